"""The model of the devices and the virtual clock (fedjax_pfi/devices.py)."""

import pickle

import numpy as np
import pytest

from fedjax_pfi import devices
from fedjax_pfi import secure_aggregation
from fedjax_pfi import training
from tests.test_training import override
from tests.test_training import small_config
from tests.test_training import without_time

# Three clients, by hand: 10, 20 and 40 examples in batches of 10 (1, 2 and 4
# steps); 0.1, 0.1 and 0.05 s an example (compute 1, 2, 2 s); 1 MB each way
# over 8, 4, 8 Mbit/s down (1, 2, 1 s) and 8, 8, 2 Mbit/s up (1, 1, 4 s):
# they finish at 3, 5 and 7 s.
SIZES = np.array([10, 20, 40])
MB = 1e6


def hand_config(**overrides):
  c = training.default_config()
  c.clients_per_round = 3
  c.client.batch_size = 10
  c.client.epochs = 1
  c.client.max_steps = None
  c.devices.profile = 'lognormal'
  c.devices.power_compute_w = 2.0
  c.devices.power_radio_w = 1.0
  return override(c, **overrides)


def hand_profiles(dropout=None):
  return devices.Profiles(
      np.array([0.1, 0.1, 0.05]), np.array([8e6, 4e6, 8e6]),
      np.array([8e6, 8e6, 2e6]),
      np.zeros((3, 3)) if dropout is None else dropout)


def timeline(config, availability=None, dropout=None):
  return devices.Timeline(config, SIZES, hand_profiles(dropout),
                          availability or devices.always(3), MB, MB)


def test_a_synchronous_round_by_hand():
  t = timeline(hand_config())
  one = t.round(0)
  np.testing.assert_array_equal(one.ids, [0, 1, 2])
  np.testing.assert_array_equal(one.steps, [1, 2, 4])
  np.testing.assert_array_equal(one.weights, [10, 20, 40])
  assert one.start == 0.0 and one.seconds == pytest.approx(7.0)
  np.testing.assert_allclose(one.busy, [3, 5, 7])
  # radio (download + upload) at 1 W, compute at 2 W
  np.testing.assert_allclose(one.energy, [2 + 2, 3 + 4, 5 + 4])
  assert t.round(1).start == pytest.approx(7.0)  # the next starts at its end
  m = t.metrics(1)
  assert m['clock/simulated_seconds'] == pytest.approx(14.0)
  assert m['clock/energy_joules'] == pytest.approx(40.0)
  assert m['clock/busy_seconds_mean'] == pytest.approx(5.0)
  totals = t.totals(2)
  np.testing.assert_allclose(totals['busy_seconds'], [6, 10, 14])
  np.testing.assert_allclose(totals['completed'], [2, 2, 2])


def test_a_deadline_drops_the_late_or_keeps_their_partial_work():
  one = timeline(hand_config(**{'devices.deadline': 6.0})).round(0)
  assert one.seconds == pytest.approx(6.0)
  np.testing.assert_array_equal(one.steps, [1, 2, 0])
  np.testing.assert_array_equal(one.weights, [10, 20, 0])
  # client 2 downloads (1 s), trains (2 s) and uploads until it is stopped
  np.testing.assert_allclose(one.energy[2], 1 + 4 + 3)
  assert one.metrics['clock/dropped'] == 1
  partial = timeline(hand_config(**{'devices.deadline': 6.0,
                                    'devices.partial': True})).round(0)
  # 6 - 1 (down) - 4 (up) = 1 s of training: 2 steps of 10 examples at 0.05
  np.testing.assert_array_equal(partial.steps, [1, 2, 2])
  np.testing.assert_array_equal(partial.weights, [10, 20, 40])
  np.testing.assert_allclose(partial.busy, [3, 5, 6])
  np.testing.assert_allclose(partial.energy[2], 5 + 2)


def test_over_selection_keeps_the_first_k():
  config = hand_config(clients_per_round=2, **{'devices.over_select': 0.5})
  one = timeline(config).round(0)
  np.testing.assert_array_equal(one.selected, [0, 1, 2])  # ceil(2 x 1.5)
  np.testing.assert_array_equal(one.ids, [0, 1])
  assert one.seconds == pytest.approx(5.0)  # the 2nd to finish
  np.testing.assert_allclose(one.busy, [3, 5, 5])  # client 2 is stopped
  np.testing.assert_allclose(one.energy[2], 1 + 4 + 2)
  assert one.metrics['clock/discarded'] == 1


def test_over_selection_counts_the_left_as_dropped_and_rounds_exactly():
  drop = np.zeros((3, 3))
  drop[0, 1] = 0.999999  # client 0 leaves while training
  config = hand_config(clients_per_round=1, **{'devices.over_select': 1.5})
  one = timeline(config, dropout=drop).round(0)
  np.testing.assert_array_equal(one.ids, [1])  # the first to finish
  assert one.metrics['clock/dropped'] == 1  # client 0 left
  assert one.metrics['clock/discarded'] == 1  # client 2, stopped at 5 s
  # ceil(50 x 1.1) is 55, though 50 * 1.1 is 55.000000000000007
  sizes = np.full(100, 10)
  big = devices.Timeline(
      hand_config(clients_per_round=50, **{'devices.over_select': 0.1}),
      sizes, devices.Profiles(np.full(100, 0.1), np.full(100, 8e6),
                              np.full(100, 8e6), np.zeros((100, 3))),
      devices.always(100), MB, MB)
  assert big.round(0).selected.size == 55


def test_availability_windows_and_stage_dropouts():
  # client 1 goes offline at t = 4, before it finishes (5 s): it is dropped
  window = devices.Availability(
      np.full(3, 100.0), np.array([[0.0], [0.0], [0.0]]),
      np.array([[100.0], [4.0], [100.0]]))
  one = timeline(hand_config(), window).round(0)
  np.testing.assert_array_equal(one.weights, [10, 0, 40])
  np.testing.assert_allclose(one.busy, [3, 4, 7])
  # at t = 7 clients 0 and 2 are online (their windows are the whole
  # period); client 1's window [0, 4) is closed until t = 100
  second = timeline(hand_config(), window).round(1)
  np.testing.assert_array_equal(second.selected, [0, 2])
  # A client that leaves during training leaves at a point of it.
  drop = np.zeros((3, 3))
  drop[0, 1] = 0.999999
  one = timeline(hand_config(), dropout=drop).round(0)
  assert one.weights[0] == 0 and 1.0 <= one.busy[0] <= 2.0


def test_the_clock_waits_for_somebody_to_come_online():
  late = devices.Availability(np.full(3, 50.0), np.full((3, 1), 10.0),
                              np.full((3, 1), 40.0))
  one = timeline(hand_config(), late).round(0)
  assert one.start == pytest.approx(10.0)
  assert one.metrics['clock/wait_seconds'] == pytest.approx(10.0)
  assert one.seconds == pytest.approx(7.0)


def test_diurnal_windows_cross_midnight():
  a = devices.diurnal(1000, 8.0, np.random.default_rng(0))
  until = a.until(0.0)
  online = until > 0
  assert 0.25 < online.mean() < 0.42  # 8 h of 24
  # a window that crosses midnight runs on to its end the next day
  assert np.all(until[online] - 0.0 <= 8 * 3600 + 1e-6)
  cross = np.isfinite(a.starts[:, 1])
  i = np.flatnonzero(cross)[0]
  at = devices.DAY - 60.0
  assert a.until(at)[i] == pytest.approx(devices.DAY + a.ends[i, 1])
  assert devices.diurnal(3, 24.0, np.random.default_rng(0)).until(5.0)[0] \
      == np.inf


def test_size_correlation_gives_the_small_clients_the_slow_devices():
  from scipy import stats  # pylint: disable=g-import-not-at-top
  sizes = np.random.default_rng(1).integers(5, 500, 2000)
  d = hand_config(**{'devices.size_correlation': 0.8}).devices
  p = devices.lognormal(d, sizes.size, np.random.default_rng(0), sizes)
  rho = stats.spearmanr(sizes, p.seconds_per_example).statistic
  assert -0.85 < rho < -0.7  # Spearman's of a Gaussian copula with 0.8
  assert stats.spearmanr(sizes, p.upload_bps).statistic > 0.7
  # the log-normal's medians and spreads are kept
  assert np.median(p.seconds_per_example) == pytest.approx(0.005, rel=0.05)
  assert np.std(np.log(p.seconds_per_example)) == pytest.approx(0.6,
                                                                rel=0.05)
  # 0: the draws without it
  d0 = hand_config().devices
  np.testing.assert_array_equal(
      devices.lognormal(d0, sizes.size, np.random.default_rng(0),
                        sizes).seconds_per_example,
      devices.lognormal(d0, sizes.size, np.random.default_rng(0))
      .seconds_per_example)


def test_csv_traces_are_read_and_bad_rows_named_by_line(tmp_path):
  names = np.array(['a', 'b'])
  d = hand_config().devices
  good = tmp_path / 'devices.csv'
  good.write_text('client,seconds_per_example,download_mbps,upload_mbps,'
                  'dropout_train\na,0.01,10,2,0.1\nb,0.02,20,4,\n')
  p = devices.read_csv_profiles(str(good), names, d)
  np.testing.assert_allclose(p.seconds_per_example, [0.01, 0.02])
  np.testing.assert_allclose(p.download_bps, [10e6, 20e6])
  np.testing.assert_allclose(p.dropout[:, 1], [0.1, 0.0])
  bad = tmp_path / 'bad.csv'
  bad.write_text('client,seconds_per_example,download_mbps,upload_mbps\n'
                 'a,0.01,10,2\nb,fast,20,4\n')
  with pytest.raises(devices.TraceError, match="line 3: seconds_per_example"
                     "='fast' is not a number"):
    devices.read_csv_profiles(str(bad), names, d)
  bad.write_text('client,seconds_per_example,download_mbps,upload_mbps\n'
                 'a,0.01,10,2\nb,-1,20,4\n')
  with pytest.raises(devices.TraceError, match='line 3.*> 0'):
    devices.read_csv_profiles(str(bad), names, d)
  bad.write_text('client,seconds_per_example,download_mbps,upload_mbps\n'
                 'a,0.01,10,2\n')
  with pytest.raises(devices.TraceError, match=r"1 of the 2 .*\['b'\]"):
    devices.read_csv_profiles(str(bad), names, d)
  bad.write_text('client,speed\na,1\n')
  with pytest.raises(devices.TraceError, match='line 1: the header'):
    devices.read_csv_profiles(str(bad), names, d)
  windows = tmp_path / 'online.csv'
  windows.write_text('client,start,end\na,0,3600\na,7200,10800\nb,100,200\n')
  a = devices.read_csv_availability(str(windows), names, 24.0)
  np.testing.assert_array_equal(a.until(7300.0) > 7300.0, [True, False])
  assert a.until(7300.0)[0] == 10800.0
  windows.write_text('client,start,end\na,0,3600\na,3600,7200\nb,0,10\n')
  # touching windows are one: online until 7200, not offline at 3600
  assert devices.read_csv_availability(str(windows), names, 24.0).until(
      100.0)[0] == 7200.0
  windows.write_text('client,start,end\na,0,3600\nb,200,100\n')
  with pytest.raises(devices.TraceError, match='line 3: the window'):
    devices.read_csv_availability(str(windows), names, 24.0)


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_plain_pickles_are_decoded_without_unpickling(protocol):
  value = {1: {'computation': 10.5, 'communication': 5000},
           'x': [0, -1, 2**40, -(2**70), 1e-300, 'café', None, True, False,
                 (1, 2), (), (3,), (4, 5, 6), (7, 8, 9, 10)],
           2: {}, 3: [], 'shared': [[1.0] * 3] * 2}
  assert devices.read_plain_pickle(pickle.dumps(value, protocol)) == value
  # a class or function reference is refused before anything runs
  for bad in (np.float64(1.0), print, ValueError('x')):
    with pytest.raises(devices.TraceError, match='is not plain data'):
      devices.read_plain_pickle(pickle.dumps({'v': bad}, protocol))


def test_fedscale_traces_are_read(tmp_path):
  cap = tmp_path / 'client_device_capacity'
  with open(cap, 'wb') as f:
    pickle.dump({1: {'computation': 10.0, 'communication': 5000.0},
                 2: {'computation': 40.0, 'communication': 800.0}}, f)
  d = hand_config().devices
  p = devices.read_fedscale_capacity(str(cap), 3, d)
  # 3 x 10 ms of inference per example; kbit/s -> bit/s; client 2 wraps
  np.testing.assert_allclose(p.seconds_per_example, [0.03, 0.12, 0.03])
  np.testing.assert_allclose(p.upload_bps, [5e6, 8e5, 5e6])
  behave = tmp_path / 'client_behave_trace'
  with open(behave, 'wb') as f:
    pickle.dump({7: {'active': [0, 500], 'inactive': [100, 600],
                     'finish_time': 1000, 'duration': 200}}, f)
  a = devices.read_fedscale_behavior(str(behave), 2)
  np.testing.assert_array_equal(a.until(1050.0), [1100.0, 1100.0])
  assert a.until(1200.0)[0] == -np.inf
  assert a.next_online(1200.0) == pytest.approx(1500.0)
  with open(behave, 'wb') as f:
    pickle.dump({7: {'active': [0], 'inactive': [], 'finish_time': 10}}, f)
  with pytest.raises(devices.TraceError, match='client 7 has 1 active'):
    devices.read_fedscale_behavior(str(behave), 2)


# -- in a run -------------------------------------------------------------------------


def test_always_online_and_waiting_for_all_trains_as_the_plain_run(tmp_path):
  """The device model only adds ``clock/`` metrics when nobody is late."""
  plain = training.run(small_config(rounds=2), str(tmp_path / 'plain'))
  timed = training.run(small_config(rounds=2, **{
      'devices.profile': 'lognormal'}), str(tmp_path / 'timed'))
  for k, v in plain.items():
    if not k.startswith('time/'):
      assert timed[k] == v, k
  assert timed['clock/simulated_seconds'] > 0
  assert timed['clock/completed'] == 4
  report = training.read_metrics(str(tmp_path / 'timed'))
  assert report[0]['clock/simulated_seconds'] < report[1][
      'clock/simulated_seconds']
  # the clock's bytes are the round's
  exp = training.build(small_config(**{'devices.profile': 'lognormal'}))
  assert exp.devices.upload_bytes == timed['comm/upload_bytes_per_client']
  assert exp.devices.download_bytes == timed['comm/download_bytes_per_client']
  clock = np.load(tmp_path / 'timed' / training.CLOCK_FILE)
  assert clock['completed'].sum() == 8
  assert clock['energy_joules'].sum() == pytest.approx(
      timed['clock/energy_joules'])


def test_compressed_bytes_shorten_the_upload():
  exp = training.build(small_config(**{
      'devices.profile': 'lognormal', 'compression.name': 'qsgd',
      'compression.bits': 4}))
  plain = training.build(small_config(**{'devices.profile': 'lognormal'}))
  assert exp.devices.upload_bytes < plain.devices.upload_bytes / 7
  assert exp.devices.download_bytes == plain.devices.download_bytes


def _late_config(rounds, **kw):
  return small_config(rounds=rounds, eval_every=2, **{
      'devices.profile': 'lognormal', 'devices.availability': 'diurnal',
      'devices.online_hours': 12.0, 'devices.deadline': 0.6,
      'devices.partial': True, 'devices.dropout_upload': 0.2,
      'devices.seconds_per_example': 0.01}, **kw)


def test_a_late_run_resumes_exactly_and_chunks_change_nothing(tmp_path):
  full = training.run(_late_config(4), str(tmp_path / 'full'))
  want = without_time(training.read_metrics(str(tmp_path / 'full')))
  assert sum(r['clock/dropped'] for r in want) > 0  # someone was late
  assert full['clock/simulated_seconds'] == pytest.approx(
      sum(r['clock/round_seconds'] + r['clock/wait_seconds'] for r in want))
  training.run(_late_config(2), str(tmp_path / 'resumed'))
  training.run(_late_config(4), str(tmp_path / 'resumed'))
  assert without_time(training.read_metrics(str(tmp_path / 'resumed'))) \
      == want
  training.run(_late_config(4, **{'execution.chunk_size': 2}),
               str(tmp_path / 'chunked'))
  got = without_time(training.read_metrics(str(tmp_path / 'chunked')))
  for a, b in zip(got, want):
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5,
                                 err_msg=k)


def test_devices_compose_with_dp_and_secure_aggregation(tmp_path):
  dp = training.run(small_config(rounds=2, **{
      'devices.profile': 'lognormal', 'devices.availability': 'diurnal',
      'privacy.mechanism': 'gaussian', 'privacy.noise_multiplier': 0.5}),
                    str(tmp_path / 'dp'))
  assert np.isfinite(dp['train_loss'])
  assert dp['privacy/epsilon_rdp'] > 0
  def secagg(deadline):
    return small_config(rounds=2, **{
        'devices.profile': 'lognormal', 'devices.deadline': deadline,
        'devices.seconds_per_example': 0.01,
        'secure_aggregation.enabled': True,
        'secure_aggregation.clip_norm': 1.0})

  # Late clients drop before they upload: one of 4 in each round (1.5 s),
  # which secure aggregation recovers; 3 of 4 (0.6 s), which it cannot.
  sa = training.run(secagg(1.5), str(tmp_path / 'sa'))
  assert np.isfinite(sa['train_loss'])
  rows = training.read_metrics(str(tmp_path / 'sa'))
  assert [r['clock/dropped'] for r in rows] == [1, 1]
  assert [r['secagg/dropped_before_upload'] for r in rows] == [1, 1]
  with pytest.raises(secure_aggregation.UnrecoverableRound,
                     match='fewer than t live neighbours'):
    training.run(secagg(0.6), str(tmp_path / 'harsh'))
  exp = training.build(small_config(**{
      'devices.profile': 'lognormal', 'secure_aggregation.enabled': True,
      'secure_aggregation.clip_norm': 1.0}))
  assert exp.devices.upload_bytes == sa['secagg/upload_bytes_per_client']


@pytest.mark.parametrize('overrides, match', [
    ({'devices.profile': 'gpu'}, "devices.profile must be one of"),
    ({'devices.deadline': 5.0}, "devices.deadline needs a model of the "
                                "devices"),
    ({'devices.profile': 'lognormal', 'devices.seconds_per_example': 0.0},
     r'devices.seconds_per_example must be a finite number > 0'),
    ({'devices.profile': 'lognormal', 'devices.dropout_train': 1.0},
     r'devices.dropout_train must lie in \[0, 1\)'),
    ({'devices.profile': 'lognormal', 'devices.size_correlation': 1.5},
     r'devices.size_correlation must lie in \[-1, 1\]'),
    ({'devices.profile': 'lognormal', 'devices.partial': True},
     'set devices.deadline > 0 too'),
    ({'devices.profile': 'lognormal', 'stragglers.fraction': 0.5},
     'set stragglers.fraction=0'),
    ({'devices.profile': 'lognormal', 'devices.over_select': 0.3,
      'privacy.mechanism': 'gaussian'}, 'devices.over_select=0.3 with '
                                        "privacy.mechanism='gaussian'"),
    ({'devices.profile': 'trace'}, 'needs devices.trace_path'),
    ({'devices.profile': 'trace', 'devices.trace_path': '/no/such.csv'},
     "devices.trace_path='/no/such.csv' does not exist"),
    ({'devices.profile': 'lognormal', 'algorithm': 'scaffold'},
     "devices.profile='lognormal' with algorithm 'scaffold'"),
])
def test_refusals_name_the_option(overrides, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    training.build(small_config(**overrides))


def test_a_trace_that_misses_clients_is_refused_before_training(tmp_path):
  path = tmp_path / 'devices.csv'
  path.write_text('client,seconds_per_example,download_mbps,upload_mbps\n'
                  'f_00001,0.01,10,2\n')
  with pytest.raises(devices.TraceError,
                     match=r'training clients have no row, e.g. \['):
    training.build(small_config(**{'devices.profile': 'trace',
                                   'devices.trace_path': str(path)}))


@pytest.mark.parametrize('dataset,word,fedasync_steps', [
    ('femnist', 'writer', 6), ('shakespeare', 'role', 9)])
def test_devices_compare_runs_tiny(tmp_path, dataset, word, fedasync_steps):
  from experiments import devices_compare  # pylint: disable=g-import-not-at-top
  # (three of the six strategies: a FEMNIST CNN run costs about 30 s here)
  strategies = ('wait_all', 'fedprox_partial', 'fedasync')
  rows = devices_compare.run_all(str(tmp_path), strategies, testing=True,
                                 dataset=dataset)
  assert [r['strategy'] for r in rows] == list(strategies)
  assert all(r['hours'] > 0 for r in rows)
  # the per-client path (clients_final.npz, McNemar against wait_all)
  assert all(0 <= r['small_quartile_mean'] <= 1 for r in rows)
  assert all(0 <= r['hurt'] <= 1 for r in rows)
  text = devices_compare.write_table(str(tmp_path), rows, dataset)
  assert f'| {word} mean |' in text
  assert '| fedprox_partial |' in text and '| fedasync |' in text
  assert 'Deadline:' in text
  assert (tmp_path / 'accuracy_hours.png').exists()
  assert (tmp_path / 'staleness.png').exists()
  fedasync = next(r for r in rows if r['strategy'] == 'fedasync')
  # one update a step: rounds x cohort (3 x 2 FEMNIST, 3 x 3 Shakespeare)
  assert fedasync['steps'] == fedasync_steps
