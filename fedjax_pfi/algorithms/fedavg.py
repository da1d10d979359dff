"""The FedAvg family: FedAvg, FedAvgM, FedAdam/FedYogi/FedAdagrad, FedProx.

- FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks
  from Decentralized Data", AISTATS 2017 (client SGD, example-weighted mean).
- FedOpt (FedAvgM, FedAdagrad, FedAdam, FedYogi): Reddi et al., "Adaptive
  Federated Optimization", ICLR 2021 -- the server optimizer is applied to the
  averaged delta (`server_optimizers`).
- FedProx: Li et al., "Federated Optimization in Heterogeneous Networks",
  MLSys 2020 -- a proximal term ``mu/2 ||w - w_t||^2`` in the local objective;
  stragglers' partial work is aggregated rather than dropped (the cohort's
  per-client step counts carry it).

All are one builder: a client update, an aggregator and a server optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi.algorithms import aggregators as aggregators_lib
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import core
from fedjax_pfi.models import base


def fed_opt(model: base.Model, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation,
            aggregator: aggregators_lib.Aggregator | None = None, *,
            proximal_mu: float = 0.0, unroll=1,
            name: str = 'fedavg') -> core.FederatedAlgorithm:
  """Builds a FedAvg-family algorithm.

  Args:
    model: the model trained by every client.
    client_optimizer: optax transform for local steps (re-initialised each
      round for each client).
    server_optimizer: optax transform applied to ``-mean_delta``.
    aggregator: combines client deltas (default: example-weighted mean).
    proximal_mu: FedProx's mu; 0 gives FedAvg/FedOpt.
    unroll: ``lax.scan`` unroll of the local steps.
    name: for metrics and checkpoints.
  """
  aggregator = aggregator or aggregators_lib.weighted_mean()
  train = client_updates.local_training(model, client_optimizer,
                                        proximal_mu=proximal_mu, unroll=unroll)

  def init(params):
    return core.ServerState(params, server_optimizer.init(params),
                            aggregator.init(params), jnp.zeros([], jnp.int32))

  def apply(state: core.ServerState, cohort, key):
    keys = core.client_keys(key, cohort.client_ids)
    out = train(state.params, cohort.batches, cohort.mask, keys)
    mean_delta, agg_state = aggregator.aggregate(out.delta, cohort.weight,
                                                 state.agg_state)
    pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
    updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state,
                                                 state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = core.round_metrics(cohort, out.loss_sum, out.count,
                                 out.num_steps, mean_delta)
    return state._replace(params=params, opt_state=opt_state,
                          agg_state=agg_state, round=state.round + 1), metrics

  return core.make_algorithm(init, apply, name)
