r"""What keeping the per-client store on the host costs a round, measured in
one process.

  python -m experiments.benchmarks.client_store_cost --cases=femnist_fedper,fedsa_lora --rounds=20

Runs each case's config twice, ``execution.client_store='device'`` (the whole
store ``[num_clients, ...]`` in the round's ``ServerState``) and ``'host'``
(numpy; the cohort's rows gathered and put on the device before each round,
copied back after it), with evaluation and checkpoints only at the last
round. Prints, per case: the store's bytes (the ``client_states`` of
``exp.algorithm.init``), the bytes one round moves with the host store
(cohort rows x row bytes x 2: there and back), the median ``time/round_s``
of each run over the rounds after the first (which compiles) and before the
last (which evaluates and checkpoints), the ratio host / device of this
run, and whether every metrics row but its ``time/`` keys is identical
between the two runs (it must be).

Cases: ``femnist_fedper`` (`experiments.configs.personalization`
``femnist,fedper``: the 2NN's personal head per writer), ``fedsa_lora``
(`experiments.configs.shakespeare_lora` ``fedsa_lora,testing``: a personal
LoRA B per role on a tiny random base), ``synthetic_fedper``
(``synthetic,fedper``). ``--testing`` takes the configs' ``,testing``
variants (tiny sizes).
"""

from __future__ import annotations

import json
import os
import tempfile

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from experiments.configs import personalization as pfl_config
from experiments.configs import shakespeare_lora
from fedjax_pfi import training
from fedjax_pfi.algorithms import param_groups


CASES = ('femnist_fedper', 'fedsa_lora', 'synthetic_fedper')


def case_config(case: str, rounds: int, testing: bool = False):
  """``case``'s config for ``rounds`` rounds, evaluated and checkpointed at
  the last round only."""
  if case == 'femnist_fedper':
    c = pfl_config.get_config('femnist,fedper' + (',testing' * testing))
  elif case == 'synthetic_fedper':
    c = pfl_config.get_config('synthetic,fedper' + (',testing' * testing))
  elif case == 'fedsa_lora':  # always the random base: no pretrained model
    c = shakespeare_lora.get_config('fedsa_lora,testing')
  else:
    raise ValueError(f'unknown case {case!r}; accepted: {", ".join(CASES)}.')
  c.rounds = rounds
  c.eval_every = rounds
  c.checkpoint_every = rounds
  c.progress = False
  return c


def store_bytes(config) -> tuple[int, int]:
  """(bytes of the whole per-client store, bytes of one client's row)."""
  exp = training.build(config)
  states = exp.algorithm.init(training.initial_params(exp)).client_states
  total = param_groups.num_bytes(states)
  leaves = jax.tree.leaves(states)
  clients = int(leaves[0].shape[0]) if leaves else 0
  return total, (total // clients if clients else 0)


def strip_time(rows) -> list[str]:
  """Each row without its ``time/`` keys, as JSON text (floats exactly;
  a NaN equals a NaN in the same place)."""
  return [json.dumps({k: v for k, v in r.items() if not k.startswith('time/')},
                     sort_keys=True) for r in rows]


def timed_run(config, where: str, workdir: str) -> tuple[float, list]:
  """Runs ``config`` with ``execution.client_store=where`` in a fresh
  ``workdir``: (median ``time/round_s`` of the rounds after the first and
  before the last, the metrics rows)."""
  if config.rounds < 3:
    raise ValueError(f'rounds={config.rounds}: at least 3 rounds are needed '
                     '(the first compiles, the last evaluates).')
  config = config.copy_and_resolve_references()
  config.execution.client_store = where
  training.run(config, workdir)
  rows = training.read_metrics(workdir)
  if len(rows) != config.rounds:
    raise RuntimeError(f'{workdir}: {len(rows)} metrics rows, expected '
                       f'{config.rounds}.')
  times = [r['time/round_s'] for r in rows[1:-1]]
  return float(np.median(times)), rows


def compare(config, workdir: str) -> dict:
  """Times ``config`` with the device store, then the host store, in
  subdirectories of ``workdir``."""
  total, row = store_bytes(config)
  device_s, device_rows = timed_run(config, 'device',
                                    os.path.join(workdir, 'device'))
  host_s, host_rows = timed_run(config, 'host', os.path.join(workdir, 'host'))
  return {
      'store_bytes': total,
      'row_bytes': row,
      'moved_bytes': config.clients_per_round * row * 2,
      'clients_per_round': config.clients_per_round,
      'device_s': device_s,
      'host_s': host_s,
      'ratio': host_s / device_s,
      'identical': strip_time(device_rows) == strip_time(host_rows),
      'rounds': config.rounds,
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  print(f'median time/round_s over rounds 2..{flags.FLAGS.rounds - 1} of '
        f'{flags.FLAGS.rounds}; jax {jax.__version__} on '
        f'{jax.default_backend()}')
  print(f'{"case":<16s} {"store B":>11s} {"row B":>9s} {"cohort":>6s} '
        f'{"moved B/round":>13s} {"device s":>9s} {"host s":>9s} '
        f'{"host/dev":>8s} {"identical":>9s}')
  for case in flags.FLAGS.cases:
    config = case_config(case, flags.FLAGS.rounds, flags.FLAGS.testing)
    with tempfile.TemporaryDirectory() as workdir:
      out = compare(config, workdir)
    print(f'{case:<16s} {out["store_bytes"]:11,d} {out["row_bytes"]:9,d} '
          f'{out["clients_per_round"]:6d} {out["moved_bytes"]:13,d} '
          f'{out["device_s"]:9.4f} {out["host_s"]:9.4f} '
          f'{out["ratio"]:8.3f} {str(out["identical"]):>9s}')


def _define_flags():
  """Flags exist only when this module is the program (tests import it
  beside other benchmarks that define the same names)."""
  flags.DEFINE_list('cases', 'femnist_fedper,fedsa_lora',
                    'Cases to run (see the module docstring).')
  flags.DEFINE_integer('rounds', 20, 'Rounds of each run.')
  flags.DEFINE_bool('testing', False,
                    "The configs' tiny ',testing' variants.")


if __name__ == '__main__':
  _define_flags()
  app.run(main)
