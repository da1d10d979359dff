"""FedRAP: Federated Recommendation with Additive Personalization (Li, Long
and Zhou, ICLR 2024; the authors' code: github.com/mtics/FedRAP).

User ``i`` scores item ``j`` with ``sigmoid(u_i . (D^(i)_j + C_j) + b_i)``
(`fedjax_pfi.models.recommender.AdditiveMF`): ``C`` (``global_items``) is
the global view of the items, learned by federated averaging and kept
sparse by an L1 penalty; ``D^(i)`` (``personal_items``) is the user's
private view and ``u_i, b_i`` (``score``) its private user embedding, both
in the per-client store and never sent. A client's local objective on its
training lists is::

  BCE(ratings) - lambda_t * mean((D^(i)_x - C_x)^2) + mu_t * mean(|C_x|)

over the items ``x`` of the batch (the means as ``torch.nn.MSELoss`` and
``L1Loss`` take them in the authors' code): the second term pushes the
personal view away from the global one, so the two are complementary, and
the third makes ``C`` sparse. Every local step is plain SGD on ``u, b, D,
C`` together with step ``lr`` on the user embedding and ``item_lr`` on both
item tables, torch-style weight decay ``weight_decay * param`` added to
every gradient, each client's ``k``-th real step scaled by ``step_decay**k``
(the code's per-batch ``ExponentialLR``) and every step of round ``r`` by
``lr_decay**r`` (its per-round decay). The server replaces ``C`` by the
unweighted mean of the clients' ``C^(i)`` (as the code does; with the
default FedAvg server step of 1).

The curriculum (``curriculum='tanh'``): round ``r`` (counted from 0) uses
``lambda_t = tanh(r / 10) * lam`` and ``mu_t = tanh(r / 10) * mu``, so
training starts as full personalization (no coupling, no sparsity) and
moves towards additive personalization; ``'fixed'`` uses ``lam`` and ``mu``
throughout. (The authors' code computes these weights but its loss reads
the constants, so as released it runs ``'fixed'``.)

Left out: the code's early stop of a client's epochs when its loss changes
by less than ``tol`` (here every client runs its ``client.epochs``), and the
paper's optional differential-privacy noise on ``C``'s updates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import meta_mixed
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.models import base

GLOBAL = 'global_items'
PERSONAL = ('score', 'personal_items')
CURRICULA = ('tanh', 'fixed')
SPARSE_BELOW = 1e-4  # |C| under this counts as zero (the authors' sparsity)


def split(params):
  """``(global, personal)``: ``{'global_items': C}`` and the rest."""
  missing = [k for k in (GLOBAL,) + PERSONAL if k not in params]
  if missing:
    raise ValueError(
        f'FedRAP trains the additive recommender (model.name=additive_mf, '
        f'params {GLOBAL!r}, {PERSONAL}); these params lack {missing}: '
        f'{sorted(params)}.')
  return {GLOBAL: params[GLOBAL]}, {k: params[k] for k in PERSONAL}


def weights(round_idx, lam: float, mu: float, curriculum: str):
  """``(lambda_t, mu_t)`` of round ``round_idx`` (module docstring)."""
  if curriculum == 'fixed':
    return jnp.float32(lam), jnp.float32(mu)
  ramp = jnp.tanh(jnp.asarray(round_idx, jnp.float32) / 10.0)
  return ramp * lam, ramp * mu


def fedrap(model: base.Model, server_optimizer: optax.GradientTransformation,
           num_clients: int, *, lr: float, item_lr: float, lam: float,
           mu: float, weight_decay: float = 0.0, lr_decay: float = 1.0,
           step_decay: float = 1.0, curriculum: str = 'tanh',
           aggregator=None, name: str = 'fedrap') -> core.FederatedAlgorithm:
  """FedRAP (module docstring) on `recommender.ranking_model`'s lists."""
  if curriculum not in CURRICULA:
    raise ValueError(f'unknown FedRAP curriculum {curriculum!r}; accepted: '
                     f'{", ".join(CURRICULA)}.')
  for key, value in (('lr', lr), ('item_lr', item_lr)):
    if value <= 0:
      raise ValueError(f'FedRAP {key} must be > 0, got {value}.')
  for key, value in (('lambda', lam), ('mu', mu),
                     ('weight_decay', weight_decay)):
    if value < 0:
      raise ValueError(f'FedRAP {key} must be >= 0, got {value}.')
  for key, value in (('lr_decay', lr_decay), ('step_decay', step_decay)):
    if not 0 < value <= 1:
      raise ValueError(f'FedRAP {key} must lie in (0, 1], got {value}.')

  def objective(params, batch, m, key, lam_t, mu_t):
    loss, stats = base.masked_mean_loss(model, params, batch, m, key,
                                        train=True)
    d = params['personal_items']['embedding'][batch['x']]   # [B, L, dim]
    c = params[GLOBAL]['embedding'][batch['x']]
    w = m.astype(jnp.float32)[:, None, None]
    n = jnp.maximum(jnp.sum(w) * d.shape[1] * d.shape[2], 1.0)
    apart = jnp.sum(w * jnp.square(d - c)) / n
    sparse = jnp.sum(w * jnp.abs(c)) / n
    return loss - lam_t * apart + mu_t * sparse, stats

  grad = jax.value_and_grad(objective, has_aux=True)

  def step(w, p, batch, m, key, s, round_idx):
    lam_t, mu_t = weights(round_idx, lam, mu, curriculum)
    params = param_groups.merge(w, p)
    (_, stats), g = grad(params, batch, m, jax.random.fold_in(key, s),
                         lam_t, mu_t)
    scale = (jnp.float32(lr_decay) ** round_idx.astype(jnp.float32) *
             jnp.float32(step_decay) ** s.astype(jnp.float32))

    def sgd(x, gx, step_size):
      return x - scale * step_size * (gx + weight_decay * x)

    new = {k: jax.tree.map(lambda x, gx, k=k: sgd(
        x, gx, lr if k == 'score' else item_lr), params[k], g[k])
           for k in params}
    w_new, p_new = split(new)
    return (w_new, p_new, jnp.sum(stats.loss_sum), jnp.sum(stats.count))

  # The personal state is set in `init` below (the round's own `init` sees
  # only the shared params).
  alg = meta_mixed.personal_round(
      step, server_optimizer, num_clients, lambda shared: {}, name=name,
      combine=param_groups.merge, with_round=True, uniform_mean=True,
      has_global_model=False, aggregator=aggregator, lr_scales=True)

  def init(params):
    shared, personal = split(params)
    state = alg.init(shared)  # every client's state starts as ``personal``
    # a new user's personal state, for held-out clients and unseen users
    fresh = jax.tree.map(lambda x: jnp.array(x, copy=True), personal)
    return state._replace(extra=fresh, client_states=jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape).copy(),
        personal))

  def apply(state, cohort, key, frozen=None):
    state, metrics = alg.apply_unjitted(state, cohort, key, frozen)
    c = state.params[GLOBAL]['embedding']
    lam_t, mu_t = weights(state.round - 1, lam, mu, curriculum)
    metrics['fedrap/global_sparsity'] = jnp.mean(
        (jnp.abs(c) < SPARSE_BELOW).astype(jnp.float32))
    metrics['fedrap/lambda'] = lam_t
    metrics['fedrap/mu'] = mu_t
    return state, metrics

  def eval_view(state, frozen):
    del frozen
    return core.EvalView(param_groups.merge(state.params, state.extra),
                         state.params, state.client_states)

  return core.make_algorithm(init, apply, name,
                             capabilities=alg.capabilities,
                             eval_view=eval_view, combine=alg.combine,
                             has_global_model=False)
