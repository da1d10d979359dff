"""client_stats against scipy and against values computed by hand."""

import numpy as np
import pytest
from scipy import stats

from fedjax_pfi import client_stats


def test_discordant_p_is_scipys_exact_binomial_test():
  worse = np.array([0, 3, 7, 2, 10, 0])
  better = np.array([0, 1, 2, 2, 0, 5])
  got = client_stats.discordant_p(worse, better)
  for w, b, p in zip(worse, better, got):
    want = 1.0 if w + b == 0 else stats.binomtest(
        int(w), int(w + b), 0.5, alternative='greater').pvalue
    assert p == pytest.approx(want, rel=1e-12)
  # By hand: 3 of 4 discordant against the model: P(X >= 3) = 5/16.
  assert got[1] == pytest.approx(5 / 16)
  assert got[4] == pytest.approx(2.0 ** -10)


def test_sixteen_examples_one_worse_is_not_hurt():
  """A client with 16 test examples that loses one: a 6-point drop, and
  noise (p = 1/2); losing 5 of 5 discordant examples is beyond it."""
  hurt, helped = client_stats.significant([1, 5, 0], [0, 0, 5], alpha=0.05)
  assert hurt.tolist() == [False, True, False]
  assert helped.tolist() == [False, False, True]
  with pytest.raises(ValueError, match=r'evaluation.alpha must lie in \(0, 1'
                     r'\), got 1.5'):
    client_stats.significant([1], [0], alpha=1.5)


def test_paired_bootstrap():
  rng = np.random.default_rng(0)
  ref = rng.normal(2.0, 0.5, 200)
  worse = ref + 0.3 + rng.normal(0, 0.1, 200)
  assert client_stats.paired_bootstrap_p(worse, ref) == pytest.approx(
      1 / 1001)
  # Equal losses: every centred resample ties the observed 0.
  assert client_stats.paired_bootstrap_p(ref, ref) == 1.0
  better = ref - 0.3
  assert client_stats.paired_bootstrap_p(better, ref) == 1.0
  same_seed = client_stats.paired_bootstrap_p(ref + rng.normal(0, .5, 200),
                                              ref, seed=3)
  assert 0 < same_seed <= 1


def test_gini_on_known_vectors():
  assert client_stats.gini([1, 1, 1, 1]) == 0.0
  assert client_stats.gini([0, 0, 0, 1]) == pytest.approx(0.75)
  assert client_stats.gini([0, 0, 0, 0]) == 0.0
  # By hand: [1, 2, 3]: sum |xi - xj| = 2 (1 + 2 + 1) = 8; 8 / (2 9 2) = 2/9.
  assert client_stats.gini([3, 1, 2]) == pytest.approx(2 / 9)
  x = np.random.default_rng(1).random(50)
  brute = np.abs(x[:, None] - x[None]).sum() / (2 * x.size ** 2 * x.mean())
  assert client_stats.gini(x) == pytest.approx(brute)
  with pytest.raises(ValueError, match='non-negative'):
    client_stats.gini([1, -1])


def test_spread():
  acc = np.arange(1, 21) / 20.0  # 0.05 .. 1.0
  s = client_stats.spread(acc)
  assert s['p10'] == pytest.approx(np.percentile(acc, 10))
  assert s['p90_p10_gap'] == pytest.approx(s['p90'] - s['p10'])
  assert s['worst_decile_mean'] == pytest.approx((0.05 + 0.10) / 2)
  assert s['std'] == pytest.approx(acc.std())


def test_ece_on_a_constructed_example():
  # Bin (0.6, 0.667]: confidences 0.65 (x4), 3 correct: |0.75 - 0.65| = 0.1.
  # Bin (0.933, 1]: confidence 0.95 (x4), 2 correct: |0.5 - 0.95| = 0.45.
  conf = [0.65] * 4 + [0.95] * 4
  ok = [1, 1, 1, 0, 1, 1, 0, 0]
  count, correct, conf_sum = client_stats.calibration_bins(conf, ok)
  assert count.sum() == 8 and count[9] == 4 and count[14] == 4
  assert client_stats.ece(count, correct, conf_sum) == pytest.approx(
      0.5 * 0.1 + 0.5 * 0.45)
  # Bins add across batches.
  a = client_stats.calibration_bins(conf[:3], ok[:3])
  b = client_stats.calibration_bins(conf[3:], ok[3:])
  assert client_stats.ece(*(x + y for x, y in zip(a, b))) == pytest.approx(
      0.275)
  perfect = client_stats.calibration_bins([1.0, 1.0], [1, 1])
  assert client_stats.ece(*perfect) == 0.0


def test_group_gap_on_known_groups():
  values = [0.9, 0.8, 0.5, 0.4, 0.7]
  groups = ['comedy', 'comedy', 'tragedy', 'tragedy', 'history']
  g = client_stats.group_gap(values, groups, 'genre')
  assert g['means'] == pytest.approx({'comedy': 0.85, 'tragedy': 0.45,
                                      'history': 0.7})
  assert g['gap'] == pytest.approx(0.4)
  assert (g['max_group'], g['min_group']) == ('comedy', 'tragedy')
  with pytest.raises(ValueError, match=r'genre has 1 value\(s\) \(comedy\)'):
    client_stats.group_gap([1, 2], ['comedy', 'comedy'], 'genre')


def test_rank_correlations():
  size = np.arange(10.0)
  gain = -size ** 3  # monotone: rho = -1
  out = client_stats.rank_correlations(gain, {'size': size,
                                              'const': np.ones(10)})
  assert out['size']['rho'] == pytest.approx(-1.0)
  assert np.isnan(out['const']['rho'])
  with pytest.raises(ValueError, match="feature 'x' has shape"):
    client_stats.rank_correlations(gain, {'x': np.ones(3)})


def test_exposure_by_rank():
  cand = np.arange(1.0, 1024.0)  # 1023 others: |R| = 1024
  assert client_stats.exposure(0.5, cand) == pytest.approx(10.0)  # rank 1
  assert client_stats.exposure(1.5, cand) == pytest.approx(9.0)  # rank 2
  assert client_stats.exposure(2000.0, cand) == pytest.approx(0.0)  # last


def test_paired_bootstrap_segments_agree_with_one_client_at_a_time():
  rng = np.random.default_rng(4)
  sizes = [12, 0, 30, 5]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  ref = rng.normal(size=offsets[-1])
  loss = ref + np.repeat([0.8, 0.0, -0.5, 0.05], sizes) + \
      0.3 * rng.normal(size=offsets[-1])
  got = client_stats.paired_bootstrap_p_segments(loss, ref, offsets,
                                                 num_resamples=4000)
  assert got[1] == 1.0  # no examples
  for i in (0, 2, 3):
    lo, hi = offsets[i], offsets[i + 1]
    one = client_stats.paired_bootstrap_p(loss[lo:hi], ref[lo:hi],
                                          num_resamples=4000)
    assert abs(got[i] - one) < 0.03, i  # two draws of the same p
  assert got[0] < 0.01 and got[2] > 0.99


def test_paired_bootstrap_of_a_few_examples_is_never_surer_than_the_signs():
  # One example resamples to itself: without the floor any positive
  # difference scored 1/1001 (MovieLens users have one test list each).
  assert client_stats.paired_bootstrap_p([2.0], [1.0]) == 0.5
  assert client_stats.paired_bootstrap_p([2.0, 3.0, 4.0], [1.0] * 3) == 0.125
  got = client_stats.paired_bootstrap_p_segments(
      np.array([2.0, 2.0, 3.0] + [1.0] * 12), np.array([1.0] * 15),
      np.array([0, 1, 3, 15]))
  np.testing.assert_allclose(got, [0.5, 0.25, 1.0])
  assert client_stats.sign_floor(11) < 1 / 1001  # no change from 11 on
