"""The model seam: a `Model` is a tuple of pure functions over a params pytree.

Every loss and metric is computed per example and reduced with an example
mask, so padded examples, padded steps and padded clients contribute exactly
nothing. For sequence models one "example" is a window; its loss is a sum over
its valid tokens and its ``count`` is the number of valid tokens, so a batch's
mean loss is ``sum(loss_sum) / sum(count)`` over the unmasked examples.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any
Batch = Mapping[str, jax.Array]


class ExampleStats(NamedTuple):
  """Per-example sums, shape ``[B]`` each: summed loss, correct, count."""
  loss_sum: jax.Array
  correct: jax.Array
  count: jax.Array


class Model(NamedTuple):
  """A model as pure functions.

  Attributes:
    init: ``key -> params``.
    apply: ``(params, x, rng, train) -> logits``; ``rng`` may be ``None`` when
      ``train`` is False.
    example_stats: ``(params, batch, rng, train) -> ExampleStats`` of shape
      ``[B]`` each.
    name: registry name, for messages and checkpoints.
    sample_x: an input batch of the right shape (or None).
  """
  init: Callable[[jax.Array], Params]
  apply: Callable[..., jax.Array]
  example_stats: Callable[..., ExampleStats]
  name: str = 'model'
  sample_x: Any = None  # one input batch, for abstract traces (shapes only)


def masked_mean_loss(model: Model, params: Params, batch: Batch,
                     mask: jax.Array, rng: Optional[jax.Array],
                     train: bool = True) -> tuple[jax.Array, ExampleStats]:
  """Mean loss over the unmasked examples of a batch (0 if none).

  Args:
    mask: bool ``[B]``; False rows are padding and get zero gradient.
  Returns:
    ``(loss, stats)`` where ``stats`` are masked per-example sums.
  """
  stats = model.example_stats(params, batch, rng, train)
  m = mask.astype(stats.loss_sum.dtype)
  stats = ExampleStats(stats.loss_sum * m, stats.correct * m, stats.count * m)
  denom = jnp.maximum(jnp.sum(stats.count), 1.0)
  return jnp.sum(stats.loss_sum) / denom, stats


def classifier(module: nn.Module, sample_x: jax.Array, name: str,
               pad_id: Optional[int] = None) -> Model:
  """Wraps a Flax module producing logits into a softmax-cross-entropy Model.

  Args:
    module: maps ``x`` (``[B, ...]``) to logits ``[B, K]`` or, for sequence
      models, ``[B, T, K]`` with integer targets ``y`` ``[B]`` / ``[B, T]``.
    sample_x: one example batch used to initialise shapes.
    pad_id: for sequence targets, the id that marks an ignored target token.
  """

  def init(key):
    return module.init({'params': key, 'dropout': key}, sample_x,
                       train=False)['params']

  def apply(params, x, rng=None, train=False):
    rngs = {'dropout': rng} if (train and rng is not None) else {}
    return module.apply({'params': params}, x, train=train, rngs=rngs)

  return from_apply(init, apply, name, pad_id, sample_x)


def from_apply(init: Callable[[jax.Array], Params], apply: Callable[..., jax.Array],
               name: str, pad_id: Optional[int] = None,
               sample_x: Any = None) -> Model:
  """A softmax-cross-entropy `Model` from ``init`` and ``apply(params, x, rng,
  train) -> logits`` (see `classifier` for the shapes and ``pad_id``)."""

  def example_stats(params, batch, rng=None, train=False):
    logits = apply(params, batch['x'], rng, train).astype(jnp.float32)
    y = batch['y']
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    if y.ndim == 1:
      return ExampleStats(losses, correct, jnp.ones_like(losses))
    valid = (jnp.ones_like(y, dtype=jnp.float32) if pad_id is None else
             (y != pad_id).astype(jnp.float32))
    axes = tuple(range(1, y.ndim))
    return ExampleStats(jnp.sum(losses * valid, axes),
                        jnp.sum(correct * valid, axes), jnp.sum(valid, axes))

  return Model(init, apply, example_stats, name, sample_x)
