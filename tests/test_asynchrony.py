"""Asynchronous aggregation in simulated time (fedjax_pfi/asynchrony.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pfi import asynchrony
from fedjax_pfi import devices
from fedjax_pfi import training
from fedjax_pfi.algorithms import server_optimizers
from tests import reference
from tests.test_devices import hand_config
from tests.test_devices import hand_profiles
from tests.test_devices import MB
from tests.test_devices import SIZES
from tests.test_training import small_config
from tests.test_training import without_time


def hand_timeline(**overrides):
  """The 3 hand clients of tests/test_devices.py (a round of work takes
  them 3, 5 and 7 s), all 3 in flight, one arrival a step."""
  config = hand_config(**{'asynchrony.mode': 'fedbuff',
                          'asynchrony.buffer_size': 1,
                          'asynchrony.concurrency': 3, **overrides})
  return asynchrony.AsyncTimeline(config, SIZES, hand_profiles(),
                                  devices.always(3), MB, MB)


def test_a_fedbuff_timeline_by_hand():
  t = hand_timeline()
  # t=3: client 0 (from version 0); t=5: client 1 (started at 0, now 1);
  # t=6: client 0 again (restarted at 3 from version 1, now 2); t=7:
  # client 2 (started at 0, now 3); t=9: client 0 (from 3 at 6, now 4);
  # t=10: client 1 (restarted at 5 from version 2, now 5).
  want = [(0, 0, 3), (1, 1, 5), (0, 1, 6), (2, 3, 7), (0, 1, 9), (1, 3, 10)]
  for r, (cid, tau, time) in enumerate(want):
    one = t.round(r)
    assert one.ids.tolist() == [cid], r
    assert one.staleness.tolist() == [tau], r
    assert one.start + one.seconds == pytest.approx(time), r
    assert one.arrivals.scale[0] == pytest.approx((1 + tau) ** -0.5), r
    assert one.arrivals.slot[0] == (r - tau) % 9, r  # the version it began
  np.testing.assert_array_equal(t.round(0).steps, [1])
  np.testing.assert_allclose(t.round(0).energy, [2 + 2])  # as synchronous
  assert t.metrics(5)['clock/simulated_seconds'] == pytest.approx(10.0)
  totals = t.totals(6)
  np.testing.assert_array_equal(totals['completed'], [3, 2, 1])
  np.testing.assert_array_equal(np.sort(totals['staleness']),
                                [0, 1, 1, 1, 3, 3])


def test_a_client_has_one_update_in_the_buffer_at_a_time():
  """K = 3 of the 3 hand clients: client 0 arrives at 3 and client 1 at 5,
  and neither starts again while its update waits (else client 0 would
  arrive twice, at 3 and 6, in the first step); the step at 7 takes all
  three fresh, and all three restart from version 1."""
  t = hand_timeline(**{'asynchrony.buffer_size': 3})
  for r, time in enumerate((7.0, 14.0)):
    one = t.round(r)
    assert sorted(one.ids.tolist()) == [0, 1, 2], r
    assert one.staleness.tolist() == [0, 0, 0], r
    assert one.start + one.seconds == pytest.approx(time), r
  assert t.max_units(2) == 2


def test_max_units_counts_each_clients_steps():
  t = hand_timeline()  # aggregated: 0, 1, 0, 2, 0, 1 (the timeline above)
  assert [t.max_units(r) for r in range(7)] == [0, 1, 1, 2, 2, 3, 3]


def test_scheduled_accounting_is_the_composed_gaussian_closed_form():
  """m steps of a Gaussian with multiplier z, no sampling, is one Gaussian
  with ``mu = sqrt(m) / z``, whose exact delta(epsilon) is Balle & Wang
  (ICML 2018, Thm. 8): ``Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)``."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from fedjax_pfi import privacy  # pylint: disable=g-import-not-at-top
  delta = 1e-5
  acc = privacy.Accountant(privacy.Accounting(
      2.0, privacy.SCHEDULED, 100, 10, delta))
  assert acc.accounting.relation == 'zero_out'
  assert acc.accounting.sensitivity == 1.0
  for m in (1, 4, 25):
    mu = np.sqrt(m) / 2.0
    def gap(eps, mu=mu):
      return (stats.norm.cdf(mu / 2 - eps / mu) -
              np.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu) - delta)
    exact = optimize.brentq(gap, 1e-6, 100.0)
    pld, rdp = acc.epsilon_pld(m), acc.epsilon_rdp(m)
    assert exact <= pld <= exact * 1.01 + 1e-3, (m, pld, exact)
    assert pld <= rdp, (m, pld, rdp)
  assert acc.epsilon_rdp(0) == 0.0


def test_fedbuff_with_dp_is_one_gaussian_release_a_step(tmp_path):
  """Without noise and with a clip nothing reaches, DP-FedBuff is FedBuff
  with uniform weights (the buffer K is the mean's denominator); with
  noise each step adds N(0, (z C)^2) to the buffer's sum, and epsilon is
  accounted over the most exposed client's steps."""
  from fedjax_pfi import privacy  # pylint: disable=g-import-not-at-top
  common = {'server.weighting': 'uniform', 'server.optimizer': 'fedavg',
            'server.learning_rate': 1.0}
  plain = _run_config(4, **common)
  private = _run_config(4, **common, **{
      'privacy.mechanism': 'gaussian', 'privacy.clip_norm': 1e6,
      'privacy.noise_multiplier': 0.0})
  training.run(plain, str(tmp_path / 'plain'))
  training.run(private, str(tmp_path / 'private'))
  a = without_time(training.read_metrics(str(tmp_path / 'plain')))
  b = without_time(training.read_metrics(str(tmp_path / 'private')))
  for x, y in zip(a, b):
    np.testing.assert_allclose(y['train_loss'], x['train_loss'], rtol=1e-6)
    np.testing.assert_allclose(y['delta_norm'], x['delta_norm'],
                               rtol=1e-5)
  noisy = _run_config(4, **common, **{
      'privacy.mechanism': 'gaussian', 'privacy.clip_norm': 0.5,
      'privacy.noise_multiplier': 0.8})
  training.run(noisy, str(tmp_path / 'noisy'))
  rows = training.read_metrics(str(tmp_path / 'noisy'))
  exp = training.build(noisy)
  assert exp.privacy.accountant.accounting.sampling == privacy.SCHEDULED
  assert exp.privacy.accountant.accounting.cohort == 3  # the buffer
  report = exp.privacy.accountant.accounting.report()
  assert report['privacy/neighboring_relation'] == 'zero_out'
  assert report['privacy/sampling_rate'] is None  # nothing is sampled
  from fedjax_pfi import participation  # pylint: disable=g-import-not-at-top
  assert participation.slots(noisy, 12) == 3  # not Poisson's bound
  for r, row in enumerate(rows):
    units = exp.devices.max_units(r + 1)
    assert row['privacy/max_client_steps'] == units
    assert row['privacy/epsilon_rdp'] == pytest.approx(
        exp.privacy.accountant.epsilon_rdp(units))
    assert row['privacy/noise_std'] == pytest.approx(0.8 * 0.5)
  assert rows[-1]['privacy/epsilon_pld'] == pytest.approx(
      exp.privacy.accountant.epsilon_pld(exp.devices.max_units(4)))


def test_max_staleness_discards_the_stale():
  t = hand_timeline(**{'asynchrony.max_staleness': 2})
  # client 2 arrives at t=7 three versions late and is dropped; it restarts
  # at 7 from version 3. Then client 0 at 9 (from 3 at 6: fresh), client 1
  # at 10 (from version 2, now 4: 2).
  got = [(t.round(r).ids[0], t.round(r).staleness[0],
          t.round(r).start + t.round(r).seconds) for r in range(5)]
  assert got == [(0, 0, 3), (1, 1, 5), (0, 1, 6), (0, 0, 9), (1, 2, 10)]
  assert t.round(3).metrics['async/discarded_stale'] == 1
  assert t.round(3).arrivals.slot.tolist() == [3 % 3]  # a ring of 3


def test_a_step_that_never_comes_is_an_error_not_a_hang(monkeypatch):
  """Online windows of 2 s, work of 3-7 s: nobody ever arrives."""
  monkeypatch.setattr(asynchrony, 'MAX_EVENTS_PER_STEP', 5000)
  short = devices.Availability(np.full(3, 10.0), np.zeros((3, 1)),
                               np.full((3, 1), 2.0))
  t = asynchrony.AsyncTimeline(hand_config(**{
      'asynchrony.mode': 'fedbuff', 'asynchrony.buffer_size': 1,
      'asynchrony.concurrency': 3}), SIZES, hand_profiles(), short, MB, MB)
  with pytest.raises(RuntimeError, match='without 1 arrivals to step on'):
    t.round(0)


def _run_config(rounds, **kw):
  return small_config(rounds=rounds, eval_every=rounds, **{
      'client.max_steps': 2, 'devices.profile': 'lognormal',
      'asynchrony.mode': 'fedbuff', 'asynchrony.buffer_size': 3,
      'asynchrony.concurrency': 5}, **kw)


def test_fedbuff_steps_match_a_per_client_loop():
  """Each buffered client trains from its own version with the same keys
  and batches, its delta weighted by ``s(tau)`` and its examples."""
  config = _run_config(5, **{'server.optimizer': 'fedadam'})
  exp = training.build(config)
  ds, sv = exp.splits.train, config.server
  server_opt = server_optimizers.server_optimizer(
      sv.optimizer, sv.learning_rate, momentum=sv.momentum, b1=sv.b1,
      b2=sv.b2, tau=sv.tau)
  params0 = training.initial_params(exp)
  state = exp.algorithm.init(params0)
  root = jax.random.key(config.seed)
  versions, ref_opt = [params0], server_opt.init(params0)
  stale_seen = 0
  for r in range(5):
    key = jax.random.fold_in(root, r)
    state, _ = exp.algorithm.apply(state, training.make_cohort(exp, r), key)
    one = exp.devices.round(r)
    stale_seen = max(stale_seen, int(one.staleness.max()))
    deltas, ws = [], []
    for j, cid in enumerate(one.ids):
      start = versions[r - int(one.staleness[j])]
      batches = reference.client_batches(ds, cid, config.client.batch_size,
                                         1, config.seed, r,
                                         int(one.steps[j]))
      local = reference.local_sgd(exp.model, optax.sgd(
          config.client.learning_rate), start, batches,
                                  jax.random.fold_in(key, int(cid)))
      s = float(asynchrony.staleness_weight(one.staleness[j], 'polynomial',
                                            0.5))
      deltas.append(jax.tree.map(lambda a, b: s * (a - b), local, start))
      ws.append(float(ds.client_sizes[cid]))
    mean = jax.tree.map(
        lambda *d: sum(w * x for w, x in zip(ws, d)) / sum(ws), *deltas)
    updates, ref_opt = server_opt.update(jax.tree.map(jnp.negative, mean),
                                         ref_opt, versions[-1])
    versions.append(optax.apply_updates(versions[-1], updates))
    chex.assert_trees_all_close(state.params, versions[-1], atol=2e-5,
                                rtol=2e-5)
  assert stale_seen >= 1  # the loop did see stale clients


@pytest.mark.parametrize('server', ['fedavg', 'fedadam'])
def test_all_arriving_together_is_synchronous_fedavg(tmp_path, server):
  """Identical devices and equal work: all K clients start together from one
  version and arrive together, and FedBuff (K = concurrency = the cohort,
  staleness 0) is the synchronous round, cohorts included."""
  same = {'devices.profile': 'lognormal', 'devices.speed_sigma': 0.0,
          'devices.bandwidth_sigma': 0.0, 'client.max_steps': 2,
          'server.optimizer': server}
  sync = training.run(small_config(rounds=3, **same), str(tmp_path / 's'))
  buff = training.run(small_config(rounds=3, **same, **{
      'asynchrony.mode': 'fedbuff'}), str(tmp_path / 'b'))
  for k, v in sync.items():
    if k.startswith(('train_loss', 'test/', 'delta_norm')):
      np.testing.assert_allclose(buff[k], v, rtol=1e-6, atol=1e-6,
                                 err_msg=k)
  assert buff['async/staleness_max'] == 0
  assert buff['clock/simulated_seconds'] == pytest.approx(
      sync['clock/simulated_seconds'])


def test_fedbuff_with_one_arrival_is_fedasync(tmp_path):
  """With one client in flight it is never stale, FedAsync's drift term
  ``x_v - x`` is 0, and its mixing step is FedBuff's with K = 1."""
  common = {'devices.profile': 'lognormal', 'asynchrony.concurrency': 1,
            'server.optimizer': 'fedavg', 'server.learning_rate': 0.6}
  a = training.run(small_config(rounds=4, **common, **{
      'asynchrony.mode': 'fedbuff', 'asynchrony.buffer_size': 1}),
                   str(tmp_path / 'buff'))
  b = training.run(small_config(rounds=4, **common, **{
      'asynchrony.mode': 'fedasync'}), str(tmp_path / 'async'))
  for k, v in a.items():
    if k.startswith(('train_loss', 'test/', 'delta_norm', 'clock/')):
      np.testing.assert_allclose(b[k], v, rtol=1e-6, atol=1e-6, err_msg=k)


def test_fedasync_mixes_stale_models():
  """FedAsync's step is x + alpha s(tau) (x_client - x): against a loop."""
  config = small_config(rounds=4, **{
      'client.max_steps': 2, 'devices.profile': 'lognormal',
      'asynchrony.mode': 'fedasync', 'asynchrony.concurrency': 4,
      'server.optimizer': 'fedavg', 'server.learning_rate': 0.6})
  exp = training.build(config)
  ds = exp.splits.train
  params0 = training.initial_params(exp)
  state = exp.algorithm.init(params0)
  root = jax.random.key(config.seed)
  versions = [params0]
  for r in range(4):
    key = jax.random.fold_in(root, r)
    state, _ = exp.algorithm.apply(state, training.make_cohort(exp, r), key)
    one = exp.devices.round(r)
    (cid,), (tau,), (steps,) = one.ids, one.staleness, one.steps
    start = versions[r - int(tau)]
    batches = reference.client_batches(ds, cid, config.client.batch_size, 1,
                                       config.seed, r, int(steps))
    local = reference.local_sgd(exp.model, optax.sgd(
        config.client.learning_rate), start, batches,
                                jax.random.fold_in(key, int(cid)))
    alpha = 0.6 * (1 + int(tau)) ** -0.5
    versions.append(jax.tree.map(lambda x, c: (1 - alpha) * x + alpha * c,
                                 versions[-1], local))
    chex.assert_trees_all_close(state.params, versions[-1], atol=2e-5,
                                rtol=2e-5)
  assert max(int(exp.devices.round(r).staleness[0]) for r in range(4)) >= 1


def test_an_asynchronous_run_resumes_exactly_with_clients_in_flight(tmp_path):
  full = training.run(_run_config(6), str(tmp_path / 'full'))
  assert full['async/in_flight'] > 0
  training.run(_run_config(6), str(tmp_path / 'resumed'), stop_after=3)
  training.run(_run_config(6), str(tmp_path / 'resumed'))
  assert without_time(training.read_metrics(str(tmp_path / 'resumed'))) == \
      without_time(training.read_metrics(str(tmp_path / 'full')))
  clock = np.load(tmp_path / 'full' / training.CLOCK_FILE)
  assert clock['staleness'].size == 6 * 3


def test_chunked_fedbuff_equals_the_plain_layout(tmp_path):
  training.run(_run_config(3), str(tmp_path / 'plain'))
  training.run(_run_config(3, **{'execution.chunk_size': 2}),
               str(tmp_path / 'chunked'))
  want = without_time(training.read_metrics(str(tmp_path / 'plain')))
  got = without_time(training.read_metrics(str(tmp_path / 'chunked')))
  for a, b in zip(got, want):
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5,
                                 err_msg=k)


@pytest.mark.parametrize('overrides, match', [
    ({'asynchrony.mode': 'gossip'}, 'asynchrony.mode must be one of'),
    ({'asynchrony.mode': 'fedbuff'}, "devices.profile='lognormal'"),
    ({'asynchrony.mode': 'fedbuff', 'devices.profile': 'lognormal',
      'asynchrony.buffer_size': 8, 'asynchrony.concurrency': 4},
     'asynchrony.buffer_size=8 is larger than asynchrony.concurrency=4'),
    ({'asynchrony.max_staleness': -1},
     r'asynchrony.max_staleness must be an integer >= 0, got -1'),
    ({'asynchrony.mode': 'fedasync', 'devices.profile': 'lognormal',
      'asynchrony.buffer_size': 4}, 'FedAsync steps on every arrival'),
    ({'asynchrony.mode': 'fedbuff', 'devices.profile': 'lognormal',
      'devices.deadline': 5.0}, 'devices.deadline is a synchronous strategy'),
    ({'asynchrony.mode': 'fedbuff', 'devices.profile': 'lognormal',
      'privacy.mechanism': 'gaussian', 'server.weighting': 'uniform',
      'privacy.noise_cohort_size': 100},
     'an asynchronous step samples none'),
    ({'asynchrony.mode': 'fedasync', 'devices.profile': 'lognormal'},
     "set server.optimizer='fedavg'"),
    ({'asynchrony.mode': 'fedbuff', 'devices.profile': 'lognormal',
      'asynchrony.concurrency': 50}, 'larger than the 10 training clients'),
    ({'asynchrony.mode': 'fedbuff', 'devices.profile': 'lognormal',
      'algorithm': 'fedrep', 'client.epochs': 2},
     'asynchronous aggregation starts each from'),
])
def test_refusals_name_the_option(overrides, match):
  with pytest.raises(ValueError, match=match):
    training.build(small_config(**overrides))


def test_fedbuff_composes_with_personal_state_secagg_and_compression(
    tmp_path):
  """A buffer is a cohort: FedPer's personal rows are written for the
  aggregated clients only, secure aggregation's masked sum gives the plain
  run to within its fixed point, top-k with error feedback runs."""
  exp = training.build(_run_config(3, algorithm='fedper'))
  state = exp.algorithm.init(training.initial_params(exp))
  before = jax.tree.map(np.asarray, state.client_states)
  for r in range(3):
    state, _ = exp.algorithm.apply(state, training.make_cohort(exp, r),
                                   jax.random.fold_in(jax.random.key(0), r))
  done = exp.devices.ever_completed(3)
  for old, new in zip(jax.tree.leaves(before),
                      jax.tree.leaves(state.client_states)):
    changed = np.any(np.asarray(new) != old, axis=tuple(
        range(1, old.ndim)))
    np.testing.assert_array_equal(changed, done)
  plain = training.run(_run_config(3), str(tmp_path / 'plain'))
  masked = training.run(_run_config(3, **{
      'secure_aggregation.enabled': True,
      'secure_aggregation.clip_norm': 100.0}), str(tmp_path / 'secagg'))
  np.testing.assert_allclose(masked['train_loss'], plain['train_loss'],
                             rtol=1e-4)
  np.testing.assert_allclose(masked['test/accuracy'], plain['test/accuracy'],
                             atol=0.01)
  topk = training.run(_run_config(3, **{
      'compression.name': 'topk', 'compression.fraction': 0.1,
      'compression.error_feedback': True}), str(tmp_path / 'topk'))
  assert 0 < topk['compression/vnmse'] < 1
  assert topk['comm/upload_bytes_per_client'] < plain[
      'comm/upload_bytes_per_client'] / 5


@pytest.mark.parametrize('asynchronous', [False, True])
def test_one_client_with_10_examples_is_10_clients_with_1_example(
    asynchronous):
  """One local step of full-batch SGD: a client's delta is ``-lr`` times
  its examples' mean gradient, so one client holding 10 examples (weight
  10) moves the model exactly as 10 clients holding one each (weight 1
  each). Synchronous FedAvg, and FedBuff steps (a buffer of the one fresh
  client against a buffer of the ten, ``s(0) = 1``)."""
  from fedjax_pfi.algorithms import aggregators  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import partitioned  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.data import cohort as cohort_lib  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.data.federated import FederatedDataset  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.models import zoo  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 6)).astype(np.float32)
  y = rng.integers(0, 3, 10).astype(np.int32)
  # client 0: all ten; clients 1..10: one each (the same examples)
  ds = FederatedDataset({'x': np.concatenate([x, x]),
                         'y': np.concatenate([y, y])},
                        np.concatenate([[0], np.arange(10, 21)]),
                        [str(i) for i in range(11)], {'num_classes': 3})
  model = zoo.build_model('mlp', x[:2], ds.metadata, hidden=(8,))
  aggregator = aggregators.weighted_mean()
  if asynchronous:
    aggregator = asynchrony.wrap(aggregator, asynchrony.Spec(3, False))
  alg = partitioned.fed_partitioned(
      model, optax.sgd(0.5), server_optimizers.server_optimizer('fedavg',
                                                                1.0),
      aggregator)
  params0 = model.init(jax.random.key(0))

  def step(ids):
    cohort = cohort_lib.stack_cohort(ds, ids, batch_size=10,
                                     step_buckets=(1,), seed=0, round_idx=0,
                                     num_slots=10)
    if asynchronous:  # every client fresh: ring slot 0, s(0) = 1
      cohort = cohort._replace(arrivals=asynchrony.Arrivals(
          np.zeros(10, np.int32), np.where(np.arange(10) < len(ids), 1.0,
                                           0.0).astype(np.float32)))
    np.testing.assert_array_equal(cohort.weight[:len(ids)],
                                  ds.client_sizes[ids])
    state, _ = alg.apply(alg.init(params0), cohort_lib.to_device(cohort),
                         jax.random.key(1))
    return state.params

  one = step(np.array([0]))
  ten = step(np.arange(1, 11))
  chex.assert_trees_all_close(one, ten, atol=1e-6, rtol=1e-6)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), one,
                       params0)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the step did move the model
