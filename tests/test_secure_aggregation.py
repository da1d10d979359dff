"""Secure aggregation: the vmapped protocol against a per-client Python loop
on the same keys, the unmasked sum against the plain fixed-point sum bit
for bit, the masks' uniformity, the quantization bound, and the refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_pfi import participation
from fedjax_pfi import secure_aggregation as sa
from fedjax_pfi import training
from tests.test_training import small_config
from tests.test_training import without_time

B = 32


def spec(bits=B, scale=1000.0, neighbors=0, threshold=0, slots=10,
         max_weight=5.0, dropout=(0.0, 0.0, 0.0)):
  degree = slots - 1 if neighbors == 0 or neighbors >= slots - 1 else neighbors
  return sa.Spec(bits, scale, neighbors, threshold, 1.0, True, max_weight,
                 slots, degree, dropout)


def messages(c, key=0):
  rng = np.random.default_rng(key)
  tree = {'w': rng.uniform(-1, 1, (c, 3, 4)).astype(np.float32),
          'b': rng.uniform(-1, 1, (c, 5)).astype(np.float32)}
  return tree


def run_protocol(sp, tree, weights, ids, plan, round_key, parts=1):
  """`client_sums` over the slots in ``parts`` chunks, added mod 2^32."""
  c = ids.size
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(
      jnp.arange(c))
  total = None
  step = c // parts
  for lo in range(0, c, step):
    sl = slice(lo, lo + step)
    out = sa.client_sums(
        sp, jax.tree.map(lambda x: jnp.asarray(x[sl]), tree),
        jnp.asarray(weights[sl]), keys[sl], jnp.asarray(ids[sl]),
        sa.Plan(*(jnp.asarray(x[sl]) for x in plan)), round_key)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  return total, keys


def reference(sp, tree, weights, ids, plan, round_key, keys):
  """The protocol as the papers write it, one client at a time: each
  uploader's masked input, the server's sum, then the server removes the
  uploaders' self masks and, for each client that dropped after sharing
  keys, the masks each of its uploading neighbours added."""
  mod = 2**sp.bits
  up = [i for i in range(ids.size) if weights[i] > 0]
  def leaves(t):
    return [np.asarray(x, np.uint64) for x in jax.tree.leaves(t)]
  q = {}
  quantize = jax.jit(lambda t, k: sa.quantize(t, sp.scale, sp.bits, k))
  for i in up:
    r = quantize(jax.tree.map(lambda x: jnp.asarray(x[i]), tree), keys[i])
    q[i] = [(x * int(weights[i])) % mod for x in leaves(r)] + [
        np.array([int(weights[i])], np.uint64)]
  like = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], jnp.uint32), tree)
  like = {'message': like, 'weight': jnp.zeros((1,), jnp.uint32)}

  expand = jax.jit(lambda key: sa.expand(key, like, sp.bits))

  def prg(key):  # jitted only for speed: the same ops on the same keys
    return leaves(expand(key))

  server = [np.zeros(x.shape, np.uint64) for x in q[up[0]]]
  for i in up:  # each client masks its own input
    s_i, b_i = sa.secrets(round_key, int(ids[i]))
    y = [a + b for a, b in zip(q[i], prg(b_i))]
    for j in plan.neighbors[i][plan.neighbors[i] >= 0]:
      s_j, _ = sa.secrets(round_key, int(j))
      p = prg(sa.pair_key(s_i, s_j))
      y = [a + (b if ids[i] < j else mod - b) for a, b in zip(y, p)]
    server = [(a + b) % mod for a, b in zip(server, y)]
  id_slot = {int(v): s for s, v in enumerate(ids) if v >= 0}
  for i in up:  # the server rebuilds the uploaders' self masks
    _, b_i = sa.secrets(round_key, int(ids[i]))
    server = [(a + mod - b) % mod for a, b in zip(server, prg(b_i))]
  for d in range(ids.size):  # ... and the dropped clients' pairwise masks
    if plan.stage[d] != sa.BEFORE_UPLOAD:
      continue
    s_d, _ = sa.secrets(round_key, int(ids[d]))
    for j in plan.neighbors[d][plan.neighbors[d] >= 0]:
      if weights[id_slot[int(j)]] <= 0:
        continue
      s_j, _ = sa.secrets(round_key, int(j))
      p = prg(sa.pair_key(s_d, s_j))
      # neighbour j added +p if j < d, else -p; the server takes it away
      server = [(a + (mod - b if j < ids[d] else b)) % mod
                for a, b in zip(server, p)]
  plain = [sum(q[i][k] for i in up) % mod for k in range(len(server))]
  return server, plain


@pytest.mark.parametrize('neighbors,dropout,seed', [
    (0, (0.0, 0.0, 0.0), 0), (0, (0.1, 0.2, 0.1), 1), (4, (0.1, 0.15, 0.1), 2),
    (4, (0.0, 0.3, 0.0), 3), (2, (0.0, 0.1, 0.0), 4)])
def test_unmasked_sum_is_the_plain_fixed_point_sum_bit_for_bit(
    neighbors, dropout, seed):
  c = 10
  sp = spec(neighbors=neighbors, threshold=1, slots=c, dropout=dropout)
  ids = np.array([3, 8, 11, 14, 20, 21, 30, 41, -1, -1])
  weights = np.array([1, 2, 5, 3, 1, 4, 2, 1, 0, 0], np.float32)
  stages = sa.draw_stages(dropout, seed, 0, ids)
  weights = np.where(np.isin(stages, [sa.BEFORE_KEYS, sa.BEFORE_UPLOAD]), 0,
                     weights).astype(np.float32)
  plan = sa.plan(sp, ids, weights, stages, seed, 0)
  tree = messages(c, seed)
  round_key = jax.random.key(100 + seed)
  got, keys = run_protocol(sp, tree, weights, ids, plan, round_key, parts=2)
  whole, _ = run_protocol(sp, tree, weights, ids, plan, round_key, parts=1)
  unmasked = jax.tree.map(lambda a, b: np.asarray(a - b),
                          got['masked'], got['removed'])
  server, plain = reference(sp, tree, weights, ids, plan, round_key, keys)
  ours = [np.asarray(x, np.uint64) for x in jax.tree.leaves(
      unmasked['message'])] + [np.asarray(unmasked['weight'], np.uint64)]
  for a, b, p in zip(ours, server, plain):
    np.testing.assert_array_equal(a, p)  # bit for bit
    np.testing.assert_array_equal(b, p)  # the papers' server, same keys
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # chunked
  # the masked sum alone is noise: far from the plain sum
  masked = np.asarray(jax.tree.leaves(got['masked']['message'])[0], np.int64)
  assert np.mean(masked != np.asarray(plain[0], np.int64)) > 0.9
  # the decoded sum is the weighted sum within its bound
  total, weight = sa.unmask(sp, got)
  up = weights > 0
  assert float(weight) == weights[up].sum()
  for leaf, exact in zip(jax.tree.leaves(total), jax.tree.leaves(tree)):
    want = np.tensordot(weights[up], exact[up], axes=1)
    assert np.max(np.abs(np.asarray(leaf) - want)) <= (
        weights[up].sum() / sp.scale + 1e-6)


def test_stage_counts_and_graph():
  ids = np.arange(40)
  sp = spec(neighbors=6, threshold=2, slots=40, dropout=(0.1, 0.1, 0.1))
  stages = sa.draw_stages(sp.dropout, 0, 5, ids)
  assert set(np.unique(stages)) == {0, 1, 2, 3}
  weights = np.where(np.isin(stages, [1, 2]), 0.0, 1.0).astype(np.float32)
  plan = sa.plan(sp, ids, weights, stages, 0, 5)
  keyed = stages != sa.BEFORE_KEYS
  degree = (plan.neighbors >= 0).sum(1)
  assert np.all(degree[keyed] == 6) and np.all(degree[~keyed] == 0)
  for i in np.flatnonzero(keyed):  # symmetric, among clients with keys
    for j in plan.neighbors[i][plan.neighbors[i] >= 0]:
      assert keyed[j] and i in plan.neighbors[j]
  np.testing.assert_array_equal(  # flags the neighbours that did not upload
      plan.neighbor_dropped[keyed][:, :6],
      weights[plan.neighbors[keyed][:, :6]] == 0)


def test_the_graph_does_not_depend_on_the_slot_order():
  """Chunked rounds order the slots by length: the same clients get the same
  neighbours (so the same rounds abort or not, whatever the layout)."""
  ids = np.array([5, 9, 2, 14, 7, 11, 3, 8])
  sp = spec(neighbors=4, threshold=1, slots=8)
  weights = np.ones(8, np.float32)
  a = sa.plan(sp, ids, weights, np.zeros(8, np.int8), 0, 3)
  order = np.array([3, 0, 6, 1, 7, 2, 5, 4])
  b = sa.plan(sp, ids[order], weights, np.zeros(8, np.int8), 0, 3)
  for slot_b, slot_a in enumerate(order):
    assert set(b.neighbors[slot_b]) == set(a.neighbors[slot_a])


def test_an_unrecoverable_round_aborts_naming_the_clients_and_t():
  ids = np.arange(12)
  sp = spec(neighbors=4, threshold=3, slots=12)
  stages = np.zeros(12, np.int8)
  stages[[0, 1, 2, 3, 4, 5]] = sa.BEFORE_UNMASK  # alive neighbours vanish
  weights = np.ones(12, np.float32)
  with pytest.raises(sa.UnrecoverableRound, match=r'clients \d+ \(\d live < '
                     r't=3\).*secure_aggregation.threshold'):
    sa.plan(sp, ids, weights, stages, 0, 0)
  sa.plan(sp._replace(threshold=1), ids, weights, stages, 0, 0)  # fine
  # a client that dropped with all its neighbours needs nothing rebuilt
  stages = np.zeros(12, np.int8)
  weights = np.zeros(12, np.float32)
  sa.plan(sp, ids, weights, stages, 0, 0)


@pytest.mark.parametrize('bits', [32, 12])
@pytest.mark.parametrize('value', [0.0, 0.75])
def test_a_single_masked_vector_is_uniform(bits, value):
  """Whatever the input, one client's masked vector is uniform on Z_2^b: a
  chi-square test of 64 equal bins at a fixed seed."""
  n = 8192
  q = {'x': sa.quantize(jnp.full((n,), value), 1000.0, bits,
                        jax.random.key(1))}
  neighbors = jnp.array([4, 9, -1], jnp.int32)
  y, _ = sa.masked_input(q, jnp.int32(5), neighbors,
                         jnp.zeros(3, bool), jax.random.key(2), bits)
  y = np.asarray(y['x'], np.uint64)
  assert y.max() < 2**bits
  counts = np.bincount((y >> (bits - 6)).astype(np.int64), minlength=64)
  assert stats.chisquare(counts).pvalue > 1e-3
  assert len(np.unique(y)) > 0.8 * min(n, 2**bits)


def test_quantization_is_unbiased_and_within_one_step():
  x = jnp.linspace(-1, 1, 101, dtype=jnp.float32)
  s, bits = 10.0, 16
  draws = jnp.stack([sa.dequantize(sa.quantize(x, s, bits, jax.random.key(k)),
                                   s, bits) for k in range(400)])
  err = np.asarray(draws - x)
  assert np.max(np.abs(err)) < 1 / s + 1e-6
  # unbiased: the mean error is zero within 4 standard errors
  assert np.all(np.abs(err.mean(0)) < 4 * (0.5 / s) / np.sqrt(400))
  # negative values wrap to two's complement and come back
  np.testing.assert_array_equal(
      np.asarray(sa.dequantize(sa.quantize(jnp.array([-3.0, 2.0]), 1.0, 8,
                                           jax.random.key(0)), 1.0, 8)),
      [-3.0, 2.0])


def test_the_same_keys_give_the_same_masks():
  ids = np.arange(6)
  sp = spec(slots=6)
  weights = np.ones(6, np.float32)
  plan = sa.plan(sp, ids, weights, np.zeros(6, np.int8), 0, 0)
  tree = messages(6)
  a, _ = run_protocol(sp, tree, weights, ids, plan, jax.random.key(1))
  b, _ = run_protocol(sp, tree, weights, ids, plan, jax.random.key(1))
  c, _ = run_protocol(sp, tree, weights, ids, plan, jax.random.key(2))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  def masked(t):
    return np.asarray(jax.tree.leaves(t['masked'])[0])
  assert np.mean(masked(a) != masked(c)) > 0.9  # other secrets, other masks
  ua = jax.tree.map(lambda p, q: np.asarray(p - q), a['masked'], a['removed'])
  uc = jax.tree.map(lambda p, q: np.asarray(p - q), c['masked'], c['removed'])
  for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(uc)):
    np.testing.assert_array_equal(x, y)  # same rounding keys: same sum


def test_bytes_model():
  got = sa.protocol_bytes(degree=10, num_values=1000, bits=32)
  assert got['masked_input'] == 4000
  assert got['upload'] == 64 + 80 * 10 + 4000 + 32 * 10
  assert got['download'] == 144 * 10
  # SecAgg+ grows with k, the complete graph with the cohort
  assert (sa.protocol_bytes(999, 1000, 32)['overhead'] >
          50 * sa.protocol_bytes(16, 1000, 32)['overhead'] / 3)


def _metrics(workdir):
  return [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  out = {}
  for name, kw in [
      ('plain', {}),
      ('secagg', {'secure_aggregation.enabled': True,
                  'secure_aggregation.clip_norm': 20.0}),
      ('secagg_chunked', {'secure_aggregation.enabled': True,
                          'secure_aggregation.clip_norm': 20.0,
                          'execution.chunk_size': 2}),
      ('secagg_packed', {'secure_aggregation.enabled': True,
                         'secure_aggregation.clip_norm': 20.0,
                         'execution.pack_lanes': 2}),
      ('secagg_dropout', {'secure_aggregation.enabled': True,
                          'secure_aggregation.clip_norm': 20.0,
                          'secure_aggregation.threshold': 1,
                          'secure_aggregation.dropout_upload': 0.4,
                          'secure_aggregation.dropout_unmask': 0.2,
                          'clients_per_round': 6}),
      ('secagg_resumed', {'secure_aggregation.enabled': True,
                          'secure_aggregation.clip_norm': 20.0}),
      ('dp', {'privacy.mechanism': 'gaussian', 'privacy.clip_norm': 0.5,
              'privacy.noise_multiplier': 0.1, 'privacy.sampling': 'fixed',
              'privacy.accountant': 'rdp'}),
      ('dp_secagg', {'privacy.mechanism': 'gaussian', 'privacy.clip_norm': 0.5,
                     'privacy.noise_multiplier': 0.1,
                     'privacy.sampling': 'fixed', 'privacy.accountant': 'rdp',
                     'secure_aggregation.enabled': True})]:
    workdir = str(tmp_path_factory.mktemp(name))
    config = small_config(**{'server.optimizer': 'fedavg',
                             'server.learning_rate': 1.0, **kw})
    if name.endswith('_resumed'):  # stopped after 2 rounds, then resumed
      training.run(config, workdir, stop_after=2)
    training.run(config, workdir)
    out[name] = _metrics(workdir)
  return out


def test_fedavg_with_secure_aggregation_matches_the_plain_run(runs):
  """Round 1 starts from the same model: the averaged deltas differ by at
  most the quantization bound; later rounds follow within that noise."""
  for base, sec in (('plain', 'secagg'), ('dp', 'dp_secagg')):
    a, b = runs[base], runs[sec]
    scale = b[0]['secagg/scale']
    assert b[0]['secagg/survived'] == 4
    num_values = b[0]['secagg/upload_bytes_per_client'] - b[0][
        'secagg/overhead_bytes_per_client']
    bound = np.sqrt(num_values / 4) / scale  # ||error||_2 <= sqrt(L) / s
    assert abs(a[0]['delta_norm'] - b[0]['delta_norm']) <= bound
    # it did quantize (under DP the clip's step 1/s is below float32's)
    assert base == 'dp' or a[0]['delta_norm'] != b[0]['delta_norm']
    for ra, rb in zip(a, b):
      assert abs(ra['train_loss'] - rb['train_loss']) < 1e-3
      if 'test/accuracy' in ra:
        assert abs(ra['test/accuracy'] - rb['test/accuracy']) <= 0.01
  # the mask sums are exact mod 2^32, so chunks change nothing; packed
  # lanes mask each client at its last step, against the whole plan
  for other in ('secagg_chunked', 'secagg_packed'):
    for ra, rb in zip(runs['secagg'], runs[other]):
      assert abs(ra['delta_norm'] - rb['delta_norm']) < 1e-5, other
      assert ra['secagg/survived'] == rb['secagg/survived']
  assert all(r['time/compilations'] <= 1 for r in runs['secagg'][1:])


def test_dropouts_are_recovered_and_counted(runs):
  """The round's counts are the participation schedule's draws; the
  aggregate is the uploaders' (a lost mask would be noise of size 2^31/s)."""
  rows = runs['secagg_dropout']
  c = small_config(**{'secure_aggregation.dropout_upload': 0.4,
                      'secure_aggregation.dropout_unmask': 0.2,
                      'secure_aggregation.enabled': True,
                      'clients_per_round': 6})
  sizes = training.build(small_config()).splits.train.client_sizes
  for r, row in enumerate(rows):
    stages = participation.participants(c, sizes, r).stages
    for s, name in enumerate(sa.STAGE_NAMES):
      assert row[f'secagg/{name}'] == np.sum(stages == s)
  assert sum(r['secagg/dropped_before_upload'] for r in rows) > 0
  assert sum(r['secagg/dropped_before_unmask'] for r in rows) > 0
  for r in rows:  # the clients aggregated are the ones that uploaded
    assert r['clients'] == r['secagg/survived'] + r[
        'secagg/dropped_before_unmask']
    assert np.isfinite(r['train_loss']) and r['delta_norm'] < 10


@pytest.mark.parametrize('overrides,match', [
    ({'secure_aggregation.bits': 8,
      'secure_aggregation.clip_norm': 20.0}, 'too small|overflow'),
    ({'secure_aggregation.clip_norm': 20.0,
      'secure_aggregation.scale': 1e9}, r'overflow Z_2\^32: 4 clients'),
    ({}, 'needs secure_aggregation.clip_norm'),
    ({'secure_aggregation.clip_norm': 1.0, 'secure_aggregation.neighbors': 3},
     'even number'),
    ({'secure_aggregation.clip_norm': 1.0,
      'secure_aggregation.threshold': 9}, 'threshold=9 exceeds the 3'),
    ({'secure_aggregation.clip_norm': 1.0, 'secure_aggregation.bits': 40},
     r'bits must be in \[2, 32\]'),
    ({'secure_aggregation.clip_norm': 1.0,
      'secure_aggregation.dropout_upload': 1.0}, r'dropout_upload must be'),
    ({'secure_aggregation.clip_norm': 1.0, 'privacy.mechanism': 'gaussian'},
     'under DP privacy.clip_norm'),
    ({'privacy.mechanism': 'adaptive', 'privacy.target_quantile': 0.5},
     'fixed-point range'),
    ({'secure_aggregation.clip_norm': 1.0, 'algorithm': 'scaffold'},
     "algorithm 'scaffold'"),
])
def test_impossible_configs_are_refused_before_tracing(overrides, match):
  c = small_config(**{'secure_aggregation.enabled': True, **overrides})
  with pytest.raises(ValueError, match=match):
    training.build(c)


@pytest.mark.parametrize('bits,slots,weight,clip', [
    (32, 10, 605.0, 10.0), (32, 1000, 1.0, 1.0), (16, 7, 3.0, 0.5),
    (32, 1, 1.0, 1e-3)])
def test_the_largest_safe_scale_passes_its_own_overflow_check(
    bits, slots, weight, clip):
  got = sa.make_spec(bits=bits, clip_norm=clip, max_weight=weight,
                     slots=slots)
  assert slots * weight * (clip * got.scale + 1) <= 2**(bits - 1) - 1
  assert clip * got.scale <= 2**23
  with pytest.raises(ValueError, match='overflow'):
    sa.make_spec(bits=bits, clip_norm=clip, max_weight=weight, slots=slots,
                 scale=got.scale * 1.01 + 1)


def test_an_unrecoverable_run_stops_before_its_round(tmp_path):
  c = small_config(**{'secure_aggregation.enabled': True,
                      'secure_aggregation.clip_norm': 20.0,
                      'secure_aggregation.neighbors': 2,
                      'secure_aggregation.dropout_unmask': 0.6,
                      'clients_per_round': 6})
  with pytest.raises(sa.UnrecoverableRound,
                     match=r'cannot finish round 1: clients .* t=2'):
    training.run(c, str(tmp_path))
  assert not (tmp_path / 'metrics.jsonl').exists() or not (
      tmp_path / 'metrics.jsonl').read_text().strip()


def test_an_aggregator_that_needs_every_message_is_refused():
  from fedjax_pfi.algorithms import aggregators  # pylint: disable=g-import-not-at-top
  buffered = aggregators.weighted_mean()._replace(needs='all', name='median')
  with pytest.raises(ValueError, match="'median' needs every client"):
    sa.wrap(buffered, spec())


def test_a_resumed_secure_run_equals_the_uninterrupted_one(runs):
  """The plan is a function of (seed, round): resuming redraws it exactly."""
  assert without_time(runs['secagg_resumed']) == without_time(runs['secagg'])


def test_a_non_finite_update_makes_the_sum_nan():
  """A NaN has no fixed point; the decoded sum is NaN, so the run stops on
  its non-finite state as it would without masks."""
  c = 4
  sp = spec(slots=c)
  ids = np.arange(c)
  weights = np.ones(c, np.float32)
  plan = sa.plan(sp, ids, weights, np.zeros(c, np.int8), 0, 0)
  tree = messages(c)
  tree['w'][2, 0, 0] = np.nan
  got, _ = run_protocol(sp, tree, weights, ids, plan, jax.random.key(0))
  assert float(got['secagg/non_finite_clients']) == 1
  total, _ = sa.unmask(sp, got, got['secagg/non_finite_clients'])
  assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(total))
