"""Tests of fedjax_pfi.data.tfds_bridge (mocked or locally built, no TF)."""

import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets')

from fedjax_pfi.data import tfds_bridge  # noqa: E402  (after the skip)


def test_mnist_dirichlet_partition():
  with tfds.testing.mock_data(num_examples=60):
    ds = tfds_bridge.from_tfds(
        'mnist', 'train', partitioner='dirichlet',
        partitioner_kwargs={'num_clients': 6, 'alpha': 0.5, 'seed': 0})
    raw = tfds.data_source('mnist', split='train', download=False)
    labels = np.array([raw[i]['label'] for i in range(60)])
  assert ds.num_clients == 6 and ds.num_examples == 60
  assert ds.client_sizes.min() >= 1
  x, y = ds.columns['x'], ds.columns['y']
  assert x.shape == (60, 28, 28, 1) and x.dtype == np.float32
  assert 0.0 <= x.min() and x.max() <= 1.0
  assert y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y, minlength=10),
                                np.bincount(labels, minlength=10))
  assert ds.metadata['num_classes'] == 10


def test_mnist_iid_max_examples_and_feature_map():
  with tfds.testing.mock_data(num_examples=30):
    ds = tfds_bridge.from_tfds(
        'mnist', 'train', partitioner='iid', max_examples=20,
        partitioner_kwargs={'num_clients': 4, 'seed': 1},
        feature_map={'label': 'label'})
  assert list(ds.columns) == ['label']
  np.testing.assert_array_equal(ds.client_sizes, [5, 5, 5, 5])


def test_sentiment140_groups_by_user():
  with tfds.testing.mock_data(num_examples=25):
    ds = tfds_bridge.from_tfds(
        'sentiment140', 'train', client_key='user', label_key='polarity',
        feature_map={'text': 'text', 'polarity': 'y', 'user': 'user'})
  assert ds.num_examples == 25
  assert ds.client_names.tolist() == sorted(set(ds.columns['user'].tolist()))
  for i in range(ds.num_clients):
    assert set(ds.client(i)['user'].tolist()) == {ds.client_names[i]}
  assert ds.columns['text'].dtype.kind == 'U'


def _build_users_dataset(data_dir):
  """Prepares a 12-example array_record dataset with a 'user' text feature.

  Registration is skipped so the name resolves only through data_dir.
  """

  class FedjaxPfiTestUsers(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
              'label': tfds.features.ClassLabel(num_classes=3),
              'user': tfds.features.Text(),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(12):
        yield i, {'image': np.full((4, 4, 1), 20 * i, np.uint8),
                  'label': i % 3, 'user': f'user{i % 4}'}

  FedjaxPfiTestUsers(data_dir=data_dir,
                     file_format='array_record').download_and_prepare()


def test_local_builder_with_bytes_and_repeated_users(tmp_path):
  with tfds.core.registered.skip_registration():
    _build_users_dataset(tmp_path)
  ds = tfds_bridge.from_tfds('fedjax_pfi_test_users', 'train',
                             client_key='user', data_dir=str(tmp_path))
  assert ds.client_names.tolist() == ['user0', 'user1', 'user2', 'user3']
  np.testing.assert_array_equal(ds.client_sizes, [3, 3, 3, 3])
  for k in range(4):
    c = ds.client(k)
    # Example i has user i % 4, label i % 3 and pixels 20 i / 255.
    i = np.round(c['x'][:, 0, 0, 0] * 255 / 20).astype(int)
    np.testing.assert_array_equal(np.sort(i % 4), [k, k, k])
    np.testing.assert_array_equal(c['y'], i % 3)
  assert ds.metadata['num_classes'] == 3


def test_argument_errors(tmp_path):
  with pytest.raises(ValueError, match='exactly one of client_key'):
    tfds_bridge.from_tfds('mnist', 'train')
  with pytest.raises(ValueError, match="'kmeans'"):
    tfds_bridge.from_tfds('mnist', 'train', partitioner='kmeans')
  with tfds.testing.mock_data(num_examples=5):
    with pytest.raises(ValueError, match="'writer'"):
      tfds_bridge.from_tfds('mnist', 'train', client_key='writer')


def test_missing_data_fails_without_downloading(tmp_path):
  # download=False: an unprepared dataset fails at once (no network access).
  with pytest.raises(Exception) as err:
    tfds_bridge.from_tfds('mnist', 'train', data_dir=str(tmp_path),
                          partitioner='iid',
                          partitioner_kwargs={'num_clients': 2, 'seed': 0})
  assert 'ConnectionError' not in type(err.value).__name__
