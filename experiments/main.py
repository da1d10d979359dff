r"""The entry point: one federated experiment from an ml_collections config.

  python -m experiments.main --config=experiments/configs/shakespeare_fedavg.py \
      --workdir=/tmp/shakespeare_fedavg

Any field can be overridden: ``--config.rounds=50 --config.client.learning_rate=0.5``.
A config file may take a parameter after a colon: ``--config=...py:testing``
selects its tiny testing variant. Re-running the same command resumes from the
workdir's newest checkpoint and finishes with exactly the metrics of an
uninterrupted run.

Multi-host: ``python -m launch.local --num_processes=2 -- <this command>``
(one machine) or ``launch/slurm.py`` (a cluster) start one such process per
host; `fedjax_pfi.distributed` joins them.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_pfi import config as config_lib
from fedjax_pfi import distributed
from fedjax_pfi import training


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  distributed.initialize()  # a multi-host run, if a launcher set one up
  config = _CONFIG.value
  logging.info('config:\n%s', config)
  final = training.run(config, _WORKDIR.value)
  if not distributed.is_primary():
    return
  keys = sorted(k for k in final if k.startswith(('test/', 'heldout/')) or
                k == 'train_loss')
  # the round the figures are from: a workdir holding more rounds than
  # asked runs nothing and reports its newest (training.run warns)
  print('final metrics (round {}):'.format(final.get('round', 0)))
  for k in keys:
    print(f'  {k:34s} {final[k]:.4f}')


if __name__ == '__main__':
  # Flags exist only when this module is the program, so that tests
  # can import experiment modules side by side.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'Path to an experiment config (experiments/configs/*.py).',
      **config_lib.COMMAND_LINE)
  _WORKDIR = flags.DEFINE_string('workdir', None,
                                 'Directory for metrics, TensorBoard and '
                                 'checkpoints; re-using it resumes the run.')
  flags.mark_flags_as_required(['config', 'workdir'])
  # --config.retrieval.lambda: a keyword, which ml_collections parses only
  # as a subscript
  sys.argv = config_lib.command_line(sys.argv)
  app.run(main)
