"""The per-client store on the host (``execution.client_store='host'``):
identical rounds to the device store, and exact resumption."""

import jax
import numpy as np
import pytest

from experiments.configs import personalization as pfl_config
from fedjax_pfi import checkpoint as checkpoint_lib
from fedjax_pfi import training


def _config(algorithm='fedrep', where='device', rounds=3):
  c = pfl_config.get_config(f'synthetic,{algorithm},testing')
  c.rounds = rounds
  c.execution.client_store = where
  c.progress = False
  return c


def _strip(rows):
  return [{k: v for k, v in r.items() if not k.startswith('time/')}
          for r in rows]


def _final_store(config, workdir):
  exp = training.build(config)
  params = training.initial_params(exp)
  state, _ = checkpoint_lib.Checkpointer(workdir).restore(
      config.rounds, exp.algorithm.init(params))
  return jax.tree.map(np.asarray, state.client_states)


@pytest.mark.parametrize('algorithm', ['fedrep', 'local_only'])
def test_host_and_device_stores_give_identical_rounds(tmp_path, algorithm):
  runs = {}
  for where in ('device', 'host'):
    c = _config(algorithm, where)
    training.run(c, str(tmp_path / where))
    runs[where] = (training.read_metrics(str(tmp_path / where)),
                   _final_store(c, str(tmp_path / where)))
  assert _strip(runs['host'][0]) == _strip(runs['device'][0])
  jax.tree.map(np.testing.assert_array_equal, runs['host'][1],
               runs['device'][1])
  # the store changed: the rounds wrote the cohorts' rows back
  c = _config(algorithm)
  exp = training.build(c)
  first = exp.algorithm.init(training.initial_params(exp)).client_states
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(
      jax.tree.leaves(runs['host'][1]), jax.tree.leaves(first)))


def test_a_run_resumed_with_a_host_store_equals_an_uninterrupted_one(
    tmp_path):
  c = _config('fedrep', 'host')
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  training.run(c, whole)
  training.run(c, split, stop_after=1)
  training.run(c, split)
  assert _strip(training.read_metrics(split)) == _strip(
      training.read_metrics(whole))
  jax.tree.map(np.testing.assert_array_equal, _final_store(c, split),
               _final_store(c, whole))
  # and a device run resumes a host run's workdir (execution.* may change)
  d = _config('fedrep', 'device', rounds=4)
  training.run(d, split)
  h = _config('fedrep', 'host', rounds=4)
  training.run(h, whole)
  assert _strip(training.read_metrics(split)) == _strip(
      training.read_metrics(whole))


def test_the_host_store_is_refused_where_it_does_not_apply():
  with pytest.raises(ValueError, match="client_store must be 'device' or "
                     "'host', got 'disk'"):
    training.build(_config('fedrep', 'disk'))
  with pytest.raises(ValueError, match="algorithm 'ditto' reads its"):
    training.build(_config('ditto', 'host'))
  c = _config('fedper', 'host')
  c.asynchrony.mode = 'fedbuff'
  c.devices.profile = 'lognormal'
  with pytest.raises(ValueError, match='synchronous rounds only'):
    training.build(c)
