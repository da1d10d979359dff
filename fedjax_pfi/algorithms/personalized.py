"""Personalized federated learning: each client ends with its own model.

Partial personalization is a partition of the params (`param_groups`) run by
`partitioned.fed_partitioned`; the registry names the partitions:

- Local-only: every leaf personal, nothing sent.
- FedAvg + FT: FedAvg, then each client fine-tunes the global model on its
  own data before it is evaluated (`core.FederatedAlgorithm.finetune`).
- FedPer (Arivazhagan et al., "Federated Learning with Personalization
  Layers", 2019): the head (the last layer) personal, the body averaged.
- LG-FedAvg (Liang et al., "Think Locally, Act Globally: Federated Learning
  with Local and Global Representations", 2020): the body (local
  representation) personal, the head averaged.
- FedRep (Collins et al., "Exploiting Shared Representations for
  Personalized Federated Learning", ICML 2021): the head personal; each
  round a client first trains its head with the body fixed, then the body
  with its new head fixed (`fedrep_training`), and only the body is
  averaged.
- FedBABU (Oh et al., "FedBABU: Toward Enhanced Representation for Federated
  Image Classification", ICLR 2022): the head stays at its random
  initialisation (frozen, shared) while the body is trained and averaged;
  at evaluation every client fine-tunes the whole model.

and this module holds what is not a partition:

- `fedrep_training`: FedRep's two-phase local update.
- `ditto` (Li et al., "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021): FedAvg on a global model ``w``, and beside
  it each client's own model ``v_i`` trained on the same batches with the
  proximal term ``lambda/2 ||v_i - w||^2``, kept in the per-client store.
"""

from __future__ import annotations

import flax.linen as nn
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


def head_pattern(model: base.Model, params) -> str:
  """The regex of the model's head: the parameterised module whose method
  returns last when the model runs (the output layer, or the embedding
  table of a model that ties it to the output through ``Embed.attend``;
  Flax sorts params by name, so their order says nothing). Traced
  abstractly on ``model.sample_x``; ``params`` may be shapes
  (`jax.eval_shape`)."""
  if model.sample_x is None:
    raise ValueError(f'model {model.name!r} has no sample_x to trace; set '
                     'personalization.head to the regex of its head.')
  finished = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != 'setup':  # (tied embeddings: Embed.attend)
      finished.append(tuple(context.module.path))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: model.apply(p, model.sample_x, None, False),
                   params)
  owners = {tuple(path.split('/')[:-1])
            for path in param_groups.leaf_paths(params)}
  for path in reversed(finished):
    if path and path in owners:
      return '^' + '/'.join(path) + '/'
  raise ValueError(f'could not find the head of model {model.name!r}; set '
                   'personalization.head to the regex of its leaves.')


def body_pattern(head: str) -> str:
  """Every leaf the ``head`` regex does not match."""
  return f'^(?!.*(?:{head}))'


def fedrep_training(model: base.Model,
                    optimizer: optax.GradientTransformation, *,
                    head_epochs: int, epochs: int, unroll=1):
  """FedRep's local update for `partitioned.fed_partitioned`'s
  ``client_train``, with the head as the personal part.

  A client's batches are ``epochs`` epochs of its data; of its ``n`` real
  steps the first ``n * head_epochs // epochs`` train the head with the
  body fixed at the broadcast global body, the rest train the body with the
  client's new head fixed. Both phases read the same stacked batches under
  two complementary masks, so one cohort layout serves both (Collins et al.,
  "Exploiting Shared Representations for Personalized Federated Learning",
  ICML 2021, Algorithm 1).

  Returns:
    ``client_train(global_params, heads, batches, mask, keys, frozen,
    window) -> ClientOutput``: the global body unbatched, the ``k``
    clients' heads ``[k, ...]``, the chunk's ``batches [rows, S, B, ...]``
    and ``mask [rows, S, B]`` of which ``window = (lo, k)`` picks theirs;
    the output's leaves are ``[k, ...]`` and its ``delta`` covers the body
    and the head.
  """
  if not 0 < head_epochs < epochs:
    raise ValueError(
        f'FedRep trains the head for head_epochs then the body for the rest '
        f'of client.epochs; need 0 < head_epochs < epochs, got head_epochs='
        f'{head_epochs}, epochs={epochs}.')
  train = client_updates.local_training(model, optimizer, unroll=unroll)

  def client_train(global_params, heads, batches, mask, keys, frozen, window):
    k = window[1]
    real = jnp.any(mask, axis=2)                         # [rows, S]
    boundary = jnp.sum(real, axis=1) * head_epochs // epochs
    in_head = jnp.arange(mask.shape[1])[None] < boundary[:, None]
    head_mask = mask & in_head[..., None]
    body_mask = mask & ~in_head[..., None]
    shared = param_groups.merge(frozen, global_params)
    first = train(heads, batches, head_mask, keys, frozen=shared,
                  window=window)
    new_heads = jax.tree.map(jnp.add, heads, first.delta)
    second = train(store.broadcast(global_params, k), batches, body_mask,
                   keys, frozen=frozen, aux=new_heads, window=window)
    return client_updates.ClientOutput(
        param_groups.merge(second.delta, first.delta),
        first.num_steps + second.num_steps, first.loss_sum + second.loss_sum,
        first.count + second.count)

  return client_train


def ditto(model: base.Model, client_optimizer: optax.GradientTransformation,
          server_optimizer: optax.GradientTransformation, num_clients: int, *,
          lam: float, unroll=1,
          aggregator: aggregators_lib.Aggregator | None = None,
          transform: rounds.ClientTransform | None = None,
          name: str = 'ditto') -> core.FederatedAlgorithm:
  """Ditto with FedAvg as the global solver (Li et al., "Ditto: Fair and
  Robust Federated Learning Through Personalization", ICML 2021, Algorithm
  1).

  A round: each sampled client trains a copy of the global ``w`` on its
  batches (the example-weighted mean of these deltas updates ``w`` through
  the server optimizer), and trains its own ``v_i`` (from the store) on the
  same batches with the gradient of ``lam/2 ||v_i - w||^2`` added, ``w``
  being the model broadcast this round. ``v_i`` starts as the initial
  params. Evaluation uses each client's ``v_i``; ``w`` is the global model.
  ``aggregator`` combines the deltas of ``w`` (DP-FedAvg clips and noises
  them, a robust aggregator sees every one), after ``transform`` (an
  attack's); ``v_i`` never leaves the client. The ``v_i`` of all
  ``num_clients`` clients live in ``ServerState.client_states`` (leaves
  ``[num_clients, ...]``); a round reads a `Cohort` ``[C, S, B, ...]``.
  """
  if lam < 0:
    raise ValueError(f'ditto lambda must be >= 0, got {lam}.')
  aggregator = aggregator or aggregators_lib.weighted_mean()
  train = client_updates.local_training(model, client_optimizer,
                                        unroll=unroll)
  personal_train = client_updates.local_training(
      model, client_optimizer, proximal_mu=lam, unroll=unroll)

  def init(params):
    return core.ServerState(params, server_optimizer.init(params),
                            aggregator.init(params), jnp.zeros([], jnp.int32),
                            client_states=store.init(params, num_clients))

  def apply(state, cohort, key, frozen=None):
    del frozen
    ids = cohort.client_ids
    c = ids.shape[0]
    out = train(store.broadcast(state.params, c), cohort.batches, cohort.mask,
                core.client_keys(key, ids))
    mine = store.gather(state.client_states, ids)
    own = personal_train(mine, cohort.batches, cohort.mask,
                         core.client_keys(jax.random.fold_in(key, 1), ids),
                         anchor=state.params)
    client_states = store.scatter(
        state.client_states, ids, jax.tree.map(jnp.add, mine, own.delta),
        ids >= 0)
    sums = rounds.cohort_sums(aggregator, state.agg_state, out.delta, cohort,
                              key, transform)
    state, metrics = rounds.finish(
        state, cohort, key, aggregator, server_optimizer, sums,
        loss_sum=out.loss_sum, count=out.count, num_steps=out.num_steps,
        client_states=client_states)
    metrics['personal_train_loss'] = jnp.sum(own.loss_sum) / jnp.maximum(
        jnp.sum(own.count), 1.0)
    return state, metrics

  def eval_view(state, frozen):
    del frozen
    return core.EvalView(state.params, None, state.client_states)

  return core.make_algorithm(
      init, apply, name,
      capabilities=core.Capabilities(personal_state=True, private=True,
                                     transforms=True,
                                     robust_aggregation=True),
      eval_view=eval_view, combine=lambda shared, mine: mine)

