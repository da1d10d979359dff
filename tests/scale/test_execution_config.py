"""`config.execution` changes how rounds run, never what they compute."""

import numpy as np
import pytest

from fedjax_pfi import training
from tests.test_training import small_config


def close_rows(a, b, tol=1e-4):
  assert [r['round'] for r in a] == [r['round'] for r in b]
  for ra, rb in zip(a, b):
    keys = {k for k in ra if not k.startswith('time/')}
    assert keys == {k for k in rb if not k.startswith('time/')}
    for k in keys:
      np.testing.assert_allclose(ra[k], rb[k], rtol=tol, atol=tol, err_msg=k)


@pytest.fixture(scope='module')
def plain(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('plain'))
  training.run(small_config(), workdir)
  return training.read_metrics(workdir)


@pytest.mark.parametrize('execution', [
    {'execution.pack_lanes': 2, 'step_buckets': 'max'},
    {'execution.chunk_size': 3},
    {'execution.pack_lanes': 2, 'execution.chunk_size': 1}])
def test_packed_or_chunked_run_equals_plain(tmp_path, plain, execution):
  training.run(small_config(**execution), str(tmp_path))
  rows = training.read_metrics(str(tmp_path))
  close_rows(rows, plain)
  assert all(r['time/compilations'] == 1 for r in rows)
  eff = [r['time/padding_efficiency'] for r in rows]
  assert all(0 < e <= 1 for e in eff)
  if 'execution.pack_lanes' in execution:  # 4 clients in 2 lanes beat 4 padded
    assert np.mean(eff) > np.mean([r['time/padding_efficiency']
                                   for r in plain])


def test_resume_with_another_layout(tmp_path, plain):
  """Half the run unpacked, the rest packed and chunked: one experiment."""
  training.run(small_config(), str(tmp_path), stop_after=2)
  training.run(small_config(**{'execution.pack_lanes': 2,
                               'execution.chunk_size': 1}), str(tmp_path))
  close_rows(training.read_metrics(str(tmp_path)), plain)


@pytest.mark.parametrize('overrides,match', [
    ({'execution.devices': 99}, 'execution.devices=99'),
    ({'execution.chunk_size': 0}, 'execution.chunk_size'),
    ({'execution.pack_lanes': -1}, 'execution.pack_lanes'),
    ({'algorithm': 'scaffold', 'execution.pack_lanes': 2},
     "algorithm 'scaffold' runs on one device"),
])
def test_bad_execution_options(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    training.run(small_config(**overrides), str(tmp_path))
