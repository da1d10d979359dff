"""Aggregators: how the server combines the cohort's client deltas.

An `Aggregator` is ``(init, aggregate)`` over its own state, like an optax
transform, so clipping, noise or robust rules can wrap or replace the weighted
mean without touching the algorithms that call it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Params = Any


class Aggregator(NamedTuple):
  """``init(params) -> state``; ``aggregate(deltas, weights, state) -> (mean, state)``.

  ``deltas`` carry a leading client axis ``[C, ...]``; ``weights`` are ``[C]``
  (0 for padded clients).

  ``finalize(weighted_sum, total_weight, state) -> (mean, state)``, where
  the aggregate is one, computes it from ``sum_c w_c delta_c`` and ``sum_c
  w_c`` alone, which is what a chunked, packed or sharded round has (the
  clients' deltas never exist together). None for rules that need every
  delta at once (a median); such aggregators run unchunked only.
  """
  init: Callable[[Params], Any]
  aggregate: Callable[[Params, jax.Array, Any], tuple[Params, Any]]
  finalize: Optional[Callable[[Params, jax.Array, Any],
                              tuple[Params, Any]]] = None


def weighted_sum(deltas: Params, weights: jax.Array) -> Params:
  """``sum_c weights[c] * deltas[c]`` for every leaf."""
  return jax.tree.map(
      lambda d: jnp.tensordot(weights.astype(d.dtype), d, axes=1), deltas)


def weighted_mean() -> Aggregator:
  """The FedAvg aggregate: ``sum_c w_c delta_c / sum_c w_c``.

  With example-count weights this is McMahan et al. (2017)'s weighting; with
  uniform weights over real clients it is the plain mean.
  """

  def init(params):
    del params
    return ()

  def finalize(sums, total, state):
    mean = jax.tree.map(lambda s: s / jnp.maximum(total, 1e-12).astype(s.dtype),
                        sums)
    return mean, state

  def aggregate(deltas, weights, state):
    return finalize(weighted_sum(deltas, weights), jnp.sum(weights), state)

  return Aggregator(init, aggregate, finalize)


AGGREGATORS = {'mean': weighted_mean}


def get_aggregator(name: str) -> Aggregator:
  if name not in AGGREGATORS:
    raise ValueError(
        f'unknown aggregator {name!r}; accepted: {", ".join(AGGREGATORS)}.')
  return AGGREGATORS[name]()
