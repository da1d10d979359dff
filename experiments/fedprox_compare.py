r"""FedProx (mu = 1) vs FedAvg on Synthetic(1,1) with stragglers: runs and table.

  python -m experiments.fedprox_compare --workdir=/tmp/fedjax_pfi/fedprox_compare

Runs the ``fedavg`` (stragglers dropped), ``fedprox0`` (mu = 0, partial work
kept) and ``fedprox`` (mu = 1, partial work kept) variants of
``experiments/configs/synthetic_fedprox.py``, evaluating the global model on
all devices' training data every round (the loss the FedProx paper plots), and
prints per variant: final and best training loss, test accuracy, and two
stability measures over the second half of training: the standard deviation
of the loss and the mean absolute round-to-round change.
Re-running resumes each variant from its workdir.
"""

import os

from absl import app
from absl import flags
import numpy as np

from experiments.configs import synthetic_fedprox
from fedjax_pfi import training

VARIANTS = ('fedavg', 'fedprox0', 'fedprox')


def summarize_run(rows):
  loss = np.array([r['trainset/loss'] for r in rows])
  half = loss[len(loss) // 2:]
  return {
      'final_loss': loss[-1], 'best_loss': loss.min(),
      'std_2nd_half': half.std(),
      'mean_abs_change_2nd_half': np.abs(np.diff(half)).mean(),
      'test_accuracy': rows[-1]['test/accuracy'],
  }


def main(argv):
  del argv
  results = {}
  for variant in VARIANTS:
    config = synthetic_fedprox.get_config(variant)
    config.rounds = _ROUNDS.value
    config.seed = _SEED.value
    config.stragglers.fraction = _STRAGGLERS.value
    config.eval_every = 1
    config.eval_train = True
    config.progress = False
    workdir = os.path.join(_WORKDIR.value, variant)
    training.run(config, workdir)
    results[variant] = summarize_run(training.read_metrics(workdir))
  keys = list(next(iter(results.values())))
  print(f'Synthetic(1,1), {_STRAGGLERS.value:.0%} stragglers, '
        f'{_ROUNDS.value} rounds, seed {_SEED.value}')
  print(f'{"variant":10s}' + ''.join(f'{k:>26s}' for k in keys))
  for variant, res in results.items():
    print(f'{variant:10s}' + ''.join(f'{res[k]:26.4f}' for k in keys))


if __name__ == '__main__':
  # Flags exist only when this module is the program, so that tests
  # can import experiment modules side by side.
  _WORKDIR = flags.DEFINE_string('workdir', '/tmp/fedjax_pfi/fedprox_compare',
                                 'Parent directory of the three runs.')
  _ROUNDS = flags.DEFINE_integer('rounds', 200, 'Rounds per run.')
  _STRAGGLERS = flags.DEFINE_float('stragglers', 0.9, 'Straggler fraction.')
  _SEED = flags.DEFINE_integer('seed', 0, 'Seed of cohort sampling and data.')
  app.run(main)
