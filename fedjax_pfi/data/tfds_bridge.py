"""TFDS datasets as `FederatedDataset` objects, without TensorFlow and never
downloading.

Reads with ``tfds.data_source(name, split=..., download=False)`` (random
access over prepared ``array_record`` files; works without TensorFlow), then
either groups examples by a per-example feature (``client_key``, e.g.
``'user'`` of ``sentiment140``, ``'author'`` of ``reddit``) or partitions
them on the label with `fedjax_pfi.data.partition` (``'iid'``,
``'dirichlet'``, ``'shards'``). Data must already be prepared under
``data_dir`` (or be mocked with ``tfds.testing.mock_data``); a missing dataset
fails at once instead of downloading.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from fedjax_pfi.data import partition as partition_lib
from fedjax_pfi.data.federated import FederatedDataset

# feature -> column name, or (column name, fn on the stacked numpy values).
FeatureMap = Mapping[str, Union[str, tuple[str, Callable[[np.ndarray],
                                                         np.ndarray]]]]
PARTITIONERS = ('iid', 'dirichlet', 'shards')


def image_to_float(images: np.ndarray) -> np.ndarray:
  """uint8 ``[n, H, W, C]`` -> float32 in ``[0, 1]`` (floats pass through)."""
  images = np.asarray(images)
  if np.issubdtype(images.dtype, np.integer):
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


def _to_int32(values: np.ndarray) -> np.ndarray:
  return np.asarray(values).astype(np.int32)


def _decode(value: Any) -> Any:
  """bytes -> str (UTF-8); numpy scalars -> Python/numpy values."""
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  if isinstance(value, np.ndarray) and value.dtype.kind in 'SO':
    return np.vectorize(_decode, otypes=[object])(value).astype(str)
  return value


def _stack(values: list) -> np.ndarray:
  values = [_decode(v) for v in values]
  if values and isinstance(values[0], str):
    return np.asarray(values, dtype=str)
  return np.stack([np.asarray(v) for v in values])


def _read(source, n: int) -> list[Mapping[str, Any]]:
  # ArrayRecordDataSource supports batched reads, but mocked sources do not.
  try:
    return list(source.__getitems__(list(range(n))))
  except Exception:  # pylint: disable=broad-except
    return [source[i] for i in range(n)]


def from_tfds(name: str, split: str, *, client_key: Optional[str] = None,
              partitioner: Optional[str] = None,
              partitioner_kwargs: Optional[Mapping[str, Any]] = None,
              label_key: str = 'label',
              feature_map: Optional[FeatureMap] = None,
              data_dir: Optional[str] = None,
              max_examples: Optional[int] = None) -> FederatedDataset:
  """Loads a prepared TFDS split as a federated dataset.

  Args:
    name: TFDS name, e.g. ``'mnist'``, ``'emnist/byclass'``,
      ``'sentiment140'``.
    split: TFDS split, e.g. ``'train'`` or ``'test[:10%]'``.
    client_key: a feature naming each example's client (natural grouping via
      `partition.natural`; clients in sorted key order). Exclusive with
      ``partitioner``.
    partitioner: ``'iid'``, ``'dirichlet'`` or ``'shards'``, applied to the
      ``label_key`` feature.
    partitioner_kwargs: the partitioner's arguments, e.g.
      ``{'num_clients': 100, 'alpha': 0.5, 'seed': 0}``.
    label_key: the label feature (``'label'``; ``'polarity'`` for
      sentiment140).
    feature_map: feature -> column name or ``(column name, fn)``; ``fn`` maps
      the stacked values ``[n, ...]`` to the column. Default:
      ``{'image': ('x', image_to_float), label_key: ('y', int32)}`` for the
      features the dataset has. Unlisted features are dropped; bytes become
      ``str``.
    data_dir: TFDS data directory (default: TFDS's own).
    max_examples: read only the first ``max_examples`` examples.

  Returns:
    A `FederatedDataset`; metadata ``num_classes`` when the label is a
    ``ClassLabel``, plus ``tfds_name`` and ``tfds_split``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if (client_key is None) == (partitioner is None):
    raise ValueError(
        'pass exactly one of client_key (group by a feature) or partitioner '
        f'(one of {PARTITIONERS}); got client_key={client_key!r}, '
        f'partitioner={partitioner!r}.')
  if partitioner is not None and partitioner not in PARTITIONERS:
    raise ValueError(f'unknown partitioner {partitioner!r}; accepted: '
                     f'{PARTITIONERS}.')
  if max_examples is not None and max_examples < 1:
    raise ValueError(f'max_examples must be >= 1, got {max_examples!r}.')

  source = tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  features = source.dataset_info.features
  feature_names = list(features.keys())
  n = len(source)
  if max_examples is not None:
    n = min(n, int(max_examples))
  if n == 0:
    raise ValueError(f'{name}:{split} has no examples.')

  if feature_map is None:
    feature_map = {}
    if 'image' in feature_names:
      feature_map['image'] = ('x', image_to_float)
    if label_key in feature_names:
      feature_map[label_key] = ('y', _to_int32)
  needed = set(feature_map) | {client_key or label_key}
  missing = sorted(needed - set(feature_names))
  if missing:
    raise ValueError(f'{name} has no feature(s) {missing}; it has '
                     f'{feature_names}.')
  if not feature_map:
    raise ValueError(f'feature_map maps no feature of {name} '
                     f'({feature_names}) to a column.')

  examples = _read(source, n)
  raw = {f: _stack([ex[f] for ex in examples]) for f in needed}
  columns = {}
  for feature, target in feature_map.items():
    column, fn = (target, None) if isinstance(target, str) else target
    columns[column] = fn(raw[feature]) if fn is not None else raw[feature]

  metadata: dict[str, Any] = {'tfds_name': name, 'tfds_split': split}
  label_feature = features[label_key] if label_key in feature_names else None
  if hasattr(label_feature, 'num_classes'):
    metadata['num_classes'] = int(label_feature.num_classes)

  if client_key is not None:
    return partition_lib.partition(columns, raw[client_key], 'natural',
                                   metadata=metadata)
  labels = np.asarray(raw[label_key]).astype(np.int64)
  return partition_lib.partition(columns, labels, partitioner,
                                 metadata=metadata,
                                 **dict(partitioner_kwargs or {}))
