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


# Equal-width confidence bins of the expected calibration error (Guo et al.,
# ICML 2017, use 15).
CONFIDENCE_BINS = 15

# The layer whose output `Model.features` returns: a transformer's final
# norm, the input of its output layer (Khandelwal et al., ICLR 2020, key
# their kNN-LM by a final-layer representation).
FEATURES_LAYER = 'ln_f'


class ExampleStats(NamedTuple):
  """Per-example sums, shape ``[B]`` each: summed loss, correct, count.

  ``confidence``: optional ``[B, CONFIDENCE_BINS, 3]`` sums over each
  example's predictions by confidence bin (the top softmax probability in
  ``(0, 1]``, equal-width bins): count, correct, and summed confidence,
  what an expected calibration error needs (`calibration_sums`). None for
  models whose outputs are not class probabilities (the recommender's
  HR@k).

  ``ndcg``: optional ``[B]`` NDCG@k of each ranked list (`recommender`,
  where ``correct`` is its HR@k); None for other models.
  """
  loss_sum: jax.Array
  correct: jax.Array
  count: jax.Array
  confidence: Optional[jax.Array] = None
  ndcg: Optional[jax.Array] = None


def calibration_sums(logits: jax.Array, correct: jax.Array,
                     valid: jax.Array) -> jax.Array:
  """``[B, CONFIDENCE_BINS, 3]``: per example and confidence bin, the
  number of valid predictions, how many are correct, and their summed
  confidence (top softmax probability). ``logits`` ``[B, ..., K]``;
  ``correct`` and ``valid`` ``[B, ...]``."""
  conf = jnp.exp(jnp.max(logits, -1) - jax.nn.logsumexp(logits, -1))
  b = jnp.clip(jnp.ceil(conf * CONFIDENCE_BINS).astype(jnp.int32) - 1, 0,
               CONFIDENCE_BINS - 1)
  onehot = jax.nn.one_hot(b, CONFIDENCE_BINS, dtype=jnp.float32) * \
      valid[..., None]
  parts = jnp.stack([onehot, onehot * correct[..., None],
                     onehot * conf[..., None]], -1)
  return jnp.sum(parts.reshape(parts.shape[0], -1, CONFIDENCE_BINS, 3), 1)


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
    features: ``(params, x) -> [B, T, d]``, the hidden states the output
      layer reads (a transformer's final norm), for retrieval
      (`fedjax_pfi.retrieval`); None where the model exposes none.
    context_len: the most tokens one input row may hold (a transformer's
      positions), or None.
  """
  init: Callable[[jax.Array], Params]
  apply: Callable[..., jax.Array]
  example_stats: Callable[..., ExampleStats]
  name: str = 'model'
  sample_x: Any = None  # one input batch, for abstract traces (shapes only)
  features: Optional[Callable[..., jax.Array]] = None
  context_len: Optional[int] = None


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

  def features(params, x):
    _, state = module.apply(
        {'params': params}, x, train=False, mutable=['intermediates'],
        capture_intermediates=lambda m, fn: m.name == FEATURES_LAYER and
        fn == '__call__')
    found = state.get('intermediates', {}).get(FEATURES_LAYER, {})
    if '__call__' not in found:
      raise ValueError(
          f'model {name!r} has no layer named {FEATURES_LAYER!r} whose '
          'output could serve as hidden states for retrieval; retrieval '
          "needs model.name='transformer'.")
    return found['__call__'][0].astype(jnp.float32)

  context_len = getattr(getattr(module, 'config', None), 'max_len',
                        getattr(module, 'max_len', None))
  return from_apply(init, apply, name, pad_id, sample_x)._replace(
      features=features, context_len=context_len)


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
      ones = jnp.ones_like(losses)
      return ExampleStats(losses, correct, ones,
                          calibration_sums(logits, correct, ones))
    valid = (jnp.ones_like(y, dtype=jnp.float32) if pad_id is None else
             (y != pad_id).astype(jnp.float32))
    axes = tuple(range(1, y.ndim))
    return ExampleStats(jnp.sum(losses * valid, axes),
                        jnp.sum(correct * valid, axes), jnp.sum(valid, axes),
                        calibration_sums(logits, correct, valid))

  return Model(init, apply, example_stats, name, sample_x)
