"""Nearest-neighbour language modelling over a client's own store
(Khandelwal et al., ICLR 2020, "Generalization through Memorization: Nearest
Neighbor Language Models").

A client's store maps each context of its training text to the token that
followed it: ``keys [N, d]`` are the frozen foundation model's hidden states
(`base.Model.features`), ``values [N]`` the next tokens. At each test
position the query is the same model's hidden state; the ``k`` nearest keys
(`search.exact_topk`) vote for their values with weights
``softmax(score / temperature)`` (score: the negative squared L2 distance, as
in the paper, or the inner product), and

    p(y) = lambda * p_kNN(y) + (1 - lambda) * p_LM(y),

where ``p_LM`` is the reader: the base, or a personalized (LoRA) model. The
retriever is always the frozen base, so the store is built once and stays
valid whichever reader personalizes on top of it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_pfi.models import base
from fedjax_pfi.retrieval import search


class KnnConfig(NamedTuple):
  k: int = 8
  lam: float = 0.25
  temperature: float = 1.0
  metric: str = 'l2'
  query_block: int = 256
  key_block: int = 4096


def neighbour_log_probs(scores: jax.Array, values: jax.Array,
                        vocab_size: int, temperature: float) -> jax.Array:
  """``[Q, V]`` log p_kNN from the ``[Q, k]`` neighbours' scores (``-inf``
  for missing ones) and values: ``softmax(scores / temperature)`` summed by
  value. A query without any neighbour gets ``-inf`` everywhere."""
  s = scores / temperature
  top = jnp.max(s, -1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.exp(s - top)
  w = w / jnp.maximum(jnp.sum(w, -1, keepdims=True), 1e-30)
  p = jax.vmap(lambda wq, vq: jnp.zeros(vocab_size, jnp.float32).at[
      jnp.maximum(vq, 0)].add(wq))(w, values)
  return jnp.log(p)


def interpolate(lm_logits: jax.Array, knn_log_probs: jax.Array,
                lam: float) -> jax.Array:
  """``log(lam p_kNN + (1 - lam) p_LM)``; ``lam = 0`` returns the model's
  log-softmax exactly."""
  lm = jax.nn.log_softmax(lm_logits.astype(jnp.float32), -1)
  if lam == 0.0:
    return lm
  if lam == 1.0:
    return knn_log_probs
  return jnp.logaddexp(jnp.log(lam) + knn_log_probs,
                       jnp.log1p(-lam) + lm)


def token_stats(log_p: jax.Array, y: jax.Array,
                pad_id: Optional[int]) -> base.ExampleStats:
  """Per-window sums from ``[B, T, V]`` log-probabilities and targets."""
  valid = jnp.ones(y.shape, jnp.float32) if pad_id is None else (
      y != pad_id).astype(jnp.float32)
  picked = jnp.take_along_axis(log_p, y[..., None], -1)[..., 0]
  loss = jnp.where(valid > 0, -picked, 0.0)
  correct = (jnp.argmax(log_p, -1) == y).astype(jnp.float32)
  return base.ExampleStats(jnp.sum(loss, -1), jnp.sum(correct * valid, -1),
                           jnp.sum(valid, -1),
                           base.calibration_sums(log_p, correct, valid))


def knn_lm(reader: base.Model, retriever: base.Model, cfg: KnnConfig,
           vocab_size: int, pad_id: Optional[int]) -> base.Model:
  """The reader augmented with a per-client store, as a `base.Model` over
  ``{'reader': reader params, 'retriever': base params, 'store': {'keys'
  [N, d], 'values' [N], 'valid' [N]}}`` (one client's store; vmap clients).
  Evaluation only."""
  if retriever.features is None:
    raise ValueError(f'model {retriever.name!r} exposes no hidden states; '
                     "retrieval needs model.name='transformer'.")
  search.check_metric(cfg.metric)

  def log_probs(params, x):
    logits = reader.apply(params['reader'], x, None, False)
    q = retriever.features(params['retriever'], x)
    b, t, d = q.shape
    store = params['store']
    k = min(cfg.k, store['keys'].shape[0])
    s, idx = search.exact_topk(q.reshape(b * t, d), store['keys'],
                               store['valid'], k, cfg.metric,
                               cfg.query_block, cfg.key_block)
    values = jnp.where(idx >= 0, store['values'][jnp.maximum(idx, 0)], -1)
    knn = neighbour_log_probs(s, values, vocab_size, cfg.temperature)
    return interpolate(logits, knn.reshape(b, t, vocab_size), cfg.lam)

  def apply(params, x, rng=None, train=False):
    return log_probs(params, x)

  def example_stats(params, batch, rng=None, train=False):
    return token_stats(log_probs(params, batch['x']), batch['y'], pad_id)

  return base.Model(lambda key: None, apply, example_stats,
                    f'{reader.name}+knn_lm', reader.sample_x,
                    context_len=reader.context_len)
