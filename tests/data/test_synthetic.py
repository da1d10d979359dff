"""Tests of fedjax_pfi.data.synthetic (FedProx Synthetic(alpha, beta))."""

import numpy as np
import pytest

from fedjax_pfi.data import partition
from fedjax_pfi.data.synthetic import synthetic


def test_shapes_and_sizes():
  ds = synthetic(0.5, 0.5, seed=0)
  assert ds.num_clients == 30
  assert ds.columns['x'].shape == (ds.num_examples, 60)
  assert ds.columns['x'].dtype == np.float32
  assert ds.columns['y'].dtype == np.int32
  assert ds.columns['y'].min() >= 0 and ds.columns['y'].max() < 10
  assert ds.metadata['num_classes'] == 10
  assert ds.client_sizes.min() >= 50  # int(lognormal(4, 2)) + 50
  assert ds.client_names[0] == 'f_00000'
  small = synthetic(1, 1, num_clients=4, num_features=5, num_classes=3)
  assert small.columns['x'].shape[1] == 5 and small.columns['y'].max() < 3


def test_deterministic_per_seed():
  a, b, c = (synthetic(1, 1, seed=s) for s in (7, 7, 8))
  np.testing.assert_array_equal(a.columns['x'], b.columns['x'])
  np.testing.assert_array_equal(a.columns['y'], b.columns['y'])
  np.testing.assert_array_equal(a.offsets, b.offsets)
  assert not np.array_equal(a.offsets, c.offsets)


@pytest.mark.parametrize('alpha,beta,iid', [(0, 0, False), (1, 1, False),
                                            (0, 0, True)])
def test_labels_are_argmax_of_generating_model(alpha, beta, iid):
  ds, p = synthetic(alpha, beta, seed=3, iid=iid, return_params=True)
  assert p['W'].shape == (30, 60, 10) and p['b'].shape == (30, 10)
  assert p['v'].shape == (30, 60)
  for k in range(ds.num_clients):
    c = ds.client(k)
    logits = c['x'].astype(np.float64) @ p['W'][k] + p['b'][k]
    np.testing.assert_array_equal(c['y'], np.argmax(logits, axis=1))
  if iid:
    np.testing.assert_array_equal(p['W'][0], p['W'][-1])
    np.testing.assert_array_equal(p['v'], 0)


def test_feature_distribution_matches_definition():
  ds, p = synthetic(0, 2, num_clients=3, seed=1, return_params=True)
  big = np.argmax(ds.client_sizes)
  x = ds.client(big)['x']
  assert len(x) > 300
  np.testing.assert_allclose(p['sigma_diag'], np.arange(1, 61) ** -1.2)
  # x ~ N(v_k, diag(j^-1.2)): check mean and variance per feature.
  se = np.sqrt(p['sigma_diag'] / len(x))
  assert np.all(np.abs(x.mean(0) - p['v'][big]) < 5 * se)
  ratio = x.var(0) / p['sigma_diag']
  assert 0.7 < ratio.mean() < 1.3


def test_beta_increases_feature_heterogeneity():
  spread = []
  for beta in (0.0, 1.0, 3.0):
    ds = synthetic(0, beta, seed=2)
    means = [ds.client(k)['x'].mean() for k in range(ds.num_clients)]
    spread.append(np.std(means))
  assert spread[0] < 0.3 < spread[1] < spread[2]


def test_alpha_shifts_models_but_not_labels():
  # u_k shifts every class logit equally (W_k and b_k share the mean u_k), so
  # in the reference generator alpha changes the models, not y given x.
  a, pa = synthetic(0, 0.5, seed=4, return_params=True)
  b, pb = synthetic(3, 0.5, seed=4, return_params=True)
  assert np.std(pa['W'].mean(axis=(1, 2))) < 0.1
  assert np.std(pb['W'].mean(axis=(1, 2))) > 1.0
  np.testing.assert_array_equal(a.columns['x'], b.columns['x'])
  assert np.mean(a.columns['y'] == b.columns['y']) > 0.999


def test_non_iid_is_label_skewed_vs_iid():
  iid = partition.report(synthetic(0, 0, iid=True, seed=0))
  non = partition.report(synthetic(1, 1, seed=0))
  assert iid['mean_tv_to_global'] < 0.25 < non['mean_tv_to_global']


def test_bad_arguments():
  with pytest.raises(ValueError, match='alpha=0.5'):
    synthetic(0.5, 0, iid=True)
  with pytest.raises(ValueError, match='beta must be'):
    synthetic(0, -1)
  with pytest.raises(ValueError, match='num_clients'):
    synthetic(0, 0, num_clients=0)
