r"""The trust report benchmark: what each method does to each client, beyond
its mean, on Shakespeare roles (the character model, and the pretrained
byte-level model with PEFT), FEMNIST and MovieLens-100k.

  python -m experiments.trust_report --workdir=/tmp/fedjax_pfi/trust
  python -m experiments.trust_report --workdir=/tmp/fedjax_pfi/trust --full
  python -m experiments.trust_report --workdir=/tmp/trust_small --testing

Each run is a config of ``experiments/configs/personalization.py`` (FEMNIST,
Shakespeare, MovieLens) or ``experiments/configs/shakespeare_lora.py``
(PEFT) with the trust report switched on (`configure`): group gaps by the
data's attributes (Shakespeare: the play's genre and the role's size;
MovieLens: gender, age band and size; FEMNIST: size), the local-only
reference for every run, canaries in three clients and a base task for the
text models, and for PEFT the pretrained model as the "no fine-tuning"
reference. Runs go to ``WORKDIR/<dataset>/<method>`` and resume from there.

Writes ``WORKDIR/table.md`` and ``table.json``: one table per dataset, a row
per method, with the columns of `ROW` (each method's reference is its
global model where it has one and personalizes it, else the pretrained
start for PEFT, else its local-only model); each run's workdir keeps its
``report.json`` and plots (``gain_histogram.png``, ``group_gap.png``).

Default: fewer rounds than the personalization benchmark, no held-out
roles, and a DP-FedAvg twin of FedAvg + FT on Shakespeare (`DP_SUFFIX`):
55 minutes on 2 idle CPU cores (BUILD_NOTES.md, "The trust report"). The
runs of a workdir compute each local-only reference once and share it
(``WORKDIR/reference_cache``, `fedjax_pfi.reference_cache`). ``--datasets``
runs a part. ``--full``: the personalization benchmark's rounds, every
algorithm, 100 PEFT rounds.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging

from experiments import tables
from experiments.configs import pretrain_shakespeare
from experiments.configs import personalization as pfl_config
from experiments.configs import shakespeare_lora
from fedjax_pfi import pretraining
from fedjax_pfi import training

DATASETS = ('shakespeare', 'shakespeare_peft', 'femnist', 'movielens')
# A method ending in DP_SUFFIX is that method with user-level DP-FedAvg
# (`DP`): the canaries' exposure with and without DP.
DP_SUFFIX = '_dp'
METHODS = {
    'shakespeare': ('fedavg', 'fedavg_ft', 'fedavg_ft_dp', 'local_only',
                    'fedper', 'fedrep', 'ditto', 'apfl', 'ifca'),
    'femnist': ('fedavg', 'fedavg_ft', 'local_only', 'fedper', 'fedrep',
                'ditto', 'apfl', 'ifca'),
    'movielens': ('fedavg', 'fedavg_ft', 'local_only', 'fedper', 'fedrep',
                  'ditto', 'ifca', 'fedrap'),
    'shakespeare_peft': ('fedit', 'ffa_lora', 'fedsa_lora', 'local_lora',
                         'full'),
}
FULL_METHODS = {
    'shakespeare': pfl_config.ALGORITHMS + ('fedavg_ft_dp',),
    'femnist': pfl_config.ALGORITHMS,
    'movielens': pfl_config.ALGORITHMS,
    'shakespeare_peft': shakespeare_lora.VARIANTS}
GROUPS = {'shakespeare': 'genre,size', 'shakespeare_peft': 'genre,size',
          'femnist': 'size', 'movielens': 'gender,age_band,size'}
# Text no client owns, as the base task: two plays left out of the char
# model's data (its clients are the first 100 training roles by name, of
# plays early in the alphabet); PEFT's the held-out windows of the history
# plays it was pretrained on, which its clients exclude.
CHAR_BASE_PLAYS = ('twelfth-night', 'two-gentlemen-of-verona')
# DP-FedAvg for the `DP_SUFFIX` rows: Poisson sampling at the config's
# 10 of 100 clients, noise multiplier 1 and the char model's clip norm of
# the privacy-utility table (the median client update's norm): epsilon 4.18
# by PLD at delta 1e-5 over 30 rounds (BUILD_NOTES.md).
DP = dict(mechanism='gaussian', noise_multiplier=1.0, clip_norm=1.0,
          sampling='poisson', delta=1e-5, accountant='pld')

def configure(config, dataset: str, full: bool, testing: bool) -> None:
  """Switches on the trust report for one run of ``dataset``."""
  e = config.evaluation
  e.group_by = GROUPS[dataset]
  e.alpha = 0.05
  e.private_epsilons = '1,4,inf'
  if config.algorithm != 'local_only':
    config.personalization.local_epochs = 1
  if dataset in ('shakespeare', 'shakespeare_peft'):
    e.canaries.num = 3
    e.canaries.repeats = 10
  if dataset == 'shakespeare':
    config.data.exclude_plays = CHAR_BASE_PLAYS
    e.base_task = dict(name='shakespeare', plays=CHAR_BASE_PLAYS,
                       seq_len=config.data.seq_len, min_chars=1000,
                       test_fraction=0.2, heldout_fraction=0.0)
    if testing:  # the testing clients are macbeth's and the tempest's
      config.data.exclude_plays = None
      e.base_task.plays = ('hamlet',)
      e.base_task.min_chars = 3000
  if dataset == 'shakespeare_peft':
    e.vs_start = True
    if not testing:
      e.base_task = pretrain_shakespeare.get_config().data.to_dict()
  if not full and not testing:
    if dataset == 'shakespeare':
      # no held-out roles: their adaptation was most of this config's time
      config.data.heldout_fraction = 0.0
    if dataset == 'shakespeare_peft':
      config.rounds = 30
      config.eval_every = 30
      config.checkpoint_every = 30
      config.data.heldout_fraction = 0.0
    if dataset == 'movielens':
      config.rounds = 50
      config.eval_every = 50


def config_for(dataset: str, method: str, workdir: str, full: bool,
               testing: bool):
  """The config of one row: ``method`` (with `DP_SUFFIX`, under DP) on
  ``dataset``; the runs of one ``workdir`` share their local-only
  reference (`evaluation.reference_cache`)."""
  private = method.endswith(DP_SUFFIX)
  if private:
    method = method[:-len(DP_SUFFIX)]
  if dataset == 'shakespeare_peft':
    c = shakespeare_lora.get_config(method + (',testing' if testing else ''))
    if not testing:
      c.model.pretrained = os.path.join(workdir, 'pretrained', 'model')
  else:
    c = pfl_config.get_config(f'{dataset},{method}' +
                              (',testing' if testing else ''))
  configure(c, dataset, full, testing)
  c.evaluation.reference_cache = os.path.join(workdir, 'reference_cache')
  if private:
    c.privacy.update(DP)
    if testing:  # 2 rounds of 3 of 6 clients: RDP, as the tiny configs do
      c.privacy.delta = 1e-3
      c.privacy.accountant = 'rdp'
  return c


# (column, report.json key with {ref} for the run's reference, format)
ROW = (('mean acc', 'test/client_accuracy_mean', '.3f'),
       ('p10 acc', 'test/client_accuracy_p10', '.3f'),
       ('reference', None, ''),
       ('hurt', 'vs_{ref}/hurt_fraction', '.2f'),
       ('hurt (significant)', 'vs_{ref}/hurt_significant_fraction', '.2f'),
       ('helped (significant)', 'vs_{ref}/helped_significant_fraction', '.2f'),
       ('small-client hurt (sig.)',
        'vs_{ref}/small_clients/hurt_significant_fraction', '.2f'),
       ('std change', 'vs_{ref}/spread_change/std', '+.3f'),
       ('p90-p10 change', 'vs_{ref}/spread_change/p90_p10_gap', '+.3f'),
       ('group gap change', 'vs_{ref}/group_gap_change/{group}', '+.3f'),
       ('base-task drop vs start', 'test/base_task/drop_mean', '+.3f'),
       ('eroded > 2 pts vs start', 'test/base_task/eroded_fraction', '.2f'),
       ('base-task drop vs global', 'test/base_task/drop_vs_global_mean',
        '+.3f'),
       ('eroded > 2 pts vs global', 'test/base_task/eroded_vs_global_fraction',
        '.2f'),
       ('ECE', 'test/calibration/ece_mean', '.3f'),
       ('canary exposure (holder / global)', None, ''),
       ('hurt, DP est. eps=1', 'private/vs_{ref}/eps1/hurt_fraction', '.2f'),
       ('eps=4', 'private/vs_{ref}/eps4/hurt_fraction', '.2f'),
       ('true', 'private/vs_{ref}/true_hurt_fraction', '.2f'))


def reference(report: dict, dataset: str) -> str:
  """The reference of a row: PEFT's pretrained start ("no fine-tuning"),
  else the global model, else the local-only one."""
  order = ('start', 'global', 'local') if dataset == 'shakespeare_peft' \
      else ('global', 'local')
  for ref in order:
    if f'vs_{ref}/hurt_significant_fraction' in report:
      return ref
  return ''


def table_row(dataset: str, method: str, report: dict) -> dict:
  ref = reference(report, dataset)
  group = GROUPS[dataset].split(',')[0]
  row = {'dataset': dataset, 'method': method}
  for col, key, fmt in ROW:
    if col == 'reference':
      row[col] = ref or '-'
      continue
    if key is None:  # canary exposure
      own = report.get('test/canary/exposure_mean')
      glob = report.get('global/canary/exposure_mean')
      row[col] = '-' if own is None else (
          f'{own:.1f} / {glob:.1f}' if glob is not None else f'{own:.1f}')
      continue
    v = report.get(key.format(ref=ref, group=group))
    row[col] = '-' if v is None else format(v, fmt)
  return row


def run_all(workdir: str, datasets, full: bool = False,
            testing: bool = False) -> list[dict]:
  """Runs (or resumes) every run; returns the table's rows."""
  rows = []
  for dataset in datasets:
    if dataset not in DATASETS:
      raise ValueError(f'unknown dataset {dataset!r}; accepted: '
                       f'{", ".join(DATASETS)}.')
    if dataset == 'shakespeare_peft' and not testing:
      pretraining.pretrain(pretrain_shakespeare.get_config(),
                           os.path.join(workdir, 'pretrained'))
    methods = (FULL_METHODS if full else METHODS)[dataset]
    for method in methods:
      if dataset != 'shakespeare_peft' and not pfl_config.runs_on(
          dataset, method.removesuffix(DP_SUFFIX)):
        continue
      wd = os.path.join(workdir, dataset, method)
      logging.info('trust report: %s / %s', dataset, method)
      try:
        training.run(config_for(dataset, method, workdir, full, testing), wd)
      except training.NonFiniteLossError as e:
        rows.append({'dataset': dataset, 'method': method,
                     'mean acc': 'diverged: ' + str(e).split(';')[0]})
        continue
      with open(os.path.join(wd, 'report.json')) as f:
        rows.append(table_row(dataset, method, json.load(f)))
  return rows


def write_table(workdir: str, rows: list[dict]) -> str:
  """``WORKDIR/table.md`` (a table per dataset) and ``table.json``."""
  cols = ['method'] + [c for c, _, _ in ROW]
  lines = []
  for dataset in dict.fromkeys(r['dataset'] for r in rows):
    lines += [f'### {dataset}', '', '| ' + ' | '.join(cols) + ' |',
              '|' + ' --- |' * len(cols)]
    lines += ['| ' + ' | '.join(str(r.get(c, '')) for c in cols) + ' |'
              for r in rows if r['dataset'] == dataset]
    lines.append('')
  return tables.write(workdir, lines, rows)


def _define_flags():
  """Flags exist only when this module is the program (tests import it
  beside other experiment scripts that define ``--workdir`` too)."""
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_list('datasets', list(DATASETS), 'Datasets.')
  flags.DEFINE_bool('full', False, 'The full version (hours).')
  flags.DEFINE_bool('testing', False, 'Tiny sizes (seconds).')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  write_table(f.workdir, run_all(f.workdir, f.datasets, f.full, f.testing))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
