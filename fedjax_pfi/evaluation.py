"""Evaluation vmapped over clients: pooled metrics and per-client distributions.

A researcher needs both numbers: the global model's accuracy on all pooled
test examples, and the distribution of per-client accuracy (mean, median,
10th/90th percentile, worst client, standard deviation), which shows the
clients an average hides.

Shared (global) params: every client's examples go through the model in one
flat pass of fixed-size batches over the pooled rows, and per-client sums are
segment sums by client. This is exactly what ``vmap`` over clients with the
params at ``in_axes=None`` computes, without padding each client to a batch
(on the Shakespeare test split this took 10 s instead of 63 s; BUILD_NOTES.md).

Personal params (a leading client axis): clients are sorted by size and
evaluated in fixed-size chunks, each stacked to ``[clients, steps, batch]``
with power-of-two batches and step buckets and vmapped with the personal params at
``in_axes=0``. A shared part (a frozen foundation model, the global adapters)
can go beside them unbatched (``in_axes=None``) and ``combine(shared,
personal_i)`` builds client ``i``'s params inside the program, so the shared
part is never copied per client.
Either way the number of compilations is bounded by a few shapes.

Beside the per-client sums, every path returns each example's results
(``ClientMetrics.rows``: the trust report's paired tests), calibration sums
(``confidence``) and, on request, every client's model on shared probe
examples (``probes``: a base task, canary candidates; `Probe`).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi import client_store
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.models import base


class RowStats(NamedTuple):
  """Per-example sums ``[..., n]``: summed loss, correct, count (the
  example's valid predictions). In a `ClientMetrics`, ``rows`` is aligned
  with the evaluated dataset's rows (client ``i``'s examples at
  ``offsets[i]:offsets[i + 1]``), and each probe's arrays are ``[clients,
  n]``: every client's model on the same probe examples."""
  loss_sum: np.ndarray
  correct: np.ndarray
  count: np.ndarray


class ClientMetrics(NamedTuple):
  """Per-client evaluation sums; arrays ``[num_evaluated_clients]``.

  The attributes beyond the sums (``rows``, ``confidence``, ``probes``,
  ``ndcg``) are None where an evaluation did not make them.

  Attributes:
    client_ids: int ``[clients]``: the evaluated clients.
    loss_sum: ``[clients]``: each client's summed loss.
    correct: ``[clients]``: its correct predictions (tokens for sequences).
    count: ``[clients]``: what ``loss_sum`` and ``correct`` are summed over
      (examples, or valid tokens).
    num_examples: ``[clients]``: its examples.
    rows: `RowStats` per example of the evaluated dataset, for paired tests
      between two models on the same examples.
    confidence: ``[clients, CONFIDENCE_BINS, 3]`` calibration sums
      (`base.calibration_sums`; None for models without class
      probabilities).
    probes: name -> `RowStats` ``[clients, n]``: each client's model on
      shared probe examples (a base task, canary candidates).
    ndcg: ``[clients]``: summed NDCG@k of each client's ranked lists, for
      models whose `base.ExampleStats` have it (the recommenders, where
      ``correct`` counts HR@k); None otherwise.
  """
  client_ids: np.ndarray
  loss_sum: np.ndarray
  correct: np.ndarray
  count: np.ndarray
  num_examples: np.ndarray
  rows: Optional[RowStats] = None
  confidence: Optional[np.ndarray] = None
  probes: Optional[Mapping[str, RowStats]] = None
  ndcg: Optional[np.ndarray] = None

  @property
  def accuracy(self) -> np.ndarray:
    """``correct / count`` per client, ``[clients]``."""
    return self.correct / np.maximum(self.count, 1)

  @property
  def loss(self) -> np.ndarray:
    """``loss_sum / count`` per client, ``[clients]``."""
    return self.loss_sum / np.maximum(self.count, 1)


class Probe(NamedTuple):
  """Shared probe examples in fixed batches: column -> ``[P, B, ...]`` and
  mask ``[P, B]``; every client's model is run on all of them."""
  batches: Mapping[str, np.ndarray]
  mask: np.ndarray
  size: int


PROBE_BATCH = 32


def make_probe(columns: Mapping[str, np.ndarray],
               batch_size: int = PROBE_BATCH) -> Probe:
  """`Probe` of ``columns`` (``[n, ...]`` each), padded to whole batches."""
  n = len(next(iter(columns.values())))
  if n == 0:
    raise ValueError('a probe needs at least one example.')
  p = -(-n // batch_size)
  rows = np.arange(p * batch_size)
  mask = rows < n
  rows = np.where(mask, rows, 0)
  return Probe({k: np.asarray(v)[rows].reshape((p, batch_size) +
                                               np.shape(v)[1:])
                for k, v in columns.items()},
               mask.reshape(p, batch_size), n)


def _masked(stats, m):
  return stats.loss_sum * m, stats.correct * m, stats.count * m


def client_sums(model: base.Model):
  """``sums(params, batches, mask, probes=None)`` of one client's stacked
  ``[S, B]`` batches: a dict of the summed ``loss_sum``, ``correct`` and
  ``count``, ``rows`` (each ``[S * B]``), ``confidence`` (``[bins, 3]``,
  where the model has it) and, for each `Probe` in ``probes``, its
  ``[P * B]`` per-example sums (``probes`` from `device_probes`; batches
  run one at a time by ``lax.map``,
  so a chunk of clients holds one probe batch's activations)."""

  def probe_rows(params, probe):  # probe: (batches, mask), `device_probes`
    def one(args):
      batch, mask = args
      stats = model.example_stats(params, batch, None, False)
      return _masked(stats, mask.astype(jnp.float32))
    out = jax.lax.map(one, tuple(probe))
    return tuple(o.reshape(-1) for o in out)

  def sums(params, batches, mask, probes=None):
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batches)
    stats = model.example_stats(params, flat, None, False)
    m = mask.reshape(-1).astype(jnp.float32)
    loss, correct, count = _masked(stats, m)
    out = {'loss_sum': jnp.sum(loss), 'correct': jnp.sum(correct),
           'count': jnp.sum(count), 'rows': (loss, correct, count)}
    if stats.confidence is not None:
      out['confidence'] = jnp.sum(stats.confidence * m[:, None, None], 0)
    if stats.ndcg is not None:
      out['ndcg'] = jnp.sum(stats.ndcg * m)
    if probes:
      out['probes'] = {k: probe_rows(params, p) for k, p in probes.items()}
    return out

  return sums


def device_probes(probes: Optional[Mapping[str, Probe]]):
  """What a program is given of each probe: name -> ``(batches, mask)``
  (None without probes)."""
  if not probes:
    return None
  return {k: (p.batches, p.mask) for k, p in probes.items()}


class ChunkResults:
  """Collects chunked per-client outputs of `client_sums` (vmapped) into a
  `ClientMetrics` over ``ds``: per-client sums, per-example rows in ``ds``
  row order, calibration sums and probe rows."""

  def __init__(self, ds: FederatedDataset,
               probes: Optional[Mapping[str, Probe]] = None):
    self.ds = ds
    self.sizes = {k: p.size for k, p in (probes or {}).items()}
    self.ids, self.sums, self.conf, self.ndcg = [], [], [], []
    self.rows = np.zeros([3, ds.num_examples], np.float64)
    self.probes = {k: [] for k in self.sizes}

  def add(self, chunk: np.ndarray, out: Mapping, mask: np.ndarray) -> None:
    """``out``: the vmapped outputs for ``chunk`` (first ``chunk.size``
    slots); ``mask``: the stacked ``[slots, S, B]`` example mask."""
    n = chunk.size
    out = jax.device_get(out)
    self.ids.append(chunk)
    self.sums.append(np.stack([np.asarray(out[k])[:n] for k in
                               ('loss_sum', 'correct', 'count')]))
    rows = np.stack([np.asarray(r)[:n] for r in out['rows']])
    flat = np.asarray(mask)[:n].reshape(n, -1)
    for j, c in enumerate(chunk):
      lo, hi = self.ds.offsets[c], self.ds.offsets[c + 1]
      got = rows[:, j, flat[j]]
      if got.shape[1] != hi - lo:
        raise AssertionError(f'client {c}: {got.shape[1]} evaluated rows, '
                             f'{hi - lo} in the dataset.')
      self.rows[:, lo:hi] = got
    if 'confidence' in out:
      self.conf.append(np.asarray(out['confidence'])[:n])
    if 'ndcg' in out:
      self.ndcg.append(np.asarray(out['ndcg'])[:n])
    for k, size in self.sizes.items():
      self.probes[k].append(np.stack(
          [np.asarray(r)[:n, :size] for r in out['probes'][k]]))

  def result(self) -> ClientMetrics:
    """The collected chunks as one `ClientMetrics`, clients in id order."""
    ids = np.concatenate(self.ids)
    order = np.argsort(ids)
    sums = np.concatenate(self.sums, axis=1)[:, order]
    conf = np.concatenate(self.conf)[order] if self.conf else None
    ndcg = np.concatenate(self.ndcg)[order] if self.ndcg else None
    probes = {k: RowStats(*np.concatenate(v, axis=1)[:, order])
              for k, v in self.probes.items()} or None
    return ClientMetrics(ids[order], *sums, self.ds.client_sizes[ids[order]],
                         RowStats(*self.rows), conf, probes, ndcg)


class Evaluator:
  """Evaluates params on a `FederatedDataset`, client by client.

  ``evaluate`` returns `ClientMetrics` (per-client sums ``[clients]``):
  shared params run over the pooled examples in one flat pass of
  ``batch_size`` batches, summed per client; personal params (a leading
  ``[num_clients]`` axis) run ``vmap``-ped over chunks of
  ``clients_per_chunk`` clients, stacked to ``[clients, steps, batch, ...]``
  (the module docstring says why both give the same numbers).

  Args:
    model: the evaluated model.
    batch_size: examples per batch (``B``).
    clients_per_chunk: clients per ``vmap``-ped chunk of personal
      evaluation.
    combine: ``(shared, personal_i) -> params`` for personal evaluation
      (default None: the personal params alone).
  """

  def __init__(self, model: base.Model, batch_size: int = 64,
               clients_per_chunk: int = 32, combine=None):
    self.batch_size = batch_size
    self.clients_per_chunk = clients_per_chunk
    sums = client_sums(model)
    combine = combine or (lambda shared, mine: mine)
    self._personal = jax.jit(jax.vmap(
        lambda shared, mine, b, m, probes: sums(combine(shared, mine), b, m,
                                                probes),
        in_axes=(None, 0, 0, 0, None)))

    def example_sums(params, batch, mask):
      stats = model.example_stats(params, batch, None, False)
      m = mask.astype(jnp.float32)
      return {'sums': _masked(stats, m),
              'confidence': (None if stats.confidence is None else
                             stats.confidence * m[:, None, None]),
              'ndcg': None if stats.ndcg is None else stats.ndcg * m}

    self._flat = jax.jit(example_sums)

  def _rows(self, params, columns, n):
    """Per-example sums ``[3, n]``, ``[n, bins, 3]`` calibration sums and
    ``[n]`` NDCG (each None where the model has none) of ``params`` on
    ``columns``, in fixed-size batches."""
    b = self.batch_size
    sums, conf, ndcg = np.zeros([3, n], np.float64), [], []
    for lo in range(0, n, b):
      rows = np.arange(lo, lo + b)
      mask = rows < n
      rows = np.where(mask, rows, 0)
      out = self._flat(params, {k: v[rows] for k, v in columns.items()},
                       mask)
      k = min(b, n - lo)
      sums[:, lo:lo + k] = np.stack(
          [np.asarray(o) for o in out['sums']])[:, :k]
      if out['confidence'] is not None:
        conf.append(np.asarray(out['confidence'], np.float64)[:k])
      if out['ndcg'] is not None:
        ndcg.append(np.asarray(out['ndcg'], np.float64)[:k])
    return (sums, np.concatenate(conf) if conf else None,
            np.concatenate(ndcg) if ndcg else None)

  def _evaluate_shared(self, params, ds: FederatedDataset, probes):
    """Per-client sums from one flat pass over the pooled examples."""
    sums, conf, ndcg = self._rows(params, ds.columns, ds.num_examples)
    owner = np.repeat(np.arange(ds.num_clients), ds.client_sizes)
    per_client = [np.bincount(owner, s, ds.num_clients) for s in sums]
    ids = np.flatnonzero(ds.client_sizes > 0)
    if ndcg is not None:
      ndcg = np.bincount(owner, ndcg, ds.num_clients)[ids]
    if conf is not None:  # rows are contiguous by client
      conf = np.add.reduceat(conf, ds.offsets[ids], axis=0)
    out = {k: RowStats(*(np.broadcast_to(a, (ids.size, a.shape[1]))
                         for a in r))
           for k, r in self.probe_rows(params, probes).items()}
    return ClientMetrics(ids, *(p[ids] for p in per_client),
                         ds.client_sizes[ids], RowStats(*sums), conf,
                         out or None, ndcg)

  def probe_rows(self, params, probes: Optional[Mapping[str, Probe]]
                 ) -> dict[str, RowStats]:
    """One model's per-example sums ``[1, n]`` on each `Probe`."""
    out = {}
    for k, p in (probes or {}).items():
      columns = {c: v.reshape((-1,) + v.shape[2:])[:p.size]
                 for c, v in p.batches.items()}
      rows, _, _ = self._rows(params, columns, p.size)
      out[k] = RowStats(*(r[None] for r in rows))
    return out

  def _chunks(self, ds: FederatedDataset, only=None):
    """Size-sorted chunks of clients (of ``only``, if given), each stacked
    to ``[clients, S, B]``.

    ``B`` is the power of two that holds the chunk's largest client, capped
    at ``batch_size``, and ``S`` a power of two: small clients are not padded
    to a large batch, and the shapes (hence compilations) stay few.
    """
    ids = np.flatnonzero(ds.client_sizes > 0)
    if only is not None:
      ids = np.intersect1d(ids, only)
    ids = ids[np.argsort(ds.client_sizes[ids], kind='stable')]
    for lo in range(0, ids.size, self.clients_per_chunk):
      chunk = ids[lo:lo + self.clients_per_chunk]
      largest = int(ds.client_sizes[chunk].max())
      b = min(self.batch_size, 1 << max(0, (largest - 1).bit_length()))
      yield chunk, cohort_lib.stack_eval(
          ds, chunk, batch_size=b, num_slots=self.clients_per_chunk,
          step_buckets=cohort_lib.power_of_two_buckets(-(-largest // b)))

  def evaluate(self, params: Any, ds: FederatedDataset,
               personal_params: Optional[Any] = None,
               probes: Optional[Mapping[str, Probe]] = None,
               only: Optional[np.ndarray] = None) -> ClientMetrics:
    """Per-client sums for every client of ``ds`` that has examples.

    Args:
      params: shared params; with ``personal_params``, the shared part that
        the evaluator's ``combine`` joins to each client's own (or None).
      personal_params: optional pytree with a leading ``[ds.num_clients]``
        axis: client ``i`` is evaluated with its own params; or a
        `fedjax_pfi.client_store` store whose ``gather(ids)`` gives a
        chunk's rows.
      probes: optional name -> `Probe`: every client's model also runs on
        these shared examples (`ClientMetrics.probes`).
      only: optional client indices: with ``personal_params``, evaluate
        these clients only (shared params evaluate everyone in one pass).
    """
    if not np.any(ds.client_sizes):
      raise ValueError('no client of this dataset has evaluation examples.')
    if personal_params is None:
      return self._evaluate_shared(params, ds, probes)
    results = ChunkResults(ds, probes)
    on_device = device_probes(probes)
    for chunk, stacked in self._chunks(ds, only):
      idx = np.zeros(self.clients_per_chunk, np.int64)
      idx[:chunk.size] = chunk
      mine = client_store.gather_rows(personal_params, idx)
      results.add(chunk, self._personal(params, mine, stacked.batches,
                                        stacked.mask, on_device),
                  stacked.mask)
    return results.result()


def select(results: Sequence[ClientMetrics], pick: np.ndarray,
           ds: FederatedDataset) -> ClientMetrics:
  """Each evaluated client's metrics from ``results[pick[j]]`` (evaluations
  of the same clients of ``ds`` by several models: clustered FL's models,
  retrieval's settings), its per-example rows and calibration sums too, so
  paired tests still apply."""
  ids = results[0].client_ids
  def take(f):
    return np.take_along_axis(np.stack([getattr(m, f) for m in results]),
                              pick[None], 0)[0]
  # each example by the model of its client's pick
  client_pick = np.zeros(ds.num_clients, np.int64)
  client_pick[ids] = pick
  row_pick = client_pick[np.repeat(np.arange(ds.num_clients),
                                   ds.client_sizes)]
  rows = RowStats(*(
      np.take_along_axis(np.stack([getattr(m.rows, f) for m in results]),
                         row_pick[None], 0)[0]
      for f in ('loss_sum', 'correct', 'count')))
  conf = None
  if results[0].confidence is not None:
    conf = np.stack([m.confidence for m in results])[pick,
                                                      np.arange(ids.size)]
  ndcg = take('ndcg') if results[0].ndcg is not None else None
  return ClientMetrics(ids, take('loss_sum'), take('correct'), take('count'),
                       results[0].num_examples, rows, conf, ndcg=ndcg)


def summarize(m: ClientMetrics, prefix: str = '') -> dict[str, float]:
  """Pooled metrics and the per-client accuracy/loss distribution.

  Args:
    m: per-client sums, arrays ``[clients]``.
    prefix: put before every key (``'test/'``).

  Returns:
    ``accuracy`` and ``loss`` over all pooled examples (or tokens);
    ``client_accuracy_mean``, ``_median``, ``_p10``, ``_p90``, ``_worst``
    and ``_std`` over clients, ``client_loss_mean``, and ``num_clients``.
    For ranking models (``m.ndcg`` set; ``accuracy`` is then HR@k) also
    ``ndcg`` (pooled over lists) and ``client_ndcg_mean``, ``_p10`` and
    ``_worst``.
  """
  acc = m.accuracy
  out = {
      'accuracy': float(m.correct.sum() / max(m.count.sum(), 1)),
      'loss': float(m.loss_sum.sum() / max(m.count.sum(), 1)),
      'client_accuracy_mean': float(acc.mean()),
      'client_accuracy_median': float(np.median(acc)),
      'client_accuracy_p10': float(np.percentile(acc, 10)),
      'client_accuracy_p90': float(np.percentile(acc, 90)),
      'client_accuracy_worst': float(acc.min()),
      'client_accuracy_std': float(acc.std()),
      'client_loss_mean': float(m.loss.mean()),
      'num_clients': int(acc.size),
  }
  if m.ndcg is not None:
    ndcg = m.ndcg / np.maximum(m.count, 1)
    out.update({'ndcg': float(m.ndcg.sum() / max(m.count.sum(), 1)),
                'client_ndcg_mean': float(ndcg.mean()),
                'client_ndcg_p10': float(np.percentile(ndcg, 10)),
                'client_ndcg_worst': float(ndcg.min())})
  return {prefix + k: v for k, v in out.items()}


def majority_baseline(train: FederatedDataset, test: FederatedDataset,
                      pad_id: Optional[int] = None) -> float:
  """Accuracy on ``test`` of always predicting ``train``'s most frequent label
  (the most frequent character, for next-character prediction)."""
  y_train = np.asarray(train.columns['y']).reshape(-1)
  y_test = np.asarray(test.columns['y']).reshape(-1)
  if pad_id is not None:
    y_train = y_train[y_train != pad_id]
    y_test = y_test[y_test != pad_id]
  top = np.bincount(y_train).argmax()
  return float(np.mean(y_test == top))


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Scalar entries of a metrics dict as Python floats (drops arrays)."""
  out = {}
  for k, v in metrics.items():
    a = np.asarray(v)
    if a.ndim == 0:
      out[k] = float(a)
  return out
