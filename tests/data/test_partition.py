"""Tests of fedjax_pfi.data.partition."""

import numpy as np
import pytest

from fedjax_pfi.data import partition as P


def _balanced_labels(num_classes=10, per_class=60, seed=0):
  y = np.repeat(np.arange(num_classes), per_class)
  return y[np.random.default_rng(seed).permutation(y.size)]


def _assert_valid(index, names, n, num_clients):
  assert index.shape == (n,)
  assert index.dtype == np.int64
  assert len(names) == num_clients
  assert index.min() >= 0 and index.max() < num_clients
  assert np.bincount(index, minlength=num_clients).sum() == n


def test_natural_groups_by_sorted_key():
  keys = np.array(['bob', 'amy', 'bob', 'cat', 'amy', 'bob'])
  index, names = P.natural(keys)
  assert names.tolist() == ['amy', 'bob', 'cat']
  np.testing.assert_array_equal(names[index], keys)
  index_b, names_b = P.natural(keys.astype(bytes))
  assert names_b.tolist() == ['amy', 'bob', 'cat']
  np.testing.assert_array_equal(index_b, index)


def test_iid_sizes_equal_and_every_example_once():
  index, names = P.iid(103, 10, seed=1)
  _assert_valid(index, names, 103, 10)
  sizes = np.bincount(index, minlength=10)
  assert sizes.max() - sizes.min() <= 1
  np.testing.assert_array_equal(index, P.iid(103, 10, seed=1)[0])
  assert not np.array_equal(index, P.iid(103, 10, seed=2)[0])


def test_iid_rejects_more_clients_than_examples():
  with pytest.raises(ValueError, match='num_clients=11'):
    P.iid(10, 11, seed=0)


def test_dirichlet_assigns_every_example_once_and_is_deterministic():
  y = _balanced_labels()
  index, names = P.dirichlet(y, 20, alpha=0.3, seed=0, min_size=2)
  _assert_valid(index, names, y.size, 20)
  assert np.bincount(index, minlength=20).min() >= 2
  np.testing.assert_array_equal(
      index, P.dirichlet(y, 20, alpha=0.3, seed=0, min_size=2)[0])


def test_dirichlet_skew_grows_as_alpha_shrinks():
  y = _balanced_labels(per_class=200)
  tv, distinct = [], []
  for alpha in (100.0, 1.0, 0.05):
    ds = P.partition({'y': y}, y, 'dirichlet', num_clients=20, alpha=alpha,
                     seed=0)
    r = P.report(ds, num_classes=10)
    tv.append(r['mean_tv_to_global'])
    distinct.append(r['mean_distinct_labels'])
  assert tv[0] < 0.1 < tv[1] < tv[2]
  assert distinct[0] == 10 and distinct[2] < distinct[1] <= 10
  assert distinct[2] < 5


def test_dirichlet_bounded_retries_give_clear_error():
  y = _balanced_labels(per_class=5)
  with pytest.raises(ValueError, match='min_size=2'):
    P.dirichlet(y, 25, alpha=0.01, seed=0, min_size=2, max_tries=3)
  with pytest.raises(ValueError, match='alpha must be > 0'):
    P.dirichlet(y, 5, alpha=0.0, seed=0)


def test_shards_exactly_k_classes_per_client():
  y = _balanced_labels(num_classes=10, per_class=60)
  for k in (1, 2, 3):
    ds = P.partition({'y': y, 'row': np.arange(y.size)}, y, 'shards',
                     num_clients=20, classes_per_client=k, seed=k)
    # 20 * k shards of 600 / (20 k) examples; each shard holds one label.
    np.testing.assert_array_equal(ds.client_sizes, 600 // 20)
    np.testing.assert_array_equal(np.sort(ds.columns['row']), np.arange(600))
    r = P.report(ds)
    np.testing.assert_array_equal(r['distinct_labels'], k)
    for i in range(ds.num_clients):
      counts = r['label_counts'][i]
      np.testing.assert_array_equal(counts[counts > 0], 600 // (20 * k))


def test_shards_unbalanced_labels_still_assign_everything():
  y = np.random.default_rng(0).integers(0, 10, 6001)
  index, names = P.shards(y, 100, 2, seed=0)
  _assert_valid(index, names, y.size, 100)
  sizes = np.bincount(index, minlength=100)
  assert sizes.max() - sizes.min() <= 2
  distinct = [np.unique(y[index == i]).size for i in range(100)]
  assert min(distinct) >= 2 and max(distinct) <= 4


def test_partition_unknown_method_names_accepted():
  y = np.zeros(4, np.int64)
  with pytest.raises(ValueError, match=r"'kmeans'.*'natural'.*'shards'"):
    P.partition({'y': y}, y, 'kmeans')


def test_partition_natural_builds_dataset():
  keys = np.array([2, 0, 2, 1, 0])
  ds = P.partition({'x': np.arange(5) * 10}, keys, 'natural')
  assert ds.client_names.tolist() == ['0', '1', '2']
  assert ds.client(0)['x'].tolist() == [10, 40]
  assert ds.client(2)['x'].tolist() == [0, 20]


def test_report_scalar_labels_by_hand():
  y = np.array([0, 0, 1, 2, 2, 2])
  ds = P.partition({'y': y}, np.array([0, 0, 0, 1, 1, 1]), 'natural')
  r = P.report(ds, num_classes=4)
  np.testing.assert_array_equal(r['label_counts'], [[2, 1, 0, 0],
                                                    [0, 0, 3, 0]])
  np.testing.assert_array_equal(r['distinct_labels'], [2, 1])
  assert r['mean_distinct_labels'] == 1.5
  assert r['sizes']['min'] == r['sizes']['max'] == 3
  assert r['sizes']['hist_counts'].sum() == 2
  # pooled = [2, 1, 3, 0] / 6; TV(client 0) = 0.5, TV(client 1) = 0.5.
  assert r['mean_tv_to_global'] == pytest.approx(0.5)


def test_report_sequence_labels_skip_pad():
  from fedjax_pfi.data.federated import FederatedDataset
  y = np.array([[3, 4, 0], [4, 0, 0], [5, 5, 5]], np.int32)
  ds = FederatedDataset(
      {'y': y}, np.array([0, 2, 3]), np.array(['a', 'b']),
      {'pad_id': 0, 'vocab_size': 6})
  r = P.report(ds)
  np.testing.assert_array_equal(r['label_counts'], [[0, 0, 0, 1, 2, 0],
                                                    [0, 0, 0, 0, 0, 3]])
  np.testing.assert_array_equal(r['distinct_labels'], [2, 1])
