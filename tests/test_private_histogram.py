"""The private gain histogram: accounting against dp-accounting, estimates
converging to the truth as epsilon grows, the clients-needed formula
against a simulation."""

import math

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
import numpy as np
import pytest

from fedjax_pfi import private_histogram as ph

K = ph.GAIN_EDGES.size - 1


def gains(n, hurt, seed=0):
  """``n`` gains, a ``hurt`` fraction of them negative."""
  rng = np.random.default_rng(seed)
  g = rng.uniform(0.001, 0.3, n)
  g[: int(round(hurt * n))] *= -1
  return g


def test_bins_and_the_hurt_fraction_without_noise():
  g = np.array([-0.5, -0.15, -0.01, 0.0, 0.01, 0.5, 1.0])
  b = ph.bin_of(g)
  assert b.tolist() == [0, 1, 4, 5, 6, 10, 10]
  r = ph.release(b, K, 'gaussian', math.inf, 1e-5, np.random.default_rng(0))
  np.testing.assert_array_equal(r.counts, r.true_counts)
  assert ph.hurt_fraction(r.counts) == pytest.approx(3 / 7)
  centres = np.clip((ph.GAIN_EDGES[:-1] + ph.GAIN_EDGES[1:]) / 2, -1, 1)
  assert ph.spread_std(r.counts) == pytest.approx(np.std(centres[b]))


def test_gaussian_accounting_matches_dp_accounting():
  z = ph.calibrate_gaussian(1.0, 1e-5)
  acc = pld_privacy_accountant.PLDAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(z))
  eps = acc.get_epsilon(1e-5)  # PLD: pessimistic by its discretization
  assert 1.0 <= eps <= 1.001
  assert ph.gaussian_epsilon(z, 1e-5) == pytest.approx(1.0, abs=1e-9)
  assert ph.gaussian_delta(z, 1.0) == pytest.approx(1e-5, rel=1e-9)
  # The classical bound sqrt(2 ln(1.25/delta)) / eps overstates z at eps 1.
  assert z < math.sqrt(2 * math.log(1.25 / 1e-5))


def test_randomized_response_p_is_pure_epsilon():
  """The mechanism's output distributions, written out for every pair of
  inputs: the largest log ratio is epsilon."""
  for eps in (0.5, 1.0, 4.0):
    p = ph.randomized_response_p(eps, K)
    out = (1 - p) * np.eye(K) + p / K  # out[i, o] = P(report o | bin i)
    np.testing.assert_allclose(out.sum(1), 1.0)
    worst = max(np.max(np.log(out[i] / out[j])) for i in range(K)
                for j in range(K))
    assert worst == pytest.approx(eps)


@pytest.mark.parametrize('mechanism', ph.MECHANISMS)
def test_estimate_converges_to_the_truth_as_epsilon_grows(mechanism):
  b = ph.bin_of(gains(2000, 0.2))
  errors = []
  for eps in (0.1, 1.0, 10.0, math.inf):
    err = [abs(ph.hurt_fraction(ph.release(
        b, K, mechanism, eps, 1e-5, np.random.default_rng(s)).counts) - 0.2)
           for s in range(40)]
    errors.append(np.mean(err))
  assert errors[0] > errors[1] > errors[2] >= errors[3]
  assert errors[3] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize('mechanism,eps', [('gaussian', 1.0),
                                           ('randomized_response', 1.0),
                                           ('randomized_response', 4.0)])
def test_clients_to_see_matches_a_simulation(mechanism, eps):
  """At the formula's population the estimate falls within h / 2 of h in
  about 95% of releases (two standard errors)."""
  n = int(math.ceil(ph.clients_to_see(0.2, eps, mechanism)))
  b = ph.bin_of(gains(n, 0.2))
  rng = np.random.default_rng(1)
  within = [abs(ph.hurt_fraction(ph.release(b, K, mechanism, eps, 1e-5,
                                            rng).counts) - 0.2) <= 0.1
            for _ in range(400)]
  assert 0.91 <= np.mean(within) <= 0.99, (n, np.mean(within))


def test_bad_mechanism_or_epsilon():
  with pytest.raises(ValueError, match="unknown histogram mechanism 'laplace'"
                     '; accepted: gaussian, randomized_response'):
    ph.release([0], K, 'laplace', 1.0, 1e-5, np.random.default_rng(0))
  with pytest.raises(ValueError, match='epsilon must be > 0, got -1'):
    ph.calibrate_gaussian(-1, 1e-5)
