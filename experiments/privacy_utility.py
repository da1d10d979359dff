r"""The privacy-utility table: DP-FedAvg at several epsilons on Shakespeare by
role, and whom DP hurts, by client data size.

  python -m experiments.privacy_utility --workdir=/tmp/fedjax_pfi/privacy_utility

Runs every ``MODEL,EPSILON`` of ``experiments/configs/privacy_utility.py``
(each in ``WORKDIR/MODEL_EPSILON``, resumable), then joins them client by
client against the non-private run (``EPSILON = inf``) of the same model:

- per-client test accuracy: mean, p10 and worst;
- the fraction of clients DP *hurts*: a client is hurt when its accuracy is
  lower than in the non-private run and a one-sided two-proportion z-test
  on its test tokens rejects equality at ``--alpha`` (conservative here: the
  two models are scored on the same tokens, which the unpaired test
  ignores); by data-size tercile too;
- whether DP hurts small clients most (Bagdasaryan et al., NeurIPS 2019):
  the small and large terciles' hurt fractions compared by a two-proportion
  z-test, and their accuracy drops by a one-sided Mann-Whitney test (the
  hurt fractions also reflect each client's power to show a drop);
- a ``no training`` row per model (the model every run starts from: the
  pretrained model for ``fedit``), and for each run the fraction of clients
  it leaves worse than that (the same z-test): fine-tuning under DP can end
  below not fine-tuning at all.

Writes ``table.md``, ``table.json`` and ``privacy_utility.png``.
"""

from __future__ import annotations

import json
import math
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np
from scipy import stats

from experiments import tables
from experiments.configs import privacy_utility as pu_config
from fedjax_pfi import evaluation
from fedjax_pfi import personalization
from fedjax_pfi import training


def z_test_lower(a_correct, a_count, b_correct, b_count) -> np.ndarray:
  """One-sided two-proportion z statistic of ``a < b`` per client
  (negative: ``a`` lower), pooled variance."""
  pa, pb = a_correct / a_count, b_correct / b_count
  pooled = (a_correct + b_correct) / (a_count + b_count)
  se = np.sqrt(np.maximum(pooled * (1 - pooled) * (1 / a_count + 1 / b_count),
                          1e-30))
  return (pa - pb) / se


def normal_cdf(z: float) -> float:
  return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def join(private: dict, plain: dict, alpha: float) -> dict:
  """One table row: the private run's per-client accuracies against the
  non-private run's (`personalization.load_clients`' ``personalized``)."""
  ids = private['client_ids']
  assert np.array_equal(ids, plain['client_ids'])
  acc, count = private['accuracy'], private['count']
  correct = acc * count
  base_correct = plain['accuracy'] * plain['count']
  z = z_test_lower(correct, count, base_correct, plain['count'])
  critical = -_z_quantile(1 - alpha)
  hurt = z < critical
  helped = z > -critical
  sizes = private['train_size']
  terciles = np.quantile(sizes, [1 / 3, 2 / 3])
  group = np.digitize(sizes, terciles)  # 0 small, 1 medium, 2 large
  row = {'clients': int(ids.size),
         'client_mean': float(acc.mean()),
         'client_p10': float(np.percentile(acc, 10)),
         'client_worst': float(acc.min()),
         'hurt': float(hurt.mean()), 'helped': float(helped.mean())}
  for g, name in enumerate(('small', 'medium', 'large')):
    row[f'hurt_{name}'] = float(hurt[group == g].mean())
    row[f'drop_{name}'] = float((plain['accuracy'] - acc)[group == g].mean())
  small, large = hurt[group == 0], hurt[group == 2]
  p = np.concatenate([small, large]).mean()
  se = math.sqrt(max(p * (1 - p) * (1 / small.size + 1 / large.size), 1e-30))
  z_sl = (small.mean() - large.mean()) / se
  row['small_vs_large_z'] = float(z_sl)
  row['small_vs_large_p'] = float(1 - normal_cdf(z_sl))  # small hurt more
  # The hurt fractions mix the size of a drop with the power to see it (a
  # large client's test set detects a drop a small one's cannot), so the
  # drops themselves are compared too: one-sided Mann-Whitney, small > large.
  drop = plain['accuracy'] - acc
  small_drop, large_drop = drop[group == 0], drop[group == 2]
  row['drop_small_vs_large_p'] = (
      float(stats.mannwhitneyu(small_drop, large_drop,
                               alternative='greater').pvalue)
      if np.ptp(np.concatenate([small_drop, large_drop])) > 0 else 1.0)
  row['size_terciles'] = [float(t) for t in terciles]
  return row


def _z_quantile(q: float) -> float:
  """The standard normal quantile (bisection on `normal_cdf`)."""
  lo, hi = -10.0, 10.0
  for _ in range(100):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if normal_cdf(mid) < q else (lo, mid)
  return (lo + hi) / 2


def starting_point(config) -> dict:
  """Each client's test accuracy with the model every run starts from (the
  pretrained model with zero adapters for ``fedit``; the random
  initialisation for ``fedavg``), in `personalization.load_clients`' form."""
  exp = training.build(config)
  params = training.initial_params(exp)
  view = exp.algorithm.eval_view(exp.algorithm.init(params),
                                 exp.algorithm.frozen_part(params))
  c = exp.config
  m = evaluation.Evaluator(exp.algorithm.eval_model or exp.model,
                           c.eval_batch_size, c.eval_clients_per_chunk,
                           combine=exp.algorithm.combine).evaluate(
                               view.params, exp.splits.test)
  return {'client_ids': m.client_ids, 'accuracy': m.accuracy,
          'count': m.count,
          'train_size': exp.splits.train.client_sizes[m.client_ids]}


def run_all(workdir: str, models, epsilons, *, testing: bool = False,
            alpha: float = 0.05) -> list[dict]:
  rows = []
  for model in models:
    finals = {}
    for eps in ('inf',) + tuple(e for e in epsilons if e != 'inf'):
      variant = f'{model},{eps}' + (',testing' if testing else '')
      config = pu_config.get_config(variant)
      config.progress = False
      wd = os.path.join(workdir, f'{model}_{eps}')
      print(f'{variant}: {wd}', flush=True)
      final = training.run(config, wd)
      with open(os.path.join(wd, 'report.json')) as f:
        finals[eps] = (final, json.load(f),
                       personalization.load_clients(wd)['personalized'])
    _, _, plain = finals['inf']
    start = starting_point(pu_config.get_config(
        f'{model},inf' + (',testing' if testing else '')))
    rows.append({'model': model, 'epsilon_target': 'no training',
                 'epsilon_pld': None, 'epsilon_rdp': None,
                 'noise_multiplier': None, 'clip_norm': None,
                 'sampling_rate': None, 'rounds': 0,
                 **join(start, plain, alpha), 'hurt_vs_start': None})
    for eps, (final, report, clients) in finals.items():
      row = {'model': model, 'epsilon_target': eps,
             'epsilon_pld': report.get('privacy/epsilon_pld'),
             'epsilon_rdp': report.get('privacy/epsilon_rdp'),
             'noise_multiplier': report.get('privacy/noise_multiplier'),
             'clip_norm': report.get('privacy/clip_norm_initial'),
             'sampling_rate': report.get('privacy/sampling_rate'),
             'rounds': final['round']}
      row.update(join(clients, plain, alpha))
      # Worse than not training at all (the pretrained model, for fedit)?
      row['hurt_vs_start'] = join(clients, start, alpha)['hurt']
      rows.append(row)
  write(workdir, rows)
  return rows


def write(workdir: str, rows: list[dict]) -> None:
  def fmt(v, digits=3):
    return '-' if v is None else f'{v:.{digits}f}'
  lines = ['| model | target eps | eps (PLD) | noise mult. | clients | client '
           'mean | p10 | worst | hurt (z-test) | hurt small / medium / large '
           '| acc. drop small / large | small hurt more: p (hurt; drop) | '
           'worse than no training |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- '
           '| --- | --- |']
  for r in rows:
    lines.append(
        f'| {r["model"]} | {r["epsilon_target"]} | {fmt(r["epsilon_pld"], 2)} '
        f'| {fmt(r["noise_multiplier"], 3)} | {r["clients"]} | '
        f'{fmt(r["client_mean"])} | {fmt(r["client_p10"])} | '
        f'{fmt(r["client_worst"])} | {fmt(r["hurt"])} | '
        f'{fmt(r["hurt_small"])} / {fmt(r["hurt_medium"])} / '
        f'{fmt(r["hurt_large"])} | {fmt(r["drop_small"])} / '
        f'{fmt(r["drop_large"])} | {fmt(r["small_vs_large_p"], 3)}; '
        f'{fmt(r.get("drop_small_vs_large_p"), 3)} | '
        f'{fmt(r.get("hurt_vs_start"))} |')
  tables.write(workdir, lines, rows)
  plot(workdir, rows)


def plot(workdir: str, rows: list[dict]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for model in sorted({r['model'] for r in rows}):
    mine = [r for r in rows if r['model'] == model and
            r['epsilon_target'] != 'no training']
    x = [r['epsilon_pld'] if r['epsilon_pld'] is not None else 32.0
         for r in mine]  # the non-private run drawn at the right
    line, = axes[0].plot(x, [r['client_mean'] for r in mine], 'o-',
                         label=f'{model} mean')
    for r in rows:
      if r['model'] == model and r['epsilon_target'] == 'no training':
        axes[0].axhline(r['client_mean'], color=line.get_color(), ls=':',
                        label=f'{model}: no training')
    axes[0].plot(x, [r['client_p10'] for r in mine], 's--',
                 label=f'{model} p10')
    for size, style in (('small', 'o-'), ('large', '^--')):
      axes[1].plot(x, [r[f'hurt_{size}'] for r in mine], style,
                   label=f'{model}, {size} clients')
  for ax in axes:
    ax.set_xscale('log', base=2)
    ax.set_xlabel('epsilon (PLD, delta 1e-5; right: no DP)')
    ax.legend(fontsize=7)
  axes[0].set_ylabel('per-client test accuracy')
  axes[1].set_ylabel('fraction of clients DP hurts (z-test)')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'privacy_utility.png'), dpi=120)
  plt.close(fig)


_WORKDIR = _MODELS = _EPSILONS = _TESTING = _ALPHA = None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  run_all(_WORKDIR.value, _MODELS.value, tuple(_EPSILONS.value),
          testing=_TESTING.value, alpha=_ALPHA.value)


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', '/tmp/fedjax_pfi/privacy_utility',
                                 'One subdirectory per run, and the table.')
  _MODELS = flags.DEFINE_list('models', list(pu_config.MODELS), 'Models.')
  _EPSILONS = flags.DEFINE_list('epsilons', list(pu_config.EPSILONS),
                                'Target epsilons (inf: no DP).')
  _TESTING = flags.DEFINE_bool('testing', False, 'Tiny runs, in seconds.')
  _ALPHA = flags.DEFINE_float('alpha', 0.05, 'Level of the per-client test.')
  app.run(main)
