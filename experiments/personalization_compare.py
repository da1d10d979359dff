r"""Every personalization algorithm on every dataset, compared client by client.

  python -m experiments.personalization_compare --workdir=/tmp/fedjax_pfi/pfl
  python -m experiments.personalization_compare --workdir=/tmp/pfl_small \
      --datasets=synthetic,cifar_shaped --testing

Runs ``experiments/configs/personalization.py`` for each dataset and
algorithm into ``WORKDIR/<dataset>/<algorithm>`` (each run resumes from its
workdir), then joins their per-client results (``clients_final.npz``):

- each client's personalized test accuracy under every algorithm;
- its gain over FedAvg's global model and over its own local-only model
  (the ``fedavg`` and ``local_only`` runs of the same dataset);
- the silent-failure fractions: the clients an algorithm leaves worse off
  than FedAvg, and than training alone.

Every figure covers the clients sampled in at least one round (the same
clients in every run of a dataset: sampling depends on the seed only); a
client never sampled still holds its initial personal state.

A run whose loss turns NaN gets a row saying so (the baselines must not).
Writes ``WORKDIR/table.md`` (and ``table.json``): per dataset and algorithm
the mean, 10th-percentile and worst per-client accuracy (on MovieLens each
user's HR@10: whether its one held-out item ranks in the top 10 of 100, so
per client 0 or 1, and its NDCG@10 in the next column), the fractions
hurt, held-out clients' accuracy after adaptation, and megabytes
communicated; and per dataset ``WORKDIR/<dataset>/gain_vs_fedavg.png``
(each client's gain over FedAvg against its training-set size) and
``accuracy_by_algorithm.png`` (the per-client accuracy distributions).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments import tables
from experiments.configs import personalization as pfl_config
from fedjax_pfi import participation
from fedjax_pfi import personalization
from fedjax_pfi import training
from fedjax_pfi.data import registry

NAMES = {'local_only': 'local-only', 'fedavg': 'FedAvg',
         'fedavg_ft': 'FedAvg + FT', 'fedper': 'FedPer',
         'lg_fedavg': 'LG-FedAvg', 'fedrep': 'FedRep', 'fedbabu': 'FedBABU',
         'ditto': 'Ditto', 'apfl': 'APFL', 'pfedme': 'pFedMe',
         'perfedavg_fo': 'Per-FedAvg (FO)', 'perfedavg_hf': 'Per-FedAvg (HF)',
         'ifca': 'IFCA / HypCluster', 'fedrap': 'FedRAP'}


def run_all(workdir: str, datasets, algorithms, testing: bool = False,
            configure=None) -> list[dict]:
  """Runs (or resumes) every run and returns the table's rows;
  ``configure(config)`` may adjust each run's config (tests point MovieLens
  at generated ratings). Pairs `pfl_config.runs_on` refuses are skipped
  (FedRAP runs on MovieLens only; APFL, pFedMe, Per-FedAvg everywhere else)."""
  for name in ('fedavg', 'local_only'):
    if name not in algorithms:  # the baselines every gain is measured against
      algorithms = [name] + list(algorithms)
  rows, diverged = [], []
  for dataset in datasets:
    finals, clients = {}, {}
    for alg in algorithms:
      if not pfl_config.runs_on(dataset, alg):
        continue
      config = pfl_config.get_config(
          f'{dataset},{alg}' + (',testing' if testing else ''))
      if configure is not None:
        configure(config)
      wd = os.path.join(workdir, dataset, alg)
      try:
        finals[alg] = training.run(config, wd)
      except training.NonFiniteLossError as e:  # a row saying so, not a crash
        diverged.append(dict(dataset=dataset, algorithm=alg,
                             diverged=str(e).split(';')[0]))
        continue
      clients[alg] = personalization.load_clients(wd)['personalized']
      if 'sampled' not in clients[alg]:  # written before the flag existed
        clients[alg]['sampled'] = sampled_clients(config)[
            clients[alg]['client_ids']]
    rows += dataset_rows(dataset, finals, clients)
    rows += [d for d in diverged if d['dataset'] == dataset]
    plot_dataset(os.path.join(workdir, dataset), dataset, clients)
  write_table(workdir, rows)
  return rows


def sampled_clients(config) -> np.ndarray:
  """Bool per training client: in some round's cohort (sampling depends on
  the seed, the population size and the cohort size only)."""
  return participation.ever_sampled(
      config, registry.load_splits(config.data).train.num_clients,
      config.rounds)


def dataset_rows(dataset, finals, clients) -> list[dict]:
  glob, local = clients['fedavg'], clients['local_only']
  rows = []
  for alg, mine in clients.items():
    for base in (glob, local):
      if not np.array_equal(mine['client_ids'], base['client_ids']):
        raise ValueError(f'{dataset}/{alg}: evaluated other clients than the '
                         'baselines.')
    # Clients sampled at least once (the same in every run of a dataset);
    # the others still hold their initial personal state.
    s = mine['sampled']
    acc = mine['accuracy'][s]
    f = finals[alg]
    rows.append(dict(
        dataset=dataset, algorithm=alg, clients=int(s.size),
        sampled=int(s.sum()),
        mean=float(acc.mean()), p10=float(np.percentile(acc, 10)),
        # ranking datasets: per-client NDCG@k beside HR@k
        ndcg=float(mine['ndcg'][s].mean()) if 'ndcg' in mine else None,
        worst=float(acc.min()),
        gain_vs_fedavg=float(np.mean(acc - glob['accuracy'][s])),
        hurt_vs_fedavg=float(np.mean(acc < glob['accuracy'][s])),
        hurt_vs_local=float(np.mean(acc < local['accuracy'][s])),
        heldout=f.get('heldout_adapted/client_accuracy_mean'),
        mb=(f.get('comm/download_bytes_cumulative', 0.0) +
            f.get('comm/upload_bytes_cumulative', 0.0)) / 1e6))
  return rows


def plot_dataset(directory: str, dataset: str, clients) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  glob = clients['fedavg']
  # One test item per client (MovieLens): 0/1 accuracies, shown as means.
  binary = personalization.is_binary(*(c['accuracy'] for c in
                                       clients.values()))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (alg, mine) in enumerate(clients.items()):
    if alg == 'fedavg':
      continue
    s = mine['sampled']
    personalization.plot_gain(
        ax, mine['train_size'][s], (mine['accuracy'] - glob['accuracy'])[s],
        binary, s=9, color=plt.cm.tab20(i % 20), marker='os^v'[i % 4],
        label=NAMES.get(alg, alg))
  ax.axhline(0.0, color='k', linewidth=0.8)
  ax.set_xscale('log')
  ax.set_xlabel('client training examples')
  ax.set_ylabel('accuracy gain over FedAvg' +
                (' (mean of 8 size bins)' if binary else ''))
  ax.set_title(f'{dataset}: per-client gain over FedAvg')
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(directory, 'gain_vs_fedavg.png'), dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  names = list(clients)
  accs = [clients[a]['accuracy'][clients[a]['sampled']] for a in names]
  if binary:  # a box of 0s and 1s says nothing: the mean and its std error
    means = np.array([a.mean() for a in accs])
    err = np.array([np.sqrt(m * (1 - m) / max(a.size, 1))
                    for m, a in zip(means, accs)])
    ax.bar(range(1, len(names) + 1), means, yerr=1.96 * err, capsize=3)
    ax.set_ylabel('mean per-client hit (error bars: 95% normal interval)')
  else:
    ax.boxplot(accs, whis=(10, 90))
    ax.set_ylabel('per-client test accuracy (whiskers: p10, p90)')
  ax.set_xticks(range(1, len(names) + 1),
                [NAMES.get(a, a) for a in names], rotation=30, fontsize=8)
  ax.set_title(f'{dataset}: per-client accuracy')
  fig.tight_layout()
  fig.savefig(os.path.join(directory, 'accuracy_by_algorithm.png'), dpi=110)
  plt.close(fig)


def write_table(workdir: str, rows: list[dict]) -> None:
  def fmt(v):
    return '-' if v is None else f'{v:.3f}'
  lines = ['| dataset | algorithm | clients trained | client mean | client '
           'p10 | worst | client NDCG@k | gain vs FedAvg | hurt vs FedAvg | '
           'hurt vs local-only | held-out adapted | MB sent+received |',
           '|' + ' --- |' * 12]
  for r in rows:
    if 'diverged' in r:
      lines.append(f'| {r["dataset"]} | {NAMES.get(r["algorithm"], r["algorithm"])}'
                   f' | diverged: {r["diverged"]} |' + ' |' * 9)
      continue
    lines.append(
        f'| {r["dataset"]} | {NAMES.get(r["algorithm"], r["algorithm"])} | '
        f'{r["sampled"]}/{r["clients"]} | '
        f'{fmt(r["mean"])} | {fmt(r["p10"])} | {fmt(r["worst"])} | '
        f'{fmt(r["ndcg"])} | '
        f'{r["gain_vs_fedavg"]:+.3f} | {fmt(r["hurt_vs_fedavg"])} | '
        f'{fmt(r["hurt_vs_local"])} | {fmt(r["heldout"])} | {r["mb"]:.1f} |')
  tables.write(workdir, lines, rows)


def _define_flags():
  """Flags exist only when this module is the program (tests import it
  beside other experiment scripts that define ``--workdir`` too)."""
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_list('datasets', list(pfl_config.DATASETS), 'Datasets to run.')
  flags.DEFINE_list('algorithms', list(pfl_config.ALGORITHMS),
                    'Algorithms to run.')
  flags.DEFINE_bool('testing', False, 'Tiny sizes (seconds).')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  run_all(f.workdir, f.datasets, f.algorithms, f.testing)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
