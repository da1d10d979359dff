"""The per-client store: state kept for every client of the population.

A store is a pytree whose leaves have a leading ``[num_clients]`` axis
(SCAFFOLD's control variates, personal adapters or heads). A round gathers
the cohort's rows and scatters the updated rows back, both inside the
compiled round, and the store is checkpointed with the rest of the
``ServerState``. Padded cohort slots (id -1) read row 0 and never write.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Params = Any


def init(value: Params, num_clients: int) -> Params:
  """A store whose every row is ``value``."""
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1, got {num_clients}.')
  return jax.tree.map(
      lambda v: jnp.broadcast_to(jnp.asarray(v), (num_clients,) +
                                 jnp.shape(v)).copy(), value)


def gather(store: Params, client_ids: jax.Array) -> Params:
  """Rows ``[C, ...]`` of the cohort (padded ids read row 0)."""
  return jax.tree.map(lambda s: s[jnp.maximum(client_ids, 0)], store)


def scatter(store: Params, client_ids: jax.Array, rows: Params,
            write: jax.Array) -> Params:
  """``store`` with ``rows[c]`` written at ``client_ids[c]`` where ``write``."""
  num_clients = jax.tree.leaves(store)[0].shape[0] if jax.tree.leaves(
      store) else 0
  ids = jnp.where(write & (client_ids >= 0), client_ids, num_clients)
  return jax.tree.map(lambda s, v: s.at[ids].set(v.astype(s.dtype),
                                                 mode='drop'), store, rows)


def broadcast(params: Params, num_clients: int) -> Params:
  """``params`` repeated along a new leading client axis (no copy in jit)."""
  return jax.tree.map(
      lambda p: jnp.broadcast_to(p, (num_clients,) + jnp.shape(p)), params)
