"""Clustered FL: IFCA (Ghosh et al., "An Efficient Framework for Clustered
Federated Learning", NeurIPS 2020), model-averaging variant.

The server keeps ``k`` models (params with a leading ``[k]`` axis, each
initialised from its own key). A round broadcasts all of them; each sampled
client computes every model's mean loss on its round's training batches,
picks the lowest (``argmin``, ties to the lower index), runs local SGD on
that model, and sends its delta; the server averages the deltas of the
clients that chose model ``j`` (example-weighted) into model ``j`` through
the server optimizer, and leaves a model no client chose unchanged. A
client's personalized model is the cluster model with the lowest loss on its
training data; the store keeps each client's latest choice.

HypCluster (Mansour et al., "Three Approaches for Personalization with
Applications to Federated Learning", 2020, Sec. 3) trains its hypotheses
the same way (assign each client to the hypothesis of lowest loss on its
data, then federated averaging within each hypothesis), so the registry's
``hypcluster`` is this round too.
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
from fedjax_pfi.algorithms import store
from fedjax_pfi.models import base


def stack_inits(init, k: int):
  """``key -> k`` models with a leading axis, from ``k`` split keys."""
  if k < 1:
    raise ValueError(f'num_clusters must be >= 1, got {k}.')
  return lambda key: jax.vmap(init)(jax.random.split(key, k))


def client_losses(model: base.Model, models, batches, mask):
  """``[C, k]``: each model's mean loss on each client's stacked batches."""

  def loss(params, b, m):
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), b)
    stats = model.example_stats(params, flat, None, False)
    w = m.reshape(-1).astype(jnp.float32)
    return jnp.sum(stats.loss_sum * w) / jnp.maximum(jnp.sum(stats.count * w),
                                                     1.0)

  per_model = jax.vmap(loss, in_axes=(None, 0, 0))
  return jax.vmap(per_model, in_axes=(0, None, None), out_axes=1)(
      models, batches, mask)


def ifca(model: base.Model, client_optimizer: optax.GradientTransformation,
         server_optimizer: optax.GradientTransformation, num_clients: int, *,
         num_clusters: int, unroll=1,
         aggregator: aggregators_lib.Aggregator | None = None,
         name: str = 'ifca') -> core.FederatedAlgorithm:
  """IFCA (module docstring); ``init`` takes the stacked ``[k]`` models
  (`stack_inits`). ``aggregator`` combines each cluster's deltas (its
  ``finalize`` sees ``[k, ...]`` sums and ``[k]`` weights; DP-FedAvg clips
  every client's delta and noises every cluster's sum, each over the fixed
  denominator: a client changes one cluster's sum by at most ``C``)."""
  aggregator = aggregator or aggregators_lib.weighted_mean()
  train = client_updates.local_training(model, client_optimizer,
                                        unroll=unroll)

  def init(models):
    k = jax.tree.leaves(models)[0].shape[0]
    if k != num_clusters:
      raise ValueError(f'{name} expects {num_clusters} stacked models, got {k}.')
    return core.ServerState(
        models, server_optimizer.init(models), aggregator.init(models),
        jnp.zeros([], jnp.int32),
        client_states={'cluster': jnp.full([num_clients], -1, jnp.int32)})

  def apply(state, cohort, key, frozen=None):
    del frozen
    ids = cohort.client_ids
    choice = jnp.argmin(client_losses(model, state.params, cohort.batches,
                                      cohort.mask), axis=1)
    start = jax.tree.map(lambda m: m[choice], state.params)
    keys = core.client_keys(key, ids)
    out = train(start, cohort.batches, cohort.mask, keys)
    onehot = jax.nn.one_hot(choice, num_clusters)
    w = rounds.client_weights(aggregator, cohort.weight)
    sums = rounds.message_sums(aggregator, state.agg_state, out.delta, w, keys,
                               groups=onehot)
    total = jnp.sum(onehot * w[:, None], axis=0)          # [k]
    sums['weight'] = total
    mean_delta, agg_state, agg_metrics = aggregator.finalize(
        sums, state.agg_state, rounds.aggregator_key(key))
    new_params, opt_state = rounds.server_step(
        server_optimizer, state.params, state.opt_state, mean_delta)
    chosen = total > 0  # a model no client chose stays as it was
    params = jax.tree.map(
        lambda p, q: jnp.where(chosen.reshape((-1,) + (1,) * (p.ndim - 1)),
                               q, p), state.params, new_params)
    opt_state = jax.tree.map(
        lambda new, old: jnp.where(
            chosen.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        if getattr(new, 'ndim', 0) and new.shape[:1] == (num_clusters,)
        else new, opt_state, state.opt_state)
    trained = jnp.any(cohort.mask, axis=(1, 2))  # not padded, not dropped
    client_states = store.scatter(state.client_states, ids,
                                  {'cluster': choice.astype(jnp.int32)},
                                  (ids >= 0) & trained)
    metrics = core.round_metrics(cohort, out.loss_sum, out.count,
                                 out.num_steps, mean_delta)
    metrics['clusters_chosen'] = jnp.sum(chosen)
    metrics.update(agg_metrics)
    one = param_groups.num_bytes(jax.tree.map(lambda p: p[0], state.params))
    metrics.update(core.comm_metrics(cohort, num_clusters * one, one))
    return state._replace(params=params, opt_state=opt_state,
                          agg_state=agg_state, round=state.round + 1,
                          client_states=client_states), metrics

  def eval_view(state, frozen):
    del frozen
    return core.EvalView(jax.tree.map(lambda p: p[0], state.params),
                         clusters=state.params)

  return core.make_algorithm(
      init, apply, name,
      capabilities=core.Capabilities(personal_state=True, private=True),
      eval_view=eval_view, has_global_model=False, clusters=num_clusters)
