"""Each client's retrieval store, built from its own training split.

- `knn_store`: one row per valid training position: the frozen model's
  hidden state there (``keys``) and the token that followed (``values``).
- `chunk_store`: the training windows cut into ``chunk_len``-token chunks
  (whole chunks of real tokens only), keyed by mean-pooled hidden states of
  the chunk read alone (``keys``), with their tokens (``tokens``).

Both return a `client_store.RaggedStore` in the dataset's client order. The
store never leaves its client: nothing of it is uploaded or downloaded.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi import client_store
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.models import base

KINDS = ('knn_lm', 'in_context')


def _batched(fn, arrays, batch_size: int):
  """``fn`` over the leading axis in fixed-size batches (one compile)."""
  n = len(arrays[0])
  outs = []
  for lo in range(0, n, batch_size):
    rows = np.arange(lo, lo + batch_size)
    rows = np.where(rows < n, rows, 0)
    got = np.asarray(fn(*(a[rows] for a in arrays)))
    outs.append(got[:min(batch_size, n - lo)])
  return np.concatenate(outs) if outs else None


def knn_store(retriever: base.Model, params, ds: FederatedDataset,
              pad_id: Optional[int], *, batch_size: int = 256,
              directory: Optional[str] = None, on_device: bool = False
              ) -> client_store.RaggedStore:
  """Keys ``[n, d]`` float32 and values ``[n]`` int32 per client."""
  x, y = np.asarray(ds.columns['x']), np.asarray(ds.columns['y'])
  feats = jax.jit(lambda xb: retriever.features(params, xb))
  d = int(jax.eval_shape(feats, jnp.zeros((1, x.shape[1]), x.dtype)).shape[-1])
  valid = np.ones(y.shape, bool) if pad_id is None else y != pad_id
  parts = []
  for c in range(ds.num_clients):
    lo, hi = ds.offsets[c], ds.offsets[c + 1]
    if hi == lo:
      parts.append({'keys': np.zeros((0, d), np.float32),
                    'values': np.zeros((0,), np.int32)})
      continue
    h = _batched(feats, (x[lo:hi],), batch_size)
    v = valid[lo:hi]
    parts.append({'keys': h[v].astype(np.float32),
                  'values': y[lo:hi][v].astype(np.int32)})
  columns, offsets = client_store.concat_ragged(parts, directory)
  return client_store.RaggedStore(columns, offsets, on_device=on_device)


def chunks_of(x: np.ndarray, chunk_len: int, pad_id: Optional[int]
              ) -> np.ndarray:
  """``[m, chunk_len]``: each window's non-overlapping whole chunks that
  hold no padding, in order."""
  if chunk_len > x.shape[1]:
    raise ValueError(f'retrieval.chunk_len={chunk_len} exceeds the windows\' '
                     f'{x.shape[1]} tokens.')
  per = x.shape[1] // chunk_len
  c = x[:, :per * chunk_len].reshape(-1, chunk_len)
  if pad_id is not None:
    c = c[np.all(c != pad_id, 1)]
  return c


def chunk_store(retriever: base.Model, params, ds: FederatedDataset,
                pad_id: Optional[int], chunk_len: int, *,
                batch_size: int = 256, directory: Optional[str] = None,
                on_device: bool = False) -> client_store.RaggedStore:
  """Keys ``[m, d]`` (mean-pooled hidden states) and tokens ``[m,
  chunk_len]`` per client."""
  x = np.asarray(ds.columns['x'])
  emb = jax.jit(lambda t: jnp.mean(retriever.features(params, t), 1))
  d = int(jax.eval_shape(emb, jnp.zeros((1, chunk_len), x.dtype)).shape[-1])
  parts = []
  for c in range(ds.num_clients):
    tokens = chunks_of(x[ds.offsets[c]:ds.offsets[c + 1]], chunk_len, pad_id)
    keys = (_batched(emb, (tokens,), batch_size) if len(tokens) else
            np.zeros((0, d), np.float32))
    parts.append({'keys': keys.astype(np.float32),
                  'tokens': tokens.astype(np.int32)})
  columns, offsets = client_store.concat_ragged(parts, directory)
  return client_store.RaggedStore(columns, offsets, on_device=on_device)
