"""The comparison methods the throughput benchmarks share: one jitted client
step for a Python loop over clients, its centralized twin, and the server's
weighted mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi.models import base


def sgd_step(model: base.Model, opt: optax.GradientTransformation):
  """Jitted ``(params, opt_state, batch, mask) -> (params, opt_state)`` on
  the masked mean loss (a fixed batch shape, so it compiles once)."""

  @jax.jit
  def step(params, opt_state, batch, mask):
    grads = jax.grad(lambda p: base.masked_mean_loss(
        model, p, batch, mask, None)[0])(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def central_step(model: base.Model, opt: optax.GradientTransformation):
  """`sgd_step` over every example of the batch: the centralized step."""
  step = sgd_step(model, opt)
  return lambda params, opt_state, batch: step(
      params, opt_state, batch, jnp.ones(batch['y'].shape[0], bool))


def server_update(server_lr: float = 1.0):
  """Jitted ``(params, deltas, weights) -> params + lr * weighted mean``."""

  @jax.jit
  def update(params, deltas, weights):
    mean = jax.tree.map(lambda *d: sum(w * x for w, x in zip(weights, d)) /
                        sum(weights), *deltas)
    return jax.tree.map(lambda p, d: p + server_lr * d, params, mean)

  return update
