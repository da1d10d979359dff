"""Plain per-client Python reference loops, as the papers write the algorithms.

No vmap, no padding, no masks: each client's batches are cut from its own
examples with the same permutation rule the simulator documents (epoch ``e`` is
``default_rng([seed, round, client_id]).permutation(n)`` drawn in order, cut
into batches of ``B`` with the last one partial), every step computes the plain
mean loss of its real examples, and the server update follows the paper's
formula. The vectorised rounds must match these to float tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def client_batches(ds, cid, batch_size, num_epochs, seed, round_idx,
                   num_steps=None):
  n = ds.client_sizes[cid]
  rng = np.random.default_rng([seed, round_idx, int(cid)])
  batches = []
  for _ in range(num_epochs):
    perm = rng.permutation(n)
    batches += [perm[i:i + batch_size] for i in range(0, n, batch_size)]
  if num_steps is not None:
    batches = batches[:num_steps]
  data = ds.client(cid)
  return [{k: jnp.asarray(v[rows]) for k, v in data.items()} for rows in batches]


def mean_loss(model, params, batch, rng):
  """Plain mean cross-entropy over a batch's real examples (tokens for seqs)."""
  logits = model.apply(params, batch['x'], rng, True)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])
  if batch['y'].ndim == 1:
    return jnp.mean(losses)
  valid = (batch['y'] != 0).astype(jnp.float32)
  return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def local_sgd(model, optimizer, params, batches, key, *, mu=0.0,
              correction=None):
  grad = jax.jit(jax.grad(lambda p, b, r: mean_loss(model, p, b, r)))
  p, opt_state = params, optimizer.init(params)
  for s, batch in enumerate(batches):
    g = grad(p, batch, jax.random.fold_in(key, s))
    if mu:
      g = jax.tree.map(lambda g, w, w0: g + mu * (w - w0), g, p, params)
    if correction is not None:
      g = jax.tree.map(jnp.add, g, correction)
    updates, opt_state = optimizer.update(g, opt_state, p)
    p = optax.apply_updates(p, updates)
  return p


def fedopt_round(model, client_opt, server_opt, params, server_state, ds, ids,
                 *, batch_size, num_epochs, seed, round_idx, key, mu=0.0,
                 steps=None, weights=None):
  """One FedAvg/FedOpt/FedProx round; returns (params, server_state)."""
  deltas, ws = [], []
  for j, cid in enumerate(ids):
    batches = client_batches(ds, cid, batch_size, num_epochs, seed, round_idx,
                             None if steps is None else steps[j])
    local = local_sgd(model, client_opt, params, batches,
                      jax.random.fold_in(key, int(cid)), mu=mu)
    deltas.append(jax.tree.map(jnp.subtract, local, params))
    ws.append(ds.client_sizes[cid] if weights is None else weights[j])
  total = float(sum(ws))
  mean = jax.tree.map(lambda *d: sum(w * x for w, x in zip(ws, d)) / total,
                      *deltas)
  updates, server_state = server_opt.update(
      jax.tree.map(jnp.negative, mean), server_state, params)
  return optax.apply_updates(params, updates), server_state


def scaffold_round(model, lr, server_opt, params, server_state, c, c_store,
                   num_clients, ds, ids, *, batch_size, num_epochs, seed,
                   round_idx, key):
  """SCAFFOLD (Karimireddy et al. 2020), Algorithm 1, option II, by hand."""
  deltas, ws, dcs = [], [], []
  c_store = dict(c_store)
  for cid in ids:
    batches = client_batches(ds, cid, batch_size, num_epochs, seed, round_idx)
    c_i = c_store.get(int(cid), jax.tree.map(jnp.zeros_like, params))
    corr = jax.tree.map(lambda cg, ci: cg - ci, c, c_i)
    y = local_sgd(model, optax.sgd(lr), params, batches,
                  jax.random.fold_in(key, int(cid)), correction=corr)
    k = len(batches)
    c_new = jax.tree.map(lambda ci, cg, x, yy: ci - cg + (x - yy) / (k * lr),
                         c_i, c, params, y)
    dcs.append(jax.tree.map(jnp.subtract, c_new, c_i))
    c_store[int(cid)] = c_new
    deltas.append(jax.tree.map(jnp.subtract, y, params))
    ws.append(ds.client_sizes[cid])
  total = float(sum(ws))
  mean = jax.tree.map(lambda *d: sum(w * x for w, x in zip(ws, d)) / total,
                      *deltas)
  c = jax.tree.map(lambda cg, *d: cg + sum(d) / num_clients, c, *dcs)
  updates, server_state = server_opt.update(
      jax.tree.map(jnp.negative, mean), server_state, params)
  return optax.apply_updates(params, updates), server_state, c, c_store


# -- federated LoRA, written out per client ------------------------------------
# The references apply adapters in weight space (lora.merge: W + s A B), the
# vectorised rounds at the activations (x W + s (x A) B): two routes to the
# same function.


def merged_apply(base_model, scale):
  """``apply(full, x, rng, train)`` of a ``{'base', 'lora'}`` params dict."""
  from fedjax_pfi.peft import lora  # pylint: disable=g-import-not-at-top

  def apply(full, x, rng=None, train=False):
    s = full.get('lora_scale', scale)
    return base_model.apply(lora.merge(full['base'], full['lora'], s), x, rng,
                            train)

  return apply


def sgd_steps(loss_of, params, batches, key, lr, regularizer=None):
  """Plain SGD on ``loss_of(params, batch, rng) (+ regularizer(params))``."""
  def total(p, b, r):
    out = loss_of(p, b, r)
    return out if regularizer is None else out + regularizer(p)
  grad = jax.grad(total)
  for s, batch in enumerate(batches):
    g = grad(params, batch, jax.random.fold_in(key, s))
    params = jax.tree.map(lambda p, gi: p - lr * gi, params, g)
  return params


def lm_loss(apply_fn, frozen):
  """Mean cross-entropy of ``apply_fn(merge(frozen, trainable))``."""
  from fedjax_pfi.algorithms import param_groups  # pylint: disable=g-import-not-at-top

  def loss(trainable, batch, rng):
    logits = apply_fn(param_groups.merge(frozen, trainable), batch['x'], rng,
                      True)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['y']))

  return loss


# -- robust aggregation, written from the papers in numpy ----------------------
# Each takes the real clients' messages only, ``x [m, D]`` (float64), as the
# papers' loops do; the simulator's versions take padded, masked buffers.


def np_median(x):
  return np.median(x, axis=0)


def np_trimmed_mean(x, beta):
  b = int(np.floor(beta * len(x)))
  s = np.sort(x, axis=0)
  return s[b:len(x) - b].mean(0)


def np_krum_scores(x, f):
  m = len(x)
  scores = []
  for i in range(m):
    d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(m) if j != i)
    scores.append(sum(d[:max(m - f - 2, 1)]))
  return np.array(scores)


def np_multi_krum(x, f, q=None):
  """Blanchard et al. (2017): the mean of the ``q`` best-scored (``q = m -
  f``; ``q = 1``: Krum's one vector)."""
  q = len(x) - f if q is None else q
  order = np.argsort(np_krum_scores(x, f), kind='stable')
  return x[order[:q]].mean(0)


def np_geometric_median(x, iterations, nu):
  """RFA's smoothed Weiszfeld (Pillutla et al. 2022, Alg. 2), from the mean."""
  v = x.mean(0)
  for _ in range(iterations):
    beta = 1.0 / np.maximum(nu, np.linalg.norm(x - v, axis=1))
    v = (beta[:, None] * x).sum(0) / beta.sum()
  return v


def np_centered_clipping(x, v, iterations, tau):
  """Karimireddy et al. (2021), eq. (CC)."""
  for _ in range(iterations):
    d = x - v
    n = np.linalg.norm(d, axis=1)
    v = v + (d * np.minimum(1.0, tau / n)[:, None]).mean(0)
  return v


def np_norm_bound(x, bound, w=None):
  n = np.linalg.norm(x, axis=1)
  c = x * np.minimum(1.0, bound / n)[:, None]
  w = np.ones(len(x)) if w is None else np.asarray(w, np.float64)
  return (w[:, None] * c).sum(0) / w.sum()


def np_nnm(x, f):
  """Allouah et al. (2023), Alg. 1: each vector -> the mean of its ``m -
  f`` nearest (itself included)."""
  m = len(x)
  out = []
  for i in range(m):
    d = np.array([np.sum((x[i] - x[j]) ** 2) for j in range(m)])
    d[i] = -1.0
    out.append(x[np.argsort(d, kind='stable')[:m - f]].mean(0))
  return np.array(out)
