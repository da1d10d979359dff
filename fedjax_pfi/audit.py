"""Auditing DP-FedAvg with canary clients: an empirical lower bound on
epsilon, to hold against the accountant's.

Following Andrew et al., "One-shot Empirical Privacy Estimation for
Federated Learning" (ICLR 2024): ``k`` canary clients take part in training
like any other (they are sampled the same way), but each one's message is
replaced by its own fixed random direction, scaled far past the clip norm
so that clipping leaves it exactly ``C`` long (`canary_transform`). Another
``k`` directions, drawn the same way, are never inserted. After training,
each direction is scored by its cosine with the final model's change
(`scores`): inserted canaries score higher. Then:

- `epsilon_lower_bound`: a hypothesis test per threshold (Jagielski et al.,
  NeurIPS 2020; Nasr et al. 2021): with Clopper-Pearson intervals at
  confidence ``1 - alpha`` on the true- and false-positive rates,
  ``eps >= log((TPR_lo - delta) / FPR_hi)`` holds for any
  ``(eps, delta)``-DP mechanism with probability ``1 - 2 alpha``;
- `one_shot_epsilon`: the paper's estimate (not a bound): the Gaussian
  mechanism whose mean shift is the canaries' standardized score gap.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize
from scipy import stats

from fedjax_pfi.algorithms import rounds

Params = Any


def directions(template: Params, count: int, key: jax.Array) -> Params:
  """``count`` random unit directions shaped like ``template`` (leaves
  ``[count, ...]``; unit L2 norm over all leaves together)."""
  leaves, tree = jax.tree.flatten(template)
  keys = jax.random.split(key, len(leaves))
  drawn = [jax.random.normal(k, (count,) + jnp.shape(x), jnp.float32)
           for k, x in zip(keys, leaves)]
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(d.reshape(count, -1)), axis=1)
                      for d in drawn))
  return jax.tree.unflatten(tree, [
      d / norm.reshape((count,) + (1,) * (d.ndim - 1)) for d in drawn])


def canary_transform(canary_ids, canaries: Params,
                     scale: float = 1e6) -> rounds.ClientTransform:
  """Replaces client ``canary_ids[i]``'s message by ``scale *
  canaries[i]`` (`directions`); every other client's message passes."""
  ids = jnp.asarray(canary_ids, jnp.int32)

  def init(params):
    del params
    return {'canaries': canaries}

  def select(state, client_id):
    hit = ids == client_id
    row = jnp.argmax(hit)
    return {'direction': jax.tree.map(lambda d: d[row], state['canaries']),
            'is_canary': jnp.any(hit)}

  def apply(message, state, key):
    del key
    return jax.tree.map(
        lambda m, d: jnp.where(state['is_canary'], scale * d.astype(m.dtype),
                               m), message, state['direction']), state

  return rounds.ClientTransform(init, apply, select)


def scores(change: Params, canaries: Params) -> np.ndarray:
  """Each direction's cosine with ``change`` (the final model minus the
  initial one), ``[count]``."""
  flat = np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(change)])
  rows = np.concatenate([np.asarray(d, np.float64).reshape(d.shape[0], -1)
                         for d in jax.tree.leaves(canaries)], axis=1)
  return rows @ flat / (np.linalg.norm(rows, axis=1) *
                        max(np.linalg.norm(flat), 1e-30))


def _clopper_pearson(successes: int, trials: int, alpha: float
                     ) -> tuple[float, float]:
  """The one-sided ``1 - alpha`` lower and upper bounds of a binomial rate."""
  lo = 0.0 if successes == 0 else stats.beta.ppf(alpha, successes,
                                                 trials - successes + 1)
  hi = 1.0 if successes == trials else stats.beta.ppf(
      1 - alpha, successes + 1, trials - successes)
  return float(lo), float(hi)


def epsilon_lower_bound(inserted: np.ndarray, held_out: np.ndarray,
                        delta: float, alpha: float = 0.05) -> float:
  """The largest ``log((TPR_lo - delta) / FPR_hi)`` over thresholds (module
  docstring); 0 where no threshold separates the scores. Every score is a
  threshold tried, so each interval is at ``alpha / thresholds``
  (Bonferroni): the bound holds with probability ``1 - 2 alpha`` whichever
  threshold wins."""
  inserted, held_out = np.sort(inserted), np.sort(held_out)
  thresholds = np.unique(np.concatenate([inserted, held_out]))
  alpha = alpha / thresholds.size
  best = 0.0
  for t in thresholds:
    tp = int(np.sum(inserted >= t))
    fp = int(np.sum(held_out >= t))
    tpr_lo = _clopper_pearson(tp, inserted.size, alpha)[0]
    fpr_hi = _clopper_pearson(fp, held_out.size, alpha)[1]
    if tpr_lo - delta > 0 and fpr_hi > 0:
      best = max(best, math.log((tpr_lo - delta) / fpr_hi))
  return best


def gaussian_epsilon(mu: float, delta: float) -> float:
  """The epsilon at ``delta`` of ``mu``-Gaussian DP (Dong, Roth and Su
  2019): ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``."""
  if mu <= 0:
    return 0.0

  def gap(eps):
    return (stats.norm.cdf(-eps / mu + mu / 2) -
            math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta)

  if gap(0.0) <= 0:
    return 0.0
  hi = 1.0
  while gap(hi) > 0:
    hi *= 2
  return float(optimize.brentq(gap, 0.0, hi))


def one_shot_epsilon(inserted: np.ndarray, held_out: np.ndarray,
                     delta: float) -> float:
  """Andrew et al. (2024)'s estimate: ``mu = (mean_in - mean_out) /
  std_out``, then `gaussian_epsilon`."""
  mu = (np.mean(inserted) - np.mean(held_out)) / max(np.std(held_out), 1e-30)
  return gaussian_epsilon(float(mu), delta)
