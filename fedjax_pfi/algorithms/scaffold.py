"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al., ICML 2020).

Algorithm 1 of the paper with control-variate update option II:

- client ``i`` runs ``K_i`` SGD steps ``y <- y - eta_l (g_i(y) - c_i + c)``;
- ``c_i+ = c_i - c + (x - y_i) / (K_i eta_l)``;
- server: ``x <- x + eta_g * mean(y_i - x)`` (here: the server optimizer on
  the aggregated delta), ``c <- c + (1/N) sum_{i in S} (c_i+ - c_i)``.

The client control variates ``c_i`` live in the per-client store
``ServerState.client_states`` (leading axis ``[num_clients]``), gathered for
the cohort and scattered back inside the round; padded clients are dropped
from the scatter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi.algorithms import aggregators as aggregators_lib
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import rounds
from fedjax_pfi.algorithms import store as store_lib
from fedjax_pfi.models import base


# Its control variates are sent too, and they are not clipped: no DP.
CAPABILITIES = core.Capabilities(
    personal_state=True, lr_scales=False,
    plain_sgd='needs plain client SGD (its control-variate update divides by '
    'K * lr)')


def scaffold(model: base.Model, client_learning_rate: float,
             server_optimizer: optax.GradientTransformation,
             num_clients: int,
             aggregator: aggregators_lib.Aggregator | None = None, *,
             unroll=1, name: str = 'scaffold') -> core.FederatedAlgorithm:
  """Builds SCAFFOLD for a population of ``num_clients`` clients
  (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
  Federated Learning", ICML 2020, Algorithm 1 with option II; the module
  docstring gives the updates).

  The client optimizer is plain SGD with ``client_learning_rate`` (option II
  of the control-variate update assumes it). The server control variate
  ``c`` (a pytree like the params) is ``ServerState.extra['c']``; the clients'
  ``c_i`` are ``ServerState.client_states``, leaves ``[num_clients, ...]``.
  ``aggregator`` combines the cohort's model deltas (default: the
  example-weighted mean); ``server_optimizer`` steps on their negation.
  """
  if not client_learning_rate > 0:
    raise ValueError(
        f'client learning rate must be positive, got {client_learning_rate}.')
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1, got {num_clients}.')
  aggregator = aggregator or aggregators_lib.weighted_mean()
  train = client_updates.local_training(
      model, optax.sgd(client_learning_rate), unroll=unroll)

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return core.ServerState(params, server_optimizer.init(params),
                            aggregator.init(params), jnp.zeros([], jnp.int32),
                            extra={'c': zeros},
                            client_states=store_lib.init(zeros, num_clients))

  def apply(state: core.ServerState, cohort, key, frozen=None):
    if frozen is not None:
      raise ValueError('scaffold trains every parameter; it takes no frozen '
                       'params.')
    ids = cohort.client_ids
    c = state.extra['c']
    c_i = store_lib.gather(state.client_states, ids)
    correction = jax.tree.map(lambda ci, cg: cg[None] - ci, c_i, c)
    keys = core.client_keys(key, ids)
    out = train(store_lib.broadcast(state.params, ids.shape[0]),
                cohort.batches, cohort.mask, keys, correction)
    # Dropped stragglers (zero steps) and padded clients keep their c_i.
    real = (ids >= 0) & (out.num_steps > 0)
    k = out.num_steps.astype(jnp.float32)
    scale = jnp.where(k > 0, 1.0 / (jnp.maximum(k, 1.0) * client_learning_rate),
                      0.0)

    def new_ci(ci, cg, d):
      s = scale.reshape((-1,) + (1,) * (d.ndim - 1)).astype(d.dtype)
      return ci - cg[None] - d * s

    c_i_new = jax.tree.map(new_ci, c_i, c, out.delta)
    real_f = real.astype(jnp.float32)
    dc_sum = jax.tree.map(
        lambda a, b: jnp.tensordot(real_f.astype(a.dtype), a - b, axes=1),
        c_i_new, c_i)
    c = jax.tree.map(lambda cg, d: cg + d / num_clients, c, dc_sum)
    store = store_lib.scatter(state.client_states, ids, c_i_new, real)

    sums = rounds.cohort_sums(aggregator, state.agg_state, out.delta, cohort,
                              key)
    # Each client receives (x, c) and sends (delta y, delta c_i).
    size = 2 * param_groups.num_bytes(state.params)
    return rounds.finish(state, cohort, key, aggregator, server_optimizer,
                         sums, loss_sum=out.loss_sum, count=out.count,
                         num_steps=out.num_steps, download=size, upload=size,
                         extra={'c': c}, client_states=store)

  return core.make_algorithm(init, apply, name, capabilities=CAPABILITIES)
