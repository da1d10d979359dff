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

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi.algorithms import param_groups
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
                   unroll: Union[int, bool] = 1,
                   regularizer: Optional[Callable[[Params, Any], jax.Array]]
                   = None):
  """Builds ``train(init_params, batches, mask, keys, ...) -> ClientOutput``.

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
    proximal_mu: FedProx's mu (0 = plain local SGD): the gradient gains
      ``mu (w - w_0)`` with ``w_0`` the client's starting point.
    unroll: ``lax.scan`` unroll over local steps (``True`` unrolls fully).
    regularizer: optional ``(params, aux) -> scalar`` added to each step's
      loss (HetLoRA's rank self-pruning penalty).

  ``train(init_params, batches, mask, keys, correction=None, frozen=None,
  aux=None)`` takes:

  - ``init_params``: each client's starting point, leaves ``[C, ...]`` (the
    broadcast server params, possibly merged with personal state);
  - ``batches`` (column -> ``[C, S, B, ...]``) and ``mask`` ``[C, S, B]``;
  - per-client ``keys`` ``[C]`` (client ``c``'s step ``s`` uses
    ``fold_in(keys[c], s)``);
  - ``correction``: optional constant gradient, leaves ``[C, ...]`` (SCAFFOLD's
    ``c - c_i``);
  - ``frozen``: optional params shared by every client and not trained (a
    foundation model's base), passed unbatched (``in_axes=None``);
  - ``aux``: optional per-client, untrained values ``[C, ...]`` (a client's
    LoRA scale or rank).

  The loss sees ``param_groups.merge(frozen, params, aux)`` when ``frozen`` or
  ``aux`` is given (nested dicts), else ``params``. It returns a
  `ClientOutput` whose leaves have a leading ``[C]`` axis; ``delta`` is
  ``final - init_params``.
  """
  if proximal_mu < 0:
    raise ValueError(f'FedProx mu must be >= 0, got {proximal_mu}.')

  def loss_fn(params, batch, mask, rng, frozen, aux):
    full = (params if frozen is None and aux is None else
            param_groups.merge(frozen, params, aux))
    loss, stats = base.masked_mean_loss(model, full, batch, mask, rng,
                                        train=True)
    if regularizer is not None:
      loss = loss + regularizer(params, aux)
    return loss, stats

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def client_step(params, opt_state, init_params, batch, m, key, s,
                  correction, frozen, aux):
    """One client's step ``s``; a no-op where its mask ``m`` is all False."""
    (_, stats), grads = grad_fn(params, batch, m, jax.random.fold_in(key, s),
                                frozen, aux)
    if proximal_mu:
      grads = jax.tree.map(lambda g, w, w0: g + proximal_mu * (w - w0),
                           grads, params, init_params)
    if correction is not None:
      grads = jax.tree.map(jnp.add, grads, correction)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    active = jnp.any(m)
    return (tree_where(active, new_params, params),
            tree_where(active, new_opt_state, opt_state),
            jnp.sum(stats.loss_sum), jnp.sum(stats.count), active)

  def train(init_params, batches, mask, keys, correction=None, frozen=None,
            aux=None):
    num_clients, num_steps = mask.shape[:2]
    batched = lambda t: None if t is None else 0
    cohort_step = jax.vmap(
        client_step,
        in_axes=(0, 0, 0, 0, 0, 0, None, batched(correction), None,
                 batched(aux)))

    def body(carry, s):
      at_step = lambda x: jax.lax.dynamic_index_in_dim(x, s, 1, keepdims=False)
      m = at_step(mask)

      def run(carry):
        params, opt_state, loss_sum, count, steps = carry
        params, opt_state, l, n, active = cohort_step(
            params, opt_state, init_params, jax.tree.map(at_step, batches), m,
            keys, s, correction, frozen, aux)
        return (params, opt_state, loss_sum + l, count + n,
                steps + active.astype(jnp.int32))

      return jax.lax.cond(jnp.any(m), run, lambda c: c, carry), None

    zeros = jnp.zeros([num_clients], jnp.float32)
    init = (init_params, jax.vmap(optimizer.init)(init_params), zeros, zeros,
            jnp.zeros([num_clients], jnp.int32))
    (params, _, loss_sum, count, steps), _ = jax.lax.scan(
        body, init, jnp.arange(num_steps), unroll=unroll)
    delta = jax.tree.map(jnp.subtract, params, init_params)
    return ClientOutput(delta, steps, loss_sum, count)

  return train
