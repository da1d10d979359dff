"""Every experiment config's testing variant runs the real loop end to end."""

import glob
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_pfi import pretraining
from fedjax_pfi import training
from tests.data.test_movielens import generated_ratings
from tests.data.test_movielens import inter_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(
    os.path.join(ROOT, 'experiments', 'configs', '*.py'))
                 if not p.endswith('__init__.py'))


def test_there_are_configs():
  assert {'shakespeare_fedavg', 'femnist_fedavg',
          'synthetic_fedprox'} <= set(CONFIGS)


PRETRAINING = ('pretrain_shakespeare', 'pretrain_sasrec')  # experiments.pretrain


def sequential_ratings(path):
  """Generated MovieLens-format ratings of users with the 4 interactions
  the sequential task needs."""
  rows = generated_ratings(num_users=12, num_items=40)
  per_user = {u: sum(1 for r in rows if r[0] == u) for u, *_ in rows}
  with open(path, 'w') as f:
    f.write(inter_text([r for r in rows if per_user[r[0]] >= 4]))
  return str(path)


def test_there_are_pretraining_and_peft_configs():
  assert {'pretrain_shakespeare', 'shakespeare_lora'} <= set(CONFIGS)


@pytest.mark.parametrize('name', PRETRAINING)
def test_pretraining_testing_variant_runs(tmp_path, name):
  module = importlib.import_module(f'experiments.configs.{name}')
  assert ('python -m experiments.pretrain --config=experiments/configs/' +
          name) in module.__doc__
  config = module.get_config('testing')
  if config.data.name.startswith('movielens'):  # generated ratings
    config.data.path = sequential_ratings(tmp_path / 'ratings.inter')
    config.data.eval_negatives = 10
  final = pretraining.pretrain(config, str(tmp_path))
  assert np.isfinite(final['train_loss'])
  assert 0.0 <= final['val/accuracy'] <= 1.0


@pytest.mark.parametrize('name', [c for c in CONFIGS if c not in PRETRAINING])
def test_testing_variant_runs(tmp_path, name):
  module = importlib.import_module(f'experiments.configs.{name}')
  assert module.__doc__.lstrip().splitlines()[0]
  assert 'python -m experiments.main --config=experiments/configs/' + name in (
      module.__doc__)
  config = module.get_config('testing')
  config.progress = False
  if config.data.name.startswith('movielens'):  # generated ratings
    config.data.path = sequential_ratings(tmp_path / 'ratings.inter')
  final = training.run(config, str(tmp_path))
  rows = training.read_metrics(str(tmp_path))
  assert len(rows) == config.rounds
  assert np.isfinite(final['train_loss'])
  assert 0.0 <= final['test/accuracy'] <= 1.0
  assert final['time/compilations'] <= len(
      training.build(config).buckets or [1])


def test_unknown_variant_is_rejected():
  module = importlib.import_module('experiments.configs.shakespeare_fedavg')
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    module.get_config('huge')


def test_command_line_entry_point_with_overrides(tmp_path):
  """The README's command shape: absl flags, a variant, --config.* overrides;
  re-running it resumes and does nothing more."""
  cmd = [sys.executable, '-m', 'experiments.main',
         '--config=experiments/configs/synthetic_fedprox.py:testing',
         f'--workdir={tmp_path}', '--config.rounds=2',
         '--config.client.learning_rate=0.02', '--config.progress=false']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'final metrics (round 2)' in out.stdout
  assert 'test/accuracy' in out.stdout
  rows = training.read_metrics(str(tmp_path))
  assert [r['round'] for r in rows] == [1, 2]
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert training.read_metrics(str(tmp_path)) == rows


def test_command_line_reports_bad_value(tmp_path):
  cmd = [sys.executable, '-m', 'experiments.main',
         '--config=experiments/configs/synthetic_fedprox.py:testing',
         f'--workdir={tmp_path}', '--config.model.name=resnet']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0
  assert ("unknown model 'resnet'; accepted: additive_mf, char_lstm, "
          'char_transformer, cnn') in out.stderr


def test_peft_config_refuses_an_unknown_variant():
  """(Every variant runs end to end in tests/test_peft_compare.py.)"""
  module = importlib.import_module('experiments.configs.shakespeare_lora')
  with pytest.raises(ValueError, match="unknown variant 'fedx'"):
    module.get_config('fedx')


def test_experiment_scripts_import_side_by_side():
  """Tests import experiment scripts into one pytest worker, whichever
  pytest-xdist puts together; each defines its flags only when it is the
  program, so no two collide on ``--workdir`` (a CI failure once)."""
  scripts = sorted(os.path.basename(p)[:-3] for p in glob.glob(
      os.path.join(ROOT, 'experiments', '*.py'))
                   if not p.endswith('__init__.py'))
  assert {'main', 'trust_report', 'peft_compare'} <= set(scripts)
  code = ('import importlib\n'
          f'for name in {scripts!r}:\n'
          '  importlib.import_module("experiments." + name)\n'
          'print("imported", len(%r))' % scripts)
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'imported {len(scripts)}' in out.stdout
