"""Tests of fedjax_pfi.data.femnist."""

import json
import pathlib

import numpy as np
import pytest

from fedjax_pfi.data import femnist

NPZ = (pathlib.Path(__file__).parents[2].parent /
       'shared/data/femnist-leaf-subset/femnist_leaf_subset.npz')
needs_npz = pytest.mark.skipif(not NPZ.exists(),
                               reason=f'shared data not present: {NPZ}')


@needs_npz
def test_npz_counts_match_readme():
  train = femnist.load_npz(NPZ, 'train')
  test = femnist.load_npz(NPZ, 'test')
  assert train.num_clients == test.num_clients == 184
  np.testing.assert_array_equal(train.client_names, test.client_names)
  assert train.num_examples == 14708 and test.num_examples == 4088
  train_sizes, test_sizes = train.client_sizes, test.client_sizes
  assert np.sum(train_sizes > 0) == 105
  assert np.sum((train_sizes > 0) & (test_sizes > 0)) == 105
  assert test_sizes[train_sizes > 0].sum() == 1685
  assert test_sizes[train_sizes == 0].sum() == 2403
  nonzero = train_sizes[train_sizes > 0]
  assert (nonzero.min(), np.median(nonzero), nonzero.max()) == (4, 152, 165)
  assert train.client_names[0] == 'f3313_11'
  assert train.metadata['num_classes'] == 62
  assert np.unique(train.columns['y']).size == 62


@needs_npz
def test_npz_grouping_and_polarity():
  train = femnist.load_npz(NPZ, 'train')
  with np.load(NPZ) as d:
    images, labels, writer = (d['train_images'], d['train_labels'],
                              d['train_writer'])
  x, y = train.columns['x'], train.columns['y']
  assert x.shape == (14708, 28, 28, 1) and x.dtype == np.float32
  assert y.dtype == np.int32 and x.min() == 0.0 and x.max() == 1.0
  # Writer 0 ('f3313_11') owns exactly its rows, in file order, MNIST polarity.
  rows = np.flatnonzero(writer == 0)
  c = train.client(0)
  np.testing.assert_array_equal(c['y'], labels[rows])
  np.testing.assert_allclose(c['x'][..., 0], (255.0 - images[rows]) / 255.0)
  assert c['y'][:3].tolist() == [55, 55, 48]
  # Background (white, 255 in the file) is 0: the border is mostly 0.
  assert np.mean(x[:, 0, :, 0] < 0.1) > 0.9
  with pytest.raises(ValueError, match="'val'"):
    femnist.load_npz(NPZ, 'val')


def _leaf_json(users, rng):
  data = {'users': [], 'num_samples': [], 'user_data': {}}
  for user, n in users:
    data['users'].append(user)
    data['num_samples'].append(n)
    data['user_data'][user] = {
        'x': (rng.integers(0, 256, (n, 784)) / 255.0).tolist(),
        'y': rng.integers(0, 62, n).tolist()}
  return data


def test_leaf_json_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  a = _leaf_json([('f0001_01', 3), ('f0002_02', 2)], rng)
  b = _leaf_json([('f0003_03', 4)], rng)
  (tmp_path / 'all_data_0.json').write_text(json.dumps(a))
  (tmp_path / 'all_data_1.json').write_text(json.dumps(b))
  (tmp_path / 'notes.txt').write_text('ignored')
  ds = femnist.load_leaf_json(tmp_path)
  assert ds.client_names.tolist() == ['f0001_01', 'f0002_02', 'f0003_03']
  np.testing.assert_array_equal(ds.client_sizes, [3, 2, 4])
  c = ds.client(2)
  np.testing.assert_array_equal(c['y'], b['user_data']['f0003_03']['y'])
  want = 1.0 - np.asarray(b['user_data']['f0003_03']['x']).reshape(4, 28, 28)
  np.testing.assert_allclose(c['x'][..., 0], want, atol=1e-6)
  assert ds.columns['x'].dtype == np.float32
  assert ds.columns['y'].dtype == np.int32
  assert ds.metadata['num_classes'] == 62
  # A fixed writer list keeps clients aligned across splits.
  aligned = femnist.load_leaf_json(
      tmp_path, client_names=['f0003_03', 'f9999_99', 'f0001_01',
                              'f0002_02'])
  np.testing.assert_array_equal(aligned.client_sizes, [4, 0, 3, 2])
  with pytest.raises(ValueError, match='f0003_03'):
    femnist.load_leaf_json(tmp_path, client_names=['f0001_01', 'f0002_02'])


def test_leaf_json_empty_directory(tmp_path):
  with pytest.raises(ValueError, match='no \\*.json'):
    femnist.load_leaf_json(tmp_path)
