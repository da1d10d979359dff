"""FEMNIST (LEAF; Caldas et al. 2018): handwritten characters, one client per
writer.

Images are float32 ``[n, 28, 28, 1]`` in ``[0, 1]`` with MNIST polarity
(0 = background, 1 = ink): ``x = (255 - pixel) / 255`` for the uint8 npz and
``x = 1 - leaf_x`` for LEAF's json, whose values are ``pixel / 255`` with a
white (1.0) background. Labels ``y`` are int32 in ``[0, 62)``: digits
``0-9``, then ``A-Z``, then ``a-z`` (EMNIST byclass order,
``metadata['label_names']``).
"""

from __future__ import annotations

import pathlib
import string
from typing import Optional, Sequence

import numpy as np

from fedjax_pfi.data import files
from fedjax_pfi.data.federated import FederatedDataset

NUM_CLASSES = 62
LABEL_NAMES = tuple(string.digits + string.ascii_uppercase +
                    string.ascii_lowercase)
SPLITS = ('train', 'test')


def _metadata(source: str) -> dict:
  return {'num_classes': NUM_CLASSES, 'label_names': list(LABEL_NAMES),
          'image_polarity': 'mnist (0 = background, 1 = ink)',
          'source': source}


def load_npz(path, split: str = 'train') -> FederatedDataset:
  """Reads ``shared/data/femnist-leaf-subset/femnist_leaf_subset.npz``.

  Every split keeps all writers of ``writer_ids`` in file order (184 in the
  shared subset), so client ``i`` of ``'train'`` and of ``'test'`` is the same
  writer; writers without data in a split are clients with zero examples
  (in the shared file, writers 105..183 have test data only: 105 writers,
  14,708 examples in train; 184 writers, 4,088 examples in test).

  Args:
    path: the ``.npz`` file (keys ``{split}_images`` uint8 ``[n, 28, 28]``,
      ``{split}_labels``, ``{split}_writer`` and ``writer_ids``).
    split: ``'train'`` or ``'test'``.

  Returns:
    A `FederatedDataset` with ``x`` float32 ``[n, 28, 28, 1]`` and ``y`` int32
    ``[n]``; ``metadata['num_classes'] = 62``.
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
  keys = (f'{split}_images', f'{split}_labels', f'{split}_writer',
          'writer_ids')
  d = files.load_npz(path, 'a FEMNIST .npz (the LEAF subset layout: '
                     f'arrays {", ".join(keys)})', keys)
  images = d[f'{split}_images']
  labels = d[f'{split}_labels'].astype(np.int32)
  writer = d[f'{split}_writer'].astype(np.int64)
  writer_ids = d['writer_ids'].astype(str)
  x = ((255 - images.astype(np.float32)) / 255.0)[..., None]
  return FederatedDataset.from_client_index(
      {'x': x, 'y': labels}, writer, writer_ids, num_clients=len(writer_ids),
      metadata=_metadata(f'{pathlib.Path(path).name}:{split}'))


def load_leaf_json(directory,
                   client_names: Optional[Sequence[str]] = None
                   ) -> FederatedDataset:
  """Reads every ``*.json`` of a LEAF FEMNIST split directory.

  LEAF's format is ``{"users": [...], "num_samples": [...], "user_data":
  {writer: {"x": [[784 floats]], "y": [int]}}}``; files are read in sorted
  name order and a writer found in several files has its examples
  concatenated.

  Args:
    directory: e.g. ``leaf/data/femnist/data/train``.
    client_names: optional writer list fixing the clients and their order
      (e.g. the train split's, so that test client ``i`` is the same writer);
      listed writers without data get zero examples, unlisted writers are an
      error. Default: writers in order of first appearance.

  Returns:
    A `FederatedDataset` as `load_npz`.
  """
  directory = pathlib.Path(directory)
  json_files = sorted(directory.glob('*.json'))
  if not json_files:
    raise ValueError(f'no *.json files in {str(directory)!r}.')
  xs: dict[str, list] = {}
  ys: dict[str, list] = {}
  expected = ('a LEAF FEMNIST json file ({"users": [...], "num_samples": '
              '[...], "user_data": {writer: {"x": [...], "y": [...]}}})')
  for f in json_files:
    data = files.read_json(f, expected)
    if not isinstance(data, dict) or not isinstance(
        data.get('users'), list) or not isinstance(data.get('user_data'),
                                                   dict):
      raise files.refuse(f, expected, 'it lacks a "users" list or a '
                         '"user_data" object')
    for user in data['users']:
      ud = data['user_data'].get(user)
      if not isinstance(ud, dict) or 'x' not in ud or 'y' not in ud:
        raise files.refuse(f, expected, f'"user_data" has no "x" and "y" '
                           f'for the listed user {user!r}')
      xs.setdefault(user, []).extend(ud['x'])
      ys.setdefault(user, []).extend(ud['y'])
  if client_names is None:
    client_names = list(xs)
  else:
    client_names = [str(c) for c in client_names]
    unknown = sorted(set(xs) - set(client_names))
    if unknown:
      raise ValueError(f'writers {unknown[:5]} (of {len(unknown)}) are not in '
                       'client_names.')
  clients = []
  for name in client_names:
    try:
      x = np.asarray(xs.get(name, []), np.float32).reshape(-1, 28, 28, 1)
      y = np.asarray(ys.get(name, []), np.int32).reshape(-1)
    except (ValueError, TypeError) as e:
      raise files.refuse(directory, expected.replace('file', 'directory'),
                         f'writer {name!r} has images that are not 784 '
                         f'numbers or labels that are not integers ({e})'
                         ) from e
    if x.shape[0] != y.shape[0]:
      raise ValueError(f'writer {name!r} has {x.shape[0]} images but '
                       f'{y.shape[0]} labels.')
    clients.append({'x': 1.0 - x, 'y': y})
  return FederatedDataset.from_clients(
      clients, client_names, _metadata(str(directory)))
