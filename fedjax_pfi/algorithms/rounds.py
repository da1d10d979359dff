"""A federated round as parts, read top to bottom.

Every algorithm's ``apply`` is these steps (DrJAX's broadcast -> map ->
reduce, with the seams that trust mechanisms plug into):

1. **start**: what each client starts from: the broadcast model, merged
   with its personal rows where the algorithm keeps some (`store`).
2. **client update**: local training, ``vmap``-ped over the cohort's clients
   (`client_updates.local_training` on stacked cohorts,
   `client_updates.packed_training` on packed lanes).
3. **per-client transforms** and the aggregator's ``client`` step
   (DP-FedAvg's clipping), `message_sums`: each client's message, weighted
   and summed, chunk by chunk (`core.sum_over_clients`, which adds the
   chunks' sums and ``psum``-s them across devices).
4. **aggregator**: ``finalize`` on the sums (the mean; DP's noise) with the
   aggregator's own key, `aggregator_key`.
5. **the server step**, `server_step`: the optax server optimizer on the
   negated aggregate.

Metrics and bytes are the algorithm's (`core.round_metrics`,
`core.comm_metrics`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi import compression
from fedjax_pfi import secure_aggregation
from fedjax_pfi.algorithms import aggregators as aggregators_lib
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import param_groups

Params = Any

# ``fold_in(round key, AGGREGATOR_STREAM)``: the aggregator's randomness
# (DP noise), apart from every client's ``fold_in(round key, client id)``;
# ``fold_in(client key, AGGREGATOR_STREAM)`` is a client's own, apart from
# its steps' ``fold_in(client key, step)``.
AGGREGATOR_STREAM = 2**31 - 2


class ClientTransform(NamedTuple):
  """A per-client transform of the messages, optax-shaped:
  ``init(params) -> state`` and ``apply(message, state, key) -> (message,
  state)``, run on each client's message (``vmap``ped over the cohort, each
  client with its own key) before the aggregator's ``client`` step. The
  state is a client's own (the rounds here start every client from
  ``init``; a transform that keeps state across rounds, such as error
  feedback, keeps it in the per-client store). Compose with `chain`.

  ``select(state, client_id) -> state``, where given, turns ``init``'s
  state into client ``client_id``'s own (a canary's direction; later a
  client's row of a store); without it every client gets ``init``'s.

  Why clipping is not one of these: DP-FedAvg's clip norm is server state
  that the noise scales with and that adaptive clipping updates from the
  noised count, so it lives with the noise in the `aggregators.gaussian`
  aggregator, whose ``client`` step clips (the last thing done to a
  message before it is summed, which is what the sensitivity needs).
  """
  init: Callable[[Params], Any]
  apply: Callable[[Params, Any, jax.Array], tuple[Params, Any]]
  select: Callable[[Any, jax.Array], Any] | None = None


def identity() -> ClientTransform:
  return ClientTransform(lambda params: (), lambda m, state, key: (m, state))


def chain(*transforms: ClientTransform) -> ClientTransform:
  """Transforms applied in order, each with its own key and state."""

  def init(params):
    return tuple(t.init(params) for t in transforms)

  def apply(message, states, key):
    out = []
    for i, (t, s) in enumerate(zip(transforms, states)):
      message, s = t.apply(message, s, jax.random.fold_in(key, i))
      out.append(s)
    return message, tuple(out)

  def select(states, client_id):
    return tuple(s if t.select is None else t.select(s, client_id)
                 for t, s in zip(transforms, states))

  return ClientTransform(init, apply, select)


def aggregator_key(key: jax.Array) -> jax.Array:
  """The aggregator's key of the round whose key is ``key``."""
  return jax.random.fold_in(key, AGGREGATOR_STREAM)


def client_weights(aggregator: aggregators_lib.Aggregator,
                   weight: jax.Array) -> jax.Array:
  """``w_c`` for the aggregator's weighting: the cohort's example weights,
  or 1 for every client that trains (weight > 0)."""
  if aggregator.weighting == 'uniform':
    return (weight > 0).astype(weight.dtype)
  return weight


def message_sums(aggregator: aggregators_lib.Aggregator, agg_state,
                 messages: Params, weights: jax.Array, keys: jax.Array,
                 transform: ClientTransform | None = None,
                 groups: jax.Array | None = None,
                 ids: jax.Array | None = None, secure_rows=None,
                 round_key: jax.Array | None = None,
                 slots: jax.Array | None = None,
                 num_slots: int | None = None, residuals=None) -> dict:
  """One chunk's sums: ``'message'`` (``sum_c w_c m_c`` of the messages
  after ``transform`` and the aggregator's ``client`` step), ``'clients'``
  (how many have ``w_c > 0``) and each per-client stat of that step summed
  over them.

  ``messages`` leaves are ``[k, ...]``, ``weights`` and the clients' keys
  ``[k]``. Without a transform or a ``client`` step the sum is exactly
  `aggregators.weighted_sum`'s. ``groups`` (``[k, G]`` one-hot): the
  messages are summed per group, ``'message'`` leaves ``[G, ...]`` (IFCA's
  clusters). ``ids``: the clients' ids ``[k]``, for a transform's
  ``select``.

  A secure aggregator (``aggregator.secure``) masks each message instead
  (`secure_aggregation.client_sums`): ``'message'`` is then ``{'masked',
  'removed'}`` (uint32 sums mod ``2^b``, unmasked by its ``finalize``);
  ``secure_rows`` are the clients' rows of the round's
  `secure_aggregation.Plan` and ``round_key`` the round's key.

  A compressing aggregator (``aggregator.compression``, `compression.wrap`)
  gets each message compressed after its ``client`` step
  (`compression.client_step`); with error feedback ``residuals`` are the
  clients' rows ``[k, ...]`` and ``'residual'`` their new rows (not summed:
  the caller places them by slot).

  An aggregator that needs every message (``needs='all'``, `robust`)
  gets them instead of their sum: ``'message'`` is the buffer, leaves
  ``[num_slots, ...]`` with each client's message at its cohort slot
  (``slots``, ``[k]``) and zeros elsewhere, ``'buffer_weight'`` its
  ``w_c`` and ``'buffer_id'`` its id + 1 (0: an empty slot), so that the
  chunks' (and devices') sums of buffers fill the whole cohort's.
  """
  real = (weights > 0).astype(jnp.float32)
  sums = {'clients': jnp.sum(real)}
  own = None
  if (transform is not None or aggregator.client is not None or
      aggregator.compression is not None):
    own = jax.vmap(lambda k: jax.random.fold_in(k, AGGREGATOR_STREAM))(keys)
  if transform is not None:
    state0 = transform.init(jax.tree.map(lambda x: x[0], messages))
    tkeys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(own)
    if transform.select is None:
      messages, _ = jax.vmap(transform.apply, in_axes=(0, None, 0))(
          messages, state0, tkeys)
    else:
      states = jax.vmap(transform.select, in_axes=(None, 0))(state0, ids)
      messages, _ = jax.vmap(transform.apply)(messages, states, tkeys)
  if aggregator.client is not None:
    messages, stats = jax.vmap(aggregator.client, in_axes=(0, None, 0))(
        messages, agg_state, own)
    sums.update({k: jnp.sum(v * real) for k, v in stats.items()})
  if aggregator.compression is not None and aggregator.secure is not None:
    if round_key is None:
      raise ValueError(
          f'aggregator {aggregator.name!r} compresses with one rotation a '
          "round, which needs the round's key; this round passes none.")
    rotation = jax.random.fold_in(aggregator_key(round_key),
                                  compression.ROTATION_STREAM)
    messages, stats = jax.vmap(
        lambda m: compression.secure_step(
            aggregator.compression, aggregator.secure.clip_norm, m,
            rotation))(messages)
    sums.update({k: jnp.sum(v * real) for k, v in stats.items()})
  elif aggregator.compression is not None:
    step = functools.partial(compression.client_step, aggregator.compression,
                             aggregator.client)
    messages, stats, new_residuals = jax.vmap(
        step, in_axes=(0, None, 0, None if residuals is None else 0))(
            messages, agg_state, own, residuals)
    sums.update({k: jnp.sum(v * real) for k, v in stats.items()})
    if residuals is not None:
      sums['residual'] = new_residuals
  if aggregator.secure is not None:
    if secure_rows is None or round_key is None or groups is not None:
      raise ValueError(
          f'aggregator {aggregator.name!r} masks each message, which needs '
          "the round's secure-aggregation plan and key (and no per-group "
          'sums); this round passes none.')
    qkeys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(own)
    sums.update(secure_aggregation.client_sums(
        aggregator.secure, messages, weights, qkeys, ids, secure_rows,
        round_key))
    sums['message'] = {'masked': sums.pop('masked'),
                       'removed': sums.pop('removed')}
    return sums
  if aggregator.needs == 'all':
    if slots is None or num_slots is None or ids is None or \
        groups is not None:
      raise ValueError(
          f'aggregator {aggregator.name!r} needs every message, which needs '
          "the clients' cohort slots, their number and the ids (and no "
          'per-group sums); this round passes none.')
    idx = jnp.where(weights > 0, slots, num_slots)  # the rest is dropped
    def fill(x):
      return jnp.zeros((num_slots,) + x.shape[1:], x.dtype).at[idx].add(
          x, mode='drop')
    sums['message'] = jax.tree.map(fill, messages)
    sums['buffer_weight'] = fill(weights)
    sums['buffer_id'] = fill((ids + 1).astype(jnp.int32))
    return sums
  if groups is None:
    sums['message'] = aggregators_lib.weighted_sum(messages, weights)
  else:
    gw = (groups * weights[:, None]).T
    sums['message'] = jax.tree.map(
        lambda d: jnp.tensordot(gw.astype(d.dtype), d, axes=1), messages)
  return sums


def stats_zeros(aggregator: aggregators_lib.Aggregator, agg_state,
                message: Params) -> dict:
  """Zero sums of the aggregator's per-client stats (the shapes `message_sums`
  adds to), for code that accumulates them itself (packed lanes)."""
  if aggregator.client is None:
    return {}
  stats = jax.eval_shape(aggregator.client, message, agg_state,
                         jax.random.key(0))[1]
  return {k: jnp.zeros(v.shape, v.dtype) for k, v in stats.items()}


def server_step(server_optimizer: optax.GradientTransformation, params,
                opt_state, mean: Params):
  """Step 5: ``params`` moved by the server optimizer on ``-mean`` (the
  averaged delta is a descent direction). Returns ``(params, opt_state)``."""
  updates, opt_state = server_optimizer.update(
      jax.tree.map(jnp.negative, mean), opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def cohort_sums(aggregator: aggregators_lib.Aggregator, agg_state,
                messages: Params, cohort, key: jax.Array,
                transform: ClientTransform | None = None) -> dict:
  """Step 3 for messages ``[C, ...]`` all at hand (the rounds that do not
  chunk): `message_sums` over the whole cohort plus ``'weight'``."""
  w = client_weights(aggregator, cohort.weight)
  c = cohort.client_ids.shape[0]
  sums = message_sums(aggregator, agg_state, messages, w,
                      core.client_keys(key, cohort.client_ids), transform,
                      ids=cohort.client_ids, slots=jnp.arange(c),
                      num_slots=c)
  sums['weight'] = jnp.sum(w)
  return sums


def finish(state, cohort, key: jax.Array,
           aggregator: aggregators_lib.Aggregator,
           server_optimizer: optax.GradientTransformation, sums: dict, *,
           loss_sum, count, num_steps, examples=None, download=None,
           upload=None, **replace):
  """Steps 4 and 5 and the round's metrics: the one end of every round
  that averages messages of the whole ``state.params``.

  ``sums`` are the round's (`message_sums` added up, with ``'weight'``);
  ``loss_sum``, ``count``, ``num_steps`` and ``examples`` the clients'
  (`core.round_metrics`); ``download``/``upload`` the bytes per client
  (default: the size of ``state.params`` both ways); ``replace``: further
  fields of the new state (``client_states``, ``extra``). Returns ``(new
  state, metrics)``.
  """
  mean, agg_state, agg_metrics = aggregator.finalize(
      sums, state.agg_state, aggregator_key(key))
  params, opt_state = server_step(server_optimizer, state.params,
                                  state.opt_state, mean)
  metrics = core.round_metrics(cohort, loss_sum, count, num_steps, mean,
                               examples)
  size = param_groups.num_bytes(state.params)
  spec = aggregator.compression
  if spec is not None and aggregator.secure is not None:  # the masked input
    upload = secure_aggregation.client_bytes(
        aggregator.secure, compression.num_floats(mean))['upload']
  elif spec is not None:  # what a compressed message costs
    upload = compression.message_bytes(spec.compressor, mean)
  if spec is not None and spec.download:
    download = compression.message_bytes(spec.compressor, state.params)
  metrics.update(core.comm_metrics(cohort, size if download is None else
                                   download, size if upload is None else upload))
  metrics.update(agg_metrics)
  return state._replace(params=params, opt_state=opt_state,
                        agg_state=agg_state, round=state.round + 1,
                        **replace), metrics
