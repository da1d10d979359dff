"""Compressed updates: the Hadamard rotation, unbiasedness over keys, DRIVE's
vNMSE, top-k with and without error feedback, and the bits by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from fedjax_pfi import compression


def test_fwht_is_the_hadamard_matrix_and_the_rotation_is_orthonormal():
  x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
  np.testing.assert_allclose(compression.fwht(jnp.asarray(x)),
                             x @ linalg.hadamard(16), rtol=1e-5, atol=1e-5)
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
