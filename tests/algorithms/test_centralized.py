"""Centralized training on pooled data (pretraining, the non-federated
baseline): a plain SGD loop over the documented batches, frozen leaves kept."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pfi.algorithms import centralized
from fedjax_pfi.models import zoo
from fedjax_pfi.peft import lora
from tests.algorithms.test_rounds import toy_dataset


def test_equals_plain_sgd_over_the_documented_batches():
  ds = toy_dataset()
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(5,))
  params = model.init(jax.random.key(0))
  got = centralized.train(model, params, ds, optimizer=optax.sgd(0.1),
                          batch_size=7, num_steps=25, seed=4)
  # By hand: epoch e is default_rng([4, e]).permutation(n) cut into 7s.
  n, p = ds.num_examples, params
  rows = []
  for e in range(4):
    order = np.random.default_rng([4, e]).permutation(n)
    rows += [order[i:i + 7] for i in range(0, n, 7)]
  grad = jax.jit(jax.grad(lambda q, x, y: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(model.apply(q, x), y))))
  for r in rows[:25]:
    g = grad(p, ds.columns['x'][r], ds.columns['y'][r])
    p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_leaves_do_not_move_and_callback_reports():
  ds = toy_dataset()
  base = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata, hidden=(5,))
  model = lora.lora_model(base, lora.LoraConfig(rank=2, target='Dense_0'))
  params = model.init(jax.random.key(0))
  seen = []
  out = centralized.train(
      model, params, ds, optimizer=optax.sgd(0.5), batch_size=8, num_steps=10,
      frozen=r'^base/', callback=lambda s, p, loss: seen.append((s, loss)),
      callback_every=4)
  for a, b in zip(jax.tree.leaves(out['base']),
                  jax.tree.leaves(params['base'])):
    np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(out['lora']['Dense_0']['b']))
  assert [s for s, _ in seen] == [4, 8, 10]
  assert all(np.isfinite(loss) for _, loss in seen)
