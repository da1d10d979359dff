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
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.models import base


class ClientMetrics(NamedTuple):
  """Per-client evaluation sums; arrays ``[num_evaluated_clients]``."""
  client_ids: np.ndarray
  loss_sum: np.ndarray
  correct: np.ndarray
  count: np.ndarray
  num_examples: np.ndarray

  @property
  def accuracy(self) -> np.ndarray:
    return self.correct / np.maximum(self.count, 1)

  @property
  def loss(self) -> np.ndarray:
    return self.loss_sum / np.maximum(self.count, 1)


def client_sums(model: base.Model):

  def sums(params, batches, mask):
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batches)
    stats = model.example_stats(params, flat, None, False)
    m = mask.reshape(-1).astype(jnp.float32)
    return (jnp.sum(stats.loss_sum * m), jnp.sum(stats.correct * m),
            jnp.sum(stats.count * m))

  return sums


class Evaluator:
  """Evaluates params on a `FederatedDataset`, client by client.

  Args:
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
        lambda shared, mine, b, m: sums(combine(shared, mine), b, m),
        in_axes=(None, 0, 0, 0)))

    def example_sums(params, batch, mask):
      stats = model.example_stats(params, batch, None, False)
      m = mask.astype(jnp.float32)
      return stats.loss_sum * m, stats.correct * m, stats.count * m

    self._flat = jax.jit(example_sums)

  def _evaluate_shared(self, params, ds: FederatedDataset):
    """Per-client sums from one flat pass over the pooled examples."""
    n, b = ds.num_examples, self.batch_size
    sums = np.zeros([3, n], np.float64)
    for lo in range(0, n, b):
      rows = np.arange(lo, lo + b)
      mask = rows < n
      rows = np.where(mask, rows, 0)
      batch = {k: v[rows] for k, v in ds.columns.items()}
      out = self._flat(params, batch, mask)
      sums[:, lo:min(lo + b, n)] = np.stack([np.asarray(o) for o in out])[
          :, :min(b, n - lo)]
    owner = np.repeat(np.arange(ds.num_clients), ds.client_sizes)
    per_client = [np.bincount(owner, s, ds.num_clients) for s in sums]
    ids = np.flatnonzero(ds.client_sizes > 0)
    return ClientMetrics(ids, *(p[ids] for p in per_client),
                         ds.client_sizes[ids])

  def _chunks(self, ds: FederatedDataset):
    """Size-sorted chunks of clients, each stacked to ``[clients, S, B]``.

    ``B`` is the power of two that holds the chunk's largest client, capped
    at ``batch_size``, and ``S`` a power of two: small clients are not padded
    to a large batch, and the shapes (hence compilations) stay few.
    """
    ids = np.flatnonzero(ds.client_sizes > 0)
    ids = ids[np.argsort(ds.client_sizes[ids], kind='stable')]
    for lo in range(0, ids.size, self.clients_per_chunk):
      chunk = ids[lo:lo + self.clients_per_chunk]
      largest = int(ds.client_sizes[chunk].max())
      b = min(self.batch_size, 1 << max(0, (largest - 1).bit_length()))
      yield chunk, cohort_lib.stack_eval(
          ds, chunk, batch_size=b, num_slots=self.clients_per_chunk,
          step_buckets=cohort_lib.power_of_two_buckets(-(-largest // b)))

  def evaluate(self, params: Any, ds: FederatedDataset,
               personal_params: Optional[Any] = None) -> ClientMetrics:
    """Per-client sums for every client of ``ds`` that has examples.

    Args:
      params: shared params; with ``personal_params``, the shared part that
        the evaluator's ``combine`` joins to each client's own (or None).
      personal_params: optional pytree with a leading ``[ds.num_clients]``
        axis: client ``i`` is evaluated with its own params.
    """
    if not np.any(ds.client_sizes):
      raise ValueError('no client of this dataset has evaluation examples.')
    if personal_params is None:
      return self._evaluate_shared(params, ds)
    parts = []
    for chunk, stacked in self._chunks(ds):
      idx = np.zeros(self.clients_per_chunk, np.int64)
      idx[:chunk.size] = chunk
      mine = jax.tree.map(lambda p: p[idx], personal_params)
      out = self._personal(params, mine, stacked.batches, stacked.mask)
      out = [np.asarray(o)[:chunk.size] for o in out]
      parts.append((chunk, *out))
    ids, loss_sum, correct, count = (np.concatenate(p) for p in zip(*parts))
    order = np.argsort(ids)
    return ClientMetrics(ids[order], loss_sum[order], correct[order],
                         count[order], ds.client_sizes[ids[order]])


def summarize(m: ClientMetrics, prefix: str = '') -> dict[str, float]:
  """Pooled metrics and the per-client accuracy/loss distribution."""
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
