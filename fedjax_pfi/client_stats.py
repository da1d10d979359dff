"""Statistics about clients that say more than a mean: who is hurt beyond
noise, how wide the spread is, how far groups drift apart, how calibrated
each model is, how exposed a planted secret is.

Everything here is NumPy/SciPy on the host, over per-client (or per-example)
arrays that an evaluation already produced; nothing is traced.

- `discordant_p`: the exact McNemar test (a binomial test on the discordant
  examples) that one model is worse than another on the same examples.
- `paired_bootstrap_p`: the same question for per-example losses (never
  below `sign_floor`, ``2^-n`` for ``n`` examples).
- `significant`: per-client hurt / helped at a level ``alpha``.
- `gini`, `spread`: how unequal the per-client accuracies are.
- `calibration_bins`, `ece`: expected calibration error (Guo et al. 2017,
  15 equal-width confidence bins).
- `group_gap`: per-group means and the largest gap between them.
- `rank_correlations`: Spearman's rho of a per-client outcome with features.
- `exposure`: a canary's exposure (Carlini et al., USENIX Security 2019,
  "The Secret Sharer"), by its rank among candidates.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import stats


def _check_alpha(alpha: float) -> None:
  if not 0 < alpha < 1:
    raise ValueError(f'evaluation.alpha must lie in (0, 1), got {alpha}.')


def discordant_p(worse, better) -> np.ndarray:
  """One-sided exact McNemar p-values that a model is *worse* than a
  reference on the same examples.

  ``worse[i]``: client ``i``'s examples the reference gets right and the
  model wrong; ``better[i]``: the other way round. Under the null (no
  difference) each discordant example is a fair coin, so the p-value is
  ``P(Binomial(worse + better, 1/2) >= worse)``; 1 with no discordant
  example. Swap the arguments for "better".
  """
  worse = np.asarray(worse, np.int64)
  better = np.asarray(better, np.int64)
  if np.any(worse < 0) or np.any(better < 0):
    raise ValueError('discordant counts must be >= 0.')
  n = worse + better
  return np.where(n > 0, stats.binom.sf(worse - 1, n, 0.5), 1.0)


def paired_bootstrap_p(loss, reference_loss, *, num_resamples: int = 1000,
                       seed: int = 0) -> float:
  """One-sided paired-bootstrap p-value that ``loss`` is *higher* than
  ``reference_loss`` (per example, the same examples, ``[n]``).

  The differences ``d = loss - reference_loss`` are centred (the null: mean
  0) and resampled with replacement; the p-value is ``(1 + #{mean(d*) >=
  mean(d)}) / (1 + num_resamples)`` (Efron & Tibshirani 1993, Sec. 16.4),
  and at least `sign_floor` ``(n) = 2^-n``: the centred bootstrap of a
  handful of differences is degenerate (one difference resamples to
  itself, so any positive one would score ``1 / (1 + num_resamples)``),
  and no test of ``n`` paired differences can be surer than all ``n``
  signs agreeing by chance.
  """
  d = np.asarray(loss, np.float64) - np.asarray(reference_loss, np.float64)
  if d.ndim != 1 or d.size == 0:
    raise ValueError(f'paired_bootstrap_p needs two [n] arrays with n >= 1, '
                     f'got shape {d.shape}.')
  rng = np.random.default_rng(seed)
  centred = d - d.mean()
  idx = rng.integers(0, d.size, size=(num_resamples, d.size))
  means = centred[idx].mean(axis=1)
  # a hair of tolerance: resampling the centred constant gives means of
  # rounding size that must not count as exceeding an observed 0
  tol = 1e-12 * max(1.0, float(np.abs(d).max()))
  p = (1 + np.sum(means >= d.mean() - tol)) / (1 + num_resamples)
  return float(max(p, sign_floor(d.size)))


def sign_floor(n) -> np.ndarray:
  """``2^-n``: the smallest p-value `paired_bootstrap_p` gives ``n``
  paired differences (the exact sign test's, all ``n`` signs agreeing)."""
  return np.power(0.5, np.asarray(n, np.float64))


def paired_bootstrap_p_segments(loss, reference_loss, offsets, *,
                                num_resamples: int = 1000,
                                seed: int = 0) -> np.ndarray:
  """`paired_bootstrap_p` for many clients at once: client ``i``'s examples
  are ``offsets[i]:offsets[i + 1]`` of the ``[n]`` arrays (p = 1 for a
  client without examples). One ``[num_resamples, rows]`` draw resamples
  every client within its own examples: one vectorized pass."""
  d = np.asarray(loss, np.float64) - np.asarray(reference_loss, np.float64)
  offsets = np.asarray(offsets, np.int64)
  sizes = np.diff(offsets)
  out = np.ones(sizes.size)
  has = sizes > 0
  if not has.any():
    return out
  first = offsets[:-1][has]          # segment starts, in d's positions
  owner = np.repeat(np.arange(sizes.size), sizes)
  rows = np.arange(offsets[0], offsets[-1])
  obs = np.add.reduceat(d[rows], first - offsets[0]) / sizes[has]
  centred = d.copy()
  centred[rows] -= np.repeat(obs, sizes[has])
  rng = np.random.default_rng(seed)
  idx = offsets[:-1][owner] + np.floor(
      rng.random((num_resamples, rows.size)) * sizes[owner]).astype(np.int64)
  means = np.add.reduceat(centred[idx], first - offsets[0], axis=1) / \
      sizes[has]
  # the tolerance of `paired_bootstrap_p`
  tol = 1e-12 * max(1.0, float(np.abs(d[rows]).max()))
  out[has] = np.maximum(
      (1 + np.sum(means >= obs - tol, axis=0)) / (1 + num_resamples),
      sign_floor(sizes[has]))
  return out


def significant(worse, better, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """Per client, ``(hurt, helped)`` bools: the model is worse (better) than
  the reference by the one-sided exact McNemar test at level ``alpha``."""
  _check_alpha(alpha)
  return (discordant_p(worse, better) < alpha,
          discordant_p(better, worse) < alpha)


def gini(values) -> float:
  """The Gini coefficient of non-negative ``values``: ``sum_ij |x_i - x_j|
  / (2 n^2 mean)``; 0 when all are equal, ``(n - 1) / n`` when one holds
  everything, 0 for an all-zero vector."""
  x = np.asarray(values, np.float64).ravel()
  if x.size == 0:
    raise ValueError('gini of an empty vector.')
  if np.any(x < 0):
    raise ValueError('gini needs non-negative values.')
  total = x.sum()
  if total == 0:
    return 0.0
  x = np.sort(x)
  n = x.size
  # sum_ij |x_i - x_j| = 2 sum_i (2i - n - 1) x_(i), i = 1..n
  ranks = np.arange(1, n + 1)
  return float(np.sum((2 * ranks - n - 1) * x) / (n * total))


def spread(accuracy) -> dict:
  """How spread out per-client accuracies are: ``std``, ``p10``, ``p90``,
  ``p90_p10_gap``, ``worst_decile_mean`` (the mean of the lowest 10%,
  at least one client) and ``gini``."""
  a = np.asarray(accuracy, np.float64).ravel()
  if a.size == 0:
    raise ValueError('spread of no clients.')
  p10, p90 = np.percentile(a, [10, 90])
  worst = np.sort(a)[:max(1, int(np.ceil(0.1 * a.size)))]
  return {'std': float(a.std()), 'p10': float(p10), 'p90': float(p90),
          'p90_p10_gap': float(p90 - p10),
          'worst_decile_mean': float(worst.mean()), 'gini': gini(a)}


def calibration_bins(confidence, correct, num_bins: int = 15
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Equal-width confidence bins over ``(0, 1]``: per bin the count, the
  number correct and the sum of confidences (sums, so bins of several
  batches or clients add)."""
  conf = np.asarray(confidence, np.float64).ravel()
  ok = np.asarray(correct, np.float64).ravel()
  if conf.shape != ok.shape:
    raise ValueError(f'confidence {conf.shape} and correct {ok.shape} differ.')
  b = np.clip(np.ceil(conf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
  count = np.bincount(b, minlength=num_bins).astype(np.float64)
  return (count, np.bincount(b, ok, minlength=num_bins),
          np.bincount(b, conf, minlength=num_bins))


def ece(count, correct, confidence_sum) -> float:
  """Expected calibration error from `calibration_bins`' sums: ``sum_b
  (n_b / n) |acc_b - conf_b|`` (Guo et al., ICML 2017); nan with no
  examples."""
  count = np.asarray(count, np.float64)
  n = count.sum()
  if n == 0:
    return float('nan')
  return float(np.sum(np.abs(np.asarray(correct) - np.asarray(confidence_sum)))
               / n)


def group_gap(values, groups, name: str = 'group') -> dict:
  """Per-group means of a per-client ``values`` and ``gap``, the largest
  minus the smallest group mean (with ``max_group`` and ``min_group``)."""
  v = np.asarray(values, np.float64)
  g = np.asarray(groups)
  if v.shape != g.shape:
    raise ValueError(f'{name}: values {v.shape} and groups {g.shape} differ.')
  names = np.unique(g)
  if names.size < 2:
    raise ValueError(f'{name} has {names.size} value(s) '
                     f'({", ".join(map(str, names))}) among the evaluated '
                     'clients; a group gap needs at least 2.')
  means = {str(k): float(v[g == k].mean()) for k in names}
  hi = max(means, key=means.get)
  lo = min(means, key=means.get)
  return {'means': means, 'gap': means[hi] - means[lo], 'max_group': hi,
          'min_group': lo}


def rank_correlations(outcome, features: Mapping[str, Sequence[float]]
                      ) -> dict:
  """Spearman's rho (and its two-sided p-value) of a per-client ``outcome``
  (a gain, or 1 for hurt) with each per-client feature; nan where either
  is constant."""
  y = np.asarray(outcome, np.float64)
  out = {}
  for k, x in features.items():
    x = np.asarray(x, np.float64)
    if x.shape != y.shape:
      raise ValueError(f'feature {k!r} has shape {x.shape}, the outcome '
                       f'{y.shape}.')
    if np.ptp(x) == 0 or np.ptp(y) == 0:
      out[k] = {'rho': float('nan'), 'p': float('nan')}
      continue
    res = stats.spearmanr(x, y)
    out[k] = {'rho': float(res.statistic), 'p': float(res.pvalue)}
  return out


def exposure(canary_score: float, candidate_scores) -> float:
  """Carlini et al. (2019), Definition 3: ``log2 |R| - log2 rank`` of the
  canary among ``R``, the canary and ``candidate_scores`` (the same format
  with other random secrets), ranked by score (a log-perplexity: lower is
  more likely; ties count against the canary). The most likely of ``|R|``
  has exposure ``log2 |R|``; an unremarkable canary about 1."""
  cand = np.asarray(candidate_scores, np.float64).ravel()
  size = cand.size + 1
  rank = 1 + int(np.sum(cand <= canary_score))
  return float(np.log2(size) - np.log2(rank))
