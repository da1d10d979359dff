"""Memory-mapped populations: a million clients, a cohort reads only its rows."""

import numpy as np

from fedjax_pfi import training
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data import registry
from fedjax_pfi.data.federated import FederatedDataset, FederatedSplits
from tests.test_training import small_config


def million_clients():
  n = 1_000_000
  sizes = 1 + (np.arange(n) % 3)  # 1, 2 or 3 examples each
  total = int(sizes.sum())
  x = np.arange(total * 2, dtype=np.float32).reshape(total, 2)
  y = (np.arange(total) % 5).astype(np.int32)
  return FederatedDataset(
      {'x': x, 'y': y}, np.concatenate([[0], np.cumsum(sizes)]),
      np.arange(n).astype(str), {'num_classes': 5})


def test_million_client_population_memory_mapped(tmp_path):
  ds = million_clients()
  ds.save(str(tmp_path))
  loaded = FederatedDataset.load(str(tmp_path))
  assert isinstance(loaded.columns['x'], np.memmap)
  assert loaded.num_clients == 1_000_000
  ids = cohort_lib.sample_cohort(loaded.num_clients, 64, seed=0, round_idx=7)
  a = cohort_lib.stack_cohort(loaded, ids, batch_size=2, seed=0, round_idx=7)
  b = cohort_lib.stack_cohort(ds, ids, batch_size=2, seed=0, round_idx=7)
  for k in ('x', 'y'):
    np.testing.assert_array_equal(a.batches[k], b.batches[k])
  np.testing.assert_array_equal(a.mask, b.mask)
  # The stacked rows are exactly the sampled clients' examples.
  want = np.concatenate([ds.client(i)['y'] for i in ids])
  assert np.sort(a.batches['y'][a.mask]).tolist() == np.sort(want).tolist()
  packed = cohort_lib.pack_cohort(loaded, ids, num_lanes=8, batch_size=2,
                                  seed=0, round_idx=7)
  assert packed.mask.sum() == ds.client_sizes[ids].sum()


def test_saved_splits_run_from_the_registry(tmp_path):
  splits = registry.load_splits(small_config().data)
  splits.save(str(tmp_path / 'splits'))
  loaded = registry.load_splits({'name': 'saved',
                                 'path': str(tmp_path / 'splits')})
  assert isinstance(loaded.train.columns['x'], np.memmap)
  assert loaded.heldout_test is not None
  np.testing.assert_array_equal(loaded.test.offsets, splits.test.offsets)
  plain = training.run(small_config(), str(tmp_path / 'a'))
  saved = training.run(small_config(**{'data.name': 'saved',
                                       'data.path': str(tmp_path / 'splits')}),
                       str(tmp_path / 'b'))
  for k in ('train_loss', 'test/accuracy', 'heldout/accuracy'):
    np.testing.assert_allclose(saved[k], plain[k], rtol=1e-6, err_msg=k)


def test_missing_saved_splits_are_named(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError, match='not a saved FederatedDataset'):
    FederatedDataset.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='lacks the split'):
    FederatedSplits.load(str(tmp_path))
  with pytest.raises(ValueError, match='data.path'):
    registry.load_splits({'name': 'saved'})
