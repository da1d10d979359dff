"""Federated datasets: flat column arrays plus per-client offsets.

A `FederatedDataset` holds every client's examples without a Python object per
client: each column (e.g. ``x``, ``y``) is one array of shape
``[total_examples, ...]`` in which client ``i`` owns rows
``offsets[i]:offsets[i + 1]``. Selecting, splitting and stacking clients are
index operations on those arrays, so a population of a million clients costs
one ``offsets`` array, not a million objects.

`FederatedSplits` bundles the per-client train/validation/test splits of the
training population (for personalized evaluation on each client's own data)
with held-out clients that never take part in training (generalization to
unseen users).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional, Sequence

import numpy as np

from fedjax_pfi.data import files


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
  """Many clients' examples as concatenated columns.

  Attributes:
    columns: name -> array ``[total_examples, ...]``; all share axis 0.
    offsets: int64 ``[num_clients + 1]``, nondecreasing, ``offsets[0] == 0``;
      client ``i`` owns rows ``offsets[i]:offsets[i + 1]``.
    client_names: ``[num_clients]`` names (writer ids, ``play/role``, ...).
    metadata: free-form facts about the data (vocabulary, number of classes).
  """

  columns: Mapping[str, np.ndarray]
  offsets: np.ndarray
  client_names: np.ndarray
  metadata: Mapping[str, object] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    offsets = np.asarray(self.offsets, dtype=np.int64)
    object.__setattr__(self, 'offsets', offsets)
    object.__setattr__(self, 'client_names', np.asarray(self.client_names))
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0:
      raise ValueError(
          f'offsets must be a 1-D array starting at 0, got {offsets[:5]}...')
    if np.any(np.diff(offsets) < 0):
      raise ValueError('offsets must be nondecreasing.')
    if len(self.client_names) != offsets.size - 1:
      raise ValueError(
          f'{len(self.client_names)} client names for {offsets.size - 1} '
          'clients.')
    if not self.columns:
      raise ValueError('a FederatedDataset needs at least one column.')
    for name, col in self.columns.items():
      if col.shape[0] != offsets[-1]:
        raise ValueError(
            f'column {name!r} has {col.shape[0]} rows but offsets end at '
            f'{offsets[-1]}.')

  # -- construction ---------------------------------------------------------

  @classmethod
  def from_client_index(cls, columns: Mapping[str, np.ndarray],
                        client_index: np.ndarray,
                        client_names: Optional[Sequence[str]] = None,
                        num_clients: Optional[int] = None,
                        metadata: Optional[Mapping[str, object]] = None
                        ) -> 'FederatedDataset':
    """Groups examples by an integer client index (a stable sort).

    Args:
      columns: name -> ``[n, ...]`` arrays of all examples.
      client_index: int ``[n]``, the client each example belongs to.
      client_names: optional names, one per client; default ``'0'..``.
      num_clients: the population size, if some clients own no example.
      metadata: passed through.
    """
    client_index = np.asarray(client_index)
    if client_index.ndim != 1:
      raise ValueError('client_index must be 1-D.')
    if num_clients is None:
      num_clients = int(client_index.max()) + 1 if client_index.size else 0
    if client_index.size and (client_index.min() < 0 or
                              client_index.max() >= num_clients):
      raise ValueError(
          f'client_index must lie in [0, {num_clients}), got '
          f'[{client_index.min()}, {client_index.max()}].')
    order = np.argsort(client_index, kind='stable')
    counts = np.bincount(client_index, minlength=num_clients)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    if client_names is None:
      client_names = [str(i) for i in range(num_clients)]
    return cls({k: np.asarray(v)[order] for k, v in columns.items()}, offsets,
               np.asarray(client_names), dict(metadata or {}))

  @classmethod
  def from_clients(cls, clients: Sequence[Mapping[str, np.ndarray]],
                   client_names: Optional[Sequence[str]] = None,
                   metadata: Optional[Mapping[str, object]] = None
                   ) -> 'FederatedDataset':
    """Concatenates a list of per-client column dicts (a one-off copy)."""
    if not clients:
      raise ValueError('from_clients needs at least one client.')
    keys = list(clients[0])
    sizes = [len(c[keys[0]]) for c in clients]
    columns = {k: np.concatenate([np.asarray(c[k]) for c in clients])
               for k in keys}
    if client_names is None:
      client_names = [str(i) for i in range(len(clients))]
    return cls(columns, np.concatenate([[0], np.cumsum(sizes)]),
               np.asarray(client_names), dict(metadata or {}))

  # -- files --------------------------------------------------------------

  def save(self, directory: str) -> None:
    """Writes one ``.npy`` per column plus ``offsets.npy``,
    ``client_names.npy`` and ``metadata.json``, so that `load` can
    memory-map the columns."""
    os.makedirs(directory, exist_ok=True)
    for name, col in self.columns.items():
      np.save(os.path.join(directory, f'column_{name}.npy'), np.asarray(col))
    np.save(os.path.join(directory, 'offsets.npy'), self.offsets)
    np.save(os.path.join(directory, 'client_names.npy'),
            self.client_names.astype(str))
    with open(os.path.join(directory, 'metadata.json'), 'w') as f:
      json.dump(dict(self.metadata), f, default=str)

  @classmethod
  def load(cls, directory: str, mmap: bool = True) -> 'FederatedDataset':
    """Reads a dataset written by `save`; with ``mmap`` the columns stay on disk
    (``np.load(mmap_mode='r')``) and stacking a cohort reads only its
    clients' rows, so a population of millions of clients costs its
    ``offsets`` array in memory."""
    if not os.path.exists(os.path.join(directory, 'offsets.npy')):
      raise FileNotFoundError(
          f'{directory} is not a saved FederatedDataset (no offsets.npy); '
          'write one with FederatedDataset.save.')
    mode = 'r' if mmap else None
    expected = 'part of a saved FederatedDataset (written by ' \
        'FederatedDataset.save)'

    def npy(f, mode=None):
      return files.load_npy(os.path.join(directory, f), expected,
                            mmap_mode=mode)

    columns = {f[len('column_'):-len('.npy')]: npy(f, mode)
               for f in sorted(os.listdir(directory))
               if f.startswith('column_') and f.endswith('.npy')}
    metadata = files.read_json(os.path.join(directory, 'metadata.json'),
                               expected + ': a JSON object')
    return cls(columns, npy('offsets.npy'), npy('client_names.npy'),
               metadata)

  # -- queries --------------------------------------------------------------

  @property
  def num_clients(self) -> int:
    return self.offsets.size - 1

  @property
  def num_examples(self) -> int:
    return int(self.offsets[-1])

  @property
  def client_sizes(self) -> np.ndarray:
    return np.diff(self.offsets)

  def client(self, i: int) -> dict[str, np.ndarray]:
    """Client ``i``'s examples (views, no copy)."""
    lo, hi = self.offsets[i], self.offsets[i + 1]
    return {k: v[lo:hi] for k, v in self.columns.items()}

  def example_index(self, i: int) -> np.ndarray:
    """Row indices of client ``i`` in the flat columns."""
    return np.arange(self.offsets[i], self.offsets[i + 1])

  def select(self, ids: Sequence[int]) -> 'FederatedDataset':
    """A new dataset with only clients ``ids`` (in that order)."""
    ids = np.asarray(ids, dtype=np.int64)
    sizes = self.client_sizes[ids]
    rows = (np.concatenate([self.example_index(i) for i in ids])
            if ids.size else np.zeros([0], np.int64))
    return FederatedDataset(
        {k: v[rows] for k, v in self.columns.items()},
        np.concatenate([[0], np.cumsum(sizes)]), self.client_names[ids],
        self.metadata)

  def drop_small_clients(self, min_examples: int) -> 'FederatedDataset':
    return self.select(np.flatnonzero(self.client_sizes >= min_examples))

  def pooled(self) -> dict[str, np.ndarray]:
    """All examples of all clients, as centralized training would see them."""
    return dict(self.columns)

  # -- splitting ------------------------------------------------------------

  def split_examples(self, fractions: Sequence[float], seed: int
                     ) -> list['FederatedDataset']:
    """Splits every client's own examples into parts (e.g. train/val/test).

    Each client's rows are shuffled with ``np.random.default_rng([seed, i])``
    and cut at ``floor(cumsum(fractions) * n)``; every part keeps the same
    client list (a client can have zero examples in a part).
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
      raise ValueError(
          f'split fractions must be nonnegative and sum to 1, got '
          f'{fractions.tolist()}.')
    cuts = np.cumsum(fractions)[:-1]
    parts_rows = [[] for _ in fractions]
    parts_sizes = [[] for _ in fractions]
    for i in range(self.num_clients):
      rows = self.example_index(i)
      rows = rows[np.random.default_rng([seed, i]).permutation(rows.size)]
      pieces = np.split(rows, np.floor(cuts * rows.size).astype(int))
      for p, piece in enumerate(pieces):
        parts_rows[p].append(np.sort(piece))
        parts_sizes[p].append(piece.size)
    out = []
    for rows, sizes in zip(parts_rows, parts_sizes):
      rows = np.concatenate(rows) if rows else np.zeros([0], np.int64)
      out.append(FederatedDataset(
          {k: v[rows] for k, v in self.columns.items()},
          np.concatenate([[0], np.cumsum(sizes)]), self.client_names,
          self.metadata))
    return out


@dataclasses.dataclass(frozen=True)
class FederatedSplits:
  """The data of one federated task.

  ``train``, ``val`` and ``test`` share one client list (the training
  population; client ``i`` of each is the same user). ``heldout`` holds
  clients that never train, split into their own adaptation (train) and
  evaluation (test) parts: ``heldout_train`` / ``heldout_test``.

  Attributes:
    train: the training population's training examples (columns
      ``[n, ...]``, ``offsets [num_clients + 1]``).
    val: the same clients' validation examples (may be empty).
    test: the same clients' test examples.
    heldout_train: the held-out clients' adaptation examples, or None.
    heldout_test: the held-out clients' test examples, or None.
  """

  train: FederatedDataset
  val: FederatedDataset
  test: FederatedDataset
  heldout_train: Optional[FederatedDataset] = None
  heldout_test: Optional[FederatedDataset] = None

  @property
  def metadata(self) -> Mapping[str, object]:
    return self.train.metadata

  PARTS = ('train', 'val', 'test', 'heldout_train', 'heldout_test')

  def save(self, directory: str) -> None:
    """Each part in its own subdirectory (`FederatedDataset.save`)."""
    for part in self.PARTS:
      ds = getattr(self, part)
      if ds is not None:
        ds.save(os.path.join(directory, part))

  @classmethod
  def load(cls, directory: str, mmap: bool = True) -> 'FederatedSplits':
    """Reads splits written by `save`, memory-mapped: split once, offline,
    and every run reads only the clients it samples."""
    parts = {p: FederatedDataset.load(os.path.join(directory, p), mmap)
             for p in cls.PARTS
             if os.path.isdir(os.path.join(directory, p))}
    missing = [p for p in ('train', 'val', 'test') if p not in parts]
    if missing:
      raise FileNotFoundError(
          f'{directory} lacks the split(s) {missing}; FederatedSplits.save '
          'writes train/, val/, test/ (and heldout_*/ if any).')
    return cls(**parts)

  @classmethod
  def from_dataset(cls, ds: FederatedDataset, *, val_fraction: float,
                   test_fraction: float, heldout_fraction: float,
                   seed: int) -> 'FederatedSplits':
    """Holds out a fraction of clients, then splits each client's examples.

    Held-out clients are chosen with ``default_rng([seed, 1])``; each held-out
    client's examples split 50/50 into adaptation and evaluation data.
    """
    if not 0 <= heldout_fraction < 1:
      raise ValueError(
          f'heldout_fraction must lie in [0, 1), got {heldout_fraction}.')
    n = ds.num_clients
    n_heldout = int(round(heldout_fraction * n))
    perm = np.random.default_rng([seed, 1]).permutation(n)
    heldout_ids = np.sort(perm[:n_heldout])
    train_ids = np.sort(perm[n_heldout:])
    population = ds.select(train_ids)
    train, val, test = population.split_examples(
        [1.0 - val_fraction - test_fraction, val_fraction, test_fraction],
        seed)
    heldout_train = heldout_test = None
    if n_heldout:
      heldout_train, heldout_test = ds.select(heldout_ids).split_examples(
          [0.5, 0.5], seed + 1)
    return cls(train, val, test, heldout_train, heldout_test)
