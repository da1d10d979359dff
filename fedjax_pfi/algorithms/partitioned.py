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

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi.algorithms import aggregators as aggregators_lib
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import store
from fedjax_pfi.models import base


def fed_partitioned(model: base.Model,
                    client_optimizer: optax.GradientTransformation,
                    server_optimizer: optax.GradientTransformation,
                    aggregator: aggregators_lib.Aggregator | None = None, *,
                    frozen: Optional[str] = None,
                    personal: Optional[str] = None,
                    num_clients: Optional[int] = None,
                    proximal_mu: float = 0.0, unroll=1,
                    name: str = 'fedavg') -> core.FederatedAlgorithm:
  """Builds FedAvg over the ``global`` part of a params partition.

  Args:
    model: the model trained by every client (its params: nested dicts when
      ``frozen`` or ``personal`` is given).
    client_optimizer: optax transform for local steps (re-initialised each
      round for each client).
    server_optimizer: optax transform applied to ``-mean_delta`` of the global
      part.
    aggregator: combines client deltas (default: example-weighted mean).
    frozen: regex of the leaves nobody trains (`param_groups.split`); they
      are `FederatedAlgorithm.frozen_part` and go to ``apply`` as ``frozen``.
    personal: regex of the leaves each client keeps in the store.
    num_clients: the population size (needed with ``personal``).
    proximal_mu: FedProx's mu; 0 gives FedAvg/FedOpt.
    unroll: ``lax.scan`` unroll of the local steps.
    name: for metrics and checkpoints.
  """
  aggregator = aggregator or aggregators_lib.weighted_mean()
  train = client_updates.local_training(model, client_optimizer,
                                        proximal_mu=proximal_mu, unroll=unroll)
  partitioned = frozen is not None or personal is not None
  if personal is not None and (num_clients is None or num_clients < 1):
    raise ValueError(f'personal state needs num_clients >= 1, got '
                     f'{num_clients}.')

  def split(params):
    if not partitioned:
      return param_groups.Parts(None, params, {})
    return param_groups.split(params, frozen, personal)

  def init(params):
    parts = split(params)
    has_personal = bool(jax.tree.leaves(parts.personal))
    return core.ServerState(
        parts.global_, server_optimizer.init(parts.global_),
        aggregator.init(parts.global_), jnp.zeros([], jnp.int32),
        extra={'personal_init': parts.personal},
        client_states=(store.init(parts.personal, num_clients)
                       if has_personal else {}))

  def apply(state: core.ServerState, cohort, key, frozen_params=None):
    ids = cohort.client_ids
    has_personal = bool(jax.tree.leaves(state.client_states))
    start = store.broadcast(state.params, ids.shape[0])
    if has_personal:
      mine = store.gather(state.client_states, ids)
      start = param_groups.merge(start, mine)
    out = train(start, cohort.batches, cohort.mask,
                core.client_keys(key, ids), frozen=frozen_params)
    delta = out.delta
    if has_personal:
      global_paths = set(param_groups.leaf_paths(state.params))
      delta = param_groups.select(out.delta, global_paths.__contains__)
      new_rows = jax.tree.map(
          jnp.add, mine, param_groups.select(
              out.delta, lambda p: p not in global_paths))
      client_states = store.scatter(state.client_states, ids, new_rows,
                                    ids >= 0)
    else:
      client_states = state.client_states
    mean_delta, agg_state = aggregator.aggregate(delta, cohort.weight,
                                                 state.agg_state)
    updates, opt_state = server_optimizer.update(
        jax.tree.map(jnp.negative, mean_delta), state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = core.round_metrics(cohort, out.loss_sum, out.count,
                                 out.num_steps, mean_delta)
    size = param_groups.num_bytes(state.params)
    metrics.update(core.comm_metrics(cohort, size, size))
    return state._replace(params=params, opt_state=opt_state,
                          agg_state=agg_state, round=state.round + 1,
                          client_states=client_states), metrics

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

  return core.make_algorithm(init, apply, name, frozen_part=frozen_part,
                             eval_view=eval_view, combine=param_groups.merge)
