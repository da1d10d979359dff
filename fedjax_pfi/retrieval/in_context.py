"""In-context retrieval over a client's own store (Ram et al., TACL 2023,
"In-Context Retrieval-Augmented Language Models").

A client's store holds chunks of ``chunk_len`` tokens of its training text,
keyed by the frozen foundation model's mean-pooled hidden states. A test
window of ``T`` tokens is predicted in blocks of ``stride`` tokens. For block
``b`` (positions ``[p0, p1)``, ``p0 = b * stride``) the query is the window's
last ``chunk_len`` tokens before ``p0``, embedded the same way; its ``k``
nearest chunks are prepended, the nearest one last (next to the text it
continues), then as much of the window's own text up to ``p1`` as the
model's context leaves room for:

    [chunk_k ... chunk_1 | x[own_lo:p1]]      own_lo = max(0, p1 - own budget)

and the block's positions are read from the model's output. The own budget
is ``context_len - k * chunk_len``; the first block (nothing to query with)
is predicted from the window alone, as without retrieval. Ram et al. use a
stride of 4 and a 32-token query on 1,024-token models; a model of 64
positions leaves far less room, which `plan` reports.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_pfi.models import base
from fedjax_pfi.retrieval import knn_lm
from fedjax_pfi.retrieval import search


class InContextConfig(NamedTuple):
  k: int = 1
  chunk_len: int = 16
  stride: int = 0  # 0: half the own budget
  metric: str = 'ip'


class Block(NamedTuple):
  """One forward pass: predicts positions ``[p0, p1)`` from the retrieved
  chunks (when ``retrieve``) and the window's tokens ``[own_lo, p1)``; the
  query is tokens ``[query_lo, p0)``."""
  p0: int
  p1: int
  own_lo: int
  query_lo: int
  retrieve: bool


class Plan(NamedTuple):
  blocks: tuple
  retrieved_tokens: int   # k * chunk_len, prepended to each later block
  own_budget: int         # context_len - retrieved_tokens
  stride: int


def plan(seq_len: int, context_len: int, cfg: InContextConfig) -> Plan:
  """The blocks of a ``seq_len`` window; raises if the retrieved chunks
  leave the model no room for the window's own text."""
  if cfg.k < 1 or cfg.chunk_len < 1:
    raise ValueError(f'retrieval.k ({cfg.k}) and retrieval.chunk_len '
                     f'({cfg.chunk_len}) must be >= 1.')
  retrieved = cfg.k * cfg.chunk_len
  own = context_len - retrieved
  if own < 1:
    raise ValueError(
        f'retrieved context overflows the model\'s context window: k={cfg.k} '
        f'chunks of chunk_len={cfg.chunk_len} are {retrieved} tokens, the '
        f'model reads at most {context_len}; lower retrieval.k or '
        'retrieval.chunk_len so that k * chunk_len < the context length.')
  stride = cfg.stride or max(1, own // 2)
  if not 1 <= stride <= own:
    raise ValueError(f'retrieval.stride={cfg.stride} must be in [1, {own}] '
                     f'(the context left after {retrieved} retrieved tokens).')
  blocks = []
  for p0 in range(0, seq_len, stride):
    p1 = min(seq_len, p0 + stride)
    if p0 == 0:
      blocks.append(Block(0, p1, 0, 0, False))
    else:
      blocks.append(Block(p0, p1, max(0, p1 - own), max(0, p0 - cfg.chunk_len),
                          True))
  return Plan(tuple(blocks), retrieved, own, stride)


def block_inputs(x: jax.Array, chunks: Optional[jax.Array], block: Block
                 ) -> tuple[jax.Array, int]:
  """``(inputs [B, L_b], read_from)``: the block's input rows and the
  position of its first prediction. ``chunks [B, k, chunk_len]`` are the
  retrieved chunks, nearest first (None for a block without retrieval)."""
  own = x[:, block.own_lo:block.p1]
  if not block.retrieve:
    return own, block.p0 - block.own_lo
  b, k, r = chunks.shape
  prefix = chunks[:, ::-1].reshape(b, k * r)  # the nearest chunk last
  return (jnp.concatenate([prefix, own.astype(prefix.dtype)], 1),
          k * r + block.p0 - block.own_lo)


def pooled(retriever: base.Model, params, tokens: jax.Array) -> jax.Array:
  """``[B, d]``: mean over positions of the retriever's hidden states."""
  return jnp.mean(retriever.features(params, tokens), 1)


def in_context(reader: base.Model, retriever: base.Model,
               cfg: InContextConfig, seq_len: int,
               pad_id: Optional[int]) -> base.Model:
  """The reader with retrieved chunks in its context, as a `base.Model`
  over ``{'reader', 'retriever', 'store': {'keys' [M, d], 'tokens' [M,
  chunk_len], 'valid' [M]}}`` (one client's store). Evaluation only."""
  if retriever.features is None:
    raise ValueError(f'model {retriever.name!r} exposes no hidden states; '
                     "retrieval needs model.name='transformer'.")
  if reader.context_len is None:
    raise ValueError(f'model {reader.name!r} does not say its context length;'
                     ' in-context retrieval needs it.')
  search.check_metric(cfg.metric)
  the_plan = plan(seq_len, reader.context_len, cfg)

  def log_probs(params, x):
    store = params['store']
    k = min(cfg.k, store['keys'].shape[0])
    outs = []
    for blk in the_plan.blocks:
      chunks = None
      if blk.retrieve:
        q = pooled(retriever, params['retriever'], x[:, blk.query_lo:blk.p0])
        _, idx = search.exact_topk(q, store['keys'], store['valid'], k,
                                   cfg.metric)
        chunks = store['tokens'][jnp.maximum(idx, 0)]  # [B, k, R]
      inputs, at = block_inputs(x, chunks, blk)
      logits = reader.apply(params['reader'], inputs, None, False)
      outs.append(logits[:, at:at + blk.p1 - blk.p0])
    return jax.nn.log_softmax(jnp.concatenate(outs, 1).astype(jnp.float32))

  def apply(params, x, rng=None, train=False):
    return log_probs(params, x)

  def example_stats(params, batch, rng=None, train=False):
    return knn_lm.token_stats(log_probs(params, batch['x']), batch['y'],
                              pad_id)

  model = base.Model(lambda key: None, apply, example_stats,
                     f'{reader.name}+in_context', reader.sample_x,
                     context_len=reader.context_len)
  return model, the_plan
