"""A real two-process run (launch/local.py, JAX's CPU collectives) equals the
one-process run, and resumes across processes."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
MAIN = [sys.executable, '-m', 'experiments.main',
        '--config=experiments/configs/synthetic_fedprox.py:testing',
        '--config.progress=False']


def run(cmd):
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=600, check=False,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def assert_same(a, b, tol=1e-5):
  assert [r['round'] for r in a] == [r['round'] for r in b]
  for x, y in zip(a, b):
    for k, v in x.items():
      if k.startswith('time/') or not isinstance(v, (int, float)):
        continue
      assert abs(v - y[k]) <= tol * max(1.0, abs(v)), (x['round'], k, v, y[k])


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('one'))
  run(MAIN + [f'--workdir={workdir}'])
  return rows(workdir)


def launched(workdir, *extra):
  return [sys.executable, '-m', 'launch.local', '--num_processes=2', '--'
          ] + MAIN + [f'--workdir={workdir}', '--config.execution.devices=0',
                      *extra]


@pytest.mark.parametrize('layout', [[], ['--config.execution.pack_lanes=2']])
def test_two_processes_equal_one(tmp_path, one_process, layout):
  out = run(launched(str(tmp_path), *layout))
  assert '[0] final metrics' in out and '[1] final metrics' not in out
  got = rows(str(tmp_path))
  assert_same(one_process, got)
  # No more compilations than one process (each new step bucket compiles
  # once; packed lanes have their own buckets).
  assert got[-1]['time/compilations'] <= one_process[-1]['time/compilations']


def test_two_process_run_resumes(tmp_path, one_process):
  run(launched(str(tmp_path), '--config.rounds=2'))
  assert [r['round'] for r in rows(str(tmp_path))] == [1, 2]
  run(launched(str(tmp_path)))  # rounds=3: restores round 2, runs round 3
  assert_same(one_process, rows(str(tmp_path)))


def test_launcher_reports_failure(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'launch.local', '--num_processes=2', '--',
       sys.executable, '-c', 'import os, sys; sys.exit(int(os.environ['
       '"FEDJAX_PFI_PROCESS_ID"]) + 3)'], cwd=ROOT, capture_output=True,
      text=True, timeout=120, check=False)
  assert out.returncode in (3, 4)
