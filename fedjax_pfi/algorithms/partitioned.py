"""FedAvg over a partition of the params: frozen, global and personal parts.

One builder covers the FedAvg family and the federated PEFT algorithms that
differ only in which leaves are frozen, averaged or kept by each client
(`fedjax_pfi.algorithms.param_groups`):

- FedAvg / FedOpt / FedProx (McMahan et al. 2017; Reddi et al. 2021; Li et
  al. 2020): nothing frozen, nothing personal.
- FedIT (Zhang et al., "Towards Building the Federated GPT: Federated
  Instruction Tuning", ICASSP 2024): the base frozen, LoRA ``A`` and ``B``
  averaged.
- FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated
  Learning", ICLR 2024): the base and the randomly initialised ``A`` frozen,
  only ``B`` trained and averaged, so the average of the products is the
  product of the averages.
- FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in
  Federated Learning", ICLR 2025): ``A`` averaged, ``B`` personal.
- Local-only LoRA: the adapters personal, nothing averaged or sent.

A round: gather the cohort's personal rows from the store, start every client
from the broadcast global part merged with its personal part, train (the
frozen part shared unbatched), aggregate the global deltas with the
aggregator and apply the server optimizer, scatter the personal parts back.
The round reports the bytes each client downloads and uploads: the global
part (the frozen part is on the device already: a pretrained model, or
FFA-LoRA's ``A`` regenerated from a shared seed).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi import compression
from fedjax_pfi import secure_aggregation
from fedjax_pfi.algorithms import aggregators as aggregators_lib
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import rounds
from fedjax_pfi.algorithms import store
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.models import base


def fed_partitioned(model: base.Model,
                    client_optimizer: optax.GradientTransformation,
                    server_optimizer: optax.GradientTransformation,
                    aggregator: aggregators_lib.Aggregator | None = None, *,
                    transform: rounds.ClientTransform | None = None,
                    frozen: Optional[str] = None,
                    personal: Optional[str] = None,
                    num_clients: Optional[int] = None,
                    proximal_mu: float = 0.0, unroll=1,
                    execution: core.Execution = core.Execution(),
                    client_train=None, federated: bool = True,
                    name: str = 'fedavg', **algorithm_fields
                    ) -> core.FederatedAlgorithm:
  """Builds FedAvg over the ``global`` part of a params partition.

  The partition picks the algorithm (the module docstring): nothing frozen
  or personal is FedAvg / FedOpt / FedProx (McMahan et al., AISTATS 2017;
  Reddi et al., ICLR 2021; Li et al., MLSys 2020); a frozen base with LoRA
  adapters averaged is FedIT (Zhang et al., ICASSP 2024), with ``A`` frozen
  too FFA-LoRA (Sun et al., ICLR 2024), with ``B`` personal FedSA-LoRA (Guo
  et al., ICLR 2025); a personal head or body is FedPer, LG-FedAvg or
  FedRep (`personalized`). A round reads a `Cohort` ``[C, S, B, ...]``
  (or a `PackedCohort`), gathers the cohort's personal rows ``[C, ...]``
  from the store ``[num_clients, ...]`` in ``ServerState.client_states``,
  trains every client ``vmap``-ped with a ``lax.scan`` over its ``S``
  steps, aggregates the global parts' deltas and scatters the personal
  rows back, in one ``jax.jit``.

  Args:
    model: the model trained by every client (its params: nested dicts when
      ``frozen`` or ``personal`` is given).
    client_optimizer: optax transform for local steps (re-initialised each
      round for each client).
    server_optimizer: optax transform applied to ``-mean_delta`` of the global
      part.
    aggregator: combines the global parts' deltas (default: example-weighted
      mean; `aggregators.gaussian` for DP-FedAvg), summed chunk by chunk; a
      robust one (``needs='all'``, `robust`) gets the buffer of every
      client's delta, filled chunk by chunk (and all-gathered across
      devices by the sums' ``psum``).
    transform: a `rounds.ClientTransform` of each client's message before
      the aggregator's client step (None: none).
    frozen: regex of the leaves nobody trains (`param_groups.split`); they
      are `FederatedAlgorithm.frozen_part` and go to ``apply`` as ``frozen``.
    personal: regex of the leaves each client keeps in the store.
    num_clients: the population size (needed with ``personal``).
    proximal_mu: FedProx's mu; 0 gives FedAvg/FedOpt.
    unroll: ``lax.scan`` unroll of the local steps.
    execution: chunking and sharding of the round's clients
      (`core.Execution`); a `fedjax_pfi.data.cohort.PackedCohort` (clients
      packed into lanes) is accepted whenever nothing is personal.
    client_train: optional local training that replaces `local_training`'s
      (FedRep's two phases): ``client_train(global_params, personal_rows,
      batches, mask, keys, frozen, window) -> ClientOutput`` whose ``delta``
      covers the global and the personal leaves; ``global_params`` is
      unbatched, ``personal_rows`` the cohort's rows ``[k, ...]``.
    federated: False where the global part is empty (local-only training:
      nothing is sent, so there is nothing for a DP aggregator to protect).
    name: for metrics and checkpoints.
    **algorithm_fields: further `core.FederatedAlgorithm` fields
      (``finetune``, ``has_global_model``).
  """
  aggregator = aggregator or aggregators_lib.weighted_mean()
  spec = aggregator.compression
  asy = aggregator.asynchrony  # each client from its own model version
  if asy is not None and client_train is not None:
    raise ValueError(f'{name} trains its clients its own way; asynchronous '
                     'aggregation starts each from its own version and runs '
                     'the rounds built on plain local training only.')
  feedback = spec is not None and spec.error_feedback
  hooked = (aggregator.client is not None or transform is not None or
            aggregator.needs == 'all' or spec is not None)
  train = client_updates.local_training(model, client_optimizer,
                                        proximal_mu=proximal_mu, unroll=unroll)
  packed_train = client_updates.packed_training(
      model, client_optimizer, proximal_mu=proximal_mu, unroll=unroll)
  partitioned = frozen is not None or personal is not None
  if personal is not None and (num_clients is None or num_clients < 1):
    raise ValueError(f'personal state needs num_clients >= 1, got '
                     f'{num_clients}.')
  if feedback and (num_clients is None or num_clients < 1):
    raise ValueError(f'error feedback keeps a residual per client, which '
                     f'needs num_clients >= 1, got {num_clients}.')

  def split(params):
    if not partitioned:
      return param_groups.Parts(None, params, {})
    return param_groups.split(params, frozen, personal)

  def init(params):
    parts = split(params)
    has_personal = bool(jax.tree.leaves(parts.personal))
    extra = {'personal_init': parts.personal}
    if feedback:  # what each client's uploads have left out so far
      extra['residual'] = store.init(
          jax.tree.map(jnp.zeros_like, parts.global_), num_clients)
    if asy is not None:  # version v of the federated part in slot v % ring
      extra['ring'] = store.init(parts.global_, asy.ring)
    return core.ServerState(
        parts.global_, server_optimizer.init(parts.global_),
        aggregator.init(parts.global_), jnp.zeros([], jnp.int32),
        extra=extra,
        client_states=(store.init(parts.personal, num_clients)
                       if has_personal else {}))

  def unpacked_sums(lanes, shared, lo, k, num_slots):
    """Clients ``lo:lo + k`` of an unpacked cohort -> the round's sums (the
    per-client ones indexed by cohort slot, ``[num_slots]``)."""
    (params, client_states, frozen_params, key, agg_state, residual,
     ring) = shared
    ids, slot, weight = (core.take(lanes[n], lo, k)
                         for n in ('ids', 'slot', 'weight'))
    has_personal = bool(jax.tree.leaves(client_states))
    mine = store.gather(client_states, core.take(lanes['store_rows'], lo, k)
                        ) if has_personal else {}
    keys = core.client_keys(key, ids)
    if ring is not None:  # asynchronous: the version each client started at
      begun = store.gather(ring, core.take(lanes['ring_slot'], lo, k))
    else:
      begun = store.broadcast(params, k)
    if client_train is not None:
      out = client_train(params, mine, lanes['batches'], lanes['mask'], keys,
                         frozen_params, (lo, k))
    else:
      start = param_groups.merge(begun, mine)
      out = train(start, lanes['batches'], lanes['mask'], keys,
                  frozen=frozen_params, window=(lo, k))
    global_paths = set(param_groups.leaf_paths(params))
    delta = param_groups.select(out.delta, global_paths.__contains__)
    if ring is not None:
      scale = core.take(lanes['staleness_weight'], lo, k)
      if asy.mixing:  # FedAsync: x_client - x = delta + (x_v - x)
        delta = jax.tree.map(lambda d, b, p: d + (b - p[None]), delta, begun,
                             params)
      delta = jax.tree.map(
          lambda d: d * scale.reshape((-1,) + (1,) * (d.ndim - 1)).astype(
              d.dtype), delta)
    def to_slots(v):
      return jnp.zeros((num_slots,) + v.shape[1:], v.dtype).at[slot].add(v)
    rows = None
    if 'secagg' in lanes:
      rows = jax.tree.map(lambda x: core.take(x, lo, k), lanes['secagg'])
    messages = rounds.message_sums(
        aggregator, agg_state, delta, weight, keys, transform, ids=ids,
        secure_rows=rows, round_key=key, slots=slot, num_slots=num_slots,
        residuals=None if residual is None else store.gather(residual, ids))
    new_residual = messages.pop('residual', None)
    sums = {'delta': messages.pop('message'), 'agg': messages,
            'loss_sum': to_slots(out.loss_sum), 'count': to_slots(out.count),
            'num_steps': to_slots(out.num_steps),
            'examples': to_slots(jnp.sum(core.take(lanes['mask'], lo, k),
                                         (1, 2)))}
    if has_personal:
      sums['personal'] = jax.tree.map(to_slots, jax.tree.map(
          jnp.add, mine, param_groups.select(
              out.delta, lambda p: p not in global_paths)))
    if new_residual is not None:
      sums['residual'] = jax.tree.map(to_slots, new_residual)
    return sums

  def packed_sums(lanes, shared, lo, k):
    params, _, frozen_params, key, ids, weight, agg_state, plan = shared
    sums_fn = None
    if hooked:
      def sums_fn(deltas, w, lane_keys, lane_ids, lane_slots):
        rows = None if plan is None else jax.tree.map(
            lambda x: x[lane_slots], plan)
        return rounds.message_sums(aggregator, agg_state, deltas, w,
                                   lane_keys, transform, ids=lane_ids,
                                   secure_rows=rows, round_key=key,
                                   slots=lane_slots, num_slots=ids.shape[0])
    out = packed_train(params, lanes, core.client_keys(key, ids), weight,
                       frozen=frozen_params, window=(lo, k), sums_fn=sums_fn,
                       client_ids=ids)
    return {'delta': out.weighted_delta, 'agg': out.sums,
            'loss_sum': out.loss_sum, 'count': out.count,
            'num_steps': out.num_steps, 'examples': out.examples}

  def apply(state: core.ServerState, cohort, key, frozen_params=None):
    ids = cohort.client_ids
    weight = rounds.client_weights(aggregator, cohort.weight)
    has_personal = bool(jax.tree.leaves(state.client_states))
    # what the clients start from: the model, or its compressed broadcast
    sent = compression.download(spec, state.params, key)
    if isinstance(cohort, cohort_lib.PackedCohort):
      if has_personal or client_train is not None or feedback:
        raise ValueError(
            f'{name} keeps personal state (or an error-feedback residual) '
            'per client, which packed cohorts do not carry; run it unpacked '
            '(execution.pack_lanes=0).')
      lanes = {k: getattr(cohort, k) for k in (
          'batches', 'mask', 'slot', 'local_step', 'first', 'last')}
      sums = core.sum_over_clients(
          packed_sums, lanes, (sent, (), frozen_params, key, ids,
                               weight, state.agg_state, cohort.secagg),
          execution)
    else:
      num_slots = ids.shape[0]
      store_rows = ids if cohort.store_rows is None else cohort.store_rows
      lanes = {'ids': ids, 'slot': jnp.arange(num_slots), 'weight': weight,
               'batches': cohort.batches, 'mask': cohort.mask,
               'store_rows': store_rows}
      if aggregator.secure is not None:
        lanes['secagg'] = cohort.secagg
      if asy is not None:
        lanes['ring_slot'] = cohort.arrivals.slot
        lanes['staleness_weight'] = cohort.arrivals.scale
      sums = core.sum_over_clients(
          functools.partial(unpacked_sums, num_slots=num_slots), lanes,
          (sent, state.client_states, frozen_params, key, state.agg_state,
           state.extra.get('residual'), state.extra.get('ring')), execution)
    if has_personal:
      client_states = store.scatter(state.client_states, store_rows,
                                    sums['personal'], ids >= 0)
    else:
      client_states = state.client_states
    extra = state.extra
    if feedback:  # the clients whose upload was summed keep their new rows
      extra = {**extra, 'residual': store.scatter(
          extra['residual'], ids, sums['residual'], weight > 0)}
    if aggregator.secure is not None:
      sums['agg'].update(secure_aggregation.stage_counts(cohort.secagg, ids))
    new, metrics = rounds.finish(
        state, cohort, key, aggregator, server_optimizer,
        {**sums['agg'], 'message': sums['delta'], 'weight': jnp.sum(weight)},
        loss_sum=sums['loss_sum'], count=sums['count'],
        num_steps=sums['num_steps'], examples=sums['examples'],
        client_states=client_states, extra=extra)
    if asy is not None:  # the new version into its slot of the ring
      at = new.round % asy.ring
      ring = jax.tree.map(lambda r, p: r.at[at].set(p), extra['ring'],
                          new.params)
      new = new._replace(extra={**new.extra, 'ring': ring})
    return new, metrics

  def frozen_part(params):
    return split(params).frozen

  def eval_view(state, frozen_params):
    if not partitioned:
      return core.EvalView(state.params)
    shared = param_groups.merge(frozen_params, state.params)
    full = param_groups.merge(shared, state.extra['personal_init'])
    if not jax.tree.leaves(state.client_states):
      return core.EvalView(full)
    return core.EvalView(full, shared, state.client_states)

  capabilities = core.Capabilities(
      chunked=True, sharded=True,
      packed=personal is None and client_train is None,
      personal_state=personal is not None, private=federated,
      transforms=True, secure_aggregation=federated,
      robust_aggregation=federated, compression_state=federated,
      host_store=True)
  return core.make_algorithm(init, apply, name, frozen_part=frozen_part,
                             capabilities=capabilities, execution=execution,
                             eval_view=eval_view, combine=param_groups.merge,
                             **algorithm_fields)
