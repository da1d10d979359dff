"""`launch.slurm` and `launch.sweep --slurm` run for real on submitit's local
executor: the same `Command` and submission code as on SLURM, with the tasks
started as processes of this machine."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import slurm
from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # where the tasks import `launch.slurm` from


def python(tmp_path, name, code):
  path = tmp_path / name
  path.write_text(code)
  return [sys.executable, str(path)]


def test_two_task_job_each_task_has_its_rank(tmp_path):
  cmd = python(tmp_path, 'rank.py', f"""
import json, os, submitit
env = submitit.JobEnvironment()
with open(os.path.join({str(tmp_path)!r}, f'rank{{env.global_rank}}.json'),
          'w') as f:
  json.dump(dict(rank=env.global_rank, tasks=env.num_tasks, cwd=os.getcwd(),
                 **{{k: v for k, v in os.environ.items()
                    if k.startswith('FEDJAX_PFI_')}}), f)
print('task', env.global_rank, 'ran')
""")
  jobs = slurm.submit([cmd], str(tmp_path), slurm.Resources(nodes=2), 'local')
  assert len(jobs) == 1 and slurm.wait(jobs) == 0
  assert jobs[0].results() == [0, 0]
  seen = [json.loads((tmp_path / f'rank{i}.json').read_text())
          for i in (0, 1)]
  assert [s['rank'] for s in seen] == [0, 1]
  assert all(s['tasks'] == 2 and s['cwd'] == ROOT for s in seen)
  # The local tasks are joined the way launch/local.py joins its processes.
  assert [s['FEDJAX_PFI_PROCESS_ID'] for s in seen] == ['0', '1']
  assert all(s['FEDJAX_PFI_NUM_PROCESSES'] == '2' for s in seen)
  assert seen[0]['FEDJAX_PFI_COORDINATOR'] == seen[1]['FEDJAX_PFI_COORDINATOR']
  # Each task's output reaches its own submitit log.
  assert 'task 1 ran' in jobs[0].task(1).stdout()
  assert str(jobs[0].paths.folder).startswith(str(tmp_path / 'submitit'))


def test_sweep_array_runs_each_job_once(tmp_path):
  cmd = python(tmp_path, 'point.py', """
import os, sys
with open(os.path.join(sys.argv[1], 'out.txt'), 'a') as f:
  f.write(sys.argv[2] + '\\n')
""")
  jobs = [(str(tmp_path / f'lr={lr}'), cmd + [str(tmp_path / f'lr={lr}'), lr])
          for lr in ('0.1', '0.2', '0.3')]
  submitted = sweep.run_slurm(jobs, str(tmp_path), slurm.Resources(),
                              cluster='local', submit=True)
  assert len(submitted) == 3 and slurm.wait(submitted) == 0
  for d, cmd in jobs:
    assert (tmp_path / d / 'out.txt').read_text() == cmd[-1] + '\n'
  assert len({j.job_id for j in submitted}) == 3


def test_preempted_job_is_requeued_and_resumes(tmp_path):
  # Five steps of "work", each recorded in the workdir. The first attempt
  # stalls after step 2 until it is preempted; the requeued attempt starts
  # the same command again, which continues from step 3.
  state = tmp_path / 'state.json'
  cmd = python(tmp_path, 'work.py', f"""
import json, os, time
path = {str(state)!r}
s = json.load(open(path)) if os.path.exists(path) else dict(steps=[], pids=[])
s['pids'].append([os.getpid(), os.getppid()])
def save():
  json.dump(s, open(path + '.tmp', 'w'))
  os.replace(path + '.tmp', path)
save()
while len(s['steps']) < 5:
  s['steps'].append(len(s['steps']) + 1)
  save()
  if len(s['pids']) == 1 and len(s['steps']) == 2:
    time.sleep(60)
""")
  [job] = slurm.submit([cmd], str(tmp_path), slurm.Resources(), 'local')
  deadline = time.time() + 60
  while not (state.exists() and
             len(json.loads(state.read_text())['steps']) == 2):
    assert time.time() < deadline, job.stderr()
    time.sleep(0.05)
  [[pid, task]] = json.loads(state.read_text())['pids']
  # SLURM signals the step's processes: the command first (it must survive
  # the signal), then the task, whose handler checkpoints and requeues.
  os.kill(pid, signal.SIGUSR2)
  time.sleep(0.3)
  os.kill(task, signal.SIGUSR2)
  assert job.result() == 0
  final = json.loads(state.read_text())
  assert final['steps'] == [1, 2, 3, 4, 5]
  assert len(final['pids']) == 2  # two attempts of the same command
  assert 'Requeued job' in job.stdout()
  with pytest.raises(ProcessLookupError):  # the stalled attempt was stopped
    os.kill(pid, 0)


def test_failing_command_fails_the_job(tmp_path):
  cmd = [sys.executable, '-c', 'import sys; sys.exit(3)']
  jobs = slurm.submit([cmd], str(tmp_path), slurm.Resources(), 'local')
  assert slurm.wait(jobs) == 1
  assert 'returned non-zero exit status 3' in str(jobs[0].exception())


def test_debug_cluster_runs_in_this_process(tmp_path):
  out = tmp_path / 'out.txt'
  cmd = [sys.executable, '-c', f'open({str(out)!r}, "w").write("ok")']
  jobs = slurm.submit([cmd], str(tmp_path), slurm.Resources(), 'debug')
  assert slurm.report(jobs, 'debug') == 0 and out.read_text() == 'ok'


def test_cli_submits_to_the_local_executor(tmp_path):
  # `python -m launch.slurm` pickles `launch.slurm.Command` (not
  # ``__main__.Command``), which the task imports.
  out = tmp_path / 'out.txt'
  done = subprocess.run(
      [sys.executable, '-m', 'launch.slurm', '--cluster=local', '--submit',
       f'--workdir={tmp_path}', '--', sys.executable, '-c',
       f'open({str(out)!r}, "w").write("ok")'], cwd=ROOT, capture_output=True,
      text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stdout + done.stderr
  assert out.read_text() == 'ok' and 'done: job ' in done.stdout
  assert b'launch.slurm' in next(
      (tmp_path / 'submitit').glob('*/*_submitted.pkl')).read_bytes()
