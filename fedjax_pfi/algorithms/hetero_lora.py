"""Federated LoRA with heterogeneous client ranks: FLoRA and HetLoRA.

Client ``k`` has rank ``r_k`` (its resource tier, `lora.assign_ranks`, kept in
the per-client store). Inside a round every client's adapters are allocated
at the largest rank ``r_max`` and the components ``>= r_k`` are zero; they
stay exactly zero under training (`lora.truncate`), so one vmapped program
trains every rank.

FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024):

- each round every client starts fresh adapters of its rank (``A`` random,
  ``B`` zero) on the current global base, with scale ``alpha / r_k``;
- the server *stacks* the clients' modules, ``A_stack = [p_1 s_1 A_1, ...,
  p_K s_K A_K]`` and ``B_stack = [B_1; ...; B_K]``, so ``A_stack B_stack =
  sum_k p_k s_k A_k B_k`` exactly (`lora.stack`), and merges that product
  into the base weights: the base is the global state and changes;
- clients upload their own modules (``r_k`` components); a sampled client
  downloads the stacks of every round since it last synced, or the adapted
  kernels outright if that is smaller (at round 0 everyone has the
  pretrained base).

HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024):

- the server keeps adapters of rank ``r_max``; client ``k`` receives them
  truncated to ``r_k`` (scale ``alpha / r_max`` for everyone, so a truncation
  is the global adapter minus its tail);
- local training adds the rank self-pruning penalty ``lambda ||A_tail||_F
  ||B_tail||_F`` over components ``[floor(gamma r_k), r_k)``; if that product
  is smaller after local training than before, the client prunes its rank to
  ``max(1, floor(gamma r_k))`` for later rounds;
- the server zero-pads the clients' adapters to ``r_max`` and averages them
  with sparsity weights ``||s A_k B_k||_F / sum_j ||s A_j B_j||_F``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import rounds
from fedjax_pfi.algorithms import store
from fedjax_pfi.models import base
from fedjax_pfi.peft import lora


# Both keep every client's rank; neither averages deltas (FLoRA stacks them,
# HetLoRA weighs them by their own norms), so no DP aggregator applies.
CAPABILITIES = core.Capabilities(personal_state=True)


def _adapter_bytes_per_rank(adapters) -> int:
  """Bytes one rank component of every adapted kernel costs (``in + out``)."""
  return int(sum((a.shape[-2] + b.shape[-1]) * a.dtype.itemsize
                 for a, b in lora.pairs(adapters)))


def flora(model: base.Model, cfg: lora.LoraConfig,
          client_optimizer: optax.GradientTransformation,
          server_optimizer: optax.GradientTransformation,
          client_ranks: Sequence[int], *, unroll=1,
          name: str = 'flora') -> core.FederatedAlgorithm:
  """Builds FLoRA for a population whose client ``k`` has rank
  ``client_ranks[k]`` (Wang et al., "FLoRA: Federated Fine-Tuning Large
  Language Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024;
  the module docstring says what a round computes).

  ``model`` is the plain base model; ``init`` takes its params (the base,
  which FLoRA updates) and `FederatedAlgorithm.eval_model` is ``model``.
  Each round every sampled client trains fresh adapters of its rank
  (``A [in, r_k]``, ``B [r_k, out]`` per targeted kernel, allocated at
  ``max(client_ranks)`` under ``vmap``) with ``client_optimizer``; the
  server merges their stacked product into the base and steps it with
  ``server_optimizer``. ``cfg`` is the LoRA config (targets, ``alpha``);
  ``client_ranks`` has one rank per client of the population.
  """
  ranks = np.asarray(client_ranks, np.int32)
  scaled = lora.lora_model_with_scale(model, cfg)
  train = client_updates.local_training(scaled, client_optimizer,
                                        unroll=unroll)

  def init(params):
    r_max = int(ranks.max())
    kernels = lora.targets(params, cfg, r_max)  # valid target, rank <= dims
    probe = lora.init_adapters(params, cfg, jax.random.key(0), r_max)
    return core.ServerState(
        params, server_optimizer.init(params), (), jnp.zeros([], jnp.int32),
        extra={
            # Bytes of all stacks sent so far, and of the adapted kernels.
            'stack_bytes_total': jnp.zeros([], jnp.float32),
            'kernel_bytes': jnp.asarray(4 * sum(
                i * o for i, o in kernels.values()), jnp.float32),
            'bytes_per_rank': jnp.asarray(
                _adapter_bytes_per_rank(probe), jnp.float32)},
        client_states={'rank': jnp.asarray(ranks),
                       'synced': jnp.zeros([ranks.size], jnp.float32)})

  def apply(state: core.ServerState, cohort, key, frozen=None):
    if frozen is not None:
      raise ValueError('flora keeps the base in its state; it takes no frozen '
                       'params.')
    ids = cohort.client_ids
    r_max = int(ranks.max())
    mine = store.gather(state.client_states, ids)
    r = mine['rank']
    keys = core.client_keys(key, ids)
    # Adapter initialisation draws from its own branch of the round key, so
    # it never coincides with a training step's key.
    init_keys = core.client_keys(jax.random.split(key)[1], ids)
    fresh = jax.vmap(lambda k, rk: lora.truncate(lora.init_adapters(
        state.params, cfg, k, r_max), rk))(init_keys, r)
    scale = cfg.alpha / jnp.maximum(r, 1).astype(jnp.float32)
    out = train({'lora': fresh}, cohort.batches, cohort.mask, keys,
                frozen={'base': state.params}, aux={'lora_scale': scale})
    trained = jax.tree.map(jnp.add, fresh, out.delta['lora'])
    p = cohort.weight / jnp.maximum(jnp.sum(cohort.weight), 1e-12)
    # Merge the stacked product into each adapted kernel of the base.
    pseudo_grad = jax.tree.map(jnp.zeros_like, state.params)
    delta_norm_sq = jnp.zeros([], jnp.float32)
    for path, (a, b) in zip(lora.adapter_paths(trained),
                            lora.pairs(trained)):
      a_stack, b_stack = lora.stack(a, b, p * scale)
      delta_w = a_stack @ b_stack
      delta_norm_sq += jnp.sum(jnp.square(delta_w))
      node = pseudo_grad
      *parents, last = path.split('/')
      for q in parents:
        node = node[q]
      node[last] = {**node[last], 'kernel': -delta_w.astype(
          node[last]['kernel'].dtype)}
    # (the pseudo-gradient is the negated merged update)
    params, opt_state = rounds.server_step(
        server_optimizer, state.params, state.opt_state,
        jax.tree.map(jnp.negative, pseudo_grad))
    metrics = core.round_metrics(cohort, out.loss_sum, out.count,
                                 out.num_steps, {})
    metrics['delta_norm'] = jnp.sqrt(delta_norm_sq)
    extra = state.extra
    total = extra['stack_bytes_total']
    download = jnp.minimum(total - mine['synced'], extra['kernel_bytes'])
    metrics.update(core.comm_metrics(cohort, download,
                                     extra['bytes_per_rank'] * r))
    client_states = store.scatter(
        state.client_states, ids,
        {'rank': r, 'synced': jnp.full(r.shape, total)}, ids >= 0)
    return state._replace(
        params=params, opt_state=opt_state, round=state.round + 1,
        extra={**extra, 'stack_bytes_total': total +
               metrics['comm/upload_bytes']},
        client_states=client_states), metrics

  return core.make_algorithm(init, apply, name, eval_model=model,
                             capabilities=CAPABILITIES)


def hetlora(model: base.Model, cfg: lora.LoraConfig,
            client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation,
            client_ranks: Sequence[int], *, prune_gamma: float = 0.99,
            prune_lambda: float = 0.0, unroll=1,
            name: str = 'hetlora') -> core.FederatedAlgorithm:
  """Builds HetLoRA for a population whose client ``k`` starts at rank
  ``client_ranks[k]`` (Cho et al., "Heterogeneous LoRA for Federated
  Fine-tuning of On-Device Foundation Models", EMNLP 2024; the module
  docstring says what a round computes).

  ``model`` is the LoRA model (`lora.lora_model`, params ``{'base', 'lora'}``
  with the adapters at rank ``cfg.rank >= max(client_ranks)``, scale
  ``alpha / cfg.rank``); the base is
  frozen. ``prune_lambda = 0`` turns self-pruning's penalty off; pruning then
  happens only where training itself shrinks the tail.
  """
  ranks = np.asarray(client_ranks, np.int32)
  r_max = cfg.rank
  if ranks.max() > r_max:
    raise ValueError(f'client ranks reach {int(ranks.max())}, above the '
                     f'adapters\' rank {r_max}.')
  if not 0.0 < prune_gamma <= 1.0:
    raise ValueError(f'prune_gamma must lie in (0, 1], got {prune_gamma}.')
  if prune_lambda < 0:
    raise ValueError(f'prune_lambda must be >= 0, got {prune_lambda}.')

  def tail_norms(adapters, rank):
    """``sum_kernels ||A_tail||_F ||B_tail||_F`` over ``[floor(g r), r)``."""
    lo = jnp.floor(prune_gamma * rank.astype(jnp.float32))
    j = jnp.arange(r_max)
    tail = ((j >= lo) & (j < rank)).astype(jnp.float32)
    # sqrt(max(., tiny)): the tail of a fresh B is zero, where sqrt's
    # gradient is infinite.
    def norm(x):
      return jnp.sqrt(jnp.maximum(jnp.sum(x), 1e-30))
    return sum(norm(jnp.square(a) * tail) * norm(jnp.square(b) * tail[:, None])
               for a, b in lora.pairs(adapters))

  def regularizer(params, aux):
    return prune_lambda * tail_norms(params['lora'], aux['rank'])

  train = client_updates.local_training(
      model, client_optimizer, unroll=unroll,
      regularizer=regularizer if prune_lambda else None)

  def init(params):
    lora.targets(params['base'], cfg, r_max)
    g = {'lora': params['lora']}
    return core.ServerState(
        g, server_optimizer.init(g), (), jnp.zeros([], jnp.int32),
        extra={'bytes_per_rank': jnp.asarray(
            _adapter_bytes_per_rank(params['lora']), jnp.float32)},
        client_states={'rank': jnp.asarray(ranks)})

  def apply(state: core.ServerState, cohort, key, frozen=None):
    ids = cohort.client_ids
    r = store.gather(state.client_states, ids)['rank']
    start = {'lora': jax.vmap(lora.truncate, in_axes=(None, 0))(
        state.params['lora'], r)}
    out = train(start, cohort.batches, cohort.mask,
                core.client_keys(key, ids), frozen=frozen,
                aux={'rank': r})
    trained = jax.tree.map(jnp.add, start, out.delta)
    # Rank self-pruning.
    before = jax.vmap(tail_norms)(start['lora'], r)
    after = jax.vmap(tail_norms)(trained['lora'], r)
    pruned = jnp.maximum(1, jnp.floor(prune_gamma * r).astype(jnp.int32))
    real = cohort.weight > 0
    new_r = jnp.where(real & (after < before), pruned, r)
    # Sparsity-weighted average of the zero-padded adapters.
    norms = jnp.sqrt(jax.vmap(lora.product_norm_sq, in_axes=(0, None))(
        trained['lora'], cfg.scale))
    w = jnp.where(real, norms, 0.0)
    w = w / jnp.maximum(jnp.sum(w), 1e-12)
    mean_delta = jax.tree.map(
        lambda t, g: jnp.tensordot(w, t - g[None], axes=1), trained,
        state.params)
    params, opt_state = rounds.server_step(server_optimizer, state.params,
                                           state.opt_state, mean_delta)
    metrics = core.round_metrics(cohort, out.loss_sum, out.count,
                                 out.num_steps, mean_delta)
    per_rank = state.extra['bytes_per_rank']
    metrics.update(core.comm_metrics(cohort, per_rank * r, per_rank * r))
    metrics['mean_client_rank'] = jnp.sum(jnp.where(real, new_r, 0)) / (
        jnp.maximum(jnp.sum(real), 1))
    client_states = store.scatter(state.client_states, ids, {'rank': new_r},
                                  real)
    return state._replace(params=params, opt_state=opt_state,
                          round=state.round + 1,
                          client_states=client_states), metrics

  def frozen_part(params):
    return {'base': params['base']}

  def eval_view(state, frozen_params):
    shared = param_groups.merge(frozen_params, state.params)
    return core.EvalView(shared, shared, state.client_states)

  def combine(shared, personal):
    return {**shared, 'lora': lora.truncate(shared['lora'], personal['rank'])}

  return core.make_algorithm(init, apply, name, frozen_part=frozen_part,
                             capabilities=CAPABILITIES, eval_view=eval_view,
                             combine=combine)
