"""Sweep and SLURM launchers."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from launch import slurm
from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CONFIG = 'experiments/configs/synthetic_fedprox.py:testing'


def test_grid_expands_to_one_job_per_point(tmp_path):
  jobs = sweep.expand(CONFIG, str(tmp_path),
                      'client.learning_rate=0.1,0.2; clients_per_round=2,4',
                      ['rounds=2'])
  assert len(jobs) == 4
  dirs = [os.path.basename(d) for d, _ in jobs]
  assert dirs[0] == 'client.learning_rate=0.1,clients_per_round=2'
  assert len(set(dirs)) == 4
  cmd = jobs[3][1]
  assert f'--workdir={jobs[3][0]}' in cmd
  assert '--config.rounds=2' in cmd
  assert '--config.client.learning_rate=0.2' in cmd
  assert '--config.clients_per_round=4' in cmd


@pytest.mark.parametrize('grid,match', [
    ('lr', "not 'key=v1,v2"), ('a=1;a=2', 'appears twice'), ('a=', 'not')])
def test_bad_grid(grid, match):
  with pytest.raises(ValueError, match=match):
    sweep.parse_grid(grid)


def test_local_sweep_runs_and_resumes(tmp_path):
  jobs = sweep.expand(CONFIG, str(tmp_path), 'client.learning_rate=0.01,0.02',
                      ['progress=False'])
  assert sweep.run_local(jobs, parallel=2) == 0
  finals = []
  for d, _ in jobs:
    with open(os.path.join(d, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    assert [r['round'] for r in rows] == [1, 2, 3]
    finals.append(rows[-1]['train_loss'])
  assert finals[0] != finals[1]  # the override reached the run
  assert sweep.run_local(jobs, parallel=1) == 0  # finished: nothing to redo
  with open(os.path.join(jobs[0][0], 'metrics.jsonl')) as f:
    assert len(f.readlines()) == 3


# The sbatch scripts are built by submitit's own SLURM executor (no cluster
# here). Each directive below is checked against sbatch(1):
#   --nodes=N            -N: allocate (at least) N nodes
#   --ntasks-per-node=1  one task (one process, one srun rank) per node
#   --gpus-per-node=G    G GPUs on each node of the allocation
#   --cpus-per-task=C    -c: C CPUs for each task
#   --time=T             -t: the run-time limit; a bare number is minutes
#   --partition=P        -p: the partition to run in
#   --signal=USR2@90     send SIGUSR2 90 s before the time limit (submitit
#                        requeues on it)
#   --requeue            the batch job may be requeued (scontrol requeue,
#                        preemption)
#   --open-mode=append   logs are appended to, not truncated, so a requeued
#                        job keeps its first attempt's output
#   --output/--error     file name patterns: %j job id, %A array's job id,
#                        %a array index
#   --array=0-2%P        -a: indexes 0..2, at most P running at once
# and srun(1): --unbuffered, --output/--error with %t (the task's rank).
def test_multihost_sbatch_directives(tmp_path):
  res = slurm.Resources(nodes=4, gpus_per_node=8, cpus_per_task=16,
                        partition='gpu', time='1-12:00:00', job_name='run')
  text = slurm.sbatch_script(str(tmp_path), res)
  logs = f'{tmp_path}/submitit/%j'
  directives = {line for line in text.splitlines()
                if line.startswith('#SBATCH')}
  assert directives == {
      '#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1',
      '#SBATCH --gpus-per-node=8', '#SBATCH --cpus-per-task=16',
      '#SBATCH --time=2160', '#SBATCH --partition=gpu',
      '#SBATCH --job-name=run', '#SBATCH --signal=USR2@90',
      '#SBATCH --requeue', '#SBATCH --open-mode=append',
      f'#SBATCH --output={logs}/%j_0_log.out',
      f'#SBATCH --error={logs}/%j_0_log.err',
      '#SBATCH --wckey=submitit'}, text
  # One srun starts every task (nodes x 1); each runs submitit's loader,
  # which unpickles `launch.slurm.Command` and runs the command.
  srun = [line for line in text.splitlines() if line.startswith('srun ')]
  assert srun == [f'srun --unbuffered --output {logs}/%j_%t_log.out --error '
                  f'{logs}/%j_%t_log.err {shlex.quote(sys.executable)} -u -m '
                  f'submitit.core._submit {logs}'], text
  assert not os.listdir(tmp_path)  # building the script writes nothing
  text = slurm.sbatch_script(str(tmp_path), res._replace(
      gpus_per_node=0, partition=None, requeue=False))
  assert '--gpus-per-node' not in text and '--partition' not in text
  assert '#SBATCH --no-requeue' in text


def test_sweep_array_directives(tmp_path):
  jobs = [(str(tmp_path / f'j{i}'), ['echo', str(i)]) for i in range(3)]
  text = slurm.preview([c for _, c in jobs], str(tmp_path),
                       slurm.Resources(array_parallelism=2, time='90'))
  logs = f'{tmp_path}/submitit/%A_%a'  # one log folder per array task
  for line in ('#SBATCH --array=0-2%2', '#SBATCH --nodes=1',
               '#SBATCH --ntasks-per-node=1', '#SBATCH --time=90',
               f'#SBATCH --output={logs}/%A_%a_0_log.out',
               '#   array task 2: echo 2', '# Not submitted (pass --submit).'):
    assert line in text.splitlines(), (line, text)
  assert '#SBATCH --array=0-2%3' in slurm.sbatch_script(
      str(tmp_path), slurm.Resources(), array=3)


@pytest.mark.parametrize('time,minutes', [
    ('90', 90), ('1:30', 2), ('24:00:00', 1440), ('0:00:59', 1),
    ('2-12', 3600), ('1-0:30', 1470), ('1-00:00:30', 1441)])
def test_slurm_time_formats(time, minutes):
  assert slurm.minutes(time) == minutes


@pytest.mark.parametrize('kwargs,match', [
    (dict(nodes=0), '--nodes must be an integer >= 1, got 0'),
    (dict(gpus_per_node=-1), '--gpus_per_node must be .* got -1'),
    (dict(array_parallelism=0), '--array_parallelism must be .* got 0'),
    (dict(time='forever'), "--time='forever' is not .* D-H:M:S"),
    (dict(time='0'), "--time='0' is not a positive")])
def test_bad_resources(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    slurm.sbatch_script(str(tmp_path), slurm.Resources(**kwargs))


def test_bad_command_or_cluster(tmp_path):
  for commands in ([], [[]]):
    with pytest.raises(ValueError, match='no command given'):
      slurm.submit(commands, str(tmp_path), slurm.Resources(), 'local')
  with pytest.raises(ValueError, match="one of slurm, local, debug; got 'pbs'"):
    slurm.submit([['true']], str(tmp_path), slurm.Resources(), 'pbs')
  with pytest.raises(ValueError, match='--nodes=2'):
    slurm.submit([['true']], str(tmp_path), slurm.Resources(nodes=2), 'debug')
  if shutil.which('srun') is None:
    with pytest.raises(ValueError, match='no srun on PATH'):
      slurm.submit([['true']], str(tmp_path), slurm.Resources(), 'slurm')


def test_slurm_cli_prints_the_script_and_submits_nothing(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'launch.slurm', '--nodes=2', '--partition=p',
       f'--workdir={tmp_path}', '--', 'python', '-m', 'experiments.main',
       '--x=1'], cwd=ROOT, capture_output=True, text=True, timeout=120,
      check=True).stdout
  assert '#SBATCH --nodes=2' in out and '#SBATCH --partition=p' in out
  assert '#   python -m experiments.main --x=1' in out
  assert not os.listdir(tmp_path)
  bad = subprocess.run(
      [sys.executable, '-m', 'launch.slurm', '--nodes=0',
       f'--workdir={tmp_path}', '--', 'true'], cwd=ROOT, capture_output=True,
      text=True, timeout=120, check=False)
  assert bad.returncode != 0
  assert '--nodes must be an integer >= 1, got 0' in bad.stderr


def test_single_task_environment_is_not_multihost(monkeypatch):
  from fedjax_pfi import distributed  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('SLURM_NTASKS', '1')
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.delenv(distributed.ENV_NUM_PROCESSES, raising=False)
  assert not distributed.initialize()
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, '2')
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, '5')
  with pytest.raises(ValueError, match='FEDJAX_PFI_PROCESS_ID=5'):
    distributed.initialize()


def test_sweep_cli_dry_run(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'launch.sweep', f'--workdir={tmp_path}',
       f'--config={CONFIG}', '--grid=seed=0,1', '--dry_run'], cwd=ROOT,
      capture_output=True, text=True, timeout=120, check=True)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2 and all('--config.seed=' in line for line in lines)


# What `srun` sets in the task with SLURM_PROCID=2 of a 4-node, one task per
# node job step (srun(1), "OUTPUT ENVIRONMENT VARIABLES").
SRUN_TASK_2_OF_4 = {
    'SLURM_JOB_ID': '123456', 'SLURM_STEP_NODELIST': 'gpu[017-019,023]',
    'SLURM_NTASKS': '4', 'SLURM_STEP_NUM_NODES': '4', 'SLURM_PROCID': '2',
    'SLURM_LOCALID': '0'}


@pytest.fixture
def slurm_task(monkeypatch):
  for var in ('JAX_COORDINATOR_PORT', 'JAX_COORDINATOR_ADDRESS',
              'JAX_LOCAL_DEVICE_IDS', 'OMPI_MCA_orte_hnp_uri',
              'KUBERNETES_SERVICE_HOST'):
    monkeypatch.delenv(var, raising=False)
  for var, value in SRUN_TASK_2_OF_4.items():
    monkeypatch.setenv(var, value)
  return monkeypatch


def test_jax_finds_its_peers_from_srun_variables(slurm_task):
  # JAX 0.10.2's own detection, called directly (no jax.distributed.initialize).
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  from fedjax_pfi import distributed  # pylint: disable=g-import-not-at-top
  cluster = clusters.SlurmCluster
  assert cluster.is_env_present()
  # The first host of the step's node list; the port is derived from the
  # job id, so every task computes the same address.
  port = 65535 - 2**12 + 1 + 123456 % 2**12
  assert cluster.get_coordinator_address(None, None) == f'gpu017:{port}'
  assert cluster.get_coordinator_address(None, '4242') == 'gpu017:4242'
  assert (cluster.get_process_count(), cluster.get_process_id()) == (4, 2)
  slurm_task.setenv('SLURM_STEP_NODELIST', 'node7,node3')
  assert cluster.get_coordinator_address(None, None) == f'node7:{port}'
  slurm_task.setenv('SLURM_STEP_NODELIST', 'gpu[017-019,023]')
  # What jax.distributed.initialize() does with no arguments: SLURM wins
  # the detection, and the GPUs are narrowed to the one numbered
  # SLURM_LOCALID (JAX assumes one task per GPU)...
  detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
  assert detect(None, None, None, None, None, 300) == (
      f'gpu017:{port}', 4, 2, [0])
  # ...which `distributed` overrides for one task per node: [] leaves every
  # GPU of the node visible (initialize narrows only to a non-empty list).
  assert distributed.slurm_local_device_ids() == []
  assert detect(None, None, None, [], None, 300) == (
      f'gpu017:{port}', 4, 2, [])
  slurm_task.setenv('SLURM_STEP_NUM_NODES', '1')  # 4 tasks on one node
  assert distributed.slurm_local_device_ids() is None
  # `distributed.SLURM_VARIABLES` are exactly what the detection needs.
  for var in distributed.SLURM_VARIABLES:
    slurm_task.delenv(var)
    assert not cluster.is_env_present(), var
    slurm_task.setenv(var, SRUN_TASK_2_OF_4[var])


def test_slurm_allocation_without_srun_is_a_clear_error(slurm_task):
  from fedjax_pfi import distributed  # pylint: disable=g-import-not-at-top
  slurm_task.delenv(distributed.ENV_NUM_PROCESSES, raising=False)
  slurm_task.delenv('SLURM_STEP_NODELIST')
  slurm_task.delenv('SLURM_PROCID')
  with pytest.raises(ValueError, match='SLURM_NTASKS=4 .* SLURM_STEP_NODELIST, '
                     'SLURM_PROCID are unset: start the tasks with srun'):
    distributed.initialize()


def test_sweep_cli_slurm_prints_an_array(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'launch.sweep', f'--workdir={tmp_path}',
       f'--config={CONFIG}', '--grid=seed=0,1,2', '--slurm', '--gpus=1',
       '--array_parallelism=2'], cwd=ROOT, capture_output=True, text=True,
      timeout=120, check=True).stdout
  assert '#SBATCH --array=0-2%2' in out and '#SBATCH --gpus-per-node=1' in out
  assert out.count('--config.seed=') == 3
  assert not os.listdir(tmp_path)
