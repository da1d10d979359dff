"""Where per-client state lives: on the device, or on the host.

A client store holds rows for every client of a population and hands a
cohort (or an evaluation chunk) its rows: ``gather(ids)`` returns a pytree of
``[len(ids), ...]`` arrays that travel with the cohort like its batches, and
``scatter(ids, rows, write)`` puts updated rows back. Padded slots (id -1)
read zeros and are never written.

- `DeviceStore`: a dense pytree ``[num_clients, ...]`` of device arrays
  (`fedjax_pfi.algorithms.store`, what a round's ``ServerState`` holds).
- `HostStore`: the same rows in numpy, memory-mapped from a directory when
  large, so a population's adapters need not fit on the accelerator.
- `RaggedStore`: clients with different numbers of rows (a retrieval
  store: one row per stored context), kept flat ``[total, ...]`` with
  ``offsets``; ``gather`` pads a chunk's clients to a power of two and adds
  a ``valid`` mask. ``on_device=True`` keeps the padded arrays on the device
  instead; both give identical arrays, hence identical results.

A `RaggedStore` saves to and loads from a directory (``save`` writes to a
temporary directory and renames it, so a crash leaves the old copy); a
dense store's ``rows`` (a pytree) are checkpointed with the server state.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi.algorithms import store

# Host arrays of more bytes than this are memory-mapped files.
MEMMAP_BYTES = 1 << 30


def _file_array(directory: Optional[str], name: str, shape, dtype,
                memmap_bytes: int) -> np.ndarray:
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  if directory is None or nbytes <= memmap_bytes:
    return np.zeros(shape, dtype)
  os.makedirs(directory, exist_ok=True)
  return np.lib.format.open_memmap(os.path.join(directory, name + '.npy'),
                                   mode='w+', dtype=dtype, shape=tuple(shape))


def _save_arrays(directory: str, arrays: Mapping[str, np.ndarray],
                 meta: Mapping[str, Any]) -> None:
  tmp = directory.rstrip('/') + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for k, v in arrays.items():
    np.save(os.path.join(tmp, k + '.npy'), np.asarray(v))
  with open(os.path.join(tmp, 'store.json'), 'w') as f:
    json.dump(dict(meta, arrays=sorted(arrays)), f)
  old = directory.rstrip('/') + '.old'
  shutil.rmtree(old, ignore_errors=True)
  if os.path.exists(directory):
    os.rename(directory, old)
  os.rename(tmp, directory)
  shutil.rmtree(old, ignore_errors=True)


def _load_arrays(directory: str, mmap: bool) -> tuple[dict, dict]:
  path = os.path.join(directory, 'store.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no client store in {directory!r} '
                            '(store.json is missing).')
  with open(path) as f:
    meta = json.load(f)
  arrays = {k: np.load(os.path.join(directory, k + '.npy'),
                       mmap_mode='r' if mmap else None)
            for k in meta['arrays']}
  return arrays, meta


def _padded_ids(ids, num_clients: int) -> np.ndarray:
  ids = np.asarray(ids, np.int64)
  if np.any(ids >= num_clients) or np.any(ids < -1):
    raise IndexError(f'client ids must be in [-1, {num_clients}), got '
                     f'{ids[(ids >= num_clients) | (ids < -1)][:5].tolist()}.')
  return ids


class DeviceStore:
  """Rows of a dense pytree ``[num_clients, ...]`` on the device."""

  def __init__(self, rows: Any):
    self.rows = rows
    self.num_clients = int(jax.tree.leaves(rows)[0].shape[0])

  def gather(self, ids) -> Any:
    """Rows of ``ids`` (int ``[k]``; -1: a padded slot, zeros): a pytree of
    ``[k, ...]`` arrays."""
    ids = jnp.asarray(_padded_ids(ids, self.num_clients))
    return jax.tree.map(
        lambda s: jnp.where((ids >= 0).reshape((-1,) + (1,) * (s.ndim - 1)),
                            s[jnp.maximum(ids, 0)], 0), self.rows)

  def scatter(self, ids, rows: Any, write=None) -> None:
    """Writes ``rows`` (leaves ``[k, ...]``) to the clients ``ids`` where
    ``write`` (bool ``[k]``; default all) and the id is not -1."""
    ids = _padded_ids(ids, self.num_clients)
    write = np.ones(ids.shape, bool) if write is None else np.asarray(write)
    self.rows = store.scatter(self.rows, jnp.asarray(ids), rows,
                              jnp.asarray(write))

  def state(self) -> Any:
    """The whole store, a pytree of ``[num_clients, ...]`` arrays."""
    return self.rows


class HostStore:
  """Rows of a dense pytree ``[num_clients, ...]`` in host memory (numpy;
  leaves of more than ``memmap_bytes`` are memory-mapped files under
  ``directory``)."""

  def __init__(self, rows: Any, directory: Optional[str] = None,
               memmap_bytes: int = MEMMAP_BYTES):
    def host(path, v):
      v = np.asarray(v)
      name = jax.tree_util.keystr(path).strip("[]'").replace("']['", '.')
      out = _file_array(directory, name or 'leaf', v.shape, v.dtype,
                        memmap_bytes)
      out[...] = v
      return out
    self.rows = jax.tree_util.tree_map_with_path(host, rows)
    self.num_clients = int(jax.tree.leaves(self.rows)[0].shape[0])

  def gather(self, ids) -> Any:
    """Rows of ``ids`` (int ``[k]``; -1: a padded slot, zeros): a pytree of
    ``[k, ...]`` arrays."""
    ids = _padded_ids(ids, self.num_clients)
    keep = ids >= 0
    return jax.tree.map(
        lambda s: np.where(keep.reshape((-1,) + (1,) * (s.ndim - 1)),
                           s[np.maximum(ids, 0)], 0).astype(s.dtype),
        self.rows)

  def scatter(self, ids, rows: Any, write=None) -> None:
    """Writes ``rows`` (leaves ``[k, ...]``) to the clients ``ids`` where
    ``write`` (bool ``[k]``; default all) and the id is not -1."""
    ids = _padded_ids(ids, self.num_clients)
    write = (ids >= 0) if write is None else (np.asarray(write) & (ids >= 0))
    for s, v in zip(jax.tree.leaves(self.rows), jax.tree.leaves(rows)):
      s[ids[write]] = np.asarray(v)[write]

  def state(self) -> Any:
    """The whole store, a pytree of ``[num_clients, ...]`` arrays."""
    return self.rows


def gather_rows(personal: Any, ids) -> Any:
  """Rows ``ids`` of a per-client store: a host store's own ``gather``, or
  the rows of a pytree of ``[num_clients, ...]`` arrays (what evaluation
  and `fedjax_pfi.personality.catalogue_scores` read a chunk's clients
  with)."""
  if hasattr(personal, 'gather'):
    return personal.gather(ids)
  return jax.tree.map(lambda p: p[ids], personal)


def next_pow2(n: int) -> int:
  """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
  return 1 << max(0, int(n) - 1).bit_length()


#: Padded row counts are powers of two up to this, then its multiples (a
#: few shapes to compile, and at most this many padded rows per large
#: client).
ROW_BLOCK = 4096


def padded_rows(n: int) -> int:
  """The rows a client of ``n`` rows is padded to: the next power of two up
  to `ROW_BLOCK`, then the next multiple of `ROW_BLOCK`."""
  n = max(int(n), 1)
  return next_pow2(n) if n <= ROW_BLOCK else -(-n // ROW_BLOCK) * ROW_BLOCK


class RaggedStore:
  """Per-client rows of different counts: ``columns`` name -> ``[total,
  ...]``, client ``i``'s rows at ``offsets[i]:offsets[i + 1]``.

  ``gather(ids)`` returns each column ``[len(ids), N, ...]`` and ``valid``
  ``[len(ids), N]``, with ``N`` the `padded_rows` (a power of two up to
  ``ROW_BLOCK``, then a multiple of it; at least ``min_rows``) that holds
  the largest of these clients. With
  ``on_device``, the population's padded arrays live on the device and a
  gather slices them there (identical values).
  """

  def __init__(self, columns: Mapping[str, np.ndarray], offsets: np.ndarray,
               *, on_device: bool = False, min_rows: int = 1):
    offsets = np.asarray(offsets, np.int64)
    if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or np.any(
        np.diff(offsets) < 0):
      raise ValueError('offsets must be [num_clients + 1], from 0, '
                       f'non-decreasing; got {offsets[:8].tolist()}...')
    for k, v in columns.items():
      if len(v) != offsets[-1]:
        raise ValueError(f'column {k!r} has {len(v)} rows; offsets say '
                         f'{offsets[-1]}.')
    self.columns = dict(columns)
    self.offsets = offsets
    self.sizes = np.diff(offsets)
    self.num_clients = self.sizes.size
    self.min_rows = int(min_rows)
    self.on_device = bool(on_device)
    self._device = None

  def bytes_per_client(self) -> np.ndarray:
    """``[num_clients]``: each client's stored bytes (unpadded)."""
    row = sum(v[0].nbytes if len(v) else np.dtype(v.dtype).itemsize *
              int(np.prod(v.shape[1:])) for v in self.columns.values())
    return self.sizes * row

  def _dense(self):
    if self._device is None:  # the population padded once, on the device
      n = padded_rows(max(int(self.sizes.max()), self.min_rows))
      ids = np.arange(self.num_clients)
      self._device = jax.device_put(self._host_gather(ids, n))
    return self._device

  def _host_gather(self, ids: np.ndarray, n: int) -> dict:
    out = {}
    keep = ids >= 0
    sizes = np.where(keep, self.sizes[np.maximum(ids, 0)], 0)
    valid = np.arange(n)[None, :] < sizes[:, None]
    rows = np.where(valid, self.offsets[np.maximum(ids, 0)][:, None] +
                    np.arange(n)[None, :], 0)
    for k, v in self.columns.items():
      got = np.asarray(v[rows.reshape(-1)]).reshape((ids.size, n) +
                                                    v.shape[1:])
      mask = valid.reshape(valid.shape + (1,) * (got.ndim - 2))
      out[k] = np.where(mask, got, 0).astype(v.dtype)
    out['valid'] = valid
    return out

  def rows_for(self, ids) -> int:
    """The padded row count ``N`` a gather of ``ids`` returns."""
    ids = _padded_ids(ids, self.num_clients)
    largest = int(self.sizes[ids[ids >= 0]].max()) if np.any(ids >= 0) else 0
    return padded_rows(max(largest, self.min_rows))

  def gather(self, ids) -> dict:
    """Rows of ``ids`` (int ``[k]``; -1: a padded slot): each column ``[k,
    N, ...]`` and ``valid`` bool ``[k, N]``, ``N`` = `rows_for` ``(ids)``;
    rows past a client's count are zeros."""
    ids = _padded_ids(ids, self.num_clients)
    n = self.rows_for(ids)
    if not self.on_device:
      return self._host_gather(ids, n)
    dense = self._dense()
    idx = jnp.asarray(np.maximum(ids, 0))
    keep = jnp.asarray(ids >= 0)
    def take(v):
      got = v[idx, :n]
      return jnp.where(keep.reshape((-1,) + (1,) * (got.ndim - 1)), got,
                       jnp.zeros((), got.dtype))
    return {k: take(v) for k, v in dense.items()}

  def add(self, client: int, rows: Mapping[str, np.ndarray]) -> None:
    """Appends ``rows`` (each column ``[m, ...]``) to ``client``'s rows: a
    client's new text enters its store without any training."""
    self.extend({client: rows})

  def extend(self, new: Mapping[int, Mapping[str, np.ndarray]]) -> None:
    """`add` for several clients at once: one copy of the columns, not
    one per client."""
    counts = np.zeros(self.num_clients, np.int64)
    for client, rows in new.items():
      if set(rows) != set(self.columns):
        raise ValueError(f'rows have columns {sorted(rows)}; the store has '
                         f'{sorted(self.columns)}.')
      m = {len(v) for v in rows.values()}
      if len(m) != 1:
        raise ValueError(f'columns of the new rows differ in length: {m}.')
      for k, v in rows.items():
        if np.shape(v)[1:] != self.columns[k].shape[1:]:
          raise ValueError(f'column {k!r}: new rows of shape '
                           f'{np.shape(v)[1:]}, the store\'s are '
                           f'{self.columns[k].shape[1:]}.')
      counts[client] = m.pop()
    offsets = np.concatenate([[0], np.cumsum(self.sizes + counts)])
    for k, col in self.columns.items():
      out = np.empty((int(offsets[-1]),) + col.shape[1:], col.dtype)
      for c in range(self.num_clients):
        lo = offsets[c]
        out[lo:lo + self.sizes[c]] = col[self.offsets[c]:self.offsets[c + 1]]
        if counts[c]:
          out[lo + self.sizes[c]:offsets[c + 1]] = np.asarray(new[c][k],
                                                              col.dtype)
      self.columns[k] = out
    self.offsets = offsets
    self.sizes = np.diff(offsets)
    self._device = None

  def copy(self) -> 'RaggedStore':
    """A copy whose columns are new arrays (in memory)."""
    return RaggedStore({k: np.array(v) for k, v in self.columns.items()},
                       self.offsets.copy(), on_device=self.on_device,
                       min_rows=self.min_rows)

  def save(self, directory: str, meta: Optional[Mapping] = None) -> None:
    """Writes the columns, offsets and ``meta`` (JSON) to ``directory``
    atomically (a temporary directory, renamed)."""
    _save_arrays(directory, dict(self.columns, offsets=self.offsets),
                 dict(meta or {}, min_rows=self.min_rows))

  @classmethod
  def load(cls, directory: str, *, on_device: bool = False,
           mmap: bool = True) -> tuple['RaggedStore', dict]:
    """A store `save` wrote (columns memory-mapped with ``mmap``), and its
    ``meta``."""
    arrays, meta = _load_arrays(directory, mmap)
    offsets = np.asarray(arrays.pop('offsets'))
    return cls(arrays, offsets, on_device=on_device,
               min_rows=int(meta.get('min_rows', 1))), meta


def concat_ragged(parts: Sequence[Mapping[str, np.ndarray]],
                  directory: Optional[str] = None,
                  memmap_bytes: int = MEMMAP_BYTES
                  ) -> tuple[dict, np.ndarray]:
  """Per-client column dicts -> flat columns and offsets (memory-mapped
  under ``directory`` when a column is large)."""
  sizes = np.array([len(next(iter(p.values()))) for p in parts], np.int64)
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  out = {}
  for k in parts[0]:
    first = np.asarray(parts[0][k])
    arr = _file_array(directory, k, (int(offsets[-1]),) + first.shape[1:],
                      first.dtype, memmap_bytes)
    for i, p in enumerate(parts):
      arr[offsets[i]:offsets[i + 1]] = p[k]
    out[k] = arr
  return out, offsets
