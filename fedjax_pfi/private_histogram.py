"""What a private server can learn about its clients: a histogram of
per-client gains released under differential privacy (federated analytics).

Each evaluated client puts its gain over a reference model in one of fixed
bins (`GAIN_EDGES`) and reports it through a DP mechanism; the server sees
only the released histogram and estimates from it the hurt fraction, the
spread and (with one histogram per group) the group gaps.

- ``'gaussian'``: the one-hot vectors summed over clients plus
  ``N(0, z^2)`` per bin. Adding or removing a client moves the sum by one
  one-hot vector, L2 norm 1, so this is one Gaussian mechanism of
  multiplier ``z`` under add-or-remove-one, the relation of the training
  rounds' Poisson accounting: as dp-accounting's ``GaussianDpEvent(z)``
  it composes with them (not yet charged to a run's accountant).
- ``'randomized_response'``: each client reports its own bin with
  probability ``1 - p`` and a uniformly random one with probability ``p``
  (k-ary randomized response, local DP: the server never holds a true
  bin). Its epsilon is pure and per client, under replace-one; the server
  debiases the counts.

`calibrate_gaussian` finds ``z`` for an epsilon at ``delta`` from the
Gaussian mechanism's exact privacy profile (Balle & Wang 2018; dp-accounting's
PLD agrees to its discretization, tested); `randomized_response_p` is the
closed form.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np
from scipy import optimize
from scipy import stats

MECHANISMS = ('gaussian', 'randomized_response')
#: The edges of the gain bins, in accuracy points as fractions; the hurt
#: bins are those below 0.
GAIN_EDGES = np.array([-1.0, -0.2, -0.1, -0.05, -0.02, -1e-9, 1e-9, 0.02,
                       0.05, 0.1, 0.2, 1.0 + 1e-9])


class Release(NamedTuple):
  """A released histogram and the server's debiased count estimate.

  Attributes:
    counts: the server's unbiased estimate of each bin's count ``[k]``
      (may be negative: noise).
    true_counts: what the simulation knows and the server does not.
    epsilon: the release's epsilon (``inf``: no noise).
    delta: its delta (0 for randomized response).
  """
  counts: np.ndarray
  true_counts: np.ndarray
  epsilon: float
  delta: float


def bin_of(gains, edges: np.ndarray = GAIN_EDGES) -> np.ndarray:
  """Each gain's bin ``[n]`` in ``0..len(edges)-2`` (clipped to the ends)."""
  g = np.asarray(gains, np.float64)
  return np.clip(np.searchsorted(edges, g, side='right') - 1, 0,
                 edges.size - 2)


def gaussian_delta(noise_multiplier: float, epsilon: float) -> float:
  """The exact delta of one Gaussian release of multiplier ``z`` at
  ``epsilon`` (Balle & Wang, ICML 2018, Theorem 8): ``Phi(1/(2z) - eps z)
  - e^eps Phi(-1/(2z) - eps z)``."""
  z = noise_multiplier
  a = 1 / (2 * z)
  return float(stats.norm.cdf(a - epsilon * z) -
               math.exp(epsilon) * stats.norm.cdf(-a - epsilon * z))


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
  """The exact epsilon of one Gaussian release at ``delta`` (inverting
  `gaussian_delta`, which falls in epsilon); ``inf`` without noise."""
  if noise_multiplier == 0:
    return math.inf
  if gaussian_delta(noise_multiplier, 0.0) <= delta:
    return 0.0
  hi = 1.0
  while gaussian_delta(noise_multiplier, hi) > delta:
    hi *= 2
  return float(optimize.brentq(
      lambda e: gaussian_delta(noise_multiplier, e) - delta, 0.0, hi,
      xtol=1e-12, rtol=1e-12))


@functools.lru_cache(maxsize=32)
def calibrate_gaussian(epsilon: float, delta: float) -> float:
  """The smallest noise multiplier of one Gaussian release at ``(epsilon,
  delta)``, exactly (`gaussian_delta` falls in ``z``); 0 for ``epsilon =
  inf``."""
  if epsilon == math.inf:
    return 0.0
  if not epsilon > 0:
    raise ValueError(f'the evaluation epsilon must be > 0, got {epsilon}.')
  if not 0 < delta < 1:
    raise ValueError(f'the evaluation delta must lie in (0, 1), got {delta}.')
  lo, hi = 1e-3, 1.0
  while gaussian_delta(hi, epsilon) > delta:
    hi *= 2
  return float(optimize.brentq(lambda z: gaussian_delta(z, epsilon) - delta,
                               lo, hi, xtol=1e-12, rtol=1e-12))


def randomized_response_p(epsilon: float, num_bins: int) -> float:
  """The noise parameter ``p`` (`dp_accounting.RandomizedResponseDpEvent`)
  of k-ary randomized response with pure ``epsilon``: the most and least
  likely reports of two inputs differ by ``(1 - p + p/k) / (p/k) = e^eps``,
  so ``p = k / (e^eps + k - 1)``."""
  if epsilon == math.inf:
    return 0.0
  if not epsilon > 0:
    raise ValueError(f'the evaluation epsilon must be > 0, got {epsilon}.')
  return num_bins / (math.exp(epsilon) + num_bins - 1)


def release(bins, num_bins: int, mechanism: str, epsilon: float,
            delta: float, rng: np.random.Generator) -> Release:
  """Releases the histogram of ``bins`` (one bin per client) under
  ``mechanism`` at ``epsilon`` (module docstring)."""
  if mechanism not in MECHANISMS:
    raise ValueError(f'unknown histogram mechanism {mechanism!r}; accepted: '
                     f'{", ".join(MECHANISMS)}.')
  bins = np.asarray(bins, np.int64)
  true = np.bincount(bins, minlength=num_bins).astype(np.float64)
  if mechanism == 'gaussian':
    z = calibrate_gaussian(epsilon, delta)
    return Release(true + z * rng.standard_normal(num_bins), true, epsilon,
                   delta if z else 0.0)
  p = randomized_response_p(epsilon, num_bins)
  random = rng.random(bins.size) < p
  reported = np.where(random, rng.integers(0, num_bins, bins.size), bins)
  observed = np.bincount(reported, minlength=num_bins).astype(np.float64)
  # E[observed_j] = (1 - p) n_j + p n / k: solve for n_j.
  n = bins.size
  counts = (observed - p * n / num_bins) / (1 - p) if p < 1 else observed
  return Release(counts, true, epsilon, 0.0)


def hurt_fraction(counts, edges: np.ndarray = GAIN_EDGES) -> float:
  """The fraction of clients in bins below zero gain, from (noised)
  counts clipped at 0."""
  c = np.maximum(np.asarray(counts, np.float64), 0.0)
  total = c.sum()
  if total == 0:
    return float('nan')
  below = edges[1:] <= 0
  return float(c[below].sum() / total)


def spread_std(counts, edges: np.ndarray = GAIN_EDGES) -> float:
  """The gains' std from (noised) counts, each bin at its centre."""
  c = np.maximum(np.asarray(counts, np.float64), 0.0)
  total = c.sum()
  if total == 0:
    return float('nan')
  centres = np.clip((edges[:-1] + edges[1:]) / 2, -1, 1)
  mean = np.sum(c * centres) / total
  return float(np.sqrt(np.sum(c * (centres - mean) ** 2) / total))


def clients_to_see(true_fraction: float, epsilon: float, mechanism: str,
                   *, delta: float = 1e-5, tolerance: Optional[float] = None,
                   edges: np.ndarray = GAIN_EDGES) -> float:
  """About how many clients a population needs before `hurt_fraction` of
  the released histogram is within ``tolerance`` (default: half of
  ``true_fraction``) of ``true_fraction`` at two standard errors, to first
  order in the noise. The population is what it is, so the error is the
  mechanism's alone:

  - Gaussian: ``h_hat - h ~ ((1 - h) e_hurt - h e_rest) / n`` with
    ``e_hurt``, ``e_rest`` the noise summed over the ``b`` hurt bins and the
    ``k - b`` others: std ``z sqrt((1 - h)^2 b + h^2 (k - b)) / n``;
  - randomized response: a hurt client's report lands in a hurt bin with
    probability ``a = 1 - p + p b / k``, another's with ``c = p b / k``;
    the debiased fraction has variance ``(h a (1 - a) + (1 - h) c (1 - c))
    / (n (1 - p)^2)``.
  """
  tol = true_fraction / 2 if tolerance is None else tolerance
  k = edges.size - 1
  b = int(np.sum(edges[1:] <= 0))
  h = true_fraction
  if mechanism == 'gaussian':
    z = calibrate_gaussian(epsilon, delta)
    return float(2 * z * math.sqrt((1 - h) ** 2 * b + h ** 2 * (k - b)) / tol)
  p = randomized_response_p(epsilon, k)
  a, c = 1 - p + p * b / k, p * b / k
  var1 = (h * a * (1 - a) + (1 - h) * c * (1 - c)) / (1 - p) ** 2
  return float((2 / tol) ** 2 * var1)
