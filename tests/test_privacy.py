"""User-level DP: DP-FedAvg's round against a plain per-client loop with the
same keys, the accountant against dp-accounting called directly, and the
mechanism's properties (bounded messages, the noise's std, padding, exact
resumption, refusals before tracing)."""

import json
import re

import chex
import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pfi import privacy
from fedjax_pfi import training
from fedjax_pfi.algorithms import aggregators
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import fedavg
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import partitioned
from fedjax_pfi.algorithms import personalized
from fedjax_pfi.algorithms import registry
from fedjax_pfi.algorithms import rounds
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.models import zoo
from fedjax_pfi.peft import lora
from tests import reference
from tests.algorithms.test_rounds import toy_dataset
from tests.test_training import small_config
from tests.test_training import without_time

SEED = 3
B = 4
CLIP = 0.3
Z = 0.8


@pytest.fixture(scope='module')
def setup():
  ds = toy_dataset(num_clients=9)
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(5,))
  return ds, model, model.init(jax.random.key(0))


def clip(tree, c):
  norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(x)))
                           for x in jax.tree.leaves(tree))))
  return jax.tree.map(lambda x: x * min(1.0, c / max(norm, 1e-30)), tree), norm


def reference_noise(round_key, tree, std):
  """The noise draw of `aggregators.gaussian`, by its documented keys: the
  aggregator's key ``fold_in(round key, 2**31 - 2)``, folded with 0, split
  into one key per leaf (in tree order)."""
  key = jax.random.fold_in(jax.random.fold_in(round_key, 2**31 - 2), 0)
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      std * np.asarray(jax.random.normal(k, x.shape, jnp.float32))
      for k, x in zip(keys, leaves)])


def dp_reference_round(deltas, round_key, expected, params):
  """Clip each client's delta, sum, add the same noise draw, divide by the
  fixed denominator; the server's SGD(1) step."""
  clipped = [clip(d, CLIP)[0] for d in deltas]
  total = jax.tree.map(lambda *d: sum(np.asarray(x) for x in d), *clipped)
  noise = reference_noise(round_key, total, Z * CLIP)
  mean = jax.tree.map(lambda s, n: (s + n) / expected, total, noise)
  return jax.tree.map(lambda p, m: np.asarray(p) + m, params, mean)


def test_dp_fedavg_matches_reference_loop(setup):
  ds, model, params0 = setup
  agg = aggregators.gaussian(CLIP, Z, expected_clients=4.0)
  alg = fedavg.fed_opt(model, optax.sgd(0.1),
                       server_optimizers.server_optimizer('fedavg'), agg)
  state = alg.init(params0)
  ref = params0
  root = jax.random.key(11)
  for r in range(2):
    ids = cohort_lib.sample_cohort(ds.num_clients, 4, SEED, r)
    cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=2,
                                     step_buckets=(8, 16), num_slots=6,
                                     seed=SEED, round_idx=r)
    key = jax.random.fold_in(root, r)
    state, metrics = alg.apply(state, cohort, key)
    deltas = []
    for cid in ids:
      batches = reference.client_batches(ds, cid, B, 2, SEED, r)
      local = reference.local_sgd(model, optax.sgd(0.1), ref, batches,
                                  jax.random.fold_in(key, int(cid)))
      deltas.append(jax.tree.map(jnp.subtract, local, ref))
    norms = [clip(d, CLIP)[1] for d in deltas]
    ref = dp_reference_round(deltas, key, 4.0, ref)
    chex.assert_trees_all_close(state.params, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(float(metrics['privacy/unclipped_fraction']),
                               np.mean([n <= CLIP for n in norms]))
    np.testing.assert_allclose(float(metrics['privacy/noise_std']), Z * CLIP,
                               rtol=1e-6)


def test_dp_on_lora_adapters_matches_reference_loop():
  """FFA-LoRA: only ``B`` is federated, so only ``B``'s delta is clipped
  and noised; the frozen base and ``A`` are never in the message."""
  ds = toy_dataset(num_clients=6)
  base = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                         hidden=(6,))
  cfg = lora.LoraConfig(rank=2, alpha=2.0, target='Dense_0')
  model = lora.lora_model(base, cfg)
  params0 = model.init(jax.random.key(1))
  agg = aggregators.gaussian(CLIP, Z, expected_clients=3.0)
  alg = partitioned.fed_partitioned(
      model, optax.sgd(0.5), server_optimizers.server_optimizer('fedavg'),
      agg, frozen=r'^base/|^lora/.*/a$')
  frozen = alg.frozen_part(params0)
  state = alg.init(params0)
  trainable = jax.tree.map(np.asarray, state.params)  # B alone (donated below)
  ids = np.array([0, 2, 5])
  cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=1,
                                   seed=SEED)
  key = jax.random.key(4)
  new, _ = alg.apply(state, cohort, key, frozen)
  apply = reference.merged_apply(base, cfg.scale)

  def loss_of(t, batch, rng):
    logits = apply(param_groups.merge(frozen, t), batch['x'], rng, True)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['y']))

  deltas = []
  for cid in ids:
    batches = reference.client_batches(ds, cid, B, 1, SEED, 0)
    local = reference.sgd_steps(loss_of, trainable, batches,
                                jax.random.fold_in(key, int(cid)), 0.5)
    deltas.append(jax.tree.map(jnp.subtract, local, trainable))
  want = dp_reference_round(deltas, key, 3.0, trainable)
  chex.assert_trees_all_close(new.params, want, atol=2e-5, rtol=2e-5)
  assert param_groups.leaf_paths(new.params) and all(
      p.endswith('/b') for p in param_groups.leaf_paths(new.params))


def test_dp_on_dittos_global_model_matches_reference_loop(setup):
  """Ditto: the global model's deltas are clipped and noised; the personal
  models never leave the clients and are trained as without DP."""
  ds, model, params0 = setup
  agg = aggregators.gaussian(CLIP, Z, expected_clients=3.0)
  opt = optax.sgd(0.1)
  alg = personalized.ditto(model, opt,
                           server_optimizers.server_optimizer('fedavg'),
                           ds.num_clients, lam=0.5, aggregator=agg)
  plain = personalized.ditto(model, opt,
                             server_optimizers.server_optimizer('fedavg'),
                             ds.num_clients, lam=0.5)
  ids = np.array([1, 4, 7])
  cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=1,
                                   seed=SEED)
  key = jax.random.key(8)
  new, _ = alg.apply(alg.init(params0), cohort, key)
  base, _ = plain.apply(plain.init(params0), cohort, key)
  chex.assert_trees_all_close(new.client_states, base.client_states)
  deltas = []
  for cid in ids:
    batches = reference.client_batches(ds, cid, B, 1, SEED, 0)
    local = reference.local_sgd(model, opt, params0, batches,
                                jax.random.fold_in(key, int(cid)))
    deltas.append(jax.tree.map(jnp.subtract, local, params0))
  want = dp_reference_round(deltas, key, 3.0, params0)
  chex.assert_trees_all_close(new.params, want, atol=2e-5, rtol=2e-5)


def test_messages_are_clipped_and_padding_changes_nothing(setup):
  ds, model, params0 = setup
  agg = aggregators.gaussian(CLIP, Z, expected_clients=3.0)
  messages = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(0), (7,) + p.shape) * 3.0,
      params0)
  keys = jax.random.split(jax.random.key(1), 7)
  clipped, stats = jax.vmap(agg.client, in_axes=(0, None, 0))(
      messages, agg.init(params0), keys)
  norms = jax.vmap(aggregators.global_norm)(clipped)
  assert np.all(np.asarray(norms) <= CLIP * (1 + 1e-6))
  assert not np.any(np.asarray(stats['unclipped']))
  alg = fedavg.fed_opt(model, optax.sgd(0.1),
                       server_optimizers.server_optimizer('fedavg'), agg)
  ids = cohort_lib.sample_cohort(ds.num_clients, 3, SEED, 0)
  tight = cohort_lib.stack_cohort(ds, ids, batch_size=B, seed=SEED)
  padded = cohort_lib.stack_cohort(ds, ids, batch_size=B, seed=SEED,
                                   step_buckets=(tight.shape[1] + 5,),
                                   num_slots=8)
  s1, m1 = alg.apply(alg.init(params0), tight, jax.random.key(2))
  s2, m2 = alg.apply(alg.init(params0), padded, jax.random.key(2))
  chex.assert_trees_all_equal(s1.params, s2.params)
  for k in ('privacy/unclipped_fraction', 'clients', 'train_loss'):
    assert float(m1[k]) == float(m2[k]), k


def test_no_noise_and_no_clip_is_exactly_the_plain_round(setup):
  """sigma = 0 and C = inf: the uniform mean of the non-private round, bit
  for bit (a fixed-size cohort: the fixed denominator is its size)."""
  ds, model, params0 = setup
  server = server_optimizers.server_optimizer('fedadam', 0.05)
  private = fedavg.fed_opt(model, optax.sgd(0.1), server,
                           aggregators.gaussian(float('inf'), 0.0, 4.0))
  plain = fedavg.fed_opt(model, optax.sgd(0.1), server,
                         aggregators.weighted_mean('uniform'))
  ids = cohort_lib.sample_cohort(ds.num_clients, 4, SEED, 0)
  cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=2,
                                   seed=SEED, num_slots=6)
  s1, _ = private.apply(private.init(params0), cohort, jax.random.key(3))
  s2, _ = plain.apply(plain.init(params0), cohort, jax.random.key(3))
  chex.assert_trees_all_equal(s1.params, s2.params)
  chex.assert_trees_all_equal(s1.opt_state, s2.opt_state)


def test_noise_std_is_sigma_times_clip():
  """Over 400 draws of a 250-dim sum the sample std of N(0, (z C)^2) is
  within 1% of z C (its standard error is 0.07%)."""
  agg = aggregators.gaussian(CLIP, Z, expected_clients=1.0)
  zeros = {'w': jnp.zeros([250])}
  state = agg.init(zeros)

  def draw(key):
    mean, _, _ = agg.finalize({'message': zeros, 'weight': 0.0, 'clients': 0.0,
                               'unclipped': 0.0}, state, key)
    return mean['w']

  samples = np.asarray(jax.vmap(draw)(jax.random.split(jax.random.key(0),
                                                       400)))
  assert abs(samples.std() / (Z * CLIP) - 1) < 0.01, samples.std()
  assert abs(samples.mean()) < 4 * Z * CLIP / np.sqrt(samples.size)


def test_epsilon_matches_dp_accounting():
  """Poisson q = 0.01, sigma = 1, T = 1000, delta = 1e-5: RDP 2.1014 and
  PLD 1.8282 (the issue's figures), and dp-accounting called directly."""
  acc = privacy.Accountant(privacy.Accounting(1.0, 'poisson', 10000, 100,
                                              1e-5))
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          0.01, dp_accounting.GaussianDpEvent(1.0)), 1000)
  rdp = rdp_privacy_accountant.RdpAccountant()
  rdp.compose(event)
  pld = pld_privacy_accountant.PLDAccountant()
  pld.compose(event)
  assert abs(acc.epsilon_rdp(1000) - rdp.get_epsilon(1e-5)) < 1e-9
  assert abs(acc.epsilon_pld(1000) - pld.get_epsilon(1e-5)) < 1e-9
  assert round(acc.epsilon_rdp(1000), 4) == 2.1014
  assert round(acc.epsilon_pld(1000), 4) == 1.8282


def test_fixed_size_sampling_is_rdp_replace_one():
  acc = privacy.Accountant(privacy.Accounting(1.2, 'fixed', 500, 20, 1e-5))
  direct = rdp_privacy_accountant.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  # Replacing one client moves the clipped sum by up to 2C: the Gaussian's
  # std z C is 1.2 / 2 of that sensitivity.
  direct.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(
          500, 20, dp_accounting.GaussianDpEvent(0.6)), 300))
  assert abs(acc.epsilon_rdp(300) - direct.get_epsilon(1e-5)) < 1e-9
  assert acc.epsilon_pld(300) is None
  report = acc.accounting.report()
  assert report['privacy/neighboring_relation'] == 'replace_one'
  assert (report['privacy/sensitivity_clip_norms'],
          report['privacy/event_noise_multiplier']) == (2.0, 0.6)
  poisson = privacy.Accounting(1.2, 'poisson', 500, 20, 1e-5).report()
  assert (poisson['privacy/sensitivity_clip_norms'],
          poisson['privacy/event_noise_multiplier']) == (1.0, 1.2)


@pytest.mark.parametrize('kind', ['rdp', 'pld'])
def test_target_epsilon_calibration(kind):
  accounting = privacy.Accounting(1.0, 'poisson', 1000, 20, 1e-5)
  z = privacy.calibrate(accounting, 10, 2.0, kind)
  got = privacy.Accountant(accounting._replace(noise_multiplier=z))
  eps = got.epsilon_rdp(10) if kind == "rdp" else got.epsilon_pld(10)
  assert 0.99 * 2.0 <= eps <= 2.0, (z, eps)
  with pytest.raises(ValueError, match='cannot be reached in 50 rounds'):
    privacy.calibrate(accounting._replace(cohort=1000), 50, 1e-4, 'rdp')


def dp_config(**overrides):
  return small_config(**{'data.num_clients': 40, 'privacy.mechanism':
                         'gaussian', 'privacy.clip_norm': 0.5,
                         'privacy.noise_multiplier': 1.0,
                         'privacy.delta': 1e-3, **overrides})


def test_private_run_reports_epsilon_and_resumes_exactly(tmp_path):
  """Stopped after round 3 (checkpointed at 2): the resumed run continues
  the noise and epsilon exactly. PLD's epsilon is reported at evaluation
  and checkpoint rounds (2, 4), RDP's every round."""
  config = dp_config(checkpoint_every=2)
  whole = training.run(config, str(tmp_path / 'whole'))
  training.run(config, str(tmp_path / 'split'), stop_after=3)
  training.run(config, str(tmp_path / 'split'))
  rows = training.read_metrics(str(tmp_path / 'split'))
  assert without_time(rows) == without_time(
      training.read_metrics(str(tmp_path / 'whole')))
  acc = privacy.Accountant(privacy.Accounting(1.0, 'poisson', 32, 4, 1e-3))
  for r in rows:
    assert abs(r['privacy/epsilon_rdp'] - acc.epsilon_rdp(r['round'])) < 1e-9
  assert [r['round'] for r in rows if 'privacy/epsilon_pld' in r] == [2, 4]
  assert abs(whole['privacy/epsilon_pld'] - acc.epsilon_pld(4)) < 1e-9
  assert whole['privacy/epsilon_pld'] < whole['privacy/epsilon_rdp']
  report = json.load(open(tmp_path / 'whole' / 'report.json'))
  assert report['privacy/sampling_rate'] == 4 / 32
  assert report['privacy/noise_multiplier'] == 1.0
  assert report['privacy/rounds'] == 4
  assert report['privacy/neighboring_relation'] == 'add_or_remove_one'


def test_poisson_cohorts_vary_and_compile_once(tmp_path):
  config = dp_config(rounds=6, eval_every=6, step_buckets='max')
  training.run(config, str(tmp_path))
  rows = training.read_metrics(str(tmp_path))
  assert len({r['clients'] for r in rows}) > 1
  assert rows[-1]['time/compilations'] == 1


def test_packed_and_chunked_private_rounds_equal_the_plain_layout(tmp_path):
  plain = dp_config(step_buckets='max', rounds=2, eval_every=2)
  training.run(plain, str(tmp_path / 'plain'))
  want = without_time(training.read_metrics(str(tmp_path / 'plain')))
  for name, overrides in (('packed', {'execution.pack_lanes': 2}),
                          ('chunked', {'execution.chunk_size': 2})):
    training.run(dp_config(step_buckets='max', rounds=2, eval_every=2,
                           **overrides), str(tmp_path / name))
    got = without_time(training.read_metrics(str(tmp_path / name)))
    for a, b in zip(got, want):
      for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5,
                                   err_msg=(name, k))


def test_adaptive_clipping_follows_andrew_et_al(setup):
  """C_{t+1} = C_t exp(-eta (b~ - gamma)) with b~ the noised unclipped
  fraction over the expected clients, released from bits shifted by 1/2
  (sensitivity 1/2); the delta noise is z_delta C_t with
  z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2."""
  adaptive = aggregators.AdaptiveClipping(0.5, 0.2, count_noise_std=2.0)
  agg = aggregators.gaussian(CLIP, Z, expected_clients=4.0,
                             adaptive=adaptive)
  params = {'w': jnp.zeros([3])}
  # 5 clients took part (Poisson: not the expected 4), 3 were not clipped.
  sums = {'message': params, 'weight': 5.0, 'clients': 5.0,
          'unclipped': jnp.float32(3.0)}
  key = jax.random.key(5)
  _, state, metrics = agg.finalize(sums, agg.init(params), key)
  count_noise = 2.0 * float(jax.random.normal(jax.random.fold_in(key, 1), (),
                                              jnp.float32))
  # released: sum of (b_i - 1/2) = 3 - 5/2, plus the noise
  b = (3.0 - 2.5 + count_noise) / 4.0 + 0.5
  np.testing.assert_allclose(float(metrics['privacy/unclipped_fraction_noised']),
                             b, rtol=1e-6)
  np.testing.assert_allclose(float(state['clip_norm']),
                             CLIP * np.exp(-0.2 * (b - 0.5)), rtol=1e-6)
  z_delta = (Z ** -2 - 4.0 ** -2) ** -0.5
  np.testing.assert_allclose(float(metrics['privacy/noise_std']),
                             z_delta * CLIP, rtol=1e-6)
  with pytest.raises(ValueError, match='count noise std 0.1 is too small'):
    aggregators.gaussian(CLIP, Z, 4.0,
                         adaptive=aggregators.AdaptiveClipping(0.5, 0.2, 0.1))


def test_adaptive_run_moves_the_clip_norm(tmp_path):
  final = training.run(dp_config(rounds=2, eval_every=2,
                                 **{'privacy.mechanism': 'adaptive'}),
                       str(tmp_path))
  assert final['privacy/clip_norm'] != 0.5
  assert np.isfinite(final['privacy/epsilon_rdp'])


def test_extrapolated_accounting_is_labelled():
  config = dp_config(**{'privacy.noise_cohort_size': 100,
                        'privacy.noise_population': 10000})
  exp = training.build(config)
  acc = exp.privacy.accountant.accounting
  assert (acc.population, acc.cohort, acc.extrapolated) == (10000, 100, True)
  assert training.privacy_report(exp)['privacy/extrapolated'] is True
  # The simulated noise is that of a mean over 100 clients: std z C n / n'.
  agg = exp.privacy.aggregator
  zeros = {'w': jnp.zeros([3])}
  _, _, metrics = agg.finalize({'message': zeros, 'weight': 4.0,
                                'clients': 4.0, 'unclipped': 4.0},
                               agg.init(zeros), jax.random.key(0))
  np.testing.assert_allclose(float(metrics['privacy/noise_std']),
                             0.5 * 4 / 100, rtol=1e-6)


@pytest.mark.parametrize('overrides,message', [
    ({'privacy.noise_multiplier': -1.0},
     'privacy.noise_multiplier must be a finite number >= 0, got -1.0'),
    ({'privacy.clip_norm': 0.0}, 'privacy.clip_norm must be > 0'),
    ({'privacy.mechanism': 'laplace'}, "unknown privacy.mechanism 'laplace'"),
    ({'privacy.sampling': 'shuffle'}, "unknown privacy.sampling 'shuffle'"),
    ({'server.weighting': 'examples'},
     "server.weighting='examples' cannot be used with DP"),
    ({'privacy.sampling': 'fixed', 'privacy.target_epsilon': 2.0},
     "privacy.accountant='pld' needs Poisson sampling"),
])
def test_bad_privacy_options_are_refused_before_loading(tmp_path, monkeypatch,
                                                        overrides, message):
  def load(cfg):
    raise AssertionError('loaded before the check')
  monkeypatch.setattr(training.registry, 'load_splits', load)
  with pytest.raises(ValueError, match=re.escape(message)):
    training.run(dp_config(**overrides), str(tmp_path))


@pytest.mark.parametrize('algorithm', ['scaffold', 'local_only', 'flora'])
def test_dp_refused_where_it_cannot_be_accounted(tmp_path, algorithm):
  with pytest.raises(ValueError, match=re.escape(
      f"aggregator 'dp_gaussian' cannot be used with algorithm "
      f"'{algorithm}'")):
    training.build(dp_config(algorithm=algorithm))


def test_unreachable_target_epsilon_is_refused(tmp_path):
  """Every client in every round (q = 1): epsilon 1e-4 would need a noise
  multiplier above 1000, more noise than any update survives."""
  with pytest.raises(ValueError, match=re.escape(
      'privacy.target_epsilon=0.0001 cannot be reached in 4 rounds at '
      'sampling rate 1')):
    training.build(dp_config(clients_per_round=32,
                             **{'privacy.target_epsilon': 1e-4,
                                'privacy.accountant': 'rdp'}))


def test_delta_above_one_over_population_warns():
  with pytest.warns(UserWarning, match=r'privacy.delta=0.05 is not below '
                    r'1/population = 0.03125'):
    training.build(dp_config(**{'privacy.delta': 0.05}))


def test_transform_chain_runs_before_the_aggregator(setup):
  """A per-client transform (here: halve every message) composes with the
  round: the weighted mean of halved deltas is half the plain one."""
  ds, model, params0 = setup
  half = rounds.ClientTransform(
      lambda params: (), lambda m, state, key: (
          jax.tree.map(lambda x: 0.5 * x, m), state))
  server = server_optimizers.server_optimizer('fedavg')
  ids = cohort_lib.sample_cohort(ds.num_clients, 3, SEED, 0)
  cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, seed=SEED)
  outs = []
  for transform in (None, rounds.chain(half)):
    alg = partitioned.fed_partitioned(model, optax.sgd(0.1), server,
                                      transform=transform)
    outs.append(alg.apply(alg.init(params0), cohort, jax.random.key(0))[0])
  chex.assert_trees_all_close(
      jax.tree.map(lambda a, p: a - p, outs[1].params, params0),
      jax.tree.map(lambda a, p: 0.5 * (a - p), outs[0].params, params0),
      atol=1e-6)


def test_an_aggregator_needing_every_message_is_refused_by_round(setup):
  """Chunked, packed and sharded rounds of `fed_partitioned` now fill the
  buffer of every message (issue 15; this test refused chunking before),
  so the refusal is of the rounds that do not collect the messages."""
  ds, model, _ = setup
  needs_all = aggregators.weighted_mean()._replace(needs='all',
                                                   name='median')
  built = registry.build(small_config(**{'execution.chunk_size': 2}), model,
                         ds.num_clients, core.Execution(chunk_size=2),
                         needs_all)
  assert built.algorithm.capabilities.robust_aggregation
  with pytest.raises(ValueError, match=re.escape(
      "aggregator 'median' needs every client's message, which the round of "
      "algorithm 'apfl' does not collect")):
    registry.build(small_config(algorithm='apfl'), model, ds.num_clients,
                   core.Execution(), needs_all)


def test_a_transform_is_refused_by_a_round_that_cannot_take_one(setup):
  ds, model, _ = setup
  halve = rounds.ClientTransform(
      lambda params: (),
      lambda m, state, key: (jax.tree.map(lambda x: 0.5 * x, m), state))
  built = registry.build(small_config(), model, ds.num_clients,
                         transform=halve)
  assert built.algorithm.capabilities.transforms
  # (Ditto takes one since issue 15: its attacks are transforms)
  with pytest.raises(ValueError, match=re.escape(
      "algorithm 'apfl' takes no per-client transform")):
    registry.build(small_config(algorithm='apfl'), model, ds.num_clients,
                   transform=halve)
