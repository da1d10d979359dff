"""Sweep and SLURM launchers."""

import json
import os
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


def test_slurm_array_runs_the_line_of_its_task(tmp_path):
  out = tmp_path / 'ran.txt'
  jobs = [(str(tmp_path / f'j{i}'), ['sh', '-c', f'echo job{i} >> {out}'])
          for i in range(3)]
  path = slurm.write_array(jobs, str(tmp_path), partition='p')
  text = open(path).read()
  assert '#SBATCH --array=0-2' in text and '#SBATCH --partition=p' in text
  env = dict(os.environ, SLURM_ARRAY_TASK_ID='1')
  subprocess.run(['bash', path], env=env, check=True, cwd=ROOT)
  assert out.read_text() == 'job1\n'


def test_slurm_multihost_job_script(tmp_path):
  path = slurm.write_job(['python', '-m', 'experiments.main', '--x=1'],
                         str(tmp_path), nodes=4, gpus=8)
  text = open(path).read()
  for line in ('#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1',
               '#SBATCH --gpus-per-node=8',
               'srun --ntasks=4 --ntasks-per-node=1 python -m '
               'experiments.main --x=1'):
    assert line in text, line
  with pytest.raises(ValueError, match='nodes'):
    slurm.write_job(['x'], str(tmp_path), nodes=0)


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
