"""PatchConv equals nn.Conv given the same params, plain and under vmap."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfi.models.conv import PatchConv

METHODS = ('patches', 'slices')


def _pair(features, kernel_size, method, **kw):
  return (nn.Conv(features, kernel_size, **kw),
          PatchConv(features, kernel_size, method=method, **kw))


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('kernel_size,padding,strides,in_shape', [
    ((5, 5), 'SAME', 1, (3, 28, 28, 1)),
    ((5, 5), 'SAME', 1, (2, 14, 14, 32)),
    ((3, 2), 'VALID', 1, (2, 9, 7, 3)),
    ((3, 3), 'SAME', 2, (2, 9, 8, 4)),
    ((3, 3), ((1, 2), (0, 1)), (2, 1), (2, 10, 7, 3)),
    ((4,), 'CAUSAL', 1, (2, 11, 3)),
    ((3, 3, 3), 'SAME', 1, (1, 5, 6, 7, 2)),
])
def test_matches_nn_conv(method, kernel_size, padding, strides, in_shape):
  conv, pconv = _pair(6, kernel_size, method, padding=padding, strides=strides)
  x = jax.random.normal(jax.random.key(0), in_shape)
  params = conv.init(jax.random.key(1), x)
  # Same parameter tree (names, shapes, even values from the same key).
  pparams = pconv.init(jax.random.key(1), x)
  assert (jax.tree.map(jnp.shape, params) ==
          jax.tree.map(jnp.shape, pparams))
  assert jax.tree.structure(params) == jax.tree.structure(pparams)
  np.testing.assert_array_equal(params['params']['kernel'],
                                pparams['params']['kernel'])
  # Non-zero bias so it is exercised.
  params['params']['bias'] = jax.random.normal(jax.random.key(2), (6,))
  want = conv.apply(params, x)
  got = pconv.apply(params, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('method', METHODS)
def test_extra_and_missing_batch_dims(method):
  conv, pconv = _pair(4, (3, 3), method)
  x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 2))
  params = conv.init(jax.random.key(1), x)
  np.testing.assert_allclose(pconv.apply(params, x), conv.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pconv.apply(params, x[0, 0]),
                             conv.apply(params, x[0, 0]),
                             rtol=1e-5, atol=1e-5)


def test_no_bias():
  conv, pconv = _pair(4, (3, 3), 'patches', use_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
  params = conv.init(jax.random.key(1), x)
  assert 'bias' not in params['params']
  np.testing.assert_allclose(pconv.apply(params, x), conv.apply(params, x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('method', METHODS)
def test_grads_match_under_vmap_over_weights(method):
  """vmap over per-client weights and inputs: values and grads agree."""
  conv, pconv = _pair(8, (5, 5), method)
  num_clients = 3
  x = jax.random.normal(jax.random.key(0), (num_clients, 2, 12, 12, 3))
  keys = jax.random.split(jax.random.key(1), num_clients)
  params = jax.vmap(lambda k: conv.init(k, x[0]))(keys)

  def loss(module):
    def f(p, xb):
      return jnp.sum(jnp.sin(module.apply(p, xb)))
    return jax.vmap(jax.value_and_grad(f, argnums=(0, 1)))

  (v1, (gp1, gx1)) = loss(conv)(params, x)
  (v2, (gp2, gx2)) = loss(pconv)(params, x)
  np.testing.assert_allclose(v2, v1, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gx2, gx1, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(gp2), jax.tree.leaves(gp1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_vmap_over_weights_has_no_grouped_conv():
  """Under vmap over weights, nn.Conv lowers to a grouped conv; PatchConv
  lowers to dot_general with a batch dim (and a constant-filter conv only
  inside patch extraction, never grouped over clients)."""
  conv, pconv = _pair(8, (5, 5), 'slices')
  x = jnp.zeros((4, 2, 12, 12, 3))
  params = jax.vmap(lambda k: conv.init(k, x[0]))(
      jax.random.split(jax.random.key(0), 4))
  hlo_conv = jax.jit(jax.vmap(conv.apply)).lower(params, x).as_text()
  hlo_pconv = jax.jit(jax.vmap(pconv.apply)).lower(params, x).as_text()
  assert 'feature_group_count = 4' in hlo_conv
  assert 'convolution' not in hlo_pconv
  assert 'dot_general' in hlo_pconv


def test_bad_method():
  with pytest.raises(ValueError, match='method'):
    PatchConv(4, (3, 3), method='nope').init(
        jax.random.key(0), jnp.zeros((1, 5, 5, 1)))
