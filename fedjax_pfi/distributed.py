"""Multi-host runs: JAX's own multi-controller runtime, started from the
environment a launcher sets.

Every process runs the same program (``experiments/main.py``) on its own
devices; `initialize` joins them with ``jax.distributed.initialize``:

- ``launch/local.py`` starts N processes on one machine and sets
  ``FEDJAX_PFI_COORDINATOR`` (``host:port``), ``FEDJAX_PFI_NUM_PROCESSES``
  and ``FEDJAX_PFI_PROCESS_ID``; on CPU the processes talk over Gloo (JAX's
  CPU collectives).
- Under SLURM (``launch/slurm.py``: submitit starts one task per node with
  ``srun``), JAX 0.10.2 finds its peers itself (its ``SlurmCluster``): it
  applies when every variable of `SLURM_VARIABLES` is set, as ``srun`` does
  in each task. The process count is ``SLURM_NTASKS``, the id
  ``SLURM_PROCID``, and the coordinator is the first host of
  ``SLURM_STEP_NODELIST`` on port ``61440 + SLURM_JOB_ID % 4096`` (the same
  in every task, one per job; ``JAX_COORDINATOR_PORT`` overrides it). Left
  to itself JAX would also give each process only the GPU numbered
  ``SLURM_LOCALID`` (it assumes one task per GPU); with one task per node
  `slurm_local_device_ids` keeps every GPU of the node visible.

After that ``jax.devices()`` lists every process's devices; the training
loop shards the cohort's clients over all of them, each host stacking only
its own share (`fedjax_pfi.training`).
"""

from __future__ import annotations

import os
from typing import Optional

import jax

ENV_COORDINATOR = 'FEDJAX_PFI_COORDINATOR'
ENV_NUM_PROCESSES = 'FEDJAX_PFI_NUM_PROCESSES'
ENV_PROCESS_ID = 'FEDJAX_PFI_PROCESS_ID'
#: What JAX 0.10.2's SLURM detection reads (all must be set for it to apply).
SLURM_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS',
                   'SLURM_PROCID', 'SLURM_LOCALID')


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
    missing = [v for v in SLURM_VARIABLES if v not in os.environ]
    if missing:
      verb = 'is' if len(missing) == 1 else 'are'
      raise ValueError(
          f'SLURM_NTASKS={os.environ["SLURM_NTASKS"]} asks for a multi-process '
          f'run, but {", ".join(missing)} {verb} unset: start the tasks with '
          'srun (launch/slurm.py does), or unset SLURM_NTASKS for one process.')
    _cpu_collectives()
    # Coordinator, process count and id: JAX's SLURM detection.
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids())
    return True
  return False


def slurm_local_device_ids() -> Optional[list[int]]:
  """``local_device_ids`` for ``jax.distributed.initialize`` under ``srun``.

  With one task per node (``SLURM_NTASKS == SLURM_STEP_NUM_NODES``), ``[]``:
  JAX restricts the visible GPUs only to a non-empty list, so the process
  drives every GPU of its node. Otherwise None: JAX's own choice, the GPU
  numbered ``SLURM_LOCALID`` (one task per GPU).
  """
  nodes = os.environ.get('SLURM_STEP_NUM_NODES')
  if nodes is not None and int(nodes) == int(os.environ['SLURM_NTASKS']):
    return []
  return None


def _cpu_collectives():
  if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def is_primary() -> bool:
  """Whether this process writes the run's files (metrics, config)."""
  return jax.process_index() == 0
