"""Client updates: local training of a cohort's clients from the broadcast model.

`local_training` runs every client's local steps ``[C, S, B, ...]`` with an
optax client optimizer and returns each client's model delta. Gradient corrections compose
onto the plain local-SGD loop instead of forking it:

- FedProx (Li et al., MLSys 2020): the local objective gains
  ``mu/2 ||w - w_global||^2``, i.e. the gradient gains ``mu (w - w_global)``.
- SCAFFOLD (Karimireddy et al., ICML 2020): the gradient gains ``c - c_i``
  (see `fedjax_pfi.algorithms.scaffold`).

A step whose batch mask is all False (a padded step) leaves parameters and
optimizer state untouched, so momentum or Adam never drift through padding;
a step that is padding for the whole cohort is skipped at run time.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi.models import base

Params = Any


class ClientOutput(NamedTuple):
  """What the cohort's clients send back (before aggregation); every leaf
  has a leading client axis ``[C]``.

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
  """Builds ``train(global_params, batches, mask, keys, correction) -> ClientOutput``.

  ``train`` runs the local steps of a whole cohort: a ``lax.scan`` over the
  step axis whose body is the single-client SGD step ``vmap``ped over the
  client axis, so the scan is *outside* the vmap. Its predicate "does any
  client of the cohort have a real example at step ``s``" is therefore not
  batched, and ``lax.cond`` skips the steps that are padding for every client
  at run time (the steps a step bucket adds beyond the longest client). A
  client that has finished while others go on keeps its params and optimizer
  state through ``jnp.where``. Both make padding an exact no-op; the first
  also makes it free.

  Args:
    model: the model.
    optimizer: the client optimizer, re-initialised every round.
    proximal_mu: FedProx's mu (0 = plain local SGD).
    unroll: ``lax.scan`` unroll over local steps (``True`` unrolls fully).

  ``train`` takes the broadcast ``global_params`` (every client starts from
  them; FedProx's proximal term reads them unbatched), ``batches`` (column ->
  ``[C, S, B, ...]``), ``mask`` ``[C, S, B]``, per-client ``keys`` ``[C]``
  (client ``c``'s step ``s`` uses ``fold_in(keys[c], s)``) and an optional
  per-client constant gradient ``correction`` with a leading ``[C]`` axis
  (SCAFFOLD's ``c - c_i``). It returns a `ClientOutput` whose leaves have a
  leading ``[C]`` axis.
  """
  if proximal_mu < 0:
    raise ValueError(f'FedProx mu must be >= 0, got {proximal_mu}.')

  def loss_fn(params, batch, mask, rng):
    return base.masked_mean_loss(model, params, batch, mask, rng, train=True)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def client_step(params, opt_state, global_params, batch, m, key, s,
                  correction):
    """One client's step ``s``; a no-op where its mask ``m`` is all False."""
    (_, stats), grads = grad_fn(params, batch, m, jax.random.fold_in(key, s))
    if proximal_mu:
      grads = jax.tree.map(lambda g, w, w0: g + proximal_mu * (w - w0),
                           grads, params, global_params)
    if correction is not None:
      grads = jax.tree.map(jnp.add, grads, correction)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    active = jnp.any(m)
    return (tree_where(active, new_params, params),
            tree_where(active, new_opt_state, opt_state),
            jnp.sum(stats.loss_sum), jnp.sum(stats.count), active)

  def train(global_params, batches, mask, keys, correction=None):
    num_clients, num_steps = mask.shape[:2]
    cohort_step = jax.vmap(
        client_step,
        in_axes=(0, 0, None, 0, 0, 0, None, None if correction is None else 0))

    def body(carry, s):
      at_step = lambda x: jax.lax.dynamic_index_in_dim(x, s, 1, keepdims=False)
      m = at_step(mask)

      def run(carry):
        params, opt_state, loss_sum, count, steps = carry
        params, opt_state, l, n, active = cohort_step(
            params, opt_state, global_params, jax.tree.map(at_step, batches),
            m, keys, s, correction)
        return (params, opt_state, loss_sum + l, count + n,
                steps + active.astype(jnp.int32))

      return jax.lax.cond(jnp.any(m), run, lambda c: c, carry), None

    per_client = lambda t: jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), t)
    zeros = jnp.zeros([num_clients], jnp.float32)
    init = (per_client(global_params),
            per_client(optimizer.init(global_params)), zeros, zeros,
            jnp.zeros([num_clients], jnp.int32))
    (params, _, loss_sum, count, steps), _ = jax.lax.scan(
        body, init, jnp.arange(num_steps), unroll=unroll)
    delta = jax.tree.map(lambda p, g: p - g[None], params, global_params)
    return ClientOutput(delta, steps, loss_sum, count)

  return train
