"""Centralized training on pooled data: pretraining and the non-federated baseline.

Two uses:

- pretraining the embedded foundation model on plays that are not federated
  clients (``experiments/pretrain.py``);
- the "centralized LoRA" baseline of the PEFT comparison: the same adapters
  trained on every client's examples pooled on a server, which federated
  learning exists to avoid.

Batches: each epoch is ``default_rng([seed, epoch]).permutation`` of the
pooled rows cut into batches of ``batch_size`` (the last partial batch is
kept, masked); training stops after ``num_steps`` steps. Leaves matching
``frozen`` (`param_groups.split`) are not trained.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.models import base

Params = Any


def pooled_batches(ds: FederatedDataset, batch_size: int, seed: int
                   ) -> Iterator[tuple[dict, np.ndarray]]:
  """Endless ``(batch, mask)`` over ``ds``'s pooled rows, epoch by epoch."""
  n = ds.num_examples
  if n == 0:
    raise ValueError('the pooled dataset has no examples.')
  epoch = 0
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for lo in range(0, n, batch_size):
      rows = order[lo:lo + batch_size]
      mask = np.zeros(batch_size, bool)
      mask[:rows.size] = True
      rows = np.pad(rows, (0, batch_size - rows.size))
      yield {k: v[rows] for k, v in ds.columns.items()}, mask
    epoch += 1


def train(model: base.Model, params: Params, ds: FederatedDataset, *,
          optimizer: optax.GradientTransformation, batch_size: int,
          num_steps: int, seed: int = 0, frozen: Optional[str] = None,
          key: Optional[jax.Array] = None,
          callback: Optional[Callable[[int, Params, float], None]] = None,
          callback_every: int = 100) -> Params:
  """Trains ``params`` on ``ds``'s pooled examples; returns the new params.

  Args:
    frozen: regex of leaves not to train (None trains everything).
    key: dropout randomness; step ``s`` uses ``fold_in(key, s)``.
    callback: called as ``callback(step, params, mean_loss)`` every
      ``callback_every`` steps and after the last one (loss averaged since
      the previous call).
  """
  if num_steps < 0 or batch_size < 1:
    raise ValueError(f'need num_steps >= 0 and batch_size >= 1, got '
                     f'{num_steps} and {batch_size}.')
  parts = (param_groups.split(params, frozen) if frozen else
           param_groups.Parts(None, params, {}))
  key = jax.random.key(seed) if key is None else key

  def loss_fn(trainable, fixed, batch, mask, rng):
    full = trainable if fixed is None else param_groups.merge(fixed, trainable)
    return base.masked_mean_loss(model, full, batch, mask, rng, train=True)[0]

  @jax.jit
  def step(trainable, opt_state, fixed, batch, mask, rng):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, fixed, batch, mask,
                                              rng)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  trainable, fixed = parts.global_, parts.frozen
  opt_state = optimizer.init(trainable)
  batches = pooled_batches(ds, batch_size, seed)
  losses = []
  for s in range(num_steps):
    batch, mask = next(batches)
    trainable, opt_state, loss = step(trainable, opt_state, fixed, batch,
                                      mask, jax.random.fold_in(key, s))
    losses.append(loss)
    if callback is not None and ((s + 1) % callback_every == 0 or
                                 s + 1 == num_steps):
      callback(s + 1, _join(fixed, trainable),
               float(jnp.mean(jnp.stack(losses))))
      losses = []
  return _join(fixed, trainable)


def _join(fixed, trainable):
  return trainable if fixed is None else param_groups.merge(fixed, trainable)
