"""Partitioners: assign every example of a centralized dataset to one client.

Each partitioner returns ``(client_index, client_names)``: an int64 array
``[num_examples]`` giving each example's client and a string array
``[num_clients]`` of names, ready for `FederatedDataset.from_client_index`.
All randomness comes from ``np.random.default_rng(seed)``, so a seed fixes the
partition. `partition` builds the `FederatedDataset` in one call and `report`
summarizes how unequal and how label-skewed a partition is.

Methods:
  * ``natural``: group by an existing key (writer id, speaker, user).
  * ``iid``: a uniformly random split into clients of (almost) equal size.
  * ``dirichlet``: label skew; for every class, the class's examples are
    divided among clients in proportions drawn from Dirichlet(alpha), the
    scheme of Hsu et al. 2019 ("Measuring the effects of non-identical data
    distribution", arXiv:1909.06335) as used by the usual FL benchmarks
    (e.g. Yurochkin et al. 2019; Li et al. 2021, NIID-Bench).
  * ``shards``: the pathological non-IID split of McMahan et al. 2017
    ("Communication-efficient learning of deep networks from decentralized
    data", Section 3): sort by label, cut into shards, deal each client
    ``classes_per_client`` shards.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from fedjax_pfi.data.federated import FederatedDataset

METHODS = ('natural', 'iid', 'dirichlet', 'shards')


def _check_num_clients(num_clients: int, num_examples: int) -> int:
  if int(num_clients) != num_clients or num_clients < 1:
    raise ValueError(
        f'num_clients must be a positive integer, got {num_clients!r}.')
  if num_clients > num_examples:
    raise ValueError(
        f'num_clients={num_clients} exceeds the {num_examples} examples; '
        'every client needs at least one example.')
  return int(num_clients)


def _check_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        'labels must be a 1-D integer array, got shape '
        f'{labels.shape} and dtype {labels.dtype}.')
  if labels.size and labels.min() < 0:
    raise ValueError(f'labels must be >= 0, got min {labels.min()}.')
  return labels


def _default_names(num_clients: int) -> np.ndarray:
  return np.asarray([str(i) for i in range(num_clients)])


def natural(keys) -> tuple[np.ndarray, np.ndarray]:
  """Groups examples by a key (writer id, speaker, user name, ...).

  Args:
    keys: ``[n]`` array of hashable keys (ints, strings or bytes; bytes are
      decoded as UTF-8).

  Returns:
    ``(client_index [n] int64, client_names [num_clients] str)``. Clients are
    the unique keys in **sorted** order (`np.unique`), so the result does not
    depend on the order of the examples.
  """
  keys = np.asarray(keys)
  if keys.ndim != 1:
    raise ValueError(f'keys must be 1-D, got shape {keys.shape}.')
  if keys.dtype.kind == 'S' or keys.dtype == object:
    keys = np.asarray([k.decode('utf-8') if isinstance(k, bytes) else str(k)
                       for k in keys])
  names, index = np.unique(keys, return_inverse=True)
  return index.astype(np.int64).reshape(-1), names.astype(str)


def iid(num_examples: int, num_clients: int, seed: int
        ) -> tuple[np.ndarray, np.ndarray]:
  """Uniformly random split; client sizes differ by at most one.

  Args:
    num_examples: ``n``.
    num_clients: number of clients (<= ``n``).
    seed: seed of ``np.random.default_rng``.

  Returns:
    ``(client_index [n] int64, client_names ['0', '1', ...])``.
  """
  num_clients = _check_num_clients(num_clients, num_examples)
  perm = np.random.default_rng(seed).permutation(num_examples)
  index = np.empty(num_examples, np.int64)
  for i, rows in enumerate(np.array_split(perm, num_clients)):
    index[rows] = i
  return index, _default_names(num_clients)


def dirichlet(labels, num_clients: int, alpha: float, seed: int,
              min_size: int = 1, max_tries: int = 100
              ) -> tuple[np.ndarray, np.ndarray]:
  """Label-skewed split with per-class Dirichlet(alpha) client proportions.

  For every class ``c`` (in increasing order), the class's examples are
  shuffled and cut among the clients at ``cumsum(p_c) * n_c`` where
  ``p_c ~ Dirichlet(alpha * ones(num_clients))`` (Hsu et al. 2019; the
  split of NIID-Bench without its size-balancing trick). Small ``alpha``
  gives each client few classes; ``alpha -> inf`` approaches IID label
  proportions. The whole draw is repeated until every client has at least
  ``min_size`` examples.

  Args:
    labels: int ``[n]`` class labels.
    num_clients: number of clients.
    alpha: Dirichlet concentration, > 0.
    seed: seed of ``np.random.default_rng``.
    min_size: the fewest examples any client may get.
    max_tries: draws before giving up with a ValueError.

  Returns:
    ``(client_index [n] int64, client_names ['0', '1', ...])``.
  """
  labels = _check_labels(labels)
  num_clients = _check_num_clients(num_clients, labels.size)
  if not alpha > 0:
    raise ValueError(f'alpha must be > 0, got {alpha!r}.')
  if min_size < 0 or min_size * num_clients > labels.size:
    raise ValueError(
        f'min_size={min_size} is impossible: {num_clients} clients share '
        f'{labels.size} examples (need 0 <= min_size <= '
        f'{labels.size // num_clients}).')
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  by_class = [np.flatnonzero(labels == c) for c in classes]
  sizes = None
  for _ in range(max_tries):
    index = np.empty(labels.size, np.int64)
    for rows in by_class:
      rows = rows[rng.permutation(rows.size)]
      p = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(p)[:-1] * rows.size).astype(np.int64)
      for i, part in enumerate(np.split(rows, cuts)):
        index[part] = i
    sizes = np.bincount(index, minlength=num_clients)
    if sizes.min() >= min_size:
      return index, _default_names(num_clients)
  raise ValueError(
      f'dirichlet(alpha={alpha}, num_clients={num_clients}) gave some client '
      f'fewer than min_size={min_size} examples in all {max_tries} tries '
      f'(last smallest client: {sizes.min()}); raise alpha, lower min_size '
      'or num_clients, or raise max_tries.')


def shards(labels, num_clients: int, classes_per_client: int, seed: int,
           max_repairs: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
  """The pathological non-IID split of McMahan et al. 2017.

  Examples are shuffled, stably sorted by label and cut into
  ``num_clients * classes_per_client`` contiguous shards of (almost) equal
  size (`np.array_split`, so every example is used); each client gets
  ``classes_per_client`` shards from a random permutation. The paper's MNIST
  setting is 100 clients x 2 shards of 300.

  One addition to the paper: after the random deal, shards are swapped
  between clients until no client holds two shards with the same majority
  label, so each client really sees ``classes_per_client`` classes. With
  class sizes that are multiples of the shard size every shard is pure and
  each client has exactly ``classes_per_client`` labels; otherwise a shard
  can straddle two labels and a client may see a few more.

  Args:
    labels: int ``[n]`` class labels.
    num_clients: number of clients.
    classes_per_client: shards (classes) per client.
    seed: seed of ``np.random.default_rng``.
    max_repairs: swaps allowed before giving up with a ValueError.

  Returns:
    ``(client_index [n] int64, client_names ['0', '1', ...])``.
  """
  labels = _check_labels(labels)
  if int(classes_per_client) != classes_per_client or classes_per_client < 1:
    raise ValueError('classes_per_client must be a positive integer, got '
                     f'{classes_per_client!r}.')
  num_clients = _check_num_clients(num_clients, labels.size)
  k = int(classes_per_client)
  num_shards = num_clients * k
  if num_shards > labels.size:
    raise ValueError(
        f'{num_clients} clients x {k} shards = {num_shards} shards exceed the '
        f'{labels.size} examples.')
  num_classes = np.unique(labels).size
  if k > num_classes:
    raise ValueError(f'classes_per_client={k} exceeds the {num_classes} '
                     'distinct labels.')
  rng = np.random.default_rng(seed)
  perm = rng.permutation(labels.size)
  order = perm[np.argsort(labels[perm], kind='stable')]
  shard_rows = np.array_split(order, num_shards)
  shard_label = np.asarray(
      [np.bincount(labels[r]).argmax() for r in shard_rows])
  # deal[i] = the shard ids of client i.
  deal = rng.permutation(num_shards).reshape(num_clients, k)
  lab = shard_label[deal]
  for repairs in range(max_repairs + 1):
    dup = np.flatnonzero(
        np.any(np.diff(np.sort(lab, axis=1), axis=1) == 0, axis=1))
    if not dup.size:
      break
    if repairs == max_repairs:
      raise ValueError(f'shards: clients {dup[:5].tolist()}... still hold '
                       f'repeated labels after max_repairs={max_repairs} '
                       'swaps.')
    i = dup[0]
    _, first = np.unique(lab[i], return_index=True)
    p = np.setdiff1d(np.arange(k), first)[0]
    c = lab[i, p]
    # (j, q) may swap with (i, p) if neither client ends up with a repeat.
    ok_j = ~np.any(lab == c, axis=1)
    ok_q = ~np.isin(lab, np.delete(lab[i], p))
    cand = np.argwhere(ok_j[:, None] & ok_q)
    if cand.size == 0:
      raise ValueError(
          f'cannot give {num_clients} clients {k} distinct labels each: label '
          f'{c} fills {np.sum(shard_label == c)} shards; use fewer clients, '
          'fewer classes_per_client or more balanced labels.')
    j, q = cand[rng.integers(len(cand))]
    deal[i, p], deal[j, q] = deal[j, q], deal[i, p]
    lab[i, p], lab[j, q] = lab[j, q], lab[i, p]
  index = np.empty(labels.size, np.int64)
  for i in range(num_clients):
    for s in deal[i]:
      index[shard_rows[s]] = i
  return index, _default_names(num_clients)


def partition(columns: Mapping[str, np.ndarray], labels_or_keys,
              method: str, metadata: Optional[Mapping[str, object]] = None,
              **kwargs) -> FederatedDataset:
  """Partitions centralized columns into a `FederatedDataset`.

  Args:
    columns: name -> ``[n, ...]`` arrays.
    labels_or_keys: ``[n]`` keys for ``'natural'``, labels for
      ``'dirichlet'``/``'shards'``; for ``'iid'`` only its length is used.
    method: one of ``'natural'``, ``'iid'``, ``'dirichlet'``, ``'shards'``.
    metadata: passed to the dataset.
    **kwargs: the method's own arguments (``num_clients``, ``seed``,
      ``alpha``, ``min_size``, ``classes_per_client``).
  """
  labels_or_keys = np.asarray(labels_or_keys)
  n = labels_or_keys.shape[0] if labels_or_keys.ndim else 0
  for name, col in columns.items():
    if np.shape(col)[0] != n:
      raise ValueError(f'column {name!r} has {np.shape(col)[0]} rows but '
                       f'labels_or_keys has {n}.')
  if method == 'natural':
    index, names = natural(labels_or_keys, **kwargs)
  elif method == 'iid':
    index, names = iid(n, **kwargs)
  elif method == 'dirichlet':
    index, names = dirichlet(labels_or_keys, **kwargs)
  elif method == 'shards':
    index, names = shards(labels_or_keys, **kwargs)
  else:
    raise ValueError(
        f'unknown partition method {method!r}; accepted: {METHODS}.')
  return FederatedDataset.from_client_index(
      columns, index, names, num_clients=len(names), metadata=metadata)


def report(ds: FederatedDataset, label_column: str = 'y',
           num_classes: Optional[int] = None, bins: int = 10) -> dict:
  """Summarizes client sizes and per-client label distributions.

  For 1-D labels every example counts once; for sequence labels (``y`` of
  shape ``[n, T]``) every token counts, and tokens equal to
  ``ds.metadata['pad_id']`` (when set) are ignored.

  Args:
    ds: the federated dataset.
    label_column: the column holding labels.
    num_classes: label range; default ``metadata['num_classes']``, else
      ``metadata['vocab_size']``, else ``max label + 1``.
    bins: bins of the client-size histogram.

  Returns:
    A dict with ``num_clients``, ``num_examples``, ``sizes`` (``min``,
    ``median``, ``mean``, ``max``, ``hist_counts``, ``hist_edges``),
    ``label_counts`` (int64 ``[num_clients, num_classes]``),
    ``distinct_labels`` (``[num_clients]``), ``mean_distinct_labels``, and
    ``mean_tv_to_global`` (mean total-variation distance between each
    nonempty client's label distribution and the pooled one; 0 for IID).
  """
  if label_column not in ds.columns:
    raise ValueError(f'label_column {label_column!r} not in columns '
                     f'{sorted(ds.columns)}.')
  sizes = ds.client_sizes
  counts, edges = np.histogram(sizes, bins=bins)
  y = np.asarray(ds.columns[label_column])
  client = np.repeat(np.arange(ds.num_clients), sizes)
  if y.ndim > 1:
    client = np.repeat(client, int(np.prod(y.shape[1:])))
    y = y.reshape(-1)
    pad_id = ds.metadata.get('pad_id')
    if pad_id is not None:
      keep = y != pad_id
      y, client = y[keep], client[keep]
  y = y.astype(np.int64)
  if num_classes is None:
    num_classes = ds.metadata.get('num_classes',
                                  ds.metadata.get('vocab_size'))
  if num_classes is None:
    num_classes = int(y.max()) + 1 if y.size else 0
  num_classes = int(num_classes)
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f'labels span [{y.min()}, {y.max()}], outside '
                     f'[0, {num_classes}).')
  label_counts = np.bincount(client * num_classes + y,
                             minlength=ds.num_clients * num_classes
                             ).reshape(ds.num_clients, num_classes)
  distinct = (label_counts > 0).sum(axis=1)
  totals = label_counts.sum(axis=1)
  nonempty = totals > 0
  pooled = label_counts.sum(axis=0) / max(label_counts.sum(), 1)
  local = label_counts[nonempty] / totals[nonempty, None]
  tv = 0.5 * np.abs(local - pooled).sum(axis=1)
  return {
      'num_clients': ds.num_clients,
      'num_examples': ds.num_examples,
      'sizes': {
          'min': int(sizes.min()) if sizes.size else 0,
          'median': float(np.median(sizes)) if sizes.size else 0.0,
          'mean': float(sizes.mean()) if sizes.size else 0.0,
          'max': int(sizes.max()) if sizes.size else 0,
          'hist_counts': counts,
          'hist_edges': edges,
      },
      'label_counts': label_counts,
      'distinct_labels': distinct,
      'mean_distinct_labels': float(distinct[nonempty].mean())
                              if nonempty.any() else 0.0,
      'mean_tv_to_global': float(tv.mean()) if tv.size else 0.0,
  }
