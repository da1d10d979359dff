"""The privacy-utility table's per-client join, by hand, and the clip-norm
probe on a tiny config."""

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments import privacy_utility

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clients(accuracy, count, sizes):
  return {'client_ids': np.arange(len(accuracy)),
          'accuracy': np.asarray(accuracy, float),
          'count': np.asarray(count, float),
          'train_size': np.asarray(sizes)}


def test_join_counts_hurt_only_beyond_noise():
  """Six clients of 400 test tokens: the z-test of a drop from 0.5 to 0.4
  is z = -0.1 / sqrt(0.45 * 0.55 * 2 / 400) = -2.84 (hurt at alpha 0.05);
  a drop to 0.47 gives z = -0.85 (not hurt)."""
  plain = clients([0.5] * 6, [400] * 6, [1, 2, 3, 10, 20, 30])
  private = clients([0.4, 0.4, 0.47, 0.5, 0.5, 0.47], [400] * 6,
                    [1, 2, 3, 10, 20, 30])
  z = privacy_utility.z_test_lower(np.array([160.0]), np.array([400.0]),
                                   np.array([200.0]), np.array([400.0]))
  np.testing.assert_allclose(z, -0.1 / np.sqrt(0.45 * 0.55 * 2 / 400))
  row = privacy_utility.join(private, plain, alpha=0.05)
  assert row['hurt'] == 2 / 6
  assert row['hurt_small'] == 1.0 and row['hurt_large'] == 0.0
  np.testing.assert_allclose(row['drop_small'], 0.1)
  np.testing.assert_allclose(row['client_worst'], 0.4)
  assert row['small_vs_large_p'] < 0.05
  # Terciles of sizes 1..30: small {1, 2}, large {20, 30}; their drops
  # 0.1, 0.1 against 0, 0.03: Mann-Whitney U = 4 of 4.
  assert row['drop_small_vs_large_p'] == pytest.approx(
      stats.mannwhitneyu([0.1, 0.1], [0.0, 0.03],
                         alternative='greater').pvalue)


def test_table_and_plot_are_written(tmp_path):
  rows = []
  for model in ('fedavg', 'fedit'):
    for eps, pld in (('inf', None), ('4', 3.9)):
      row = {'model': model, 'epsilon_target': eps, 'epsilon_pld': pld,
             'noise_multiplier': None if pld is None else 0.6}
      row.update(privacy_utility.join(
          clients([0.5, 0.4, 0.3], [100] * 3, [1, 5, 9]),
          clients([0.5, 0.45, 0.3], [100] * 3, [1, 5, 9]), 0.05))
      rows.append(row)
  start = {'model': 'fedit', 'epsilon_target': 'no training',
           'epsilon_pld': None, 'noise_multiplier': None,
           'hurt_vs_start': None}
  start.update(privacy_utility.join(
      clients([0.45, 0.45, 0.3], [100] * 3, [1, 5, 9]),
      clients([0.5, 0.45, 0.3], [100] * 3, [1, 5, 9]), 0.05))
  rows[-1]['hurt_vs_start'] = 0.0
  privacy_utility.write(str(tmp_path), rows + [start])
  text = (tmp_path / 'table.md').read_text()
  assert text.count('\n| fedavg |') == 2 and '| fedit | 4 | 3.90 |' in text
  assert '| fedit | no training | - |' in text
  assert text.splitlines()[-2].endswith('| 0.000 |')  # fedit, 4
  assert (tmp_path / 'privacy_utility.png').stat().st_size > 1000


def test_clip_probe_prints_the_norm_distribution():
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.clip_probe',
       '--config=experiments/configs/privacy_utility.py:testing',
       '--rounds=1'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  fractions = [float(line.split()[1]) for line in out.stdout.splitlines()
               if line.startswith('  ') and len(line.split()) == 2]
  assert len(fractions) == 25 and fractions == sorted(fractions)
  assert fractions[-1] == 1.0
  assert 'median between' in out.stdout


def test_run_all_end_to_end_with_the_starting_point(tmp_path):
  """The real loop on the non-private testing variant (the private ones run
  in tests/test_configs.py): a no-training row, evaluated on the same
  clients, and the fraction the run leaves worse than no training."""
  rows = privacy_utility.run_all(str(tmp_path), ['fedavg'], ['inf'],
                                 testing=True)
  assert [r['epsilon_target'] for r in rows] == ['no training', 'inf']
  start, plain = rows
  assert start['rounds'] == 0 and start['hurt_vs_start'] is None
  assert plain['hurt'] == 0.0  # the non-private run against itself
  assert 0.0 <= plain['hurt_vs_start'] <= 1.0
  assert start['clients'] == plain['clients'] > 0
  assert '| fedavg | no training |' in (tmp_path / 'table.md').read_text()
