"""Rounds sharded over 1, 2, 4 and 8 (CPU) devices agree with one device."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope='module')
def diffs():
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'tests.scale.sharded_rounds'],
                       cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


@pytest.mark.parametrize('layout', ['stacked', 'packed', 'personal'])
def test_same_result_on_1_2_4_8_devices_chunked_or_not(diffs, layout):
  got = diffs[layout]
  assert sorted(got) == sorted(f'{n}x{c}' for n in (1, 2, 4, 8)
                               for c in ('None', '1'))
  assert diffs[layout + '_param_scale'] > 0.1  # the params did move
  for name, d in got.items():
    assert d < 2e-5, (layout, name, d)


def test_private_rounds_on_1_2_8_devices_chunked_or_not(diffs):
  """DP-FedAvg sharded: each device clips its clients, the sums are
  psum-ed, the noise is drawn once from the round's key: the same round."""
  got = diffs['private']
  assert sorted(got) == sorted(f'{n}x{c}' for n in (1, 2, 8)
                               for c in ('None', '1'))
  assert diffs['private_param_scale'] > 0.1
  for name, d in got.items():
    assert d < 2e-5, (name, d)


def test_training_loop_on_4_and_2_devices_equals_one(diffs):
  got = diffs['training']
  assert got['rounds'] == 4
  assert got['compilations'] == 1
  assert got['four_packed'] < 1e-4 and got['two_chunked'] < 1e-4, got


def test_secure_aggregation_on_2_chunked_devices_equals_one(diffs):
  """Masked sums add mod 2^32 across chunks and devices (psum of uint32),
  and the plan travels sharded with the cohort: the same rounds, dropouts
  recovered on both."""
  got = diffs['training']
  assert got['secagg_dropped'] > 0
  assert got['secagg_two_chunked'] < 1e-4, got


def test_robust_aggregation_on_2_chunked_devices_equals_one(diffs):
  """The buffer of every message is filled chunk by chunk and psum-ed
  across devices (an all-gather), then sorted by client id: Multi-Krum
  under ALIE gives the same rounds on 1 device and on 2 chunked."""
  got = diffs['training']
  assert got['robust_malicious'] > 0
  assert got['robust_two_chunked'] < 1e-4, got


def test_compression_with_error_feedback_on_2_chunked_devices_equals_one(diffs):
  """Top-k with error feedback and a compressed broadcast: each device
  gathers its clients' residual rows and returns them by slot (psum-ed),
  the broadcast is one draw of the round's key: the same rounds."""
  got = diffs['training']
  assert got['compressed_vnmse'] > 0.1  # top-10% leaves most out
  assert got['compressed_two_chunked'] < 1e-4, got


def test_fedbuff_with_dp_secagg_and_compression_on_2_chunked_devices(diffs):
  """An asynchronous step's buffer shards like a cohort (each client from
  its own version of the replicated ring), its masked, rotated sum is
  psum-ed, and the noise is one draw of the step's key: the same steps on
  1 device and on 2 chunked."""
  got = diffs['training']
  assert got['fedbuff_staleness'] >= 1  # stale clients were in the runs
  assert got['fedbuff_epsilon'] > 0
  assert got['fedbuff_two_chunked'] < 1e-4, got
