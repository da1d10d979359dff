"""Does a personalized recommender still reflect its user? (issue 19)

Li et al. ("Learn to Preserve Personality: Federated Foundation Models in
Recommendations", 2025, arXiv 2506.11563) ask that each user's adaptation
keep what makes the user unique rather than average it away. These
measures make that checkable, user by user, from a model's top-``k``
recommendations over the whole catalogue (the user's own training items
excluded, `top_k`):

- `genre_divergence`: the Jensen-Shannon divergence (base 2, in
  ``[0, 1]``) between the genre distribution of the user's recommendations
  and that of the user's own history. A movie with several genres spreads
  its mass evenly over them (`genre_matrix`), as in Steck's calibrated
  recommendations (RecSys 2018), whose miscalibration is a KL divergence
  between the same two distributions; Jensen-Shannon is used here because
  it stays finite where the recommendations miss a genre of the history.
- `popularity_rank`: the mean popularity rank of the recommended items
  (1 = the item with the most training interactions): a model that pushes
  everyone toward popular items has a low rank.
- `closer_test`: whether one model's recommendations are significantly
  closer to the user's profile than another's (the personalized model
  against the global one). The profile is estimated from a finite history,
  so the test resamples the history's items (a bootstrap, paired: both
  models' recommendations are scored against the same resampled profile)
  and gives the one-sided p-value of "not closer"; the share of users with
  ``p < alpha`` is the share significantly closer, in the spirit of the trust
  report's per-client paired tests (`fedjax_pfi.trust`).

`catalogue_inputs` and `catalogue_scores` give any trained ranking model's
scores of every item for every user (each user with its own personalized
params, as evaluation joins them), which `top_k` turns into the
recommendations.

Arrays: ``recommended`` int ``[users, k]`` item indices; ``histories`` a
sequence of int arrays (each user's training items); ``matrix`` float
``[items, genres]`` (`genre_matrix`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from fedjax_pfi import client_store


def catalogue_inputs(test_x: np.ndarray, metadata: Mapping[str, Any]
                     ) -> np.ndarray:
  """``[users, history_len + num_items]`` int32: each user's model input
  that scores the whole catalogue. ``test_x`` is the test split's ``x``
  (one list per user): its history part, if the task has one
  (``metadata['history_len']``, `movielens.sequential`: the items before
  the test item), is kept, and the candidates become every item
  ``0..num_items-1`` in order."""
  test_x = np.asarray(test_x)
  history = int(metadata.get('history_len', 0))
  items = np.arange(int(metadata['num_items']), dtype=np.int32)
  return np.concatenate(
      [test_x[:, :history].astype(np.int32),
       np.broadcast_to(items, (test_x.shape[0], items.size))], 1)


def catalogue_scores(model, view, inputs: np.ndarray,
                     combine: Optional[Callable[[Any, Any], Any]] = None,
                     users_per_chunk: int = 64) -> np.ndarray:
  """``[users, num_items]`` float: each user's scores of the catalogue
  (`catalogue_inputs`), user ``i`` with its own params: ``view`` is an
  algorithm's `fedjax_pfi.algorithms.core.EvalView` (``view.params`` for
  everyone, or ``combine(view.shared, view.personal[i])``, as the
  `fedjax_pfi.evaluation.Evaluator` joins them; a host store's ``gather``
  works too). Users go ``users_per_chunk`` at a time, the last chunk
  padded, so one shape compiles. Clustered models are refused: which
  cluster serves a user is chosen on its training loss, which
  `fedjax_pfi.run_evaluator` does."""
  if getattr(view, 'clusters', None) is not None:
    raise ValueError('catalogue_scores takes one model per user; a '
                     'clustered view picks one of its k models per user by '
                     'training loss first.')
  inputs = np.asarray(inputs, np.int32)
  n, c = inputs.shape[0], users_per_chunk
  personal = view.personal
  if personal is None:
    run = jax.jit(lambda p, x: model.apply(p, x))
  else:
    join = combine or (lambda shared, mine: mine)
    run = jax.jit(jax.vmap(
        lambda shared, mine, x: model.apply(join(shared, mine), x[None])[0],
        in_axes=(None, 0, 0)))
  out = []
  for lo in range(0, n, c):
    idx = np.arange(lo, lo + c)
    idx = np.where(idx < n, idx, n - 1)  # pad with the last user
    if personal is None:
      s = run(view.params, inputs[idx])
    else:
      s = run(view.shared, client_store.gather_rows(personal, idx),
              inputs[idx])
    out.append(np.asarray(s, np.float64)[:min(c, n - lo)])
  return np.concatenate(out)


def genre_matrix(genres_by_item: Sequence[Sequence[str]],
                 genres: Sequence[str] | None = None
                 ) -> tuple[np.ndarray, tuple[str, ...]]:
  """``([items, genres] float, genre names)``: row ``i`` spreads item
  ``i``'s unit mass evenly over its genres (all zeros for an item without
  any). ``genres``: the column order (default: sorted names seen)."""
  names = tuple(genres if genres is not None else
                sorted({g for gs in genres_by_item for g in gs}))
  col = {g: j for j, g in enumerate(names)}
  out = np.zeros([len(genres_by_item), len(names)])
  for i, gs in enumerate(genres_by_item):
    unknown = [g for g in gs if g not in col]
    if unknown:
      raise ValueError(f'item {i} has genres {unknown} outside {names}.')
    for g in set(gs):
      out[i, col[g]] = 1.0 / len(set(gs))
  return out, names


def profile(items: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """``[genres]``: the genre distribution of ``items`` (each counted as
  often as it appears); zeros where no item has a genre."""
  total = matrix[np.asarray(items, np.int64)].sum(0)
  mass = total.sum()
  return total / mass if mass > 0 else total


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
  """Jensen-Shannon divergence, base 2, of distributions over the last
  axis: 0 for equal distributions, 1 for disjoint supports."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  m = (p + q) / 2

  def kl(a):
    with np.errstate(divide='ignore', invalid='ignore'):
      t = np.where(a > 0, a * np.log2(a / np.where(m > 0, m, 1.0)), 0.0)
    return t.sum(-1)

  return np.clip((kl(p) + kl(q)) / 2, 0.0, 1.0)


def top_k(scores: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
  """``[users, k]``: each user's ``k`` highest-scoring items, best first,
  among those ``exclude`` (bool ``[users, items]``: the user's training
  items) does not mark. Ties go to the lower item index."""
  if k < 1 or k > scores.shape[1]:
    raise ValueError(f'k must lie in [1, {scores.shape[1]}], got {k}.')
  s = np.where(exclude, -np.inf, np.asarray(scores, np.float64))
  return np.argsort(-s, axis=1, kind='stable')[:, :k]


def genre_divergence(recommended: np.ndarray,
                     histories: Sequence[np.ndarray],
                     matrix: np.ndarray) -> np.ndarray:
  """``[users]``: JS divergence between each user's recommendations' genre
  distribution and the user's history's."""
  return np.array([js_divergence(profile(r, matrix), profile(h, matrix))
                   for r, h in zip(recommended, histories)])


def popularity_ranks(counts: np.ndarray) -> np.ndarray:
  """``[items]``: each item's popularity rank, 1 for the most interacted
  with (``counts``: training interactions per item); ties share the best
  rank of their group."""
  counts = np.asarray(counts)
  order = np.sort(counts)[::-1]
  return np.searchsorted(-order, -counts, side='left') + 1


def popularity_rank(recommended: np.ndarray, counts: np.ndarray
                    ) -> np.ndarray:
  """``[users]``: the mean popularity rank (`popularity_ranks`) of each
  user's recommended items; lower is more popular."""
  return popularity_ranks(counts)[np.asarray(recommended)].mean(-1)


def _resampled(history: np.ndarray, mine: np.ndarray, ref: np.ndarray,
               matrix: np.ndarray, resamples: int, seed: int):
  """``(div_mine, div_ref)``, each ``[resamples]``: both models'
  recommendations against the same bootstrap resamples of the history's
  profile."""
  history = np.asarray(history, np.int64)
  if history.size == 0:
    raise ValueError('a user without history has no profile to be close to.')
  rng = np.random.default_rng(seed)
  pm, pr = profile(mine, matrix), profile(ref, matrix)
  draws = rng.integers(0, history.size, (resamples, history.size))
  profiles = matrix[history[draws]].sum(1)
  profiles /= np.maximum(profiles.sum(-1, keepdims=True), 1e-300)
  return (js_divergence(pm[None], profiles),
          js_divergence(pr[None], profiles))


def _p_not_closer(div_mine: np.ndarray, div_ref: np.ndarray) -> float:
  return float((1 + np.sum(div_mine >= div_ref)) / (1 + div_mine.size))


def closer_test(history: np.ndarray, mine: np.ndarray, ref: np.ndarray,
                matrix: np.ndarray, resamples: int = 1000,
                seed: int = 0) -> float:
  """One-sided p-value that ``mine``'s recommendations are NOT closer (by
  `js_divergence`) than ``ref``'s to the profile of ``history``: the share
  of bootstrap resamples of the history in which ``mine`` is at least as
  far as ``ref`` (with the +1 correction, so never 0). Equal
  recommendations give 1."""
  return _p_not_closer(*_resampled(history, mine, ref, matrix, resamples,
                                   seed))


def report(mine: np.ndarray, ref: np.ndarray,
           histories: Sequence[np.ndarray], matrix: np.ndarray,
           counts: np.ndarray, *, alpha: float = 0.05,
           groups: Mapping[str, np.ndarray] | None = None,
           resamples: int = 1000, seed: int = 0,
           prefix: str = 'personality/') -> dict[str, float]:
  """The personality measures of ``mine`` against ``ref`` (both ``[users,
  k]`` recommendations of the same users; ``ref`` the global model):
  the mean genre divergence and popularity rank of each, the share of
  users significantly closer to their own profile under ``mine`` (and
  significantly farther: ``ref`` closer), and with ``groups`` (attribute
  -> ``[users]`` labels, e.g. gender and age band) the same means per
  group."""
  div_m = genre_divergence(mine, histories, matrix)
  div_r = genre_divergence(ref, histories, matrix)
  pop_m, pop_r = popularity_rank(mine, counts), popularity_rank(ref, counts)
  # one bootstrap per user serves both directions
  both = [_resampled(h, a, b, matrix, resamples, seed + u)
          for u, (h, a, b) in enumerate(zip(histories, mine, ref))]
  p_closer = np.array([_p_not_closer(dm, dr) for dm, dr in both])
  p_farther = np.array([_p_not_closer(dr, dm) for dm, dr in both])
  out = {'genre_divergence_mean': float(div_m.mean()),
         'genre_divergence_ref_mean': float(div_r.mean()),
         'popularity_rank_mean': float(pop_m.mean()),
         'popularity_rank_ref_mean': float(pop_r.mean()),
         'closer_significant_fraction': float(np.mean(p_closer < alpha)),
         'farther_significant_fraction': float(np.mean(p_farther < alpha))}
  for attr, labels in (groups or {}).items():
    labels = np.asarray(labels)
    for g in np.unique(labels):
      sel = labels == g
      out[f'by_{attr}/{g}/genre_divergence_mean'] = float(div_m[sel].mean())
      out[f'by_{attr}/{g}/genre_divergence_ref_mean'] = float(
          div_r[sel].mean())
      out[f'by_{attr}/{g}/popularity_rank_mean'] = float(pop_m[sel].mean())
      out[f'by_{attr}/{g}/closer_significant_fraction'] = float(
          np.mean(p_closer[sel] < alpha))
  return {prefix + k: v for k, v in out.items()}
