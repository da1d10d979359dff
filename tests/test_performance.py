"""The warning for convolutions inside the local-step loop on CPU."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_pfi as fp
from fedjax_pfi import performance
from fedjax_pfi.models import base
from fedjax_pfi.models import zoo

X = np.zeros([2, 28, 28, 1], np.float32)
META = {'num_classes': 62}


def cnn(name, **kwargs):
  return zoo.build_model('cnn', X, META, **kwargs)._replace(name=name)


def test_counts_convolutions_in_nested_jaxprs():
  k = jnp.ones([2, 1, 3, 3])  # OIHW, lax's default layout

  def f(x):
    def body(c, _):
      return c, jax.lax.conv_general_dilated(c, k, (1, 1), 'SAME')
    return jax.lax.scan(body, x, None, length=2)[1]

  jaxpr = jax.make_jaxpr(f)(jnp.ones([1, 1, 4, 4]))
  assert performance.count_primitives(jaxpr, performance.CONVOLUTIONS) == 1
  assert performance.count_primitives(jax.make_jaxpr(jnp.sin)(1.0),
                                      performance.CONVOLUTIONS) == 0


def test_convolution_count_of_each_cnn_formulation():
  assert performance.convolutions(cnn('a', conv='lax')) == 2  # nn.Conv
  # PatchConv by shifted slices has no convolution op at all; by
  # conv_general_dilated_patches it has one per layer (a grouped one).
  assert performance.convolutions(cnn('b', conv='patches')) == 0
  assert performance.convolutions(
      cnn('c', conv='patches', patch_method='patches')) == 2
  assert performance.convolutions(zoo.build_model(
      'mlp', X.reshape(2, -1), META)) == 0


def test_an_ordinary_flax_cnn_warns_once_naming_patchconv():
  class MyCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      return nn.Dense(62)(x.reshape(x.shape[0], -1))

  model = base.classifier(MyCNN(), X, 'my_cnn_for_the_warning')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    fp.fed_opt(model, optax.sgd(0.1), optax.sgd(1.0))
    fp.fed_opt(model, optax.sgd(0.1), optax.sgd(1.0))  # once per process
  mine = [w for w in caught
          if issubclass(w.category, performance.PerformanceWarning)]
  assert len(mine) == 1
  text = str(mine[0].message)
  assert "'my_cnn_for_the_warning'" in text and 'PatchConv' in text
  assert 'docs/performance.md' in text


def test_no_warning_off_cpu_or_without_convolutions():
  with warnings.catch_warnings():
    warnings.simplefilter('error', performance.PerformanceWarning)
    assert not performance.warn_scanned_convolutions(
        cnn('cnn_on_gpu', conv='lax'), backend='gpu')
    assert not performance.warn_scanned_convolutions(
        cnn('cnn_patches', conv='patches'))
    fp.fed_opt(cnn('cnn_patches_round', conv='patches'), optax.sgd(0.1),
               optax.sgd(1.0))


def test_the_warning_is_a_warning_not_an_error():
  with pytest.warns(performance.PerformanceWarning, match='PatchConv'):
    assert performance.warn_scanned_convolutions(cnn('cnn_lax_2', conv='lax'))
