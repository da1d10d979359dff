r"""Robust aggregation under attack, client by client (issue 15).

  python -m experiments.robust_compare --workdir=/tmp/fedjax_pfi/robust
  python -m experiments.robust_compare --workdir=/tmp/fedjax_pfi/robust \
      --tables=ditto
  python -m experiments.robust_compare --workdir=/tmp/robust_small --testing

Two tables, each written to ``WORKDIR/<table>/table.md`` and ``table.json``
with a plot (``honest_accuracy.png``):

- ``femnist`` (and ``shakespeare``, the same on Shakespeare roles): every
  aggregator of `AGGREGATORS` against every attack of `ATTACKS` at
  malicious fractions `FRACTIONS` (10% and 30% of the population), FedAvg's
  round otherwise (``experiments/configs/personalization.py``: FEMNIST's
  105 writers and the 2NN, 40 rounds of 10). Columns: the honest clients'
  mean test accuracy and its 10th percentile, the attack's success (the
  backdoor's success rate on the global model; for the other attacks the
  drop of honest accuracy from the attack-free run with the same
  aggregator), and the fraction of honest clients whose accuracy the
  attack hurt significantly (one-sided exact McNemar on each client's own
  test examples at level 0.05, against that attack-free run).
- ``ditto``: the reproduction of Ditto (Li et al., ICML 2021, Table 2 and
  Figure 3): FedAvg, two robust aggregators (median, Multi-Krum), FedPer
  and Ditto, under label flipping (their A1), random Gaussian updates (A2)
  and scaled updates (A3, their model replacement) at 20%, 50% and 80%
  malicious clients, on FEMNIST. The column is the honest clients' mean
  accuracy of the model each method serves them (the personalized one for
  FedPer and Ditto).

The server's Byzantine count ``aggregator.f`` is Krum's bound ``(10 - 3) // 2
= 3`` in every run, the attack-free ones included (a server does not know
the attack's fraction; and a run and its attack-free twin then differ by
the attack alone); centered clipping's radius and
norm bounding's ``M`` are the median client update norm of a clean FEMNIST
round (0.5; BUILD_NOTES.md). Runs go to ``WORKDIR/<table>/<run>`` and are
skipped when they have finished (``report.json``).
"""

from __future__ import annotations

import json
import math
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments import tables
from experiments.configs import personalization as pfl_config
from fedjax_pfi import client_stats
from fedjax_pfi import personalization
from fedjax_pfi import training

AGGREGATORS = ('mean', 'median', 'trimmed_mean', 'krum', 'multi_krum',
               'geometric_median', 'centered_clipping', 'norm_bound')
ATTACKS = ('label_flip', 'sign_flip', 'scale', 'gaussian', 'alie', 'ipm',
           'backdoor')
FRACTIONS = (0.1, 0.3)
DITTO_METHODS = (('fedavg', 'mean'), ('fedavg', 'median'),
                 ('fedavg', 'multi_krum'), ('fedper', 'mean'),
                 ('ditto', 'mean'))
DITTO_ATTACKS = ('label_flip', 'gaussian', 'scale')
DITTO_FRACTIONS = (0.2, 0.5, 0.8)
# Median client-update L2 norm of clean rounds (robust/client_norm_median).
NORM = {'femnist': 0.5, 'shakespeare': 1.0}
ALPHA = 0.05


def config_for(dataset: str, algorithm: str, aggregator: str, attack: str,
               fraction: float, testing: bool = False):
  """One run: ``personalization.py``'s ``dataset,algorithm`` config with
  the aggregator and the attack; one evaluation, at the end."""
  c = pfl_config.get_config(f'{dataset},{algorithm}' +
                            (',testing' if testing else ''))
  c.eval_every = c.rounds
  c.personalization.finetune_epochs = 0  # held-out adaptation: not asked
  c.aggregator.name = aggregator
  n = int(c.clients_per_round)
  # The server's assumption, the same in every run (attack-free ones too,
  # so that a run and its attack-free twin differ by the attack alone):
  # the most Krum allows, (10 - 3) // 2 = 3 of 10.
  c.aggregator.f = (n - 3) // 2
  c.aggregator.tau = NORM[dataset]
  c.aggregator.norm_bound = NORM[dataset]
  c.attack.name = attack
  c.attack.fraction = fraction if attack != 'none' else 0.0
  c.evaluation.private_epsilons = ''
  return c


def run_name(algorithm, aggregator, attack, fraction) -> str:
  return f'{algorithm}-{aggregator}-{attack}-{int(round(fraction * 100))}'


def run_one(workdir: str, config) -> dict:
  """Runs (or finds finished) one run; its final metrics row."""
  if not os.path.exists(os.path.join(workdir, 'report.json')):
    training.run(config, workdir)
  return training.read_metrics(workdir)[-1]


def honest_hurt(attacked: str, clean: str, malicious: np.ndarray,
                alpha: float = ALPHA) -> tuple[float, float]:
  """Fractions of honest clients (with test data) whose personalized
  accuracy in run ``attacked`` is significantly below / above that in
  run ``clean``: one-sided exact McNemar on their own test examples."""
  a = personalization.load_clients(attacked)['personalized']
  b = personalization.load_clients(clean)['personalized']
  off = a['example_offsets']
  diff = a['example_correct'] - b['example_correct']
  def per_client(v):
    c = np.concatenate([[0.0], np.cumsum(v)])
    return (c[off[1:]] - c[off[:-1]]).astype(np.int64)
  worse, better = per_client(diff < 0), per_client(diff > 0)
  hurt, helped = client_stats.significant(worse, better, alpha)
  ids = a['client_ids']
  has = (off[1:] - off[:-1])[ids] > 0
  keep = has & ~malicious[ids]
  return float(hurt[ids][keep].mean()), float(helped[ids][keep].mean())


_POPULATION = {}


def honest_mean(workdir: str, malicious: np.ndarray) -> float:
  """The mean personalized accuracy of run ``workdir`` over the clients
  not in ``malicious`` that have test data (what `attack_metrics` reports
  for an attacked run, computed for its attack-free twin)."""
  m = personalization.load_clients(workdir)['personalized']
  keep = ~malicious[m['client_ids']] & (m['count'] > 0)
  return float(m['accuracy'][keep].mean())


def _malicious(config) -> np.ndarray:
  """The run's malicious set (`attacks.malicious_set` of its population)."""
  from fedjax_pfi import attacks  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.data import registry  # pylint: disable=g-import-not-at-top
  key = json.dumps(config.data.to_dict(), sort_keys=True, default=str)
  if key not in _POPULATION:
    _POPULATION[key] = registry.load_splits(config.data).train.num_clients
  return attacks.malicious_set(_POPULATION[key],
                               float(config.attack.fraction),
                               int(config.attack.seed))


def aggregator_table(workdir: str, dataset: str, aggregators=AGGREGATORS,
                     attacks=ATTACKS, fractions=FRACTIONS,
                     testing: bool = False) -> list[dict]:
  """Every aggregator x attack x fraction on ``dataset`` (FedAvg)."""
  rows = []
  for agg in aggregators:
    clean_cfg = config_for(dataset, 'fedavg', agg, 'none', 0.0, testing)
    clean_wd = os.path.join(workdir, run_name('fedavg', agg, 'none', 0.0))
    logging.info('robust_compare: %s clean', agg)
    clean = run_one(clean_wd, clean_cfg)
    rows.append({'aggregator': agg, 'attack': 'none', 'fraction': 0.0,
                 'honest_acc': clean['test/client_accuracy_mean'],
                 'honest_p10': clean.get('test/client_accuracy_p10'),
                 'success': None, 'hurt': 0.0, 'helped': 0.0})
    for attack in attacks:
      for fraction in fractions:
        cfg = config_for(dataset, 'fedavg', agg, attack, fraction, testing)
        wd = os.path.join(workdir, run_name('fedavg', agg, attack, fraction))
        logging.info('robust_compare: %s %s %s', agg, attack, fraction)
        try:
          last = run_one(wd, cfg)
        except training.NonFiniteLossError as e:
          rows.append({'aggregator': agg, 'attack': attack,
                       'fraction': fraction,
                       'diverged': str(e).split(';')[0]})
          continue
        acc = last.get('attack/honest/test/accuracy_mean')
        malicious = _malicious(cfg)
        success = (last.get('attack/backdoor_success/global')
                   if attack == 'backdoor' else
                   honest_mean(clean_wd, malicious) - acc)
        hurt, helped = honest_hurt(wd, clean_wd, malicious)
        rows.append({'aggregator': agg, 'attack': attack,
                     'fraction': fraction, 'honest_acc': acc,
                     'honest_p10': last.get('attack/honest/test/accuracy_p10'),
                     'success': success, 'hurt': hurt, 'helped': helped,
                     'backdoor_start': last.get(
                         'attack/backdoor_success/start')})
  return rows


def ditto_table(workdir: str, testing: bool = False) -> list[dict]:
  """Ditto's experiment on FEMNIST: each method's honest accuracy."""
  rows = []
  for algorithm, agg in DITTO_METHODS:
    method = algorithm if agg == 'mean' else f'{algorithm}+{agg}'
    clean_cfg = config_for('femnist', algorithm, agg, 'none', 0.0, testing)
    clean = run_one(os.path.join(workdir, run_name(algorithm, agg, 'none',
                                                   0.0)), clean_cfg)
    rows.append({'method': method, 'attack': 'none', 'fraction': 0.0,
                 'honest_acc': clean['test/client_accuracy_mean']})
    for attack in DITTO_ATTACKS:
      for fraction in DITTO_FRACTIONS:
        cfg = config_for('femnist', algorithm, agg, attack, fraction, testing)
        wd = os.path.join(workdir, run_name(algorithm, agg, attack, fraction))
        logging.info('robust_compare ditto: %s %s %s', method, attack,
                     fraction)
        try:
          last = run_one(wd, cfg)
          acc = last.get('attack/honest/test/accuracy_mean')
        except training.NonFiniteLossError:
          acc = float('nan')  # diverged: no model to serve
        rows.append({'method': method, 'attack': attack,
                     'fraction': fraction, 'honest_acc': acc})
  return rows


def _fmt(v, pct=True):
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return '-'
  return f'{100 * v:.1f}' if pct else f'{v:.3f}'


def write_aggregator_table(workdir: str, rows: list[dict]) -> str:
  fractions = sorted({r['fraction'] for r in rows if r['fraction']})
  lines = []
  for fraction in fractions:
    lines += [f'### {int(round(fraction * 100))}% malicious clients', '',
              '| aggregator | attack | honest acc % | honest p10 % | '
              'attack success % | honest hurt (sig.) % | helped (sig.) % |',
              '| --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
      if r['fraction'] not in (0.0, fraction):
        continue
      if 'diverged' in r:
        lines.append(f"| {r['aggregator']} | {r['attack']} | diverged | | | "
                     '| |')
        continue
      lines.append(
          f"| {r['aggregator']} | {r['attack']} | {_fmt(r['honest_acc'])} | "
          f"{_fmt(r.get('honest_p10'))} | {_fmt(r['success'])} | "
          f"{_fmt(r['hurt'])} | {_fmt(r['helped'])} |")
    lines.append('')
  _plot_aggregators(workdir, rows)
  return tables.write(workdir, lines, rows)


def _plot_aggregators(workdir: str, rows: list[dict]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  aggs = list(dict.fromkeys(r['aggregator'] for r in rows))
  atks = ['none'] + list(dict.fromkeys(r['attack'] for r in rows
                                       if r['attack'] != 'none'))
  fractions = sorted({r['fraction'] for r in rows if r['fraction']})
  fig, axes = plt.subplots(1, len(fractions), figsize=(6 * len(fractions), 4),
                           squeeze=False)
  for ax, fraction in zip(axes[0], fractions):
    grid = np.full((len(aggs), len(atks)), np.nan)
    for r in rows:
      if r['fraction'] in (0.0, fraction) and 'honest_acc' in r and \
          r['honest_acc'] is not None:
        grid[aggs.index(r['aggregator']), atks.index(r['attack'])] = \
            100 * r['honest_acc']
    im = ax.imshow(grid, vmin=0, vmax=np.nanmax(grid), cmap='viridis')
    ax.set_xticks(range(len(atks)), atks, rotation=45, ha='right')
    ax.set_yticks(range(len(aggs)), aggs)
    for i in range(len(aggs)):
      for j in range(len(atks)):
        if not np.isnan(grid[i, j]):
          ax.text(j, i, f'{grid[i, j]:.0f}', ha='center', va='center',
                  color='w', fontsize=7)
    ax.set_title(f'honest clients\' accuracy %, {int(100 * fraction)}% '
                 'malicious')
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'honest_accuracy.png'), dpi=120)
  plt.close(fig)


def write_ditto_table(workdir: str, rows: list[dict]) -> str:
  methods = list(dict.fromkeys(r['method'] for r in rows))
  cols = ['clean'] + [f'{a} {int(100 * f)}%' for a in DITTO_ATTACKS
                      for f in DITTO_FRACTIONS]
  lines = ['| method | ' + ' | '.join(cols) + ' |',
           '|' + ' --- |' * (len(cols) + 1)]
  for m in methods:
    got = {('clean' if r['attack'] == 'none' else
            f"{r['attack']} {int(round(100 * r['fraction']))}%"):
           r['honest_acc'] for r in rows if r['method'] == m}
    lines.append(f'| {m} | ' + ' | '.join(_fmt(got.get(c)) for c in cols) +
                 ' |')
  lines.append('')
  return tables.write(workdir, lines, rows)


def _define_flags():
  """Flags exist only when this module is the program."""
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_list('tables', ['femnist', 'ditto'],
                    'Tables: femnist, shakespeare, ditto.')
  flags.DEFINE_list('aggregators', list(AGGREGATORS), 'Aggregators.')
  flags.DEFINE_list('attacks', list(ATTACKS), 'Attacks.')
  flags.DEFINE_list('fractions', [str(f) for f in FRACTIONS],
                    'Malicious fractions of the aggregator tables.')
  flags.DEFINE_bool('testing', False, 'Tiny sizes (seconds).')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  unknown = [t for t in f.tables if t not in ('femnist', 'shakespeare',
                                               'ditto')]
  if unknown:  # before any run, not after the tables before it
    raise ValueError(f'unknown table(s) {unknown}; accepted: femnist, '
                     'shakespeare, ditto.')
  for table in f.tables:
    wd = os.path.join(f.workdir, table)
    os.makedirs(wd, exist_ok=True)
    if table == 'ditto':
      print(write_ditto_table(wd, ditto_table(wd, f.testing)))
    else:
      print(write_aggregator_table(wd, aggregator_table(
          wd, table, f.aggregators, f.attacks,
          tuple(float(x) for x in f.fractions), testing=f.testing)))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
