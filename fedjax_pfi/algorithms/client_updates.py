"""Client updates: local training of one client from the broadcast model.

`local_training` runs a client's local steps ``[S, B, ...]`` with an optax
client optimizer and returns its model delta. Gradient corrections compose
onto the plain local-SGD loop instead of forking it:

- FedProx (Li et al., MLSys 2020): the local objective gains
  ``mu/2 ||w - w_global||^2``, i.e. the gradient gains ``mu (w - w_global)``.
- SCAFFOLD (Karimireddy et al., ICML 2020): the gradient gains ``c - c_i``
  (see `fedjax_pfi.algorithms.scaffold`).

A step whose batch mask is all False (a padded step) leaves parameters and
optimizer state untouched, so momentum or Adam never drift through padding.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi.models import base

Params = Any


class ClientOutput(NamedTuple):
  """What one client sends back (before aggregation).

  Attributes:
    delta: ``local_params - broadcast_params``.
    num_steps: local steps actually taken (unpadded).
    loss_sum: summed training loss over the examples seen.
    count: number of loss terms (examples or tokens) seen.
  """
  delta: Params
  num_steps: jax.Array
  loss_sum: jax.Array
  count: jax.Array


def tree_where(cond, a, b):
  return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


ClientOptimizer = optax.GradientTransformation
Correction = Callable[[Params], Params]


def client_optimizer(name: str, learning_rate: float, momentum: float = 0.0,
                     b1: float = 0.9, b2: float = 0.999,
                     eps: float = 1e-8) -> optax.GradientTransformation:
  """The client optimizers: ``'sgd'`` (with optional momentum) or ``'adam'``."""
  if not learning_rate > 0:
    raise ValueError(
        f'client learning rate must be positive, got {learning_rate}.')
  if name == 'sgd':
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == 'adam':
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  raise ValueError(
      f"unknown client optimizer {name!r}; accepted: 'sgd', 'adam'.")


def local_training(model: base.Model, optimizer: optax.GradientTransformation,
                   *, proximal_mu: float = 0.0,
                   unroll: Union[int, bool] = 1):
  """Builds ``train(global_params, batches, mask, key, correction) -> ClientOutput``.

  Args:
    model: the model.
    optimizer: the client optimizer, re-initialised every round.
    proximal_mu: FedProx's mu (0 = plain local SGD).
    unroll: ``lax.scan`` unroll over local steps (``True`` unrolls fully; on
      XLA:CPU unrolled conv steps are much faster, see BUILD_NOTES.md).

  The returned function takes ``batches`` (column -> ``[S, B, ...]``), ``mask``
  ``[S, B]``, a per-client ``key`` (step ``s`` uses ``fold_in(key, s)``) and an
  optional constant gradient ``correction`` pytree (SCAFFOLD's ``c - c_i``).
  """
  if proximal_mu < 0:
    raise ValueError(f'FedProx mu must be >= 0, got {proximal_mu}.')

  def loss_fn(params, batch, mask, rng):
    return base.masked_mean_loss(model, params, batch, mask, rng, train=True)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train(global_params, batches, mask, key, correction=None):
    num_steps = mask.shape[0]

    def step(carry, inputs):
      params, opt_state = carry
      batch, m, s = inputs
      (_, stats), grads = grad_fn(params, batch, m, jax.random.fold_in(key, s))
      if proximal_mu:
        grads = jax.tree.map(lambda g, w, w0: g + proximal_mu * (w - w0),
                             grads, params, global_params)
      if correction is not None:
        grads = jax.tree.map(jnp.add, grads, correction)
      updates, new_opt_state = optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      active = jnp.any(m)
      carry = (tree_where(active, new_params, params),
               tree_where(active, new_opt_state, opt_state))
      return carry, (jnp.sum(stats.loss_sum), jnp.sum(stats.count), active)

    init = (global_params, optimizer.init(global_params))
    (params, _), (loss_sums, counts, active) = jax.lax.scan(
        step, init, (batches, mask, jnp.arange(num_steps)), unroll=unroll)
    delta = jax.tree.map(jnp.subtract, params, global_params)
    return ClientOutput(delta, jnp.sum(active.astype(jnp.int32)),
                        jnp.sum(loss_sums), jnp.sum(counts))

  return train
