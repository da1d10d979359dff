"""Compressed updates: the Hadamard rotation, unbiasedness over keys, DRIVE's
vNMSE, top-k with and without error feedback, and the bits by hand."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from fedjax_pfi import compression


def test_fwht_is_the_hadamard_matrix_and_the_rotation_is_orthonormal():
  for d, block in ((16, 7), (512, 7), (512, 3), (2048, 4)):
    # one factor, 128 x 4, 8 x 8 x 8 and 16 x 16 x 8: the same H
    x = np.random.default_rng(0).normal(size=(3, d)).astype(np.float32)
    np.testing.assert_allclose(compression.fwht(jnp.asarray(x), block),
                               x @ linalg.hadamard(d), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(compression.sylvester(d),
                                  linalg.hadamard(d))
  v = jnp.asarray(np.random.default_rng(1).normal(size=37), jnp.float32)
  key = jax.random.key(3)
  y = compression.rotate(v, key)
  assert y.shape == (64,)
  np.testing.assert_allclose(jnp.linalg.norm(y), jnp.linalg.norm(v),
                             rtol=1e-5)
  np.testing.assert_allclose(compression.unrotate(y, key, 37), v, atol=1e-5)
  with pytest.raises(ValueError, match='power of 2, got 12'):
    compression.fwht(jnp.zeros(12))


def _many(compressor, v, n, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  return np.asarray(jax.jit(jax.vmap(compressor.apply, in_axes=(None, 0)))(
      v, keys), np.float64)


@pytest.mark.parametrize('name,bits', [('qsgd', 2), ('qsgd', 4),
                                       ('rotated_qsgd', 2),
                                       ('rotated_qsgd', 3)])
def test_quantizers_are_unbiased_over_keys(name, bits):
  """The mean over 20,000 keys is within 5 standard errors of ``v`` in every
  coordinate (the standard error from the same draws)."""
  rng = np.random.default_rng(2)
  v = jnp.asarray(rng.normal(size=37) * rng.lognormal(size=37), jnp.float32)
  c = compression.make(name, bits=bits)
  assert c.unbiased
  out = _many(c, v, 20_000)
  se = out.std(0) / math.sqrt(out.shape[0])
  assert np.all(np.abs(out.mean(0) - np.asarray(v)) <= 5 * se + 1e-6)
  # each draw is on the grid: scale * l / s with |l| <= s
  s = 2 ** (bits - 1) - 1
  if name == 'qsgd':
    grid = out * s / float(jnp.linalg.norm(v))
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)
    assert np.abs(grid).max() <= s + 1e-3


def test_qsgd_variance_bound():
  """QSGD's Lemma 3.1: E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) ||v||^2."""
  v = jnp.asarray(np.random.default_rng(4).normal(size=256), jnp.float32)
  for bits in (2, 3, 5):
    s = 2 ** (bits - 1) - 1
    out = _many(compression.qsgd(bits), v, 2_000)
    mse = np.mean(np.sum((out - np.asarray(v)) ** 2, 1)) / float(v @ v)
    assert mse <= min(256 / s ** 2, 16 / s)


@pytest.mark.parametrize('dist', ['normal', 'lognormal', 'uniform'])
def test_drive_vnmse_is_pi_over_2_minus_1_at_2_to_the_16(dist):
  """DRIVE's unbiased 1-bit vNMSE, ``d ||v||^2 / ||Rv||_1^2 - 1``, is within
  2% of pi/2 - 1 at d = 2^16, whatever the input's distribution; the same
  figure from the decoded vector."""
  rng = np.random.default_rng(5)
  d = 2 ** 16
  v = {'normal': rng.normal(size=d), 'lognormal': rng.lognormal(size=d),
       'uniform': rng.uniform(size=d)}[dist]
  v = jnp.asarray(v, jnp.float32)
  c = compression.drive()
  for seed in range(3):
    key = jax.random.key(seed)
    v_hat = jax.jit(c.apply)(v, key)
    got = float(compression.vnmse(v, v_hat))
    y = compression.rotate(v, key)
    closed = d * float(v @ v) / float(jnp.sum(jnp.abs(y))) ** 2 - 1
    assert got == pytest.approx(closed, rel=1e-3)
    assert got == pytest.approx(math.pi / 2 - 1, rel=0.02)


def test_drive_is_unbiased_to_within_its_variance():
  """Over N keys the mean's error is that of N independent draws of
  vNMSE ~0.57: ||mean - v||^2 / ||v||^2 ~ 0.57 / N, not a bias."""
  v = jnp.asarray(np.random.default_rng(6).normal(size=64), jnp.float32)
  n = 8_000
  out = _many(compression.drive(), v, n)
  err = np.sum((out.mean(0) - np.asarray(v)) ** 2) / float(v @ v)
  assert err < 3 * (math.pi / 2 - 1) / n


def test_topk_keeps_the_largest_coordinates():
  v = jnp.asarray([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 1.0, -3.0])
  c = compression.topk(0.25)  # k = 2
  np.testing.assert_array_equal(c.apply(v, jax.random.key(0)),
                                [0, -5.0, 0, 0, 0, 0, 0, -3.0])
  assert compression.topk_count(0.01, 10) == 1


def test_error_feedback_converges_where_plain_topk_stalls():
  """Two clients with quadratics ``f_i = ||x - a_i||^2 / 2``, ``a = (10, 1)``
  and ``(-10, 1)``: their gradients' largest coordinates cancel, so top-1
  of each (the second never sent) leaves ``x`` at 0 forever. With error
  feedback the unsent second coordinates pile up until they are sent, and
  ``x`` reaches the optimum ``(0, 1)``: with a constant step the iterates
  circle it at a distance of order the step, so their mean over the last
  half of the steps is what converges."""
  a = jnp.asarray([[10.0, 1.0], [-10.0, 1.0]])
  c = compression.topk(0.5)
  ef = compression.error_feedback(c)
  key = jax.random.key(0)

  def run(feedback, steps=1000, lr=0.1):
    def step(carry, _):
      x, residual = carry
      g = x - a
      if feedback:
        sent, residual = jax.vmap(ef, in_axes=(0, 0, None))(g, residual, key)
      else:
        sent = jax.vmap(c.apply, in_axes=(0, None))(g, key)
      x = x - lr * sent.mean(0)
      return (x, residual), x
    (x, _), xs = jax.lax.scan(step, (jnp.zeros(2), jnp.zeros((2, 2))), None,
                              length=steps)
    return np.mean(np.asarray(xs)[steps // 2:], 0), x

  mean, last = run(False)
  np.testing.assert_allclose(last, [0.0, 0.0], atol=1e-6)  # stalled,
  np.testing.assert_allclose(mean, [0.0, 0.0], atol=1e-6)  # 1 from x*
  mean, _ = run(True)
  np.testing.assert_allclose(mean, [0.0, 1.0], atol=0.02)


def test_bits_by_hand():
  d = 1000
  assert compression.qsgd(8).bits(d) == 8 * 1000 + 32
  assert compression.rotated_qsgd(4).bits(d) == 4 * 1024 + 32
  assert compression.drive().bits(d) == 1024 + 32
  # k = 10 values of 32 bits and 10 indices of ceil(log2 1000) = 10 bits
  assert compression.topk(0.01).bits(d) == 10 * (32 + 10)


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="unknown compression.name 'zip'; "
                     'accepted: none, qsgd'):
    compression.make('zip')
  with pytest.raises(ValueError, match='compression.bits must be an integer '
                     '>= 2 .* got 1'):
    compression.make('qsgd', bits=1)
  with pytest.raises(ValueError, match=r'compression.fraction must be in '
                     r'\(0, 1\], got 0.0'):
    compression.make('topk', fraction=0.0)
  assert compression.make('none') is None


# -- in the round ---------------------------------------------------------------

B = 4
CLIP = 0.3
Z = 0.8


@pytest.fixture(scope='module')
def setup():
  from fedjax_pfi.models import zoo  # pylint: disable=g-import-not-at-top
  from tests.algorithms.test_rounds import toy_dataset  # pylint: disable=g-import-not-at-top
  ds = toy_dataset(num_clients=9)
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(5,))
  return ds, model, model.init(jax.random.key(0))


def _reference_message(compressor, delta, client_key):
  """What the server sums for one client: its delta flattened, compressed
  with the documented key ``fold_in(fold_in(client key, 2**31 - 2), 3)``
  (the client's aggregator stream, then the compression stream)."""
  flat, unravel = jax.flatten_util.ravel_pytree(delta)
  key = jax.random.fold_in(jax.random.fold_in(client_key, 2**31 - 2),
                           compression.COMPRESSION_STREAM)
  v_hat = compressor.apply(flat, key)
  return unravel(v_hat), float(jnp.sum((v_hat - flat) ** 2)), float(
      jnp.sum(flat * flat))


@pytest.mark.parametrize('name', ['qsgd', 'rotated_qsgd', 'drive', 'topk'])
@pytest.mark.parametrize('private', [False, True])
def test_compressed_rounds_match_a_per_client_loop(setup, name, private):
  """FedAvg (and DP-FedAvg: clip, compress, clip what the server decodes,
  sum, noise) with each compressor against a plain loop over the clients
  with the same keys; the upload is the compressor's bits; padded slots
  change nothing."""
  import optax  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import aggregators  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import fedavg  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import server_optimizers  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.data import cohort as cohort_lib  # pylint: disable=g-import-not-at-top
  from tests import reference  # pylint: disable=g-import-not-at-top
  from tests.test_privacy import clip, reference_noise  # pylint: disable=g-import-not-at-top
  ds, model, params0 = setup
  c = compression.make(name, bits=3, fraction=0.2)
  inner = (aggregators.gaussian(CLIP, Z, expected_clients=4.0) if private
           else aggregators.weighted_mean())
  alg = fedavg.fed_opt(model, optax.sgd(0.1),
                       server_optimizers.server_optimizer('fedavg'),
                       compression.wrap(inner, compression.Spec(c)))
  state = alg.init(params0)
  ref = params0
  root = jax.random.key(11)
  d = compression.num_floats(params0)
  for r in range(2):
    ids = cohort_lib.sample_cohort(ds.num_clients, 4, 3, r)
    cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=2,
                                     step_buckets=(8, 16), num_slots=6,
                                     seed=3, round_idx=r)
    key = jax.random.fold_in(root, r)
    state, metrics = alg.apply(state, cohort, key)
    sent, ws, err, norm = [], [], 0.0, 0.0
    for cid in ids:
      batches = reference.client_batches(ds, cid, B, 2, 3, r)
      ckey = jax.random.fold_in(key, int(cid))
      local = reference.local_sgd(model, optax.sgd(0.1), ref, batches, ckey)
      delta = jax.tree.map(jnp.subtract, local, ref)
      if private:
        delta = clip(delta, CLIP)[0]
      m, e, n = _reference_message(c, delta, ckey)
      if private:
        m = clip(m, CLIP)[0]
      sent.append(m)
      ws.append(1.0 if private else float(ds.client_sizes[cid]))
      err, norm = err + e, norm + n
    total = jax.tree.map(lambda *x: sum(w * np.asarray(v) for w, v in
                                        zip(ws, x)), *sent)
    if private:
      noise = reference_noise(key, total, Z * CLIP)
      mean = jax.tree.map(lambda s, n: (s + n) / 4.0, total, noise)
    else:
      mean = jax.tree.map(lambda s: s / sum(ws), total)
    ref = jax.tree.map(lambda p, m: np.asarray(p) + m, ref, mean)
    np.testing.assert_allclose(
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)]),
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(ref)]),
        atol=3e-5, rtol=3e-5)
    np.testing.assert_allclose(float(metrics['compression/vnmse']),
                               err / norm, rtol=1e-4)
    np.testing.assert_allclose(float(metrics['comm/upload_bytes_per_client']),
                               c.bits(d) / 8, rtol=1e-6)
    np.testing.assert_allclose(float(metrics['comm/upload_bytes']),
                               4 * c.bits(d) / 8, rtol=1e-6)


def test_chunked_and_packed_compressed_runs_equal_the_plain_one(tmp_path):
  from fedjax_pfi import training  # pylint: disable=g-import-not-at-top
  from tests.test_training import small_config, without_time  # pylint: disable=g-import-not-at-top

  def config(**kw):
    return small_config(rounds=2, eval_every=2, step_buckets='max',
                        **{'compression.name': 'rotated_qsgd',
                           'compression.bits': 4}, **kw)

  training.run(config(), str(tmp_path / 'plain'))
  want = without_time(training.read_metrics(str(tmp_path / 'plain')))
  assert want[-1]['compression/vnmse'] > 0
  d = want[-1]['comm/download_bytes_per_client'] / 4  # float32 params
  assert want[-1]['comm/upload_bytes_per_client'] == (
      compression.rotated_qsgd(4).bits(int(d)) / 8)
  for name, overrides in (('packed', {'execution.pack_lanes': 2}),
                          ('chunked', {'execution.chunk_size': 2})):
    training.run(config(**overrides), str(tmp_path / name))
    got = without_time(training.read_metrics(str(tmp_path / name)))
    for a, b in zip(got, want):
      for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5,
                                   err_msg=(name, k))


def test_compression_refusals_name_the_option(tmp_path):
  from fedjax_pfi import training  # pylint: disable=g-import-not-at-top
  from tests.test_training import small_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="unknown compression.name 'gzip'"):
    training.run(small_config(**{'compression.name': 'gzip'}),
                 str(tmp_path / 'a'))
  with pytest.raises(ValueError, match='compression.bits must be an integer '
                     '>= 2'):
    training.run(small_config(**{'compression.name': 'qsgd',
                                 'compression.bits': 1}), str(tmp_path / 'b'))
  with pytest.raises(ValueError, match="compression.name='drive' with "
                     'secure_aggregation.enabled'):
    training.run(small_config(**{'compression.name': 'drive',
                                 'secure_aggregation.enabled': True,
                                 'secure_aggregation.clip_norm': 1.0}),
                 str(tmp_path / 'c'))
  with pytest.raises(ValueError, match="compression.name='drive' cannot be "
                     "used with algorithm 'scaffold'"):
    training.run(small_config(**{'compression.name': 'drive',
                                 'algorithm': 'scaffold',
                                 'server.optimizer': 'fedavg',
                                 'server.learning_rate': 1.0}),
                 str(tmp_path / 'd'))
  with pytest.raises(ValueError, match='compression.error_feedback keeps a '
                     'residual per client, which packed lanes do not carry'):
    training.run(small_config(**{'compression.name': 'topk',
                                 'compression.error_feedback': True,
                                 'execution.pack_lanes': 2}),
                 str(tmp_path / 'e'))
  with pytest.raises(ValueError, match='compression.download=True need a '
                     'compressor; set compression.name'):
    training.run(small_config(**{'compression.download': True}),
                 str(tmp_path / 'f'))
  with pytest.raises(ValueError, match="algorithm 'ditto' keeps no residual "
                     'per client'):
    training.run(small_config(**{'compression.name': 'topk',
                                 'compression.error_feedback': True,
                                 'algorithm': 'ditto'}), str(tmp_path / 'g'))
  for sub in 'abcdefg':  # refused before anything was written
    assert not os.path.exists(tmp_path / sub / 'config.json')


def test_error_feedback_and_download_match_a_per_client_loop(setup):
  """Three rounds of FedAvg with top-20% and error feedback, the broadcast
  compressed too (the same top-20%, one draw a round), against a loop that keeps each client's
  residual in a dict: the clients start from the decoded broadcast, add
  their residual, send the top coordinates and keep the rest; the server
  adds the mean to its exact model. The store holds the same residuals;
  clients never sampled (and padded slots) keep zeros; the bytes are the
  compressors'."""
  import optax  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import aggregators  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import fedavg  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import server_optimizers  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.data import cohort as cohort_lib  # pylint: disable=g-import-not-at-top
  from tests import reference  # pylint: disable=g-import-not-at-top
  ds, model, params0 = setup
  up = compression.topk(0.2)
  spec = compression.Spec(up, error_feedback=True, download=True)
  alg = fedavg.fed_opt(model, optax.sgd(0.1),
                       server_optimizers.server_optimizer('fedavg'),
                       compression.wrap(aggregators.weighted_mean(), spec),
                       num_clients=ds.num_clients)
  state = alg.init(params0)
  ref, residual, sampled = params0, {}, set()
  root = jax.random.key(5)
  d = compression.num_floats(params0)
  for r in range(3):
    ids = cohort_lib.sample_cohort(ds.num_clients, 4, 3, r)
    cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=1,
                                     step_buckets=(8, 16), num_slots=6,
                                     seed=3, round_idx=r)
    key = jax.random.fold_in(root, r)
    state, metrics = alg.apply(state, cohort, key)
    start, _ = compression.compress_tree(
        up, ref, jax.random.fold_in(key, compression.DOWNLOAD_STREAM))
    sent, ws = [], []
    for cid in ids:
      batches = reference.client_batches(ds, cid, B, 1, 3, r)
      ckey = jax.random.fold_in(key, int(cid))
      local = reference.local_sgd(model, optax.sgd(0.1), start, batches, ckey)
      flat = jax.flatten_util.ravel_pytree(
          jax.tree.map(jnp.subtract, local, start))[0]
      corrected = flat + residual.get(int(cid), jnp.zeros(d))
      key_c = jax.random.fold_in(jax.random.fold_in(ckey, 2**31 - 2),
                                 compression.COMPRESSION_STREAM)
      v_hat = up.apply(corrected, key_c)
      residual[int(cid)] = corrected - v_hat
      sent.append(np.asarray(v_hat, np.float64))
      ws.append(float(ds.client_sizes[cid]))
      sampled.add(int(cid))
    mean = sum(w * v for w, v in zip(ws, sent)) / sum(ws)
    flat_ref, unravel = jax.flatten_util.ravel_pytree(ref)
    ref = unravel(jnp.asarray(np.asarray(flat_ref) + mean, jnp.float32))
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(state.params)[0],
                               jax.flatten_util.ravel_pytree(ref)[0],
                               atol=3e-5, rtol=3e-5)
    np.testing.assert_allclose(
        float(metrics['comm/download_bytes_per_client']), up.bits(d) / 8)
    np.testing.assert_allclose(
        float(metrics['comm/upload_bytes_per_client']), up.bits(d) / 8)
  store = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(
      state.extra['residual'])
  for cid in range(ds.num_clients):
    want = residual.get(cid, np.zeros(d))
    np.testing.assert_allclose(store[cid], want, atol=3e-5, err_msg=cid)
  assert len(sampled) < ds.num_clients  # some rows stayed zero


def test_error_feedback_resumes_exactly(tmp_path):
  """The residuals are part of the checkpointed state: 2 rounds, then 2
  more from the checkpoint, equal 4 uninterrupted."""
  from fedjax_pfi import training  # pylint: disable=g-import-not-at-top
  from tests.test_training import small_config, without_time  # pylint: disable=g-import-not-at-top

  def config(rounds):
    return small_config(rounds=rounds, eval_every=2, **{
        'compression.name': 'topk', 'compression.fraction': 0.1,
        'compression.error_feedback': True, 'compression.download': True,
        'compression.bits': 4})

  training.run(config(4), str(tmp_path / 'full'))
  training.run(config(2), str(tmp_path / 'resumed'))
  training.run(config(4), str(tmp_path / 'resumed'))
  assert without_time(training.read_metrics(str(tmp_path / 'resumed'))) == \
      without_time(training.read_metrics(str(tmp_path / 'full')))


def test_chunked_error_feedback_equals_the_plain_layout(tmp_path):
  """Each chunk gathers and returns its own clients' residual rows: the
  same rounds chunked by 2 as all at once."""
  from fedjax_pfi import training  # pylint: disable=g-import-not-at-top
  from tests.test_training import small_config, without_time  # pylint: disable=g-import-not-at-top

  def config(**kw):
    return small_config(rounds=3, eval_every=3, step_buckets='max', **{
        'compression.name': 'drive', 'compression.error_feedback': True},
                        **kw)

  training.run(config(), str(tmp_path / 'plain'))
  training.run(config(**{'execution.chunk_size': 2}), str(tmp_path / 'chunk'))
  want = without_time(training.read_metrics(str(tmp_path / 'plain')))
  got = without_time(training.read_metrics(str(tmp_path / 'chunk')))
  for a, b in zip(got, want):
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)


def test_the_bytes_accuracy_script_runs_tiny(tmp_path):
  from experiments import compression_curve  # pylint: disable=g-import-not-at-top
  rows = compression_curve.run_task(str(tmp_path), 'femnist',
                                    ('none', 'drive', 'topk1_ef'),
                                    testing=True)
  text = compression_curve.write_table(str(tmp_path), 'femnist', rows)
  by = {r['setting']: r for r in rows}
  assert by['none']['kept'] == 1.0 and by['none']['ratio'] == 1.0
  # the FedAvg CNN's 1,690,046 floats: 4 bytes each, against DRIVE's bit
  # per coordinate of 2^21 and its scale
  assert by['none']['upload_per_client'] == 4 * 1_690_046
  assert by['drive']['upload_per_client'] == (2 ** 21 + 32) / 8
  assert 'topk1_ef keeps' in text
  assert os.path.exists(tmp_path / 'bytes_accuracy.png')


# -- composed with secure aggregation ------------------------------------------


def _secure_round(name, bits, tree, weights, round_key, sa_bits=24,
                  neighbors=0):
  """One secure, compressed round's mean through `rounds.message_sums` and
  the wrapped aggregator's ``finalize``, with its sums."""
  from fedjax_pfi import secure_aggregation as sa  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import aggregators  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import rounds  # pylint: disable=g-import-not-at-top
  c = weights.size
  sp = sa.make_spec(bits=sa_bits, neighbors=neighbors, clip_norm=1.0,
                    max_weight=float(weights.max()), slots=c,
                    compressor=name, compressor_bits=bits)
  comp = compression.make(name, bits=bits)
  agg = compression.wrap(sa.wrap(aggregators.weighted_mean(), sp),
                         compression.Spec(comp))
  ids = np.arange(c) * 3 + 1
  plan = sa.plan(sp, ids, weights, np.zeros(c, np.int8), 0, 0)
  @jax.jit
  def run(tree, rk, seed=5):
    # the clients' keys: their stochastic rounding
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
        jnp.asarray(ids))
    sums = rounds.message_sums(
        agg, (), tree, jnp.asarray(weights), keys, ids=jnp.asarray(ids),
        secure_rows=sa.Plan(*(jnp.asarray(x) for x in plan)), round_key=rk)
    sums['weight'] = jnp.sum(jnp.asarray(weights))
    mean, _, metrics = agg.finalize(sums, (), rounds.aggregator_key(rk))
    return mean, metrics

  mean, metrics = run(tree, round_key)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(
      jnp.asarray(ids))
  return sp, keys, mean, metrics, run


def test_rotated_qsgd_under_secure_aggregation_matches_a_per_client_loop():
  """Each client clips, rotates with the round's shared rotation, clamps to
  beta and quantizes to ``2^(b-1) - 1`` levels of beta; the server's
  integer sum, divided by the weights and rotated back (H from scipy),
  is the round's mean to float32 rounding."""
  from fedjax_pfi import secure_aggregation as sa  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import aggregators  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import rounds  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  c, bits = 5, 6
  tree = {'w': rng.normal(size=(c, 3, 4)).astype(np.float32) * 0.2,
          'b': rng.normal(size=(c, 9)).astype(np.float32) * 0.2}
  tree['b'][1] *= 40  # client 1 is clipped to norm 1
  weights = np.array([3, 1, 4, 1, 5], np.float32)
  rk = jax.random.key(11)
  sp, keys, mean, metrics, _ = _secure_round('rotated_qsgd', bits, tree,
                                             weights, rk)
  d, n = 21, 32
  beta = 1.0 * min(1.0, math.sqrt(2 * math.log(2 * n * 2**20) / n))
  assert sp.levels == 31 and sp.rotated
  scale = 31 / beta
  rot = jax.random.fold_in(rounds.aggregator_key(rk),
                           compression.ROTATION_STREAM)
  # the rotation by hand: R = H D / sqrt(n), D the signs R's key draws
  signs = np.asarray(jax.random.bernoulli(rot, 0.5, (n,)), np.float64) * 2 - 1
  h = linalg.hadamard(n) / math.sqrt(n)
  total = np.zeros(n, np.int64)
  for i in range(c):
    m = jax.tree.map(lambda x, i=i: jnp.asarray(x[i]), tree)
    m = aggregators.clip_by_norm(m, 1.0)[0]
    v = np.concatenate([np.asarray(m['b']).ravel(),
                        np.asarray(m['w']).ravel()]).astype(np.float64)
    y = h @ (signs * np.pad(v, (0, n - d)))
    y = np.clip(y, -beta, beta)
    # the protocol's stochastic rounding, on the client's own key
    qkey = jax.random.fold_in(jax.random.fold_in(
        keys[i], rounds.AGGREGATOR_STREAM), 2)
    parts = {'rotated': {'b': jnp.asarray(y[:9], jnp.float32),
                         'w': jnp.asarray(y[9:d].reshape(3, 4), jnp.float32)},
             'tail': jnp.asarray(y[d:], jnp.float32)}
    r = sa.quantize(parts, scale, 32, qkey)
    ints = np.concatenate([np.asarray(x, np.uint32).view(np.int32).ravel()
                           for x in (r['rotated']['b'], r['rotated']['w'],
                                     r['tail'])]).astype(np.int64)
    assert np.abs(ints).max() <= 31
    np.testing.assert_array_less(np.abs(ints - y * scale), 1.0 + 1e-4)
    total += int(weights[i]) * ints
  want = signs * (h.T @ (total / scale / weights.sum()))
  got = np.concatenate([np.asarray(mean['b']).ravel(),
                        np.asarray(mean['w']).ravel()])
  np.testing.assert_allclose(got, want[:d], rtol=1e-5, atol=1e-6)
  assert float(metrics['compression/clamped_coordinates']) == 0.0
  np.testing.assert_allclose(float(metrics['secagg/scale']), scale,
                             rtol=1e-6)


def test_secure_compression_is_unbiased_and_rotation_buys_precision():
  """Over many round keys the decoded mean is unbiased (z-scores of the
  per-coordinate means); at d = 4,096 the rotation's narrower range cuts
  the error of the same 4 bits several times."""
  rng = np.random.default_rng(1)
  c = 3
  weights = np.array([2, 1, 3], np.float32)
  tree = {'w': (rng.normal(size=(c, 17)) * 0.15).astype(np.float32)}
  exact = np.tensordot(weights, tree['w'], axes=1) / weights.sum()
  for name in ('qsgd', 'rotated_qsgd'):
    _, _, _, _, run = _secure_round(name, 4, tree, weights,
                                    jax.random.key(0))
    draws = np.stack([np.asarray(run(tree, jax.random.key(k), k)[0]['w'])
                      for k in range(400)])
    z = (draws.mean(0) - exact) / (draws.std(0) / math.sqrt(400) + 1e-12)
    assert np.abs(z).max() < 4.5, (name, z)
  big = {'w': (rng.normal(size=(c, 4096)) / 64 * 0.5).astype(np.float32)}
  exact = np.tensordot(weights, big['w'], axes=1) / weights.sum()
  err = {}
  for name in ('qsgd', 'rotated_qsgd'):
    mean = _secure_round(name, 4, big, weights, jax.random.key(3))[2]
    err[name] = float(np.sum((np.asarray(mean['w']) - exact) ** 2) /
                      np.sum(exact ** 2))
  # beta / C = sqrt(2 ln(2^33) / 4096) = 0.12: about 70x less variance
  assert err['rotated_qsgd'] < err['qsgd'] / 20, err


def test_compressor_bits_must_fit_the_secure_aggregation_modulus(tmp_path):
  from fedjax_pfi import secure_aggregation as sa  # pylint: disable=g-import-not-at-top
  from fedjax_pfi import training  # pylint: disable=g-import-not-at-top
  from tests.test_training import small_config  # pylint: disable=g-import-not-at-top
  # 10 clients x (255 + 1) = 2,560 > 2^11 - 1: 8 bits fit, or Z_2^13
  with pytest.raises(ValueError, match=r'compression.bits=9 does not fit the '
                     r'secure-aggregation modulus Z_2\^12.*2560.*at most 8.*'
                     r'at least 13'):
    sa.make_spec(bits=12, clip_norm=1.0, slots=10, compressor='qsgd',
                 compressor_bits=9)
  sp = sa.make_spec(bits=12, clip_norm=2.0, slots=10, compressor='qsgd',
                    compressor_bits=8)
  assert sp.levels == 127 and sp.scale == 127 / 2.0
  with pytest.raises(ValueError, match="compression.name='drive' with "
                     'secure_aggregation.enabled'):
    sa.make_spec(bits=24, clip_norm=1.0, slots=4, compressor='drive')
  with pytest.raises(ValueError, match='unset secure_aggregation.scale'):
    sa.make_spec(bits=24, clip_norm=1.0, slots=10, scale=5.0,
                 compressor='qsgd', compressor_bits=4)
  # in a run, before anything is traced: weights up to the largest client
  base = {'secure_aggregation.enabled': True,
          'secure_aggregation.clip_norm': 1.0, 'secure_aggregation.bits': 16}
  with pytest.raises(ValueError, match='compression.bits=12 does not fit'):
    training.build(small_config(**base, **{'compression.name': 'qsgd',
                                           'compression.bits': 12}))
  for name, match in (('drive', 'scale per client'),
                      ('topk', "each client's own coordinates")):
    with pytest.raises(ValueError, match=f"compression.name='{name}' with "
                       f'secure_aggregation.enabled.*{match}.*Accepted with '
                       'secure aggregation: qsgd, rotated_qsgd, or none'):
      training.run(small_config(**base, **{'compression.name': name}),
                   str(tmp_path / name))
  with pytest.raises(ValueError, match='compression.error_feedback with '
                     'secure aggregation'):
    training.run(small_config(**base, **{
        'compression.name': 'qsgd', 'compression.bits': 4,
        'compression.error_feedback': True}), str(tmp_path / 'ef'))


def test_secure_compressed_runs(tmp_path):
  """``qsgd`` under secure aggregation is the protocol's fixed point at
  ``levels / C`` (the same run as ``secure_aggregation.scale`` set so);
  ``rotated_qsgd`` composes with DP and FedBuff, and the upload counts
  the masked ``d'`` values at ``secure_aggregation.bits``."""
  from fedjax_pfi import secure_aggregation as sa  # pylint: disable=g-import-not-at-top
  from fedjax_pfi import training  # pylint: disable=g-import-not-at-top
  from tests.test_training import small_config  # pylint: disable=g-import-not-at-top
  from tests.test_training import without_time  # pylint: disable=g-import-not-at-top
  base = {'secure_aggregation.enabled': True,
          'secure_aggregation.clip_norm': 0.5, 'secure_aggregation.bits': 20,
          'rounds': 2, 'eval_every': 2}
  runs = {
      'qsgd': {'compression.name': 'qsgd', 'compression.bits': 5},
      'scale': {'secure_aggregation.scale': 15 / 0.5},
      'rotated_dp': {'compression.name': 'rotated_qsgd',
                     'compression.bits': 5, 'privacy.mechanism': 'gaussian',
                     'privacy.clip_norm': 0.5,
                     'privacy.noise_multiplier': 0.3,
                     'secure_aggregation.clip_norm': 0.0,
                     'server.weighting': 'uniform'},
      'rotated_fedbuff': {'compression.name': 'rotated_qsgd',
                          'compression.bits': 5,
                          'asynchrony.mode': 'fedbuff',
                          'asynchrony.buffer_size': 2,
                          'asynchrony.concurrency': 3,
                          'devices.profile': 'lognormal'}}
  got = {}
  for name, over in runs.items():
    c = small_config(**{**base, **over})
    training.run(c, str(tmp_path / name))
    got[name] = without_time(training.read_metrics(str(tmp_path / name)))
  for a, b in zip(got['qsgd'], got['scale']):
    for k in ('train_loss', 'test/loss', 'secagg/scale'):
      if k in b:
        assert a[k] == b[k], k
  for name in ('rotated_dp', 'rotated_fedbuff'):
    exp = training.build(small_config(**{**base, **runs[name]}))
    params = jax.eval_shape(lambda k, e=exp: e.algorithm.init(
        e.init_params(k)), jax.random.key(0)).params
    d = compression.num_floats(params)
    n = 1 << (d - 1).bit_length()  # 578 floats: 1,024 rotated values
    want = sa.protocol_bytes(exp.secagg.degree, n + 1, 20)['upload']
    rows = got[name]
    assert all(np.isfinite(r['train_loss']) for r in rows)
    assert rows[-1]['comm/upload_bytes_per_client'] == want
    assert rows[-1]['compression/clamped_coordinates'] >= 0
  assert got['rotated_dp'][-1]['privacy/noise_std'] > 0
