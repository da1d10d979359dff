"""The client-store cost benchmark at tiny sizes: the host and device stores
give identical metrics, and the timings and byte counts are positive (no
wall-clock threshold is asserted)."""

import pytest

from experiments.benchmarks import client_store_cost


def test_host_and_device_runs_match_and_are_timed(tmp_path):
  # (FedSA-LoRA's host store: tests/test_client_store.py and the benchmark)
  config = client_store_cost.case_config('synthetic_fedper', rounds=3,
                                         testing=True)
  out = client_store_cost.compare(config, str(tmp_path))
  assert out['identical']
  assert out['device_s'] > 0 and out['host_s'] > 0
  assert out['ratio'] == out['host_s'] / out['device_s']
  assert 0 < out['row_bytes'] < out['store_bytes']
  assert out['moved_bytes'] == 2 * config.clients_per_round * out['row_bytes']


def test_too_few_rounds_and_unknown_cases_are_refused(tmp_path):
  with pytest.raises(ValueError, match='unknown case'):
    client_store_cost.case_config('cifar_fedper', rounds=3)
  config = client_store_cost.case_config('synthetic_fedper', rounds=2,
                                         testing=True)
  with pytest.raises(ValueError, match='at least 3 rounds'):
    client_store_cost.timed_run(config, 'device', str(tmp_path))


def test_rows_are_compared_without_their_time_keys_and_exactly():
  strip = client_store_cost.strip_time
  a = [{'round': 1, 'loss': 0.5, 'x': float('nan'), 'time/round_s': 1.0}]
  b = [{'round': 1, 'loss': 0.5, 'x': float('nan'), 'time/round_s': 2.0}]
  assert strip(a) == strip(b)
  b[0]['loss'] = 0.5 + 1e-16 * 4
  assert strip(a) != strip(b)
