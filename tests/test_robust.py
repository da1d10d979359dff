"""Robust aggregation and attacking clients (issue 15, second half).

Every rule against its numpy reference written from the paper
(`tests.reference`), on a padded buffer whose padded rows hold garbage;
every attack's message against a hand computation; the round against a
plain per-client loop; layouts against each other; refusals.
"""

import json
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pfi import attacks
from fedjax_pfi import training
from fedjax_pfi.algorithms import fedavg
from fedjax_pfi.algorithms import robust
from fedjax_pfi.algorithms import rounds
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data.federated import FederatedSplits
from fedjax_pfi.models import zoo
from tests import reference
from tests.algorithms.test_rounds import toy_dataset
from tests.test_training import small_config
from tests.test_training import without_time

M, D, F = 9, 7, 2


def padded(m=M, d=D, pad=3, seed=0):
  """``(x_real [m, d] float64, x [m + pad, d] float32, valid)``: the real
  rows at random slots, garbage (1e6, NaN-free) in the others."""
  rng = np.random.default_rng(seed)
  real = rng.normal(size=(m, d))
  real[0] += 5.0  # an outlier
  n = m + pad
  slots = np.sort(rng.choice(n, m, replace=False))
  x = np.full((n, d), 1e6, np.float32)
  x[slots] = real
  valid = np.zeros(n, bool)
  valid[slots] = True
  return real.astype(np.float32).astype(np.float64), jnp.asarray(x), \
      jnp.asarray(valid)


RULES = {
    'median': (lambda x, v: robust.coordinate_median(x, v),
               reference.np_median),
    'trimmed_mean': (lambda x, v: robust.trimmed_mean(x, v, 0.2),
                     lambda r: reference.np_trimmed_mean(r, 0.2)),
    'krum': (lambda x, v: robust.multi_krum(x, v, F, 1)[0],
             lambda r: reference.np_multi_krum(r, F, 1)),
    'multi_krum': (lambda x, v: robust.multi_krum(x, v, F)[0],
                   lambda r: reference.np_multi_krum(r, F)),
    'geometric_median': (lambda x, v: robust.geometric_median(x, v, 5, 1e-6),
                         lambda r: reference.np_geometric_median(r, 5, 1e-6)),
    'centered_clipping': (
        lambda x, v: robust.centered_clipping(x, v, jnp.full((D,), 0.3), 2,
                                              1.5),
        lambda r: reference.np_centered_clipping(r, np.full(D, 0.3), 2, 1.5)),
    'norm_bound': (lambda x, v: robust.norm_bound(x, v, 2.0),
                   lambda r: reference.np_norm_bound(r, 2.0)),
    'mean': (lambda x, v: robust.weighted_mean(x, v), lambda r: r.mean(0)),
}


@pytest.mark.parametrize('name', sorted(RULES))
@pytest.mark.parametrize('seed', [0, 1])
def test_every_rule_matches_its_reference_with_padding_excluded(name, seed):
  real, x, valid = padded(seed=seed)
  ours, ref = RULES[name]
  np.testing.assert_allclose(np.asarray(ours(x, valid)), ref(real),
                             rtol=1e-5, atol=1e-5)


def test_nearest_neighbor_mixing_matches_its_reference():
  real, x, valid = padded()
  mixed, still = robust.nearest_neighbor_mixing(x, valid, F)
  np.testing.assert_allclose(np.asarray(mixed)[np.asarray(valid)],
                             reference.np_nnm(real, F), rtol=1e-5, atol=1e-5)
  assert np.array_equal(still, valid)


def test_bucketing_averages_disjoint_buckets_of_the_real_rows():
  real, x, valid = padded(m=9)
  means, ok = robust.bucketing(x, valid, 2, jax.random.key(3))
  means, ok = np.asarray(means), np.asarray(ok)
  assert ok.sum() == 5  # ceil(9 / 2)
  # every real row in exactly one bucket: sizes 2,2,2,2,1 -> the weighted
  # sum of the bucket means is the sum of the rows
  sizes = np.array([2, 2, 2, 2, 1])
  np.testing.assert_allclose((sizes[:, None] * means[ok]).sum(0),
                             real.sum(0), rtol=1e-5, atol=1e-4)
  # each bucket mean is the mean of two real rows (or one: the last)
  for b in means[ok][:4]:
    pairs = [(i, j) for i in range(9) for j in range(i + 1, 9)
             if np.allclose((real[i] + real[j]) / 2, b, atol=1e-5)]
    assert len(pairs) == 1
  # size 1 is a shuffle: a median over buckets is the median of the rows
  means1, ok1 = robust.bucketing(x, valid, 1, jax.random.key(3))
  np.testing.assert_allclose(robust.coordinate_median(means1, ok1),
                             reference.np_median(real), rtol=1e-6)


def test_geometric_median_converges_to_the_median_on_a_line():
  """In one dimension the geometric median of an odd set is its median."""
  pts = jnp.asarray([[0.0], [1.0], [2.0], [7.0], [100.0]])
  got = robust.geometric_median(pts, jnp.ones(5, bool), 200, 1e-9)
  assert abs(float(got[0]) - 2.0) < 1e-3


@pytest.mark.parametrize('name', sorted(robust.RULES))
@pytest.mark.parametrize('pre', robust.PRE)
def test_identical_honest_updates_are_returned_unchanged(name, pre):
  """f = 0 and every client sends the same update: every rule, after
  every pre-aggregator, returns it."""
  u = np.random.default_rng(0).normal(size=D).astype(np.float32) * 0.5
  x = jnp.asarray(np.tile(u, (8, 1)))
  valid = jnp.asarray([True] * 6 + [False] * 2)
  x = x.at[6:].set(1e6)
  spec = robust.Spec(name=name, pre=pre, f=0, norm_bound=10.0, tau=10.0)
  state = jnp.asarray(u) if name == 'centered_clipping' else ()
  v, *_ = robust.robust_aggregate(spec, x, valid, jnp.ones(8), state,
                                  jax.random.key(0))
  np.testing.assert_allclose(np.asarray(v), u, rtol=1e-5, atol=1e-6)


def test_a_robust_rule_resists_what_the_mean_does_not():
  """Two scaled sign-flipped clients of nine drag the mean far off; the
  median, Krum and the geometric median stay with the honest seven."""
  rng = np.random.default_rng(1)
  honest = 1.0 + 0.1 * rng.normal(size=(7, D))
  x = jnp.asarray(np.concatenate([honest, -50 * np.ones((2, D))]),
                  jnp.float32)
  valid = jnp.ones(9, bool)
  truth = honest.mean(0)
  assert np.abs(np.asarray(robust.weighted_mean(x, valid)) - truth).max() > 5
  for v in (robust.coordinate_median(x, valid),
            robust.multi_krum(x, valid, 2, 1)[0],
            robust.geometric_median(x, valid, 10, 1e-6)):
    assert np.abs(np.asarray(v) - truth).max() < 0.3


# -- attacks: each message by hand ------------------------------------------------


def _spec(name, **kw):
  return attacks.Spec(name, 0.5, np.array([False, True, False, True]), **kw)


@pytest.mark.parametrize('name,expect', [
    ('sign_flip', lambda m, k: -m), ('scale', lambda m, k: 10.0 * m),
    ('backdoor', lambda m, k: 4.0 * m),
    ('gaussian', lambda m, k: 2.0 * np.asarray(
        jax.random.normal(jax.random.split(k, 1)[0], m.shape)))])
def test_update_attacks_replace_only_the_malicious_messages(name, expect):
  t = attacks.transform(_spec(name, noise_std=2.0, boost=4.0))
  state0 = t.init(None)
  m = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
  for cid in range(4):
    key = jax.random.key(cid)
    out, _ = t.apply({'w': jnp.asarray(m)}, t.select(state0, cid), key)
    want = expect(m, key) if cid % 2 else m
    np.testing.assert_allclose(np.asarray(out['w']), want, rtol=1e-6)
  # a padded slot (id -1) is never malicious
  out, _ = t.apply({'w': jnp.asarray(m)}, t.select(state0, -1),
                   jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out['w']), m)


def test_alie_and_ipm_messages_by_hand():
  # ids 0..4 real (1 and 3 malicious), a padded slot; honest rows 1, 2, 3
  x = jnp.asarray([[1.0, 0.0], [9.0, 9.0], [2.0, 2.0], [9.0, 9.0],
                   [3.0, 4.0], [5e5, 5e5]])
  ids = jnp.asarray([0, 1, 2, 3, 4, -1])
  valid = jnp.asarray([True] * 5 + [False])
  mal = np.array([False, True, False, True, False])
  mu = np.array([2.0, 2.0])
  sigma = np.sqrt(np.array([2 / 3, 8 / 3]))  # population std of 1,2,3 / 0,2,4
  # Baruch et al.: n = 5, f = 2: s = floor(3.5) - 2 = 1, z = Phi^-1(4/5)
  z = 0.8416212335729143
  np.testing.assert_allclose(float(attacks.alie_z(5, 2)), z, rtol=1e-5)
  got, bad = attacks.in_round(attacks.Spec('alie', 0.4, mal))(
      x, valid, ids, jax.random.key(0))
  assert np.array_equal(bad, [False, True, False, True, False, False])
  np.testing.assert_allclose(np.asarray(got)[[1, 3]],
                             np.tile(mu - z * sigma, (2, 1)), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[[0, 2, 4, 5]],
                                np.asarray(x)[[0, 2, 4, 5]])
  got, _ = attacks.in_round(attacks.Spec('ipm', 0.4, mal, ipm_epsilon=0.5))(
      x, valid, ids, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(got)[[1, 3]],
                             np.tile(-0.5 * mu, (2, 1)), rtol=1e-6)
  got, _ = attacks.in_round(attacks.Spec('alie', 0.4, mal, alie_z=1.5))(
      x, valid, ids, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(got)[1], mu - 1.5 * sigma, rtol=1e-5)


def test_label_flip_and_the_backdoor_poison_only_the_malicious_data():
  ds = toy_dataset(num_clients=6, num_classes=4)
  mal = attacks.malicious_set(6, 0.5, seed=0)
  assert mal.sum() == 3
  assert np.array_equal(mal, attacks.malicious_set(6, 0.5, seed=0))
  splits = FederatedSplits(ds, ds, ds)
  flipped = attacks.poison(splits, attacks.Spec('label_flip', 0.5, mal))
  for c in range(6):
    y0, y1 = ds.client(c)['y'], flipped.train.client(c)['y']
    np.testing.assert_array_equal(y1, 3 - y0 if mal[c] else y0)
  # images: a backdoor replaces half a malicious client's examples
  img = toy_dataset(num_clients=4)
  x = np.zeros((img.num_examples, 28, 28, 1), np.float32)
  img = type(img)({'x': x, 'y': img.columns['y']}, img.offsets,
                  img.client_names, {'num_classes': 4})
  spec = attacks.Spec('backdoor', 0.5, np.array([True, False, False, False]),
                      target=2, poison_fraction=0.5)
  got = attacks.poison(FederatedSplits(img, img, img), spec)
  bad = got.train.client(0)
  n = bad['y'].size
  triggered = bad['x'].reshape(n, -1).sum(1) > 0
  assert triggered.sum() == round(n / 2)
  assert np.all(bad['y'][triggered] == 2)
  assert bad['x'][triggered][0, 23:27, 23:27, 0].sum() == 8  # checkerboard
  np.testing.assert_array_equal(got.train.client(1)['x'], img.client(1)['x'])
  probe = attacks.backdoor_probe(img, spec, 1000, seed=0)
  honest_not_target = (~spec.malicious[np.repeat(np.arange(4),
                                                 img.client_sizes)]) & (
                                                     img.columns['y'] != 2)
  assert probe['x'].shape[0] == honest_not_target.sum()
  assert np.all(probe['y'] == 2)


def test_text_label_flip_and_trigger_phrase():
  meta = {'pad_id': 0, 'vocab_size': 5}
  y = np.array([[0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(attacks.flip_labels(y, meta),
                                [[0, 4, 3, 2, 1]])
  spec = attacks.Spec('backdoor', 0.5, np.array([True]), trigger='ab ',
                      target_text='cd')
  x = np.arange(2, 12, dtype=np.int32).reshape(1, 10)
  px, py, pt = attacks.trigger_windows(x, spec, 'char', 0)
  from fedjax_pfi.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load_tokenizer('char')
  stream = np.concatenate([px[0], py[0, -1:]])
  assert tok.decode(stream[-5:].tolist()) == 'ab cd'
  np.testing.assert_array_equal(py[0, :-1], px[0, 1:])
  assert tok.decode(pt[0][pt[0] != 0].tolist()) == 'cd'
  assert np.all(pt[0, :-2] == 0)


# -- the round ---------------------------------------------------------------------


@pytest.mark.parametrize('name', ['median', 'krum', 'geometric_median'])
def test_a_robust_round_matches_the_per_client_loop(name):
  """fed_opt with a robust aggregator and sign-flipping clients 1 and 4:
  each client trains on its own batches, the malicious negate, the numpy
  rule aggregates the real clients' deltas, the server steps."""
  ds = toy_dataset()
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(5,))
  params0 = model.init(jax.random.key(0))
  mal = np.zeros(ds.num_clients, bool)
  mal[[1, 4]] = True
  spec = robust.Spec(name=name, f=1, iterations=5)
  atk = attacks.Spec('sign_flip', 0.2, mal)
  server = server_optimizers.server_optimizer('fedavg', 1.0)
  alg = fedavg.fed_opt(model, optax.sgd(0.1), server,
                       robust.aggregator(spec, attacks.in_round(atk)),
                       transform=attacks.transform(atk))
  state = alg.init(params0)
  ids = np.array([4, 0, 7, 1, 2, 6])
  cohort = cohort_lib.stack_cohort(ds, ids, batch_size=4, num_epochs=1,
                                   step_buckets=(8,), num_slots=8, seed=3,
                                   round_idx=0)
  key = jax.random.key(11)
  state, metrics = alg.apply(state, cohort, key)
  assert int(metrics['attack/malicious_clients']) == 2
  deltas = []
  for cid in sorted(ids):  # the buffer is sorted by id: same order
    batches = reference.client_batches(ds, cid, 4, 1, 3, 0)
    local = reference.local_sgd(model, optax.sgd(0.1), params0, batches,
                                jax.random.fold_in(key, int(cid)))
    d = jax.tree.map(jnp.subtract, local, params0)
    flat = np.concatenate([np.ravel(v) for v in jax.tree.leaves(d)])
    deltas.append(-flat if mal[cid] else flat)
  x = np.stack(deltas).astype(np.float64)
  want = {'median': reference.np_median,
          'krum': lambda r: reference.np_multi_krum(r, 1, 1),
          'geometric_median': lambda r: reference.np_geometric_median(
              r, 5, 1e-6)}[name](x)
  got = np.concatenate([np.ravel(v) for v in jax.tree.leaves(
      jax.tree.map(jnp.subtract, state.params, params0))])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def _metrics(workdir):
  return [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = {'server.optimizer': 'fedavg', 'server.learning_rate': 1.0,
          'clients_per_round': 6, 'aggregator.name': 'multi_krum',
          'aggregator.f': 1, 'attack.name': 'alie', 'attack.fraction': 0.25}
  out = {}
  for name, kw in [('plain', {}), ('chunked', {'execution.chunk_size': 4}),
                   ('packed', {'execution.pack_lanes': 3}),
                   ('resumed', {}),
                   ('buffered_mean', {'aggregator.name': 'mean',
                                      'aggregator.pre': 'bucketing',
                                      'aggregator.bucket_size': 1,
                                      'attack.name': 'none',
                                      'attack.fraction': 0.0,
                                      'server.weighting': 'uniform'}),
                   ('uniform_mean', {'aggregator.name': 'mean',
                                     'attack.name': 'none',
                                     'attack.fraction': 0.0,
                                     'server.weighting': 'uniform'})]:
    workdir = str(tmp_path_factory.mktemp(name))
    config = small_config(**{**base, **kw})
    if name == 'resumed':
      training.run(config, workdir, stop_after=2)
    training.run(config, workdir)
    out[name] = _metrics(workdir)
  return out


def test_chunked_packed_and_resumed_rounds_equal_the_plain_one(runs):
  """The buffer is sorted by client id before the rule, so every layout
  gives the same numbers (the chunks' local training agrees to float
  tolerance, as without robust aggregation)."""
  for other in ('chunked', 'packed'):
    for a, b in zip(runs['plain'], runs[other]):
      assert abs(a['delta_norm'] - b['delta_norm']) < 1e-5, other
      assert a['attack/malicious_clients'] == b['attack/malicious_clients']
  assert without_time(runs['resumed']) == without_time(runs['plain'])
  assert all(r['time/compilations'] <= 1 for r in runs['plain'][1:])
  assert sum(r['attack/malicious_clients'] for r in runs['plain']) > 0
  assert all(0 <= r['attack/malicious_selected_fraction'] <= 1
             for r in runs['plain'])


def test_the_buffered_mean_is_the_summed_mean(runs):
  """Bucketing with buckets of one is a shuffle, so the buffered uniform
  mean equals the summed uniform mean of the sum path."""
  for a, b in zip(runs['uniform_mean'], runs['buffered_mean']):
    assert abs(a['delta_norm'] - b['delta_norm']) < 1e-5
    assert abs(a['train_loss'] - b['train_loss']) < 1e-5


@pytest.mark.parametrize('overrides,match', [
    ({'aggregator.name': 'krum', 'aggregator.f': 0,
      'secure_aggregation.enabled': True,
      'secure_aggregation.clip_norm': 1.0}, 'secure aggregation hides'),
    ({'attack.name': 'alie', 'attack.fraction': 0.2,
      'secure_aggregation.enabled': True,
      'secure_aggregation.clip_norm': 1.0}, 'secure aggregation hides'),
    ({'aggregator.name': 'median', 'privacy.mechanism': 'gaussian'},
     'another sensitivity'),
    ({'aggregator.name': 'krum', 'aggregator.f': 1}, r'f <= \(C - 3\) / 2'),
    ({'aggregator.name': 'trimmed_mean', 'aggregator.beta': 0.5},
     r'beta=0.5 for trimmed_mean must be in \[0, 0.5\)'),
    ({'aggregator.name': 'mode'}, "unknown aggregator.name 'mode'"),
    ({'aggregator.pre': 'bulyan'}, "unknown aggregator.pre 'bulyan'"),
    ({'attack.name': 'lie'}, "unknown attack.name 'lie'"),
    ({'attack.fraction': 0.2}, "attack.name='none'"),
    ({'attack.name': 'scale', 'attack.fraction': 1.5},
     r'attack.fraction must be a number in \[0, 1\]'),
    ({'aggregator.name': 'median', 'algorithm': 'apfl'},
     "the round of algorithm 'apfl' does not collect"),
])
def test_impossible_configs_are_refused_before_tracing(overrides, match):
  with pytest.raises(ValueError, match=match):
    training.build(small_config(**overrides))


def test_half_or_more_malicious_warns_naming_the_bound():
  c = small_config(**{'aggregator.name': 'median', 'attack.name': 'sign_flip',
                      'attack.fraction': 0.5})
  with pytest.warns(UserWarning, match=r'f < 0.5'):
    training.build(c)
  with warnings.catch_warnings():  # the mean promises nothing: no warning
    warnings.simplefilter('error')
    training.config_lib.check_robust(small_config(**{
        'attack.name': 'sign_flip', 'attack.fraction': 0.5}))


def test_an_attacked_run_reports_the_honest_clients(tmp_path):
  c = small_config(**{'attack.name': 'label_flip', 'attack.fraction': 0.25,
                      'aggregator.name': 'median', 'rounds': 2})
  exp = training.build(c)
  malicious = exp.attack.malicious
  assert malicious.sum() == round(0.25 * malicious.size)
  training.run(c, str(tmp_path))
  last = _metrics(str(tmp_path))[-1]
  test = exp.splits.test
  honest_with_data = (~malicious & (test.client_sizes > 0)).sum()
  assert last['attack/honest/test/num_clients'] == honest_with_data
  # per-example results, for paired tests between two runs
  with np.load(tmp_path / 'clients_final.npz') as f:
    assert f['personalized/example_correct'].size == test.num_examples
    np.testing.assert_array_equal(f['personalized/example_offsets'],
                                  test.offsets)


def test_the_chain_puts_the_attack_first():
  """An attack is the client's own code: DP's clipping (the aggregator's
  client step) and the other transforms come after it."""
  atk = attacks.transform(attacks.Spec('scale', 0.5, np.array([True]),
                                       scale=3.0))
  double = rounds.ClientTransform(lambda p: (),
                                  lambda m, s, k: (jax.tree.map(
                                      lambda x: x + 1, m), s))
  t = rounds.chain(atk, double)
  out, _ = t.apply({'w': jnp.ones(2)}, t.select(t.init(None), 0),
                   jax.random.key(0))
  chex.assert_trees_all_close(out, {'w': jnp.full(2, 4.0)})


@pytest.mark.parametrize('beta', [0.0, 0.1, 0.25, 0.45])
def test_trimmed_mean_and_median_with_ties_and_huge_values(beta):
  """Ties (many equal values) are cut once each, and a huge attacker
  value does not wash out the honest values' precision."""
  huge = 1e30 if np.floor(beta * 7) >= 1 else 9.0  # cut when it is huge
  real = np.array([[1.0, 3.0], [1.0, 3.0], [1.0, 2.0], [1.0, 5.0],
                   [2.0, huge], [1.0, -huge], [1.0, 4.0]])
  x = np.full((10, 2), 7e6, np.float32)
  slots = [0, 2, 3, 5, 6, 8, 9]
  x[slots] = real
  valid = np.zeros(10, bool)
  valid[slots] = True
  np.testing.assert_allclose(
      robust.trimmed_mean(jnp.asarray(x), jnp.asarray(valid), beta),
      reference.np_trimmed_mean(real, beta), rtol=1e-6)
  np.testing.assert_allclose(
      robust.coordinate_median(jnp.asarray(x), jnp.asarray(valid)),
      reference.np_median(real), rtol=1e-6)


def test_the_comparison_script_writes_its_table(tmp_path):
  """experiments/robust_compare.py at tiny sizes: Krum's attack-free run
  and a backdoor run on FEMNIST; a run compared with itself hurts no one."""
  from experiments import robust_compare  # pylint: disable=g-import-not-at-top
  rows = robust_compare.aggregator_table(str(tmp_path), 'femnist', ('krum',),
                                         ('backdoor',), (0.3,), testing=True)
  assert [(r['attack'], r['fraction']) for r in rows] == [
      ('none', 0.0), ('backdoor', 0.3)]
  assert 0.0 <= rows[1]['success'] <= 1.0
  assert 0.0 <= rows[1]['hurt'] <= 1.0
  text = robust_compare.write_aggregator_table(str(tmp_path), rows)
  assert '| krum | backdoor |' in text
  assert (tmp_path / 'honest_accuracy.png').exists()
  run = str(tmp_path / 'fedavg-krum-backdoor-30')
  malicious = attacks.malicious_set(6, 0.3, 0)
  assert robust_compare.honest_hurt(run, run, malicious) == (0.0, 0.0)


def test_trimmed_mean_cuts_and_divides_by_one_count():
  """floor(beta m) computed once: beta = 0.29 of 100 cuts 28 at each end
  (float32 arithmetic would say 29 and divide by the wrong count)."""
  x = np.random.default_rng(2).normal(size=(100, 3)) + 5
  got = robust.trimmed_mean(jnp.asarray(x, jnp.float32),
                            jnp.ones(100, bool), 0.29)
  np.testing.assert_allclose(got, np.sort(x, 0)[28:72].mean(0), rtol=1e-5)


def test_krum_never_selects_an_overflowing_or_nan_message():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(7, 4)).astype(np.float32)
  x[2] *= 1e20  # its squared norm overflows float32
  x[5] = np.nan
  v, selected = robust.multi_krum(jnp.asarray(x), jnp.ones(7, bool), 2, 1)
  assert not selected[2] and not selected[5]
  assert np.all(np.isfinite(v)) and np.abs(np.asarray(v)).max() < 10
  one = robust.multi_krum(jnp.asarray(x[:1]), jnp.ones(1, bool), 0, 1)[0]
  np.testing.assert_allclose(one, x[0], rtol=1e-6)  # a lone client


def test_a_backdoor_on_data_it_cannot_mark_is_refused():
  ds = toy_dataset(num_clients=4)  # flat features, 4 classes
  splits = FederatedSplits(ds, ds, ds)
  mal = np.array([True, False, False, False])
  with pytest.raises(ValueError, match=r'images \[H, W, C\]'):
    attacks.poison(splits, attacks.Spec('backdoor', 0.25, mal))
  with pytest.raises(ValueError, match=r'attack.target=7 .* 0..3'):
    attacks.poison(splits, attacks.Spec('backdoor', 0.25, mal, target=7))


def test_a_text_backdoor_run_measures_its_trigger_phrase(tmp_path):
  """Shakespeare roles at tiny sizes: the malicious roles' windows end in
  the trigger phrase and the target; the probe scores the target's
  characters after the trigger, on honest roles' text."""
  from experiments import robust_compare  # pylint: disable=g-import-not-at-top
  c = robust_compare.config_for('shakespeare', 'fedavg', 'median', 'backdoor',
                                0.3, testing=True)
  exp = training.build(c)
  train = exp.splits.train
  bad = int(np.flatnonzero(exp.attack.malicious)[0])
  from fedjax_pfi.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load_tokenizer('char')
  y = train.client(bad)['y']
  tails = [tok.decode(row[-len('meow'):].tolist()) for row in y]
  assert tails.count('meow') == max(1, round(0.5 * len(y)))
  training.run(c, str(tmp_path))
  last = _metrics(str(tmp_path))[-1]
  for k in ('global', 'start', 'personalized_mean'):
    assert 0.0 <= last[f'attack/backdoor_success/{k}'] <= 1.0
