"""The training loop: determinism, exact resume, and a clear error for each
bad input, raised before any tracing."""

import json
import os
import re

import jax
import numpy as np
import pytest

from fedjax_pfi import checkpoint as checkpoint_lib
from fedjax_pfi import training
from fedjax_pfi.data import cohort as cohort_lib


def small_config(**overrides):
  c = training.default_config()
  c.rounds = 4
  c.clients_per_round = 4
  c.data.name = 'synthetic'
  c.data.num_clients = 12
  c.data.heldout_fraction = 0.2
  c.model.name = 'mlp'
  c.model.kwargs.hidden = (8,)
  c.client.learning_rate = 0.05
  c.client.batch_size = 16
  c.client.max_steps = 6
  c.server.optimizer = 'fedadam'
  c.server.learning_rate = 0.01
  c.eval_every = 2
  c.checkpoint_every = 1
  c.progress = False
  return override(c, **overrides)


def override(c, **overrides):
  """``c`` with dotted keys (``'client.batch_size'``) set."""
  for k, v in overrides.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


def without_time(rows):
  return [{k: v for k, v in r.items() if not k.startswith('time/')}
          for r in rows]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('full'))
  training.run(small_config(), workdir)
  return training.read_metrics(workdir)


def test_metrics_and_evaluation_written(uninterrupted):
  assert [r['round'] for r in uninterrupted] == [1, 2, 3, 4]
  last = uninterrupted[-1]
  for key in ('train_loss', 'test/accuracy', 'test/client_accuracy_p10',
              'test/client_accuracy_worst', 'heldout/accuracy'):
    assert np.isfinite(last[key]), key
  assert last['test/client_accuracy_worst'] <= last['test/client_accuracy_p10']
  assert last['test/client_accuracy_p10'] <= last['test/client_accuracy_p90']
  assert 'test/accuracy' not in uninterrupted[0]  # eval_every = 2


def test_same_seed_same_metrics(tmp_path, uninterrupted):
  training.run(small_config(), str(tmp_path))
  assert without_time(training.read_metrics(str(tmp_path))) == without_time(
      uninterrupted)


def test_other_seed_other_metrics(tmp_path, uninterrupted):
  training.run(small_config(seed=1), str(tmp_path))
  assert without_time(training.read_metrics(str(tmp_path))) != without_time(
      uninterrupted)


@pytest.mark.parametrize('checkpoint_every,first_leg', [(1, 2), (2, 3)])
def test_kill_and_resume_equals_uninterrupted(tmp_path, uninterrupted,
                                              checkpoint_every, first_leg):
  """Stop after `first_leg` rounds (with checkpoint_every=2 and 3 rounds, the
  third round's metrics row is written but its state is not checkpointed, as
  after a crash), then re-run the same command."""
  config = small_config(checkpoint_every=checkpoint_every)
  training.run(config, str(tmp_path), stop_after=first_leg)
  assert len(training.read_metrics(str(tmp_path))) == first_leg
  training.run(config, str(tmp_path))
  assert without_time(training.read_metrics(str(tmp_path))) == without_time(
      uninterrupted)


def test_rerun_of_finished_run_changes_nothing(tmp_path):
  config = small_config(rounds=2)
  first = training.run(config, str(tmp_path))
  again = training.run(config, str(tmp_path))
  assert without_time([first]) == without_time([again])
  assert len(training.read_metrics(str(tmp_path))) == 2


@pytest.mark.parametrize('overrides,message', [
    ({'data.name': 'cifar1000'}, "unknown dataset 'cifar1000'; accepted: "),
    ({'model.name': 'resnet9'}, "unknown model 'resnet9'; accepted: "),
    ({'algorithm': 'fedsgd'}, "unknown algorithm 'fedsgd'; accepted: "),
    ({'server.optimizer': 'adamw'}, "unknown server optimizer 'adamw'"),
    ({'client.optimizer': 'lion'}, "unknown client optimizer 'lion'"),
    ({'clients_per_round': 50}, 'clients_per_round=50 but the training '
     'population has 10 clients; choose 1..10'),
    ({'client.learning_rate': 0.0}, 'client learning rate must be positive, '
     'got 0.0'),
    ({'server.learning_rate': -1.0}, 'server learning rate must be positive, '
     'got -1.0'),
    ({'client.batch_size': 0}, 'client.batch_size must be >= 1, got 0'),
    ({'client.proximal_mu': 1.0}, 'client.proximal_mu=1.0 is FedProx'),
    ({'algorithm': 'scaffold', 'client.optimizer': 'adam'},
     'scaffold needs plain client SGD'),
    ({'model.name': 'char_lstm'}, "model 'char_lstm' needs dataset metadata "
     "'vocab_size'"),
    ({'step_buckets': '1,2'}, "step_buckets '1,2' cannot hold the longest "
     'client'),
    ({'step_buckets': 'big'}, "step_buckets must be 'pow2', 'max', 'exact' or "),
])
def test_bad_config_gets_clear_error(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    training.run(small_config(**overrides), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints', '1'))


def test_client_without_examples_is_rejected(tmp_path):
  # 2 examples per client and a 60% test split leave some clients no
  # training example.
  config = small_config(**{'data.num_clients': 12, 'data.test_fraction': 0.999})
  with pytest.raises(ValueError, match='training clients have no examples'):
    training.run(config, str(tmp_path))


def poison_client_of_round(monkeypatch, config, round_idx):
  """Makes one client sampled first in `round_idx` produce NaN losses."""
  real_load = training.registry.load_splits

  def load(cfg):
    splits = real_load(cfg)
    n = splits.train.num_clients
    earlier = set()
    for r in range(round_idx):
      earlier |= set(cohort_lib.sample_cohort(n, config.clients_per_round,
                                              config.seed, r).tolist())
    now = cohort_lib.sample_cohort(n, config.clients_per_round, config.seed,
                                   round_idx)
    victim = next(c for c in now if c not in earlier)
    lo, hi = splits.train.offsets[victim], splits.train.offsets[victim + 1]
    splits.train.columns['x'][lo:hi] = np.nan
    return splits

  monkeypatch.setattr(training.registry, 'load_splits', load)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = small_config(rounds=6)
  poison_client_of_round(monkeypatch, config, 2)  # the third round (index 2)
  # Rounds count from 1 in the message, as in metrics.jsonl and checkpoints.
  with pytest.raises(training.NonFiniteLossError,
                     match=r'round 3: training loss train_loss is nan'
                     ) as info:
    training.run(config, str(tmp_path))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  assert ckpt.latest_round() == 2
  assert 'last good checkpoint is round 2' in str(info.value)
  rows = training.read_metrics(str(tmp_path))
  assert [r['round'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['train_loss']) for r in rows)


def test_nan_in_first_round_says_no_checkpoint(tmp_path, monkeypatch):
  config = small_config(rounds=3)
  poison_client_of_round(monkeypatch, config, 0)
  with pytest.raises(training.NonFiniteLossError,
                     match='round 1: .*No checkpoint was written before it'):
    training.run(config, str(tmp_path))


def test_mismatched_checkpoint_is_rejected(tmp_path):
  training.run(small_config(rounds=1), str(tmp_path))
  bigger = small_config(rounds=2, **{'model.kwargs.hidden': (16,)})
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=re.escape(
                         "does not match this config: leaf .params['Dense_0']"
                         "['bias'] is float32[8] in the checkpoint but the "
                         'config builds float32[16]')):
    training.run(bigger, str(tmp_path))


def test_other_config_in_same_workdir_is_rejected(tmp_path):
  training.run(small_config(rounds=1), str(tmp_path))
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match='written by a different config'):
    training.run(small_config(rounds=2, **{'client.learning_rate': 0.07}),
                 str(tmp_path))


def test_corrupt_checkpoint_is_reported(tmp_path):
  training.run(small_config(rounds=1), str(tmp_path))
  ckpt_dir = os.path.join(tmp_path, 'checkpoints', '1')
  for root, _, files in os.walk(ckpt_dir):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'\x00garbage')
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'checkpoints/1 is unreadable .*Delete that '
                     r'directory'):
    training.run(small_config(rounds=2), str(tmp_path))


def test_config_json_written(tmp_path):
  training.run(small_config(rounds=1), str(tmp_path))
  with open(os.path.join(tmp_path, 'config.json')) as f:
    assert json.load(f)['data']['name'] == 'synthetic'
  assert os.listdir(os.path.join(tmp_path, 'tensorboard'))


def test_load_state_reads_back_a_finished_run(tmp_path):
  config = small_config(rounds=2)
  exp = training.build(config)
  training.run_experiment(exp, str(tmp_path))
  state = training.load_state(exp, str(tmp_path))
  assert int(state.round) == 2
  assert int(training.load_state(exp, str(tmp_path), 1).round) == 1
  start = training.initial_params(exp)
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
           zip(jax.tree.leaves(state.params), jax.tree.leaves(start))]
  assert max(moved) > 0
  with pytest.raises(FileNotFoundError, match='empty.*no checkpoint'):
    training.load_state(exp, str(tmp_path / 'empty'))
