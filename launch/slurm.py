r"""SLURM launchers: a multi-host job (one task per host) and sweep arrays.

  python -m launch.slurm --nodes=4 --gpus_per_node=8 --partition=gpu \
      --workdir=/shared/runs/femnist -- \
      python -m experiments.main --config=experiments/configs/femnist_fedavg.py \
      --workdir=/shared/runs/femnist --config.execution.devices=0

writes ``<workdir>/job.sbatch`` and prints the ``sbatch`` command (``--submit``
runs it). The script starts one task per node with ``srun``; each task calls
``jax.distributed.initialize()`` (via `fedjax_pfi.distributed`), which reads
the coordinator, process count and id from SLURM's variables, and sees every
node's devices. The workdir must be on a filesystem all nodes share (the
checkpoints are written there); re-submitting resumes the run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Optional, Sequence

from absl import app
from absl import flags

def header(*, job_name: str, nodes: int, time: str, workdir: str,
           partition: Optional[str] = None, gpus: int = 0,
           cpus_per_task: int = 8, array: Optional[str] = None) -> list[str]:
  if nodes < 1:
    raise ValueError(f'--nodes must be >= 1, got {nodes}.')
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name={job_name}',
           f'#SBATCH --nodes={nodes}',
           '#SBATCH --ntasks-per-node=1',
           f'#SBATCH --cpus-per-task={cpus_per_task}',
           f'#SBATCH --time={time}',
           f'#SBATCH --output={os.path.join(workdir, "slurm-%A_%a.out" if array else "slurm-%j.out")}']
  if partition:
    lines.append(f'#SBATCH --partition={partition}')
  if gpus:
    lines.append(f'#SBATCH --gpus-per-node={gpus}')
  if array:
    lines.append(f'#SBATCH --array={array}')
  return lines + ['set -euo pipefail', f'cd {shlex.quote(os.getcwd())}']


def write_job(command: Sequence[str], workdir: str, *, nodes: int = 1,
              gpus: int = 0, cpus_per_task: int = 8,
              partition: Optional[str] = None, time: str = '24:00:00',
              job_name: str = 'fedjax_pfi') -> str:
  """Writes ``workdir/job.sbatch`` running ``command`` once per node."""
  if not command:
    raise ValueError('no command given; put it after "--".')
  os.makedirs(workdir, exist_ok=True)
  lines = header(job_name=job_name, nodes=nodes, time=time, workdir=workdir,
                 partition=partition, gpus=gpus, cpus_per_task=cpus_per_task)
  # One task per node; each joins the others via jax.distributed.
  lines.append(f'srun --ntasks={nodes} --ntasks-per-node=1 '
               f'{shlex.join(command)}')
  path = os.path.join(workdir, 'job.sbatch')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def write_array(jobs, workdir: str, *, partition: Optional[str] = None,
                time: str = '24:00:00', gpus: int = 0,
                job_name: str = 'fedjax_pfi_sweep') -> str:
  """Writes ``workdir/jobs.txt`` (one command per line) and an array job
  ``workdir/sweep.sbatch`` whose task ``i`` runs line ``i + 1``."""
  if not jobs:
    raise ValueError('the sweep has no jobs.')
  os.makedirs(workdir, exist_ok=True)
  listing = os.path.join(workdir, 'jobs.txt')
  with open(listing, 'w') as f:
    for _, cmd in jobs:
      f.write(shlex.join(cmd) + '\n')
  lines = header(job_name=job_name, nodes=1, time=time, workdir=workdir,
                 partition=partition, gpus=gpus,
                 array=f'0-{len(jobs) - 1}')
  lines.append(f'eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" '
               f'{shlex.quote(listing)})"')
  path = os.path.join(workdir, 'sweep.sbatch')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def main(argv, f):
  if not f.workdir:
    raise app.UsageError('--workdir is required.')
  path = write_job(argv[1:], f.workdir, nodes=f.nodes, gpus=f.gpus_per_node,
                   cpus_per_task=f.cpus_per_task, partition=f.partition,
                   time=f.time, job_name=f.job_name)
  print(f'sbatch {path}')
  if f.submit:
    subprocess.run(['sbatch', path], check=True)


def _define_flags():
  """The command line's flags (defined only when run as a script, so that
  `launch.sweep` can import this module beside its own flags)."""
  flags.DEFINE_integer('nodes', 1, 'Hosts (one task each).')
  flags.DEFINE_integer('gpus_per_node', 0, 'GPUs per host.')
  flags.DEFINE_integer('cpus_per_task', 8, 'CPU cores per task.')
  flags.DEFINE_string('partition', None, 'SLURM partition.')
  flags.DEFINE_string('time', '24:00:00', 'Time limit.')
  flags.DEFINE_string('job_name', 'fedjax_pfi', 'Job name.')
  flags.DEFINE_string('workdir', None, 'Where the script and SLURM logs go.')
  flags.DEFINE_bool('submit', False, 'Run sbatch on the script.')


if __name__ == '__main__':
  _define_flags()
  app.run(lambda argv: main(argv, flags.FLAGS))
