"""Personalization by regularization, mixing and meta-learning.

Each is a FedAvg-shaped round whose client step is the paper's, written as a
pure per-client function ``step(w, p, batch, mask, key, s) -> (w, p,
loss_sum, count)`` over the client's local copy ``w`` of the global model and
its personal state ``p`` (kept in the per-client store). `personal_round`
vmaps it over the cohort and scans it over the local steps (steps that are
padding for a client leave it unchanged; steps that are padding for every
client are skipped), averages ``w_i - w`` with the example weights and
applies the server optimizer. Their step sizes are the papers' explicit SGD
steps, so the client optimizer must be plain SGD.

- APFL (Deng, Kamani and Mahdavi, "Adaptive Personalized Federated
  Learning", 2020, Algorithm 1): the personalized model is the mixture
  ``alpha_i v_i + (1 - alpha_i) w``; per step ``w <- w - eta grad f(w)``,
  ``v <- v - eta alpha grad f(vbar)`` and ``alpha <- clip(alpha - eta
  <grad f(vbar), v - w>, 0, 1)`` with ``vbar = alpha v + (1 - alpha) w``.
- pFedMe (Dinh, Tran and Nguyen, "Personalized Federated Learning with
  Moreau Envelopes", NeurIPS 2020, Algorithm 1): per step, ``K`` gradient
  steps of lr ``personal_lr`` on ``f(theta; D) + lambda/2 ||theta - w||^2``
  give the personalized ``theta``, then ``w <- w - eta lambda (w -
  theta)``. As in the authors' code, ``theta`` starts each round at the
  received ``w`` and carries over between steps; the store keeps the last
  one (the client's personalized model) for evaluation; the server's ``(1 - beta) w + beta mean(w_i)`` is
  the FedAvg server step with lr ``beta``.
- Per-FedAvg (Fallah, Mokhtari and Ozdaglar, "Personalized Federated
  Learning with Theoretical Guarantees: A Model-Agnostic Meta-Learning
  Approach", NeurIPS 2020): per step, ``tmp = w - alpha grad f(w; D)`` and
  ``w <- w - beta grad f(tmp; D')`` (first-order), or with the
  Hessian-free correction ``w <- w - beta (I - alpha H(w; D'')) grad f(tmp;
  D')`` where ``H v`` is a Hessian-vector product. ``D`` is the first half
  of the step's real examples and ``D'`` the second (``D''`` reuses ``D``:
  the paper draws a third batch). Clients personalize at evaluation by
  fine-tuning with lr ``alpha`` (`core.FederatedAlgorithm.finetune`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi import performance
from fedjax_pfi.algorithms import aggregators as aggregators_lib
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import rounds
from fedjax_pfi.algorithms import store
from fedjax_pfi.models import base

Step = Callable[..., tuple]


def _loss_grad(model: base.Model):
  performance.warn_scanned_convolutions(model)  # the local steps' model
  def loss(params, batch, mask, key):
    return base.masked_mean_loss(model, params, batch, mask, key, train=True)
  return jax.value_and_grad(loss, has_aux=True)


def _axpy(a, x, y):
  """``a * x + y`` leaf by leaf."""
  return jax.tree.map(lambda u, v: a * u + v, x, y)


def _vdot(x, y):
  return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(x),
                                            jax.tree.leaves(y)))


def personal_round(step: Step, server_optimizer: optax.GradientTransformation,
                   num_clients: int, personal_init: Callable, *, name: str,
                   combine=None, round_start=None, with_round: bool = False,
                   uniform_mean: bool = False,
                   aggregator: aggregators_lib.Aggregator | None = None,
                   lr_scales: bool = False,
                   **fields) -> core.FederatedAlgorithm:
  """A round over ``step`` (module docstring); ``personal_init(params)`` is
  every client's initial personal state (``{}`` for none), and
  ``combine(w, p_i)`` builds a client's personalized params for evaluation
  (None: the algorithm has no personal state). ``round_start(w, p)``: the
  personal state a client starts the round from, given the broadcast model
  and its stored state (default: the stored state). ``with_round``: ``step``
  takes the rounds completed as a last argument (schedules over rounds).
  ``uniform_mean``: every client's ``w_i`` counts equally in the server's
  mean instead of by its examples. ``lr_scales``: ``step`` takes per-leaf
  step sizes (FedRAP's item tables). ``aggregator``: of the ``w_i - w``
  (default: the weighted mean; `aggregators.gaussian` for DP-FedAvg on the
  shared model: the personal state never leaves the client)."""
  aggregator = aggregator or aggregators_lib.weighted_mean(
      'uniform' if uniform_mean else 'examples')

  def guarded(w, p, batch, m, key, s, r):  # a padded step leaves the client be
    nw, np_, loss, n = step(w, p, batch, m, key, s, *((r,) if with_round else ()))
    active = jnp.any(m)
    return (client_updates.tree_where(active, nw, w),
            client_updates.tree_where(active, np_, p), loss, n, active)

  cohort_step = jax.vmap(guarded, in_axes=(0, 0, 0, 0, 0, None, None))

  def init(params):
    p0 = personal_init(params)
    return core.ServerState(
        params, server_optimizer.init(params), aggregator.init(params),
        jnp.zeros([], jnp.int32),
        client_states=store.init(p0, num_clients) if jax.tree.leaves(p0)
        else {})

  def apply(state, cohort, key, frozen=None):
    del frozen
    ids, mask = cohort.client_ids, cohort.mask
    c = ids.shape[0]
    has_personal = bool(jax.tree.leaves(state.client_states))
    mine = store.gather(state.client_states, ids) if has_personal else {}
    keys = core.client_keys(key, ids)
    zeros = jnp.zeros([c], jnp.float32)

    def body(carry, s):
      def run(carry):
        w, p, loss_sum, count, steps = carry
        m = mask[:, s]
        w, p, loss, n, active = cohort_step(
            w, p, jax.tree.map(lambda x: x[:, s], cohort.batches), m, keys, s,
            state.round)
        return w, p, loss_sum + loss, count + n, steps + active.astype(jnp.int32)
      return jax.lax.cond(jnp.any(mask[:, s]), run, lambda x: x, carry), None

    w0 = store.broadcast(state.params, c)
    if round_start is not None:
      mine = round_start(w0, mine)
    w, p, loss_sum, count, steps = client_updates.over_steps(
        body, (w0, mine, zeros, zeros, jnp.zeros([c], jnp.int32)), mask, 1)
    delta = jax.tree.map(jnp.subtract, w, w0)
    client_states = (store.scatter(state.client_states, ids, p, ids >= 0)
                     if has_personal else state.client_states)
    sums = rounds.cohort_sums(aggregator, state.agg_state, delta, cohort, key)
    return rounds.finish(state, cohort, key, aggregator, server_optimizer,
                         sums, loss_sum=loss_sum, count=count,
                         num_steps=steps, client_states=client_states)

  def eval_view(state, frozen):
    del frozen
    if combine is None:
      return core.EvalView(state.params)
    return core.EvalView(state.params, state.params, state.client_states)

  capabilities = core.Capabilities(
      personal_state=combine is not None, private=True,
      plain_sgd="takes the paper's plain SGD steps (client.learning_rate is "
      'its step size)', lr_scales=lr_scales)
  return core.make_algorithm(init, apply, name, capabilities=capabilities,
                             eval_view=eval_view, combine=combine, **fields)


def apfl(model: base.Model, lr: float, server_optimizer, num_clients: int, *,
         alpha: float, aggregator=None,
         name: str = 'apfl') -> core.FederatedAlgorithm:
  """APFL with mixing weight ``alpha`` initialised to ``alpha`` and
  adapted per client (module docstring)."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'APFL alpha must be in [0, 1], got {alpha}.')
  grad = _loss_grad(model)

  def step(w, p, batch, m, key, s):
    key = jax.random.fold_in(key, s)
    (_, stats), gw = grad(w, batch, m, key)
    v, a = p['v'], p['alpha']
    vbar = jax.tree.map(lambda x, y: a * x + (1 - a) * y, v, w)
    _, gbar = grad(vbar, batch, m, jax.random.fold_in(key, 1))
    ga = _vdot(gbar, jax.tree.map(jnp.subtract, v, w))
    new = {'v': _axpy(-lr * a, gbar, v),
           'alpha': jnp.clip(a - lr * ga, 0.0, 1.0)}
    return (_axpy(-lr, gw, w), new, jnp.sum(stats.loss_sum),
            jnp.sum(stats.count))

  def combine(w, p):
    return jax.tree.map(lambda x, y: p['alpha'] * x + (1 - p['alpha']) * y,
                        p['v'], w)

  return personal_round(
      step, server_optimizer, num_clients,
      lambda params: {'v': params, 'alpha': jnp.asarray(alpha, jnp.float32)},
      name=name, combine=combine, aggregator=aggregator)


def pfedme(model: base.Model, lr: float, server_optimizer, num_clients: int,
           *, lam: float, inner_steps: int, personal_lr: float,
           aggregator=None, name: str = 'pfedme') -> core.FederatedAlgorithm:
  """pFedMe (module docstring)."""
  if lam <= 0 or inner_steps < 1 or personal_lr <= 0:
    raise ValueError(
        f'pFedMe needs lambda > 0, inner_steps >= 1 and personal_lr > 0; got '
        f'lambda={lam}, inner_steps={inner_steps}, personal_lr={personal_lr}.')
  grad = _loss_grad(model)

  def step(w, theta, batch, m, key, s):
    key = jax.random.fold_in(key, s)
    stats = None
    for k in range(inner_steps):
      (_, st), g = grad(theta, batch, m, jax.random.fold_in(key, k))
      stats = st if stats is None else stats
      theta = jax.tree.map(lambda t, gi, wi: t - personal_lr * (
          gi + lam * (t - wi)), theta, g, w)
    w = jax.tree.map(lambda wi, t: wi - lr * lam * (wi - t), w, theta)
    return w, theta, jnp.sum(stats.loss_sum), jnp.sum(stats.count)

  # As the authors' code: theta starts each round at the received w and
  # carries over between steps; the store keeps the last theta (the client's
  # personalized model) for evaluation.
  return personal_round(step, server_optimizer, num_clients,
                        lambda params: params, name=name,
                        combine=lambda w, theta: theta,
                        round_start=lambda w, theta: w, aggregator=aggregator)


def per_fedavg(model: base.Model, lr: float, server_optimizer, *,
               alpha: float, hessian_free: bool, aggregator=None,
               name: str = 'perfedavg') -> core.FederatedAlgorithm:
  """Per-FedAvg, first-order or Hessian-free (module docstring); ``lr`` is
  the outer step ``beta``, ``alpha`` the inner one."""
  if alpha <= 0:
    raise ValueError(f'Per-FedAvg alpha must be > 0, got {alpha}.')
  grad = _loss_grad(model)

  def step(w, p, batch, m, key, s):
    key = jax.random.fold_in(key, s)
    n = jnp.sum(m)
    first = m & (jnp.cumsum(m) <= (n + 1) // 2)
    second = m & ~first
    (_, stats), g1 = grad(w, batch, first, key)
    tmp = _axpy(-alpha, g1, w)
    (_, stats2), g2 = grad(tmp, batch, second, jax.random.fold_in(key, 1))
    if hessian_free:
      def g_at(q):
        return grad(q, batch, first, key)[1]
      hv = jax.jvp(g_at, (w,), (g2,))[1]
      g2 = _axpy(-alpha, hv, g2)
    return (_axpy(-lr, g2, w), p,
            jnp.sum(stats.loss_sum) + jnp.sum(stats2.loss_sum),
            jnp.sum(stats.count) + jnp.sum(stats2.count))

  return personal_round(step, server_optimizer, 1, lambda params: {},
                        name=name, finetune='trainable', finetune_lr=alpha,
                        aggregator=aggregator)
