"""Client updates: local training of a cohort's clients from the broadcast model.

`local_training` runs every client's local steps ``[C, S, B, ...]`` with an
optax client optimizer and returns each client's model delta. Gradient corrections compose
onto the plain local-SGD loop instead of forking it:

- FedProx (Li et al., MLSys 2020): the local objective gains
  ``mu/2 ||w - w_global||^2``, i.e. the gradient gains ``mu (w - w_global)``.
- SCAFFOLD (Karimireddy et al., ICML 2020): the gradient gains ``c - c_i``
  (see `fedjax_pfi.algorithms.scaffold`).

A step whose batch mask is all False (a padded step) leaves parameters and
optimizer state untouched, so momentum or Adam never drift through padding;
a step that is padding for the whole cohort is skipped at run time.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from fedjax_pfi import performance
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms.core import take as core_take
from fedjax_pfi.algorithms.core import window_at_step as core_window
from fedjax_pfi.models import base
from fedjax_pfi.tree_util import path_str

Params = Any


class ClientOutput(NamedTuple):
  """What the cohort's clients send back (before aggregation); every leaf
  has a leading client axis ``[C]``.

  Attributes:
    delta: ``local_params - broadcast_params``.
    num_steps: local steps actually taken (unpadded).
    loss_sum: summed training loss over the examples seen.
    count: number of loss terms (examples or tokens) seen.
  """
  delta: Params
  num_steps: jax.Array
  loss_sum: jax.Array
  count: jax.Array


def tree_where(cond, a, b):
  return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def parse_lr_scales(spec: str) -> tuple[tuple[str, float], ...]:
  """``client.lr_scales``: ``'REGEX=FACTOR,...'`` -> ``((regex, factor),
  ...)``; a leaf whose path (``'global_items/embedding'``) a regex matches
  (``re.search``, the first that does) steps with ``learning_rate *
  factor``. ``''``: none."""
  out = []
  for piece in (p.strip() for p in str(spec or '').split(',')):
    if not piece:
      continue
    regex, sep, factor = piece.rpartition('=')
    try:
      value = float(factor)
      re.compile(regex)
    except (ValueError, re.error):
      value = -1.0
    if not sep or not regex or not value > 0:
      raise ValueError(
          f"client.lr_scales entry {piece!r} must be REGEX=FACTOR with a "
          "valid regex and a positive factor, e.g. '_items/=1000'.")
    out.append((regex, value))
  return tuple(out)


def lr_scale(scales, path: str) -> float:
  """The factor `parse_lr_scales`'s ``scales`` give the leaf ``path``."""
  for regex, factor in scales:
    if re.search(regex, path):
      return factor
  return 1.0


def scale_by_path(scales) -> optax.GradientTransformation:
  """Multiplies each leaf's update by its `lr_scale`."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda kp, u: u * lr_scale(scales, path_str(kp)), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


def client_optimizer(name: str, learning_rate: float, momentum: float = 0.0,
                     b1: float = 0.9, b2: float = 0.999,
                     eps: float = 1e-8,
                     lr_scales: str = '') -> optax.GradientTransformation:
  """The client optimizers: ``'sgd'`` (with optional momentum) or ``'adam'``;
  ``lr_scales`` (`parse_lr_scales`) gives leaves their own step sizes (an
  embedding row's gradient is averaged over a whole batch of which few
  examples touch it: MovieLens' item tables need ~1000x the user
  embedding's step).

  Args:
    name: ``'sgd'`` (``optax.sgd``; FedAvg's local SGD, McMahan et al.,
      AISTATS 2017) or ``'adam'`` (``optax.adam``, Kingma and Ba, ICLR
      2015).
    learning_rate: the local step size, > 0.
    momentum: SGD's heavy-ball momentum (0: none).
    b1, b2, eps: Adam's.
    lr_scales: ``'REGEX=FACTOR,...'``: a leaf whose path a regex matches
      steps with ``learning_rate * FACTOR`` (`parse_lr_scales`); empty:
      none.

  Returns:
    An optax transform over one client's params; the round re-initialises
    its state for each client each round and ``vmap``-s it over clients.
  """
  if not learning_rate > 0:
    raise ValueError(
        f'client learning rate must be positive, got {learning_rate}.')
  if name == 'sgd':
    opt = optax.sgd(learning_rate, momentum=momentum or None)
  elif name == 'adam':
    opt = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  else:
    raise ValueError(
        f"unknown client optimizer {name!r}; accepted: 'sgd', 'adam'.")
  scales = parse_lr_scales(lr_scales)
  return optax.chain(opt, scale_by_path(scales)) if scales else opt


def _client_step(model: base.Model, optimizer: optax.GradientTransformation,
                 proximal_mu: float, regularizer=None):
  """One client's local step, shared by `local_training` and
  `packed_training`: ``step(params, opt_state, init_params, batch, m, key,
  s, correction, frozen, aux) -> (params, opt_state, loss_sum, count,
  active)``, a no-op where the mask ``m`` is all False."""
  if proximal_mu < 0:
    raise ValueError(f'FedProx mu must be >= 0, got {proximal_mu}.')
  performance.warn_scanned_convolutions(model)

  def loss_fn(params, batch, mask, rng, frozen, aux):
    full = (params if frozen is None and aux is None else
            param_groups.merge(frozen, params, aux))
    loss, stats = base.masked_mean_loss(model, full, batch, mask, rng,
                                        train=True)
    if regularizer is not None:
      loss = loss + regularizer(params, aux)
    return loss, stats

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def client_step(params, opt_state, init_params, batch, m, key, s,
                  correction, frozen, aux):
    (_, stats), grads = grad_fn(params, batch, m, jax.random.fold_in(key, s),
                                frozen, aux)
    if proximal_mu:
      grads = jax.tree.map(lambda g, w, w0: g + proximal_mu * (w - w0),
                           grads, params, init_params)
    if correction is not None:
      grads = jax.tree.map(jnp.add, grads, correction)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    active = jnp.any(m)
    return (tree_where(active, new_params, params),
            tree_where(active, new_opt_state, opt_state),
            jnp.sum(stats.loss_sum), jnp.sum(stats.count), active)

  return client_step


def over_steps(body, carry, mask, unroll, ys=None):
  """``lax.scan(body, carry, arange(S))`` for the local steps of ``mask``
  ``[clients, S, B]``, stopping after the last step any client has examples.

  With ``unroll == 1`` a ``lax.while_loop`` runs only up to that step: a
  step bucket that holds every cohort (one compilation per run) leaves most
  steps padding, and a skipped step still costs ~16 us on XLA:CPU
  (BUILD_NOTES). ``ys=(dtypes, width)``: ``body`` returns one value ``[width]``
  per dtype per step, stacked to ``[S, width]`` (zeros after the stop);
  returns ``carry`` or ``(carry, ys)``.
  """
  num_steps = mask.shape[1]
  if unroll is True or unroll > 1:  # (True == 1 in Python: 'full' unrolls)
    carry, out = jax.lax.scan(body, carry, jnp.arange(num_steps),
                              unroll=unroll)
    return carry if ys is None else (carry, out)
  real = jnp.any(mask, axis=(0, 2))
  stop = jnp.max(jnp.where(real, jnp.arange(num_steps) + 1, 0))
  out0 = () if ys is None else tuple(jnp.zeros([num_steps, ys[1]], d)
                                     for d in ys[0])

  def step(state):
    t, carry, out = state
    carry, y = body(carry, t)
    if ys is not None:
      out = tuple(jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), t,
                                                      0) for a, v in zip(out, y))
    return t + 1, carry, out

  _, carry, out = jax.lax.while_loop(lambda st: st[0] < stop, step,
                                     (jnp.zeros([], jnp.int32), carry, out0))
  return carry if ys is None else (carry, out)


def local_training(model: base.Model, optimizer: optax.GradientTransformation,
                   *, proximal_mu: float = 0.0,
                   unroll: Union[int, bool] = 1,
                   regularizer: Optional[Callable[[Params, Any], jax.Array]]
                   = None):
  """Builds ``train(init_params, batches, mask, keys, ...) -> ClientOutput``.

  ``train`` runs the local steps of a whole cohort: a loop over the step
  axis (`over_steps`: a ``lax.while_loop`` that stops after the last real
  step, or a ``lax.scan`` with ``unroll``) whose body is the single-client
  SGD step ``vmap``ped over the client axis, so the loop is *outside* the
  vmap. Its predicate "does any client of the cohort have a real example at
  step ``s``" is therefore not batched, and ``lax.cond`` skips the steps
  that are padding for every client at run time. A
  client that has finished while others go on keeps its params and optimizer
  state through ``jnp.where``. Both make padding an exact no-op; the first
  also makes it free.

  Args:
    model: the model.
    optimizer: the client optimizer, re-initialised every round.
    proximal_mu: FedProx's mu (0 = plain local SGD): the gradient gains
      ``mu (w - w_0)`` with ``w_0`` the client's starting point (or
      ``anchor``).
    unroll: ``lax.scan`` unroll over local steps (``True`` unrolls fully).
    regularizer: optional ``(params, aux) -> scalar`` added to each step's
      loss (HetLoRA's rank self-pruning penalty).

  ``train(init_params, batches, mask, keys, correction=None, frozen=None,
  aux=None)`` takes:

  - ``init_params``: each client's starting point, leaves ``[C, ...]`` (the
    broadcast server params, possibly merged with personal state);
  - ``batches`` (column -> ``[C, S, B, ...]``) and ``mask`` ``[C, S, B]``;
  - per-client ``keys`` ``[C]`` (client ``c``'s step ``s`` uses
    ``fold_in(keys[c], s)``);
  - ``correction``: optional constant gradient, leaves ``[C, ...]`` (SCAFFOLD's
    ``c - c_i``);
  - ``frozen``: optional params shared by every client and not trained (a
    foundation model's base), passed unbatched (``in_axes=None``);
  - ``aux``: optional per-client, untrained values ``[C, ...]`` (a client's
    LoRA scale or rank);
  - ``window``: optional ``(lo, k)``: ``batches`` and ``mask`` hold more
    clients than these, and clients ``lo:lo + k`` are trained, read step by
    step in place (a chunk of a larger cohort, `core.sum_over_clients`);
  - ``anchor``: optional unbatched params that the proximal term pulls
    towards instead of each client's starting point (Ditto's global model).

  The loss sees ``param_groups.merge(frozen, params, aux)`` when ``frozen`` or
  ``aux`` is given (nested dicts), else ``params``. It returns a
  `ClientOutput` whose leaves have a leading ``[C]`` axis; ``delta`` is
  ``final - init_params``.
  """
  client_step = _client_step(model, optimizer, proximal_mu, regularizer)

  def train(init_params, batches, mask, keys, correction=None, frozen=None,
            aux=None, window=None, anchor=None):
    num_clients = keys.shape[0]
    def batched(t):
      return None if t is None else 0
    cohort_step = jax.vmap(
        client_step,
        in_axes=(0, 0, None if anchor is not None else 0, 0, 0, 0, None,
                 batched(correction), None, batched(aux)))
    prox_to = init_params if anchor is None else anchor

    def body(carry, s):
      def at_step(x):
        return core_window(x, s, window)
      m = at_step(mask)

      def run(carry):
        params, opt_state, loss_sum, count, steps = carry
        params, opt_state, loss, n, active = cohort_step(
            params, opt_state, prox_to, jax.tree.map(at_step, batches), m,
            keys, s, correction, frozen, aux)
        return (params, opt_state, loss_sum + loss, count + n,
                steps + active.astype(jnp.int32))

      return jax.lax.cond(jnp.any(m), run, lambda c: c, carry), None

    zeros = jnp.zeros([num_clients], jnp.float32)
    init = (init_params, jax.vmap(optimizer.init)(init_params), zeros, zeros,
            jnp.zeros([num_clients], jnp.int32))
    lo, k = (0, num_clients) if window is None else window
    params, _, loss_sum, count, steps = over_steps(
        body, init, core_take(mask, lo, k), unroll)
    delta = jax.tree.map(jnp.subtract, params, init_params)
    return ClientOutput(delta, steps, loss_sum, count)

  return train


class PackedOutput(NamedTuple):
  """What a packed cohort's lanes send back: sums over their clients.

  Attributes:
    weighted_delta: ``sum_c weight[c] * delta_c`` (no client axis), of the
      messages ``sums_fn`` returns where one is given.
    num_steps, loss_sum, count, examples: per cohort slot ``[C]``.
    sums: the other sums of ``sums_fn`` (`rounds.message_sums`'s stats),
      or ``{}``.
  """
  weighted_delta: Params
  num_steps: jax.Array
  loss_sum: jax.Array
  count: jax.Array
  examples: jax.Array
  sums: dict = {}


def packed_training(model: base.Model, optimizer: optax.GradientTransformation,
                    *, proximal_mu: float = 0.0,
                    unroll: Union[int, bool] = 1):
  """Builds ``train(init_params, lanes, keys, weight, frozen=None)`` for a
  `fedjax_pfi.data.cohort.PackedCohort`'s lanes.

  Every lane runs its clients one after another: where ``first`` is set the
  lane's params and optimizer state reset to ``init_params`` (the broadcast
  model, unbatched), each step is the client step of `local_training` with
  the client's own key ``fold_in(keys[slot], local_step)``, and at ``last``
  the client's ``weight[slot] * (params - init_params)`` is added to the
  round's sum. The reset and the sum run only at steps where some lane needs
  them, and steps that are padding in every lane are skipped, as in
  `local_training`. The per-client result is that of `local_training` for
  the same clients (up to float summation order).

  ``lanes`` holds ``batches`` (column -> ``[L, T, B, ...]``), ``mask``
  ``[L, T, B]`` and ``slot``, ``local_step``, ``first``, ``last`` ``[L, T]``;
  ``keys`` and ``weight`` are per cohort slot ``[C]``; ``window=(lo, k)``
  trains lanes ``lo:lo + k`` only (a chunk). ``sums_fn(deltas, w,
  lane_keys, lane_ids, lane_slots)``, where given, turns the finishing
  clients' deltas ``[L, ...]`` (``w`` their weights, 0 for lanes not
  finishing; ``lane_keys``, ``lane_ids`` and ``lane_slots`` their clients'
  keys, ids (from ``client_ids`` per cohort slot) and cohort slots) into
  sums (`rounds.message_sums`: each client's
  whole delta is at hand at its last step, so DP's clipping applies here).
  Returns a `PackedOutput` whose per-client leaves are ``[C]``.
  """
  client_step = _client_step(model, optimizer, proximal_mu)

  def train(init_params, lanes, keys, weight, frozen=None, window=None,
            sums_fn=None, client_ids=None):
    mask = lanes['mask']
    lo, num_lanes = (0, mask.shape[0]) if window is None else window
    # The small per-step arrays of this window's lanes; batches and mask are
    # read step by step in place.
    meta = {n: core_take(lanes[n], lo, num_lanes)
            for n in ('slot', 'local_step', 'first', 'last')}
    num_slots = weight.shape[0]
    opt0 = optimizer.init(init_params)

    def lane_step(params, opt_state, batch, m, slot, local_step):
      return client_step(params, opt_state, init_params, batch, m,
                         keys[jnp.maximum(slot, 0)], local_step, None, frozen,
                         None)

    step_all = jax.vmap(lane_step)

    def body(carry, t):
      def at(x):
        return jax.lax.dynamic_index_in_dim(x, t, 1, keepdims=False)
      def in_place(x):
        return core_window(x, t, window)
      m, slot, local_step = in_place(mask), at(meta['slot']), at(
          meta['local_step'])
      first, last = at(meta['first']), at(meta['last'])

      # Each lax.cond carries only what it may change.
      def reset(po):
        params, opt_state = po
        def pick(x0, x):
          return jnp.where(first.reshape((-1,) + (1,) * (x.ndim - 1)),
                           x0[None], x)
        return (jax.tree.map(pick, init_params, params),
                jax.tree.map(pick, opt0, opt_state))

      params, opt_state, acc = carry
      params, opt_state = jax.lax.cond(jnp.any(first), reset, lambda po: po,
                                       (params, opt_state))
      zeros = jnp.zeros([num_lanes], jnp.float32)

      def run(po):
        params, opt_state, loss, n, active = step_all(
            *po, jax.tree.map(in_place, lanes['batches']), m, slot,
            local_step)
        return (params, opt_state), (loss, n, active)

      (params, opt_state), (loss, n, active) = jax.lax.cond(
          jnp.any(m), run,
          lambda po: (po, (zeros, zeros, jnp.zeros([num_lanes], bool))),
          (params, opt_state))
      w = jnp.where(last & (slot >= 0), weight[jnp.maximum(slot, 0)], 0.0)

      def accumulate(acc):
        if sums_fn is not None:
          deltas = jax.tree.map(lambda p, p0: p - p0[None], params,
                                init_params)
          sums = sums_fn(deltas, w, keys[jnp.maximum(slot, 0)],
                         client_ids[jnp.maximum(slot, 0)],
                         jnp.maximum(slot, 0))
          return jax.tree.map(jnp.add, acc, sums)
        return jax.tree.map(
            lambda a, p, p0: a + jnp.tensordot(w.astype(p.dtype), p - p0[None],
                                               axes=1), acc, params,
            init_params)

      acc = jax.lax.cond(jnp.any(w != 0), accumulate, lambda a: a, acc)
      return (params, opt_state, acc), (loss, n, active, jnp.sum(m, axis=1))

    params0 = jax.tree.map(
        lambda p: jnp.broadcast_to(p, (num_lanes,) + p.shape), init_params)
    opt_lanes = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_lanes,) + jnp.shape(x)), opt0)
    acc0 = jax.tree.map(jnp.zeros_like, init_params)
    if sums_fn is not None:
      acc0 = jax.tree.map(
          lambda a: jnp.zeros(a.shape, a.dtype),
          jax.eval_shape(sums_fn, params0, jnp.zeros([num_lanes], jnp.float32),
                         jax.random.split(jax.random.key(0), num_lanes),
                         jnp.zeros([num_lanes], jnp.int32),
                         jnp.zeros([num_lanes], jnp.int32)))
    (_, _, acc), (loss, n, active, ex) = over_steps(
        body, (params0, opt_lanes, acc0), core_take(mask, lo, num_lanes),
        unroll, ys=((jnp.float32,) * 2 + (bool, jnp.int32), num_lanes))
    # [T, L] per-step values -> per cohort slot [C].
    seg = jnp.where(meta['slot'] >= 0, meta['slot'], num_slots).T.reshape(-1)
    def per_slot(v):
      return jax.ops.segment_sum(v.reshape(-1).astype(jnp.float32), seg,
                                 num_slots + 1)[:num_slots]
    sums = {}
    if sums_fn is not None:
      sums = dict(acc)
      acc = sums.pop('message')
    return PackedOutput(acc, per_slot(active).astype(jnp.int32), per_slot(loss),
                        per_slot(n), per_slot(ex), sums)

  return train
