"""Multi-host runs: JAX's own multi-controller runtime, started from the
environment a launcher sets.

Every process runs the same program (``experiments/main.py``) on its own
devices; `initialize` joins them with ``jax.distributed.initialize``:

- ``launch/local.py`` starts N processes on one machine and sets
  ``FEDJAX_PFI_COORDINATOR`` (``host:port``), ``FEDJAX_PFI_NUM_PROCESSES``
  and ``FEDJAX_PFI_PROCESS_ID``; on CPU the processes talk over Gloo (JAX's
  CPU collectives).
- Under SLURM (``launch/slurm.py``: one task per host), JAX reads the
  coordinator, process count and id from SLURM's own variables.

After that ``jax.devices()`` lists every process's devices; the training
loop shards the cohort's clients over all of them, each host stacking only
its own share (`fedjax_pfi.training`).
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = 'FEDJAX_PFI_COORDINATOR'
ENV_NUM_PROCESSES = 'FEDJAX_PFI_NUM_PROCESSES'
ENV_PROCESS_ID = 'FEDJAX_PFI_PROCESS_ID'


def initialize() -> bool:
  """Joins a multi-process run if the environment describes one.

  Returns:
    True if this process is part of a multi-process run.
  """
  if ENV_NUM_PROCESSES in os.environ:
    num = int(os.environ[ENV_NUM_PROCESSES])
    if num < 2:
      return False
    pid = int(os.environ[ENV_PROCESS_ID])
    if not 0 <= pid < num:
      raise ValueError(f'{ENV_PROCESS_ID}={pid} must lie in [0, {num}).')
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=os.environ[ENV_COORDINATOR],
                               num_processes=num, process_id=pid)
    return True
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in (
      os.environ):
    _cpu_collectives()
    jax.distributed.initialize()  # SLURM cluster detection
    return True
  return False


def _cpu_collectives():
  if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def is_primary() -> bool:
  """Whether this process writes the run's files (metrics, config)."""
  return jax.process_index() == 0
