r"""Expands a grid of ``--config.*`` overrides into jobs, each with its own
workdir, and runs them as local processes or writes a SLURM array.

  python -m launch.sweep --workdir=/tmp/fedjax_pfi/sweep \
      --config=experiments/configs/synthetic_fedprox.py \
      --grid='client.learning_rate=0.01,0.03;clients_per_round=10,20' \
      --parallel=2

runs ``experiments.main`` once per point of the grid (here 4) with
``--config.client.learning_rate=... --config.clients_per_round=...`` and
``--workdir=<workdir>/client.learning_rate=0.01,clients_per_round=10`` and so
on. ``--set`` adds overrides common to every job. Every job resumes from its
workdir, so re-running the sweep finishes what is missing (finished jobs
return at once). ``--dry_run`` prints the commands.

``--slurm`` goes through submitit instead (`launch.slurm`): one job per point
as a SLURM job array (``--array=0-N%P``, ``P`` = ``--array_parallelism``),
each job on one node, requeued on preemption or time-out (it resumes from its
workdir). Without ``--submit`` it prints the sbatch script and submits
nothing; ``--cluster=local`` runs the same jobs on this machine with
submitit's local executor. submitit's logs go to ``<workdir>/submitit/``.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from typing import Sequence

from absl import app
from absl import flags

from launch import slurm

def parse_grid(spec: str) -> list[tuple[str, list[str]]]:
  """``'a=1,2;b.c=x'`` -> ``[('a', ['1', '2']), ('b.c', ['x'])]``."""
  axes = []
  for part in filter(None, (p.strip() for p in spec.split(';'))):
    key, sep, values = part.partition('=')
    vals = [v.strip() for v in values.split(',') if v.strip()]
    if not sep or not key.strip() or not vals:
      raise ValueError(f"grid axis {part!r} is not 'key=v1,v2,...'.")
    if key.strip() in [k for k, _ in axes]:
      raise ValueError(f'grid key {key.strip()!r} appears twice.')
    axes.append((key.strip(), vals))
  return axes


def expand(config: str, workdir: str, grid: str,
           common: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
  """The jobs: ``[(workdir, command), ...]``, one per point of the grid."""
  if not config or not workdir:
    raise ValueError('--config and --workdir are required.')
  for c in common:
    if '=' not in c:
      raise ValueError(f"--set {c!r} is not 'key=value'.")
  axes = parse_grid(grid)
  jobs = []
  for values in itertools.product(*(v for _, v in axes)):
    point = [f'{k}={v}' for (k, _), v in zip(axes, values)]
    name = ','.join(point) or 'default'
    job_dir = os.path.join(workdir, name.replace('/', '_'))
    cmd = ([sys.executable, '-m', 'experiments.main', f'--config={config}',
            f'--workdir={job_dir}'] +
           [f'--config.{kv}' for kv in list(common) + point])
    jobs.append((job_dir, cmd))
  return jobs


def run_local(jobs, parallel: int) -> int:
  """Runs the jobs, ``parallel`` at a time; returns how many failed."""
  if parallel < 1:
    raise ValueError(f'--parallel must be >= 1, got {parallel}.')
  pending, running, failed = list(jobs), [], 0
  while pending or running:
    while pending and len(running) < parallel:
      job_dir, cmd = pending.pop(0)
      os.makedirs(job_dir, exist_ok=True)
      log = open(os.path.join(job_dir, 'sweep.log'), 'a')
      running.append((job_dir, subprocess.Popen(cmd, stdout=log,
                                                stderr=subprocess.STDOUT),
                      log))
    job_dir, proc, log = running.pop(0)
    proc.wait()
    log.close()
    print(f'{"done" if proc.returncode == 0 else "FAILED"}: {job_dir}',
          flush=True)
    failed += proc.returncode != 0
  return failed


def run_slurm(jobs, workdir: str, resources: slurm.Resources,
              cluster: str = 'slurm', submit: bool = False) -> list:
  """The jobs as one submitit array (`launch.slurm.submit`) on ``cluster``;
  without ``submit``, prints the sbatch script instead. Returns submitit's
  jobs (none if not submitted)."""
  commands = [cmd for _, cmd in jobs]
  if not submit:
    print(slurm.preview(commands, workdir, resources))
    return []
  for job_dir, _ in jobs:
    os.makedirs(job_dir, exist_ok=True)
  return slurm.submit(commands, workdir, resources, cluster)


def main(argv, f):
  del argv
  jobs = expand(f.config, f.workdir, f.grid, f.set)
  if f.dry_run:
    for _, cmd in jobs:
      print(shlex.join(cmd))
    return
  if f.slurm:
    resources = slurm.Resources(
        nodes=1, gpus_per_node=f.gpus, cpus_per_task=f.cpus_per_task,
        partition=f.partition, time=f.time, job_name=f.job_name,
        array_parallelism=f.array_parallelism,
        max_num_timeout=f.max_num_timeout, requeue=f.requeue)
    try:
      submitted = run_slurm(jobs, f.workdir, resources.check(), f.cluster,
                            f.submit)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    sys.exit(1 if slurm.report(submitted, f.cluster) else 0)
  sys.exit(1 if run_local(jobs, f.parallel) else 0)


def _define_flags():
  """The command line's flags (defined only when run as a script, so the
  module imports beside other absl programs)."""
  flags.DEFINE_string('workdir', None, 'Root of the job workdirs.')
  flags.DEFINE_string('config', None, 'The experiment config file.')
  flags.DEFINE_string(
      'grid', '', "Semicolon-separated 'key=v1,v2,...' axes over config "
      'fields.')
  flags.DEFINE_multi_string('set', [], "'key=value' overrides for every job.")
  flags.DEFINE_integer('parallel', 1, 'Local jobs at a time.')
  flags.DEFINE_bool('slurm', False,
                    'Run the jobs as a SLURM array through submitit.')
  flags.DEFINE_bool('dry_run', False, 'Print the commands only.')
  flags.DEFINE_bool('submit', False, 'With --slurm: submit; without it, '
                    'print the sbatch script only.')
  flags.DEFINE_enum('cluster', 'slurm', list(slurm.CLUSTERS),
                    'With --slurm: slurm; local: this machine; debug: in '
                    'this process.')
  flags.DEFINE_string('partition', None, 'SLURM partition.')
  flags.DEFINE_string('time', '24:00:00',
                      f'Time limit per job ({", ".join(slurm.TIME_FORMATS)}).')
  flags.DEFINE_integer('gpus', 0, 'GPUs per job (one node each).')
  flags.DEFINE_integer('cpus_per_task', 8, 'CPU cores per job.')
  flags.DEFINE_string('job_name', 'fedjax_pfi_sweep', 'SLURM job name.')
  flags.DEFINE_integer('array_parallelism', 256,
                       'Array jobs SLURM may run at once.')
  flags.DEFINE_bool('requeue', True,
                    'Requeue jobs on preemption and time-out.')
  flags.DEFINE_integer('max_num_timeout', 3,
                       'Requeues after hitting the time limit.')


if __name__ == '__main__':
  _define_flags()
  app.run(lambda argv: main(argv, flags.FLAGS))
