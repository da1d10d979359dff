"""Robust aggregation: aggregators over the round's buffer of messages.

A robust aggregator looks at every client's message, so its round fills a
``[C, ...]`` buffer (one row per cohort slot; `rounds.message_sums` writes
each chunk's rows, and a sharded round's ``psum`` of the zero-filled buffers
is an all-gather) instead of summing the messages. ``finalize`` then sorts
the buffer's rows by client id (so chunked, packed and sharded layouts give
the very same numbers), lets an omniscient attack (ALIE, IPM; `attacks`)
replace the malicious rows, runs the pre-aggregator and the aggregator on
the real rows only (padded slots and dropped clients are excluded by a mask,
never by a value), and returns the aggregate.

The rules, each on a flat ``[n, D]`` matrix ``x`` with a mask ``valid``
(``m`` real rows, ``f`` the Byzantine clients the server assumes):

- `coordinate_median`: per coordinate the median of the real rows
  (Yin et al., ICML 2018).
- `trimmed_mean`: per coordinate the mean after dropping the ``floor(beta m)``
  largest and smallest values (Yin et al. 2018).
- Krum / `multi_krum` (Blanchard et al., NeurIPS 2017): each row's score
  is the sum of its squared distances to its ``m - f - 2`` nearest other
  rows (the distances from one Gram matmul); Krum returns the row of
  lowest score, Multi-Krum the mean of the ``q`` lowest (``q = m - f`` by
  default).
- `geometric_median`: the smoothed Weiszfeld iterations of RFA (Pillutla,
  Kakade and Harchaoui, IEEE TSP 2022, Algorithm 2), from the mean, with
  smoothing ``nu``.
- `centered_clipping` (Karimireddy, He and Jaggi, ICML 2021): from the
  previous round's aggregate ``v``, ``L`` times ``v <- v + mean_i clip_tau(x_i
  - v)``; ``v`` is the aggregator's state.
- `norm_bound` (Sun et al., "Can You Really Backdoor Federated Learning?",
  2019): every message clipped to L2 norm ``M``, then the weighted mean.
- ``mean``: the weighted mean of the buffer (FedAvg's, for the omniscient
  attacks that need the buffer).

Pre-aggregators (rows in, rows out, run before the rule):

- `nearest_neighbor_mixing` (Allouah et al., AISTATS 2023): each row
  replaced by the mean of its ``m - f`` nearest rows (itself included).
- `bucketing` (Karimireddy, He and Jaggi, ICLR 2022): the real rows
  shuffled by the aggregator's key and averaged in buckets of ``s``; the
  rule runs on the ``ceil(m / s)`` bucket means.

Robust rules weigh every real client equally (a weight a client reports is
what an attacker would inflate); ``mean`` and ``norm_bound`` use the
round's weighting (``server.weighting``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi.algorithms import aggregators as aggregators_lib

Params = Any

#: The rules ``aggregator.name`` may name.
RULES = ('mean', 'median', 'trimmed_mean', 'krum', 'multi_krum',
         'geometric_median', 'centered_clipping', 'norm_bound')
#: The pre-aggregators ``aggregator.pre`` may name.
PRE = ('none', 'nnm', 'bucketing')
# The rules whose guarantee needs fewer than half the clients Byzantine.
HALF_BOUND = ('median', 'trimmed_mean', 'krum', 'multi_krum',
              'geometric_median', 'centered_clipping')
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Spec:
  """A robust aggregator (the ``aggregator.*`` options).

  Attributes:
    name: one of `RULES`.
    pre: one of `PRE`.
    f: the Byzantine clients per round the server assumes (Krum's, NNM's).
    beta: trimmed mean's fraction cut at each end, in [0, 0.5).
    multi_krum_m: Multi-Krum's rows averaged (0: ``m - f``).
    iterations: Weiszfeld's and centered clipping's.
    nu: Weiszfeld's smoothing.
    tau: centered clipping's radius.
    norm_bound: norm bounding's ``M``.
    bucket_size: bucketing's ``s``.
    weighting: ``'examples'`` or ``'uniform'`` (``mean``, ``norm_bound``).
  """
  name: str = 'mean'
  pre: str = 'none'
  f: int = 0
  beta: float = 0.1
  multi_krum_m: int = 0
  iterations: int = 3
  nu: float = 1e-6
  tau: float = 1.0
  norm_bound: float = 1.0
  bucket_size: int = 2
  weighting: str = 'examples'


def check(spec: Spec, clients_per_round: int, attack_fraction: float = 0.0
          ) -> None:
  """Refuses, before tracing, what no round can run; warns where the
  guarantee of ``spec.name`` does not hold for ``attack_fraction``."""
  if spec.name not in RULES:
    raise ValueError(f'unknown aggregator.name {spec.name!r}; accepted: '
                     f'{", ".join(RULES)}.')
  if spec.pre not in PRE:
    raise ValueError(f'unknown aggregator.pre {spec.pre!r}; accepted: '
                     f'{", ".join(PRE)}.')
  if spec.weighting not in aggregators_lib.WEIGHTINGS:
    raise ValueError(f'unknown weighting {spec.weighting!r}; accepted: '
                     f'{", ".join(aggregators_lib.WEIGHTINGS)}.')
  if not (isinstance(spec.f, (int, np.integer)) and spec.f >= 0):
    raise ValueError(f'aggregator.f must be an integer >= 0 (the Byzantine '
                     f'clients per round the server assumes), got {spec.f!r}.')
  if spec.name == 'trimmed_mean' and not 0.0 <= spec.beta < 0.5:
    raise ValueError(
        f'aggregator.beta={spec.beta} for trimmed_mean must be in [0, 0.5): '
        'it cuts floor(beta m) values at each end of m, and beta >= 0.5 '
        'leaves none.')
  n = clients_per_round
  if spec.pre == 'bucketing':
    if spec.bucket_size < 1:
      raise ValueError(f'aggregator.bucket_size must be >= 1, got '
                       f'{spec.bucket_size}.')
    n = -(-n // spec.bucket_size)
  if spec.name in ('krum', 'multi_krum') and 2 * spec.f > n - 3:
    raise ValueError(
        f'aggregator.f={spec.f} is too large for {spec.name} over {n} '
        f'rows per round: Krum needs f <= (C - 3) / 2 = {(n - 3) / 2:g} '
        '(Blanchard et al. 2017: 2f + 2 < n), so that every score sums '
        'at least one honest distance.')
  if spec.pre == 'nnm' and spec.f >= clients_per_round:
    raise ValueError(f'aggregator.f={spec.f} leaves nearest-neighbour mixing '
                     f'no neighbours among {clients_per_round} clients.')
  if spec.name == 'multi_krum' and spec.multi_krum_m < 0:
    raise ValueError(f'aggregator.multi_krum_m must be >= 0 (0: m - f), got '
                     f'{spec.multi_krum_m}.')
  if spec.name in ('geometric_median', 'centered_clipping') and \
      spec.iterations < 1:
    raise ValueError(f'aggregator.iterations must be >= 1, got '
                     f'{spec.iterations}.')
  for key, v in (('nu', spec.nu), ('tau', spec.tau),
                 ('norm_bound', spec.norm_bound)):
    if not (math.isfinite(v) and v > 0):
      raise ValueError(f'aggregator.{key} must be a finite number > 0, got '
                       f'{v}.')
  if spec.name in HALF_BOUND and attack_fraction >= 0.5:
    warnings.warn(
        f'attack.fraction={attack_fraction} >= 0.5: {spec.name} is robust '
        'only while fewer than half the clients are Byzantine (f < 0.5); '
        'past that bound the malicious clients can set its output.',
        stacklevel=2)


# -- the buffer as a matrix --------------------------------------------------------


def flatten(buffer: Params) -> tuple[jax.Array, Callable[[jax.Array], Params]]:
  """``[n, ...]`` leaves -> ``x [n, D]`` float32 and ``unflatten([D])``."""
  leaves, tree = jax.tree.flatten(buffer)
  n = leaves[0].shape[0]
  shapes = [leaf.shape[1:] for leaf in leaves]
  dtypes = [leaf.dtype for leaf in leaves]
  sizes = [int(np.prod(s)) for s in shapes]
  x = jnp.concatenate(
      [leaf.reshape(n, -1).astype(jnp.float32) for leaf in leaves], axis=1)

  def unflatten(v):
    parts = jnp.split(v, np.cumsum(sizes)[:-1])
    return jax.tree.unflatten(tree, [p.reshape(s).astype(d) for p, s, d in
                                     zip(parts, shapes, dtypes)])

  return x, unflatten


def _count(valid):
  return jnp.sum(valid.astype(jnp.int32))


def sq_distances(x: jax.Array) -> jax.Array:
  """``[n, n]`` squared L2 distances from one Gram matmul (diagonal 0)."""
  sq = jnp.sum(x * x, axis=1)
  gram = jnp.matmul(x, x.T, precision=_HI)
  d = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d)


def weighted_mean(x, valid, weight=None):
  """The weighted mean of the valid rows; a row of weight 0 adds nothing,
  whatever it holds (0 x inf or NaN would be NaN in the matmul)."""
  w = valid.astype(jnp.float32) if weight is None else jnp.where(
      valid, weight.astype(jnp.float32), 0.0)
  x = jnp.where((w > 0)[:, None], x, 0.0)
  return jnp.matmul(w, x, precision=_HI) / jnp.maximum(jnp.sum(w), 1e-12)


def _largest(xt, valid, k: int):
  """``lax.top_k`` of each row of ``xt [D, n]`` over the valid columns:
  ``(values [D, k], column indices [D, k])``, ties by the lower index.
  On XLA:CPU this is ~3x faster than sorting the columns."""
  return jax.lax.top_k(jnp.where(valid[None, :], xt, -jnp.inf), k)


def coordinate_median(x, valid):
  """The coordinate-wise median of the valid rows of ``x [n, D]``: ``[D]``
  (the mean of the two middle values when ``m`` is even; 0 with no valid
  row). Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates", ICML 2018."""
  n = x.shape[0]
  m = _count(valid)
  top, _ = _largest(x.T, valid, n // 2 + 1)  # descending
  # ascending positions (m - 1) // 2 and m // 2 are descending m - 1 - them
  lo = jnp.clip(m - 1 - (m - 1) // 2, 0, n // 2)
  hi = jnp.clip(m - 1 - m // 2, 0, n // 2)
  out = 0.5 * (jax.lax.dynamic_index_in_dim(top, lo, 1, keepdims=False) +
               jax.lax.dynamic_index_in_dim(top, hi, 1, keepdims=False))
  return jnp.where(m > 0, out, 0.0)


def trimmed_mean(x, valid, beta: float):
  """The mean of the values left after cutting the ``b = floor(beta m)``
  largest and smallest of each coordinate. The cut values are found with
  ``top_k`` (at most ``floor(beta n)`` of them) and the kept ones summed
  as they are, so a huge attacker value cannot cancel the honest ones'
  precision; ties are cut in one total order (value, then index), so the
  two ends never cut the same value twice."""
  n = x.shape[0]
  m = _count(valid)
  # floor(beta m) for every m, on the host: the one count both the cut
  # and the divisor use (float32 on the device could round it up by one)
  cuts = np.floor(beta * np.arange(n + 1)).astype(np.int32)
  b = jnp.asarray(cuts)[m]
  k = int(cuts[n])
  keep = jnp.broadcast_to(valid[None, :], (x.shape[1], n))
  if k > 0:
    xt = x.T
    rows = jnp.arange(xt.shape[0])[:, None]
    use = jnp.broadcast_to(jnp.arange(k)[None, :] < b, (xt.shape[0], k))
    _, hi = _largest(xt, valid, k)
    # the smallest, ties to the higher index: top_k of -x, columns reversed
    _, lo = _largest(-xt[:, ::-1], valid[::-1], k)
    lo = n - 1 - lo
    cut = jnp.zeros(xt.shape, bool).at[rows, hi].set(use)
    cut = cut.at[rows, lo].max(use)
    keep = keep & ~cut
  total = jnp.sum(jnp.where(keep, x.T, 0.0), axis=1)
  return total / jnp.maximum(m - 2 * b, 1).astype(jnp.float32)


def krum_scores(x, valid, f: int):
  """Each valid row's sum of squared distances to its ``m - f - 2``
  nearest other valid rows (at least 1); invalid rows score inf."""
  n = x.shape[0]
  m = _count(valid)
  d = sq_distances(x)
  other = valid[None, :] & valid[:, None] & ~jnp.eye(n, dtype=bool)
  # a message whose norm overflows (or NaN) is infinitely far from all
  d = jnp.sort(jnp.where(other & ~jnp.isnan(d), d, jnp.inf), axis=1)
  k = jnp.clip(m - f - 2, 1, jnp.maximum(m - 1, 1))
  near = jnp.arange(n)[None, :] < k
  scores = jnp.sum(jnp.where(near, d, 0.0), axis=1)
  scores = jnp.where(m <= 1, 0.0, scores)  # a lone client has no neighbour
  return jnp.where(valid, scores, jnp.inf)


def multi_krum(x, valid, f: int, q: int = 0):
  """Mean of the ``q`` rows of lowest Krum score (``q = 0``: ``m - f``);
  ``q = 1`` is Krum. Returns ``(aggregate, selected [n] bool)``."""
  m = _count(valid)
  scores = krum_scores(x, valid, f)
  rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
  take = jnp.clip(m - f if q == 0 else q, 1, jnp.maximum(m, 1))
  selected = valid & (rank < take)
  return weighted_mean(x, selected), selected


def geometric_median(x, valid, iterations: int, nu: float):
  """RFA's smoothed Weiszfeld, from the mean, ``iterations`` steps."""
  w0 = valid.astype(jnp.float32)

  def step(_, v):
    dist = jnp.sqrt(jnp.sum(jnp.square(x - v[None]), axis=1))
    beta = w0 / jnp.maximum(nu, dist)
    return jnp.matmul(beta, x, precision=_HI) / jnp.maximum(jnp.sum(beta),
                                                            1e-30)

  return jax.lax.fori_loop(0, iterations, step, weighted_mean(x, valid))


def centered_clipping(x, valid, center, iterations: int, tau: float):
  """Centered clipping (Karimireddy, He and Jaggi, "Learning from History
  for Byzantine Robust Optimization", ICML 2021): from ``center [D]`` (the
  previous aggregate), ``iterations`` times ``v <- v + mean_i clip_tau(x_i -
  v)`` over the valid rows of ``x [n, D]``; returns ``v [D]``."""
  m = jnp.maximum(_count(valid), 1).astype(jnp.float32)

  def step(_, v):
    diff = x - v[None]
    norm = jnp.sqrt(jnp.sum(jnp.square(diff), axis=1))
    scale = jnp.where(valid, jnp.minimum(1.0, tau / jnp.maximum(norm, 1e-30)),
                      0.0)
    return v + jnp.matmul(scale, diff, precision=_HI) / m

  return jax.lax.fori_loop(0, iterations, step, center)


def norm_bound(x, valid, bound: float, weight=None):
  """Norm bounding (Sun et al., "Can You Really Backdoor Federated
  Learning?", 2019): every valid row of ``x [n, D]`` clipped to L2 norm
  ``bound``, then their `weighted_mean` with ``weight [n]`` (None:
  uniform); ``[D]``."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=1))
  clipped = x * jnp.minimum(1.0, bound / jnp.maximum(norm, 1e-30))[:, None]
  return weighted_mean(clipped, valid, weight)


def nearest_neighbor_mixing(x, valid, f: int):
  """Each row -> the mean of its ``m - f`` nearest valid rows (itself
  first); invalid rows stay invalid."""
  n = x.shape[0]
  m = _count(valid)
  d = jnp.where(valid[None, :], sq_distances(x), jnp.inf)
  d = jnp.where(jnp.eye(n, dtype=bool), -1.0, d)  # itself first
  rank = jnp.argsort(jnp.argsort(d, axis=1, stable=True), axis=1,
                     stable=True)
  q = jnp.maximum(m - f, 1)
  w = ((rank < q) & valid[None, :]).astype(jnp.float32)
  mixed = jnp.matmul(w, x, precision=_HI) / jnp.maximum(
      jnp.sum(w, axis=1, keepdims=True), 1.0)
  return jnp.where(valid[:, None], mixed, x), valid


def bucketing(x, valid, size: int, key):
  """The valid rows shuffled by ``key``, averaged in buckets of ``size``:
  ``[ceil(n / size), D]`` and the buckets' mask."""
  n = x.shape[0]
  m = _count(valid)
  order = jnp.argsort(jnp.where(valid, jax.random.uniform(key, (n,)), 2.0),
                      stable=True)
  position = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n))
  nb = -(-n // size)
  bucket = jnp.where(valid, position // size, nb)
  onehot = (bucket[None, :] == jnp.arange(nb)[:, None]).astype(jnp.float32)
  means = jnp.matmul(onehot, x, precision=_HI) / jnp.maximum(
      jnp.sum(onehot, axis=1, keepdims=True), 1.0)
  return means, jnp.arange(nb) < -(-m // size)


# -- the aggregator --------------------------------------------------------------


def robust_aggregate(spec: Spec, x, valid, weight, state, key):
  """``spec``'s rule (after its pre-aggregator) on ``x [n, D]``; returns
  ``(aggregate [D], new state, metrics, selected [n] or None)``."""
  selected = None
  w = weight
  if spec.pre == 'nnm':
    x, valid = nearest_neighbor_mixing(x, valid, spec.f)
  elif spec.pre == 'bucketing':
    x, valid = bucketing(x, valid, spec.bucket_size, key)
    w = None
  name = spec.name
  if name == 'mean':
    v = weighted_mean(x, valid, w)
  elif name == 'median':
    v = coordinate_median(x, valid)
  elif name == 'trimmed_mean':
    v = trimmed_mean(x, valid, spec.beta)
  elif name in ('krum', 'multi_krum'):
    v, selected = multi_krum(x, valid, spec.f,
                             1 if name == 'krum' else spec.multi_krum_m)
  elif name == 'geometric_median':
    v = geometric_median(x, valid, spec.iterations, spec.nu)
  elif name == 'centered_clipping':
    v = centered_clipping(x, valid, state, spec.iterations, spec.tau)
    state = v
  else:  # norm_bound
    v = norm_bound(x, valid, spec.norm_bound, w)
  if spec.pre != 'none':
    selected = None  # rows are no longer clients
  return v, state, {}, selected


def aggregator(spec: Spec, attack=None) -> aggregators_lib.Aggregator:
  """The `aggregators.Aggregator` (``needs='all'``) of ``spec``.

  ``attack(x, valid, ids, key) -> (x, malicious [n] bool)``, where given,
  says which rows of the id-sorted buffer are malicious clients' and
  rewrites them where the attack sees the honest messages (ALIE, IPM:
  `attacks.in_round`), before the rule; ``malicious`` feeds the ``attack/``
  metrics.
  """

  def init(params):
    if spec.name == 'centered_clipping':
      return jnp.zeros((sum(int(np.prod(p.shape)) for p in
                            jax.tree.leaves(params)),), jnp.float32)
    return ()

  def finalize(sums, state, key):
    ids = sums['buffer_id'] - 1  # 0: an empty slot
    weight = sums['buffer_weight']
    valid = (weight > 0) & (ids >= 0)
    order = jnp.argsort(jnp.where(valid, ids, jnp.iinfo(jnp.int32).max),
                        stable=True)
    buffer = jax.tree.map(lambda b: b[order], sums['message'])
    ids, weight, valid = ids[order], weight[order], valid[order]
    x, unflatten = flatten(buffer)
    malicious = None
    if attack is not None:
      x, malicious = attack(x, valid, ids, jax.random.fold_in(key, 1))
    v, state, metrics, selected = robust_aggregate(
        spec, x, valid, weight, state, jax.random.fold_in(key, 0))
    # what the server sees of the messages (after any attack): their norms
    norms = jnp.sqrt(jnp.sum(jnp.square(x), axis=1))
    metrics['robust/client_norm_median'] = coordinate_median(
        norms[:, None], valid)[0]
    metrics['robust/client_norm_max'] = jnp.max(jnp.where(valid, norms, 0.0))
    if malicious is not None:
      metrics['attack/malicious_clients'] = jnp.sum(malicious & valid)
      if selected is not None:  # Krum: how much of the aggregate they own
        metrics['attack/malicious_selected_fraction'] = jnp.sum(
            selected & malicious) / jnp.maximum(jnp.sum(selected), 1)
    return unflatten(v), state, metrics

  return aggregators_lib.Aggregator(init, finalize, weighting=spec.weighting,
                                    needs='all', name=spec.name)


def from_config(config, clients_per_round: int, weighting: str) -> Spec:
  """The `Spec` of ``config.aggregator`` (``f = -1``: the expected number of
  malicious clients per round, ``ceil(attack.fraction * clients_per_round)``)."""
  a = config.aggregator
  f = int(a.f)
  if f < 0:
    f = int(math.ceil(float(config.attack.fraction) * clients_per_round -
                      1e-9))
  return Spec(name=str(a.name), pre=str(a.pre), f=f, beta=float(a.beta),
              multi_krum_m=int(a.multi_krum_m), iterations=int(a.iterations),
              nu=float(a.nu), tau=float(a.tau),
              norm_bound=float(a.norm_bound), bucket_size=int(a.bucket_size),
              weighting=weighting)
