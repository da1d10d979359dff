r"""SLURM launches through submitit: a multi-host job (one task per node) and
job arrays for sweeps.

  python -m launch.slurm --nodes=4 --gpus_per_node=8 --partition=gpu \
      --workdir=/shared/runs/femnist --submit -- \
      python -m experiments.main --config=experiments/configs/femnist_fedavg.py \
      --workdir=/shared/runs/femnist --config.execution.devices=0

submits the command with submitit (``submitit==1.5.4``): its sbatch script
asks for ``--nodes`` nodes with one task each and starts the tasks with
``srun``; each task runs the command as a subprocess (`Command`) in the
directory it was submitted from. Each task calls ``jax.distributed.initialize``
(via `fedjax_pfi.distributed`), which reads the coordinator, process count and
id from the variables ``srun`` sets, and sees every device of its node.
Without ``--submit`` the script submitit would write is printed and nothing is
submitted. Logs go to ``<workdir>/submitit/<job id>/``.

Preemption and time limits: SLURM sends ``SIGUSR2`` 90 s before it stops the
job (``#SBATCH --signal=USR2@90``); submitit then requeues it
(``scontrol requeue``) and the requeued job runs the same command again, which
resumes from the checkpoints in its workdir. Preemptions requeue without
limit, time-outs at most ``--max_num_timeout`` times; ``--norequeue`` turns
both off. The workdir must be on a filesystem all nodes share.

``--cluster=local`` runs the same job on this machine with submitit's
`LocalExecutor` (``--nodes`` tasks, joined like ``launch/local.py`` through
``FEDJAX_PFI_*``), and ``--cluster=debug`` in this process.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from typing import NamedTuple, Optional, Sequence

from absl import app
from absl import flags
import submitit

CLUSTERS = ('slurm', 'local', 'debug')
TIME_FORMATS = ('M', 'M:S', 'H:M:S', 'D-H', 'D-H:M', 'D-H:M:S')


class Resources(NamedTuple):
  """What every job of a submission asks for.

  Attributes:
    nodes: hosts, one task each.
    gpus_per_node: GPUs per host (``--gpus-per-node``; 0 asks for none).
    cpus_per_task: CPU cores per task.
    partition: SLURM partition, or None for the cluster's default.
    time: time limit in one of SLURM's formats (`TIME_FORMATS`).
    job_name: SLURM job name.
    array_parallelism: array tasks SLURM may run at once (``--array=0-N%P``).
    max_num_timeout: how many times a job that hits its time limit is
      requeued (submitit's ``slurm_max_num_timeout``).
    requeue: requeue on preemption and time-out (``#SBATCH --requeue``);
      False gives ``--no-requeue`` and jobs that are not checkpointable.
  """
  nodes: int = 1
  gpus_per_node: int = 0
  cpus_per_task: int = 8
  partition: Optional[str] = None
  time: str = '24:00:00'
  job_name: str = 'fedjax_pfi'
  array_parallelism: int = 256
  max_num_timeout: int = 3
  requeue: bool = True

  def check(self) -> 'Resources':
    """Returns self; raises ValueError naming the first bad field."""
    for name, low in (('nodes', 1), ('gpus_per_node', 0), ('cpus_per_task', 1),
                      ('array_parallelism', 1), ('max_num_timeout', 0)):
      value = getattr(self, name)
      if not isinstance(value, int) or value < low:
        raise ValueError(f'--{name} must be an integer >= {low}, got {value!r}.')
    minutes(self.time)
    return self


def minutes(time: str) -> int:
  """A SLURM time limit (``'90'``, ``'24:00:00'``, ``'2-12'``...) in whole
  minutes, rounded up; submitit counts time-outs in minutes."""
  m = re.fullmatch(r'(?:(\d+)-)?(\d+(?::\d+){0,2})', str(time).strip())
  parts = [int(p) for p in m[2].split(':')] if m else []
  if m and m[1] is not None:  # D-H, D-H:M, D-H:M:S
    h, mi, s = (parts + [0, 0])[:3]
    seconds = ((int(m[1]) * 24 + h) * 60 + mi) * 60 + s
  elif len(parts) == 3:  # H:M:S
    seconds = (parts[0] * 60 + parts[1]) * 60 + parts[2]
  elif parts:  # M or M:S
    seconds = parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)
  else:
    seconds = 0
  if seconds <= 0:
    raise ValueError(f'--time={time!r} is not a positive SLURM time limit; '
                     f'accepted formats: {", ".join(TIME_FORMATS)}.')
  return math.ceil(seconds / 60)


def slurm_parameters(resources: Resources) -> dict:
  """`submitit.SlurmExecutor`'s parameters: the sbatch directives."""
  resources.check()
  params = dict(job_name=resources.job_name, nodes=resources.nodes,
                ntasks_per_node=1, cpus_per_task=resources.cpus_per_task,
                time=minutes(resources.time),
                array_parallelism=resources.array_parallelism,
                additional_parameters={
                    'requeue' if resources.requeue else 'no_requeue': True})
  if resources.gpus_per_node:
    params['gpus_per_node'] = resources.gpus_per_node
  if resources.partition:
    params['partition'] = resources.partition
  return params


def log_folder(workdir: str) -> str:
  """Where submitit keeps a submission's pickles and logs (``%j``: job id)."""
  return os.path.join(os.path.abspath(workdir), 'submitit', '%j')


class Command:
  """A command line run as a subprocess by each task of a submitit job.

  Like ``submitit.helpers.CommandFunction``, but the output goes straight to
  the task's log (submitit's ``stdout``/``stderr`` files) and the job is
  checkpointable: on preemption or time-out `checkpoint` hands submitit the
  same command, which it requeues; the command resumes from its workdir.
  A nonzero exit raises ``subprocess.CalledProcessError`` (the job fails).

  Args:
    command: the command line.
    cwd: where it runs; default: the directory it is submitted from.
    requeue: whether `checkpoint` requeues it.
    env: variables added to the command's environment.
    rank_env: a variable set to the task's rank (submitit's
      ``JobEnvironment().global_rank``).
  """

  def __init__(self, command: Sequence[str], cwd: Optional[str] = None,
               requeue: bool = True, env: Optional[dict] = None,
               rank_env: Optional[str] = None):
    if not command or not all(isinstance(c, str) for c in command):
      raise ValueError(f'no command given (got {command!r}); put it after '
                       '"--".')
    self.command = list(command)
    self.cwd = cwd or os.getcwd()
    self.requeue = requeue
    self.env = dict(env or {})
    self.rank_env = rank_env

  def __call__(self) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, **self.env)
    if self.rank_env:
      env[self.rank_env] = str(submitit.JobEnvironment().global_rank)
    proc = subprocess.Popen(self.command, cwd=self.cwd, env=env,
                            preexec_fn=_ignore_preemption_signal)
    try:
      code = proc.wait()
    finally:  # requeue (SystemExit), cancel (KeyboardInterrupt), ...
      if proc.poll() is None:
        proc.terminate()
        try:
          proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
    if code:
      raise subprocess.CalledProcessError(code, self.command)
    return code

  def checkpoint(self) -> Optional[submitit.helpers.DelayedSubmission]:
    """Called by submitit on ``SIGUSR2`` (task 0 only): the same command
    again, or None (no requeue) when `requeue` is off."""
    return submitit.helpers.DelayedSubmission(self) if self.requeue else None


def _ignore_preemption_signal():
  # SLURM may signal every process of the step; the command must not die of
  # submitit's signal before submitit has requeued the job.
  signal.signal(getattr(signal, 'SIG' + submitit.JobEnvironment.USR_SIG),
                signal.SIG_IGN)


class _ScriptOnly(submitit.SlurmExecutor):
  """SLURM's executor where no ``srun`` is installed: writes no file and
  submits nothing, only builds the sbatch script."""

  @classmethod
  def affinity(cls) -> int:
    return 2


def sbatch_script(workdir: str, resources: Resources, array: int = 1) -> str:
  """The sbatch script submitit writes for ``array`` jobs (an array if > 1)."""
  ex = _ScriptOnly(log_folder(workdir),
                   max_num_timeout=resources.max_num_timeout)
  ex.update_parameters(**slurm_parameters(resources))
  if array > 1:
    ex.parameters['map_count'] = array  # as submitit's array submission does
  return ex._make_submission_file_text(ex._submitit_command_str, 'preview')  # pylint: disable=protected-access


def preview(commands: Sequence[Sequence[str]], workdir: str,
            resources: Resources) -> str:
  """The sbatch script and what each job's tasks run."""
  commands = _check_commands(commands)
  lines = [sbatch_script(workdir, resources, len(commands)).rstrip(), '',
           f'# Each task runs, in {os.getcwd()}:']
  for i, cmd in enumerate(commands):
    who = f'array task {i}: ' if len(commands) > 1 else ''
    lines.append(f'#   {who}{shlex.join(cmd)}')
  lines.append('# Not submitted (pass --submit).')
  return '\n'.join(lines)


def executor(workdir: str, resources: Resources,
             cluster: str = 'slurm') -> submitit.Executor:
  """A submitit executor for ``cluster`` (`CLUSTERS`): SLURM, this machine
  (one local task per node) or this process."""
  resources.check()
  folder = log_folder(workdir)
  if cluster == 'slurm':
    if shutil.which('srun') is None:
      raise ValueError('--cluster=slurm needs SLURM (no srun on PATH): '
                       'submit from a cluster login node, run here with '
                       '--cluster=local, or leave out --submit to print the '
                       'script.')
    ex = submitit.SlurmExecutor(folder,
                                max_num_timeout=resources.max_num_timeout)
    ex.update_parameters(**slurm_parameters(resources))
  elif cluster == 'local':
    ex = submitit.LocalExecutor(folder,
                                max_num_timeout=resources.max_num_timeout)
    ex.update_parameters(timeout_min=minutes(resources.time), nodes=1,
                         tasks_per_node=resources.nodes,
                         gpus_per_node=resources.gpus_per_node)
  elif cluster == 'debug':
    if resources.nodes != 1:
      raise ValueError(f'--cluster=debug runs one task in this process; got '
                       f'--nodes={resources.nodes}.')
    ex = submitit.DebugExecutor(folder)
  else:
    raise ValueError(f'--cluster must be one of {", ".join(CLUSTERS)}; got '
                     f'{cluster!r}.')
  return ex


def submit(commands: Sequence[Sequence[str]], workdir: str,
           resources: Resources, cluster: str = 'slurm') -> list:
  """Submits one job per command (a job array if more than one); returns
  submitit's jobs."""
  commands = _check_commands(commands)
  ex = executor(workdir, resources, cluster)
  calls = [Command(cmd, requeue=resources.requeue,
                   **_local_peers(cluster, resources.nodes))
           for cmd in commands]
  with ex.batch():
    jobs = [ex.submit(call) for call in calls]
  return jobs


def wait(jobs) -> int:
  """Waits for the jobs; prints each one's outcome; returns how many failed."""
  failed = 0
  for job in jobs:
    try:
      job.results()
      print(f'done: job {job.job_id}', flush=True)
    except Exception as e:  # pylint: disable=broad-except
      failed += 1
      last = (str(e).strip().splitlines() or [repr(e)])[-1]
      print(f'FAILED: job {job.job_id}: {last} (log {job.paths.stdout})',
            flush=True)
  return failed


def report(jobs, cluster: str) -> int:
  """After `submit`: SLURM's job ids and logs, or (local, debug) the outcome
  of each job once finished. Returns how many failed."""
  if cluster != 'slurm':
    return wait(jobs)
  for job in jobs:
    print(f'submitted job {job.job_id}: log {job.paths.stdout}', flush=True)
  return 0


def _check_commands(commands):
  commands = [list(c) for c in commands]
  if not commands or not all(commands):
    raise ValueError('no command given; put it after "--".')
  return commands


def _local_peers(cluster: str, nodes: int) -> dict:
  """For several local tasks, `Command`'s arguments that join them as
  `fedjax_pfi.distributed` expects (like ``launch/local.py``); under SLURM
  JAX reads SLURM's own variables instead."""
  if cluster != 'local' or nodes == 1:
    return {}
  from fedjax_pfi import distributed  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  return dict(env={distributed.ENV_COORDINATOR: f'localhost:{port}',
                   distributed.ENV_NUM_PROCESSES: str(nodes)},
              rank_env=distributed.ENV_PROCESS_ID)


def resources_from_flags(f) -> Resources:
  return Resources(nodes=f.nodes, gpus_per_node=f.gpus_per_node,
                   cpus_per_task=f.cpus_per_task, partition=f.partition,
                   time=f.time, job_name=f.job_name,
                   max_num_timeout=f.max_num_timeout, requeue=f.requeue)


def main(argv, f):
  if not f.workdir:
    raise app.UsageError('--workdir is required.')
  commands = [argv[1:]]
  try:
    resources = resources_from_flags(f).check()
    if not f.submit:
      print(preview(commands, f.workdir, resources))
      return
    jobs = submit(commands, f.workdir, resources, f.cluster)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  sys.exit(1 if report(jobs, f.cluster) else 0)


def _define_flags():
  """The command line's flags (defined only when run as a script, so that
  `launch.sweep` can import this module beside its own flags)."""
  flags.DEFINE_integer('nodes', 1, 'Hosts (one task each).')
  flags.DEFINE_integer('gpus_per_node', 0, 'GPUs per host (0: none).')
  flags.DEFINE_integer('cpus_per_task', 8, 'CPU cores per task.')
  flags.DEFINE_string('partition', None, 'SLURM partition.')
  flags.DEFINE_string('time', '24:00:00',
                      f'Time limit ({", ".join(TIME_FORMATS)}).')
  flags.DEFINE_string('job_name', 'fedjax_pfi', 'Job name.')
  flags.DEFINE_string('workdir', None,
                      'submitit writes its logs under <workdir>/submitit/.')
  flags.DEFINE_enum('cluster', 'slurm', list(CLUSTERS),
                    'slurm; local: this machine, one task per node; debug: '
                    'in this process.')
  flags.DEFINE_bool('submit', False,
                    'Submit; without it, print the sbatch script only.')
  flags.DEFINE_bool('requeue', True,
                    'Requeue on preemption and time-out (the command resumes '
                    'from its workdir).')
  flags.DEFINE_integer('max_num_timeout', 3,
                       'Requeues after hitting the time limit.')


if __name__ == '__main__':
  # Jobs pickle `Command` by reference: take it from `launch.slurm`, not from
  # ``__main__``, so that the tasks import it.
  from launch import slurm  # pylint: disable=g-import-not-at-top
  slurm._define_flags()  # pylint: disable=protected-access
  app.run(lambda argv: slurm.main(argv, flags.FLAGS))
