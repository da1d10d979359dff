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

All are one builder, `partitioned.fed_partitioned` with nothing frozen and
nothing personal: a client update, an aggregator and a server optimizer.
"""

from __future__ import annotations

import optax

from fedjax_pfi.algorithms import aggregators as aggregators_lib
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import partitioned
from fedjax_pfi.models import base


def fed_opt(model: base.Model, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation,
            aggregator: aggregators_lib.Aggregator | None = None, *,
            transform=None, proximal_mu: float = 0.0, unroll=1,
            execution: core.Execution = core.Execution(),
            num_clients: int | None = None,
            name: str = 'fedavg') -> core.FederatedAlgorithm:
  """Builds a FedAvg-family algorithm (every parameter trained and averaged).

  FedAvg (McMahan et al., AISTATS 2017) with ``server_optimizer`` SGD at
  rate 1; FedOpt (Reddi et al., ICLR 2021) with an adaptive server
  optimizer; FedProx (Li et al., MLSys 2020) with ``proximal_mu > 0``. A
  round (``apply(state, cohort, key)``) trains every client of the
  `Cohort` (``batches [C, S, B, ...]``, ``mask [C, S, B]``) from the
  broadcast params, ``vmap``-ped over clients with a ``lax.scan`` over the
  ``S`` local steps, aggregates the clients' deltas (weights ``[C]``) and
  applies the server optimizer, in one ``jax.jit``.

  Args:
    model: the model trained by every client.
    client_optimizer: optax transform for local steps (re-initialised each
      round for each client).
    server_optimizer: optax transform applied to ``-mean_delta``.
    aggregator: combines client deltas (default: example-weighted mean;
      `aggregators.gaussian` for DP-FedAvg).
    transform: a `rounds.ClientTransform` of each client's delta first.
    proximal_mu: FedProx's mu; 0 gives FedAvg/FedOpt.
    unroll: ``lax.scan`` unroll of the local steps.
    execution: chunking and sharding of the round (`core.Execution`).
    num_clients: the population (needed by a compressing aggregator's
      error feedback, a residual per client).
    name: for metrics and checkpoints.
  """
  return partitioned.fed_partitioned(
      model, client_optimizer, server_optimizer, aggregator,
      transform=transform, proximal_mu=proximal_mu, unroll=unroll,
      execution=execution, num_clients=num_clients, name=name)
