"""`FederatedAlgorithm(init, apply)` and the server state it threads.

``apply(state, cohort, key, frozen=None)`` is one jitted program with the
state donated: broadcast the server params, train every client of the cohort
(a ``lax.scan`` over local steps of the step ``vmap``ped over clients),
aggregate the deltas, apply the server optimizer. ``key`` is the round's key;
client ``i`` uses ``fold_in(key, client_id)`` and its step ``s``
``fold_in(that, s)``, so a client's randomness does not depend on its slot, on
padding or on chunking. ``frozen`` holds params every client uses but nobody
trains (a foundation model's base); it is an argument, not part of the state,
so it is shared unbatched, never donated and never checkpointed.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_pfi.data.cohort import Cohort

Params = Any


class ServerState(NamedTuple):
  """Everything a round reads and writes; checkpointed as one pytree.

  Attributes:
    params: the global model.
    opt_state: the server optimizer's state.
    agg_state: the aggregator's state.
    round: int32 scalar, rounds completed.
    extra: algorithm-specific server state (SCAFFOLD's control variate).
    client_states: per-client store with a leading ``[num_clients]`` axis
      (SCAFFOLD's client control variates), or ``()``.
  """
  params: Params
  opt_state: Any
  agg_state: Any
  round: jax.Array
  extra: Any = ()
  client_states: Any = ()


class EvalView(NamedTuple):
  """What evaluation needs from a `ServerState`.

  Attributes:
    params: complete params for a client without personal state (the test
      split's global model, held-out clients).
    shared: the part every client shares, joined to each client's row of
      ``personal`` by the algorithm's ``combine`` (None without personal
      state).
    personal: the per-client store ``[num_clients, ...]``, or None.
  """
  params: Params
  shared: Params = None
  personal: Params = None


def _no_frozen(params):
  del params
  return None


def _global_view(state, frozen):
  del frozen
  return EvalView(state.params)


class FederatedAlgorithm(NamedTuple):
  """``init(params) -> ServerState``; ``apply(state, cohort, key, frozen=None)
  -> (state, metrics)``.

  ``apply`` is jitted with ``state`` donated; ``apply_unjitted`` is the same
  function without ``jax.jit`` (for tests and for composing into larger
  programs). ``frozen_part(params)`` is the part of the full params passed as
  ``frozen`` (None for algorithms that train everything); ``eval_view(state,
  frozen)`` and ``combine(shared, personal_row)`` say what to evaluate, and
  ``eval_model`` with which model when it is not the one trained (FLoRA
  merges its adapters into the base and evaluates the plain base model).
  """
  init: Callable[[Params], ServerState]
  apply: Callable[..., tuple[ServerState, dict]]
  apply_unjitted: Callable[..., tuple[ServerState, dict]]
  name: str
  frozen_part: Callable[[Params], Params] = _no_frozen
  eval_view: Callable[[ServerState, Params], EvalView] = _global_view
  combine: Optional[Callable[[Params, Params], Params]] = None
  eval_model: Any = None  # the Model to evaluate with, if not the trained one


def client_keys(key: jax.Array, client_ids: jax.Array) -> jax.Array:
  """Per-client keys ``fold_in(key, id)``; padded clients (id -1) get id 0's."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(
      jnp.maximum(client_ids, 0))


def round_metrics(cohort: Cohort, loss_sum: jax.Array, count: jax.Array,
                  num_steps: jax.Array, mean_delta: Params) -> dict:
  """Scalar and per-client metrics of a round (all on device)."""
  real = cohort.weight > 0  # not padded, not a dropped straggler
  client_loss = loss_sum / jnp.maximum(count, 1.0)
  total = jnp.sum(jnp.where(real, count, 0.0))
  return {
      'train_loss': jnp.sum(jnp.where(real, loss_sum, 0.0)) /
                    jnp.maximum(total, 1.0),
      'train_examples': jnp.sum(jnp.where(real, jnp.sum(cohort.mask, (1, 2)),
                                          0)),
      'clients': jnp.sum(real.astype(jnp.int32)),
      'delta_norm': jnp.sqrt(sum(jnp.sum(jnp.square(x))
                                 for x in jax.tree.leaves(mean_delta))),
      'client_loss': client_loss,
      'client_steps': num_steps,
  }


def comm_metrics(cohort: Cohort, download, upload) -> dict:
  """Bytes each client of the round receives and sends, and their totals.

  Args:
    download: bytes per client, a scalar or ``[C]``; counted for every
      sampled client (id >= 0).
    upload: bytes per client, a scalar or ``[C]``; counted for clients whose
      update is aggregated (weight > 0; a dropped straggler sends nothing).
  """
  sampled = cohort.client_ids >= 0
  real = cohort.weight > 0
  down = jnp.where(sampled, jnp.asarray(download, jnp.float32), 0.0)
  up = jnp.where(real, jnp.asarray(upload, jnp.float32), 0.0)
  return {
      'comm/download_bytes': jnp.sum(down),
      'comm/upload_bytes': jnp.sum(up),
      'comm/download_bytes_per_client': jnp.sum(down) / jnp.maximum(
          jnp.sum(sampled), 1),
      'comm/upload_bytes_per_client': jnp.sum(up) / jnp.maximum(
          jnp.sum(real), 1),
      'client_download_bytes': down,
      'client_upload_bytes': up,
  }


def make_algorithm(init, apply, name, **fields) -> FederatedAlgorithm:
  """Jits ``apply`` with the state donated.

  ``init``'s state is copied: the state owns its buffers, so donating it
  never invalidates the caller's arrays (only the state is copied, not a
  frozen base the params may hold). ``fields`` are the optional
  `FederatedAlgorithm` fields.
  """

  def owning_init(params):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), init(params))

  return FederatedAlgorithm(owning_init, jax.jit(apply, donate_argnums=0),
                            apply, name, **fields)
