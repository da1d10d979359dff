"""Exact nearest-neighbour search over each client's private store, in JAX.

A client's store is ``keys [N, d]`` with a ``valid [N]`` mask (stores of a
cohort are padded to one ``N`` and stacked ``[C, N, d]``). `exact_topk` scores
every valid key against every query, by inner product (``'ip'``) or by
negative squared L2 distance (``'l2'``), and keeps the ``k`` best, as faiss's
``IndexFlatIP`` / ``IndexFlatL2`` do. Queries and keys are processed in
blocks (a running top-k is merged block by block), so memory is
``query_block x key_block`` per client whatever the store's size; ``vmap`` it
over clients (`batched_topk`). A padded key is never returned while the store
has ``k`` valid keys; past that, the extra slots have score ``-inf`` and
index ``-1``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

METRICS = ('ip', 'l2')


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f'unknown retrieval metric {metric!r}; accepted: '
                     f'{", ".join(METRICS)}.')
  return metric


def scores(queries: jax.Array, keys: jax.Array, metric: str) -> jax.Array:
  """``[Q, N]``: inner products, or negative squared L2 distances
  ``-(|q|^2 - 2 q.k + |k|^2)`` (larger is nearer, both ways)."""
  dots = jnp.dot(queries, keys.T, precision=jax.lax.Precision.HIGHEST)
  if metric == 'ip':
    return dots
  qq = jnp.sum(queries * queries, -1)[:, None]
  kk = jnp.sum(keys * keys, -1)[None, :]
  return -(qq - 2.0 * dots + kk)


def _pad_rows(x: jax.Array, multiple: int, value=0) -> jax.Array:
  n = x.shape[0]
  extra = -n % multiple
  if not extra:
    return x
  return jnp.concatenate(
      [x, jnp.full((extra,) + x.shape[1:], value, x.dtype)], 0)


def exact_topk(queries: jax.Array, keys: jax.Array, valid: jax.Array,
               k: int, metric: str = 'l2', query_block: int = 256,
               key_block: int = 4096) -> tuple[jax.Array, jax.Array]:
  """The ``k`` nearest valid keys of each query, best first.

  Args:
    queries: ``[Q, d]``.
    keys: ``[N, d]``; ``valid``: bool ``[N]`` (False rows are padding).
    k: neighbours per query (static; at most ``N``).
    metric: ``'ip'`` or ``'l2'`` (`scores`).
  Returns:
    ``(scores [Q, k], indices [Q, k])``: the scores of `scores` (for L2 the
    negative squared distance) and the keys' rows; slots beyond the valid
    keys hold ``-inf`` and ``-1``.
  """
  check_metric(metric)
  q, d = queries.shape
  n = keys.shape[0]
  if keys.shape[1] != d:
    raise ValueError(f'query width {d} does not match the store\'s key width '
                     f'{keys.shape[1]}.')
  if not 1 <= k <= n:
    raise ValueError(f'k must be in [1, {n}] (the store\'s rows), got {k}.')
  qb = max(1, min(query_block, q))
  kb = max(k, min(key_block, n))
  qs = _pad_rows(queries, qb).reshape(-1, qb, d)
  ks = _pad_rows(keys, kb).reshape(-1, kb, d)
  vs = _pad_rows(valid, kb, False).reshape(-1, kb)
  offsets = jnp.arange(ks.shape[0], dtype=jnp.int32) * kb

  def one_query_block(qblock):
    def merge(carry, block):
      best_s, best_i = carry
      kblock, vblock, off = block
      s = jnp.where(vblock[None, :], scores(qblock, kblock, metric), -jnp.inf)
      top_s, pos = jax.lax.top_k(jnp.concatenate([best_s, s], 1), k)
      # positions < k are the running best; the rest index this block (no
      # [queries, block] index array is built)
      kept = jnp.take_along_axis(best_i, jnp.minimum(pos, k - 1), 1)
      return (top_s, jnp.where(pos < k, kept, off + pos - k)), None

    init = (jnp.full((qb, k), -jnp.inf, jnp.float32),
            jnp.full((qb, k), -1, jnp.int32))
    (best_s, best_i), _ = jax.lax.scan(merge, init, (ks, vs, offsets))
    return best_s, jnp.where(jnp.isfinite(best_s), best_i, -1)

  best_s, best_i = jax.lax.map(one_query_block, qs)
  return best_s.reshape(-1, k)[:q], best_i.reshape(-1, k)[:q]


@functools.partial(jax.jit, static_argnames=('k', 'metric', 'query_block',
                                             'key_block'))
def batched_topk(queries: jax.Array, keys: jax.Array, valid: jax.Array, *,
                 k: int, metric: str = 'l2', query_block: int = 256,
                 key_block: int = 4096) -> tuple[jax.Array, jax.Array]:
  """`exact_topk` for every client in one jitted call: ``queries [C, Q, d]``,
  ``keys [C, N, d]``, ``valid [C, N]`` -> ``[C, Q, k]`` scores and rows."""
  return jax.vmap(lambda q, kk, v: exact_topk(
      q, kk, v, k, metric, query_block, key_block))(queries, keys, valid)
