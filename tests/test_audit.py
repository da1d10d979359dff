"""Auditing DP with canaries: the pieces by hand, and an audited run whose
empirical epsilon lower bound stays below the accountant's."""

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
import jax
import jax.numpy as jnp
import numpy as np

from experiments import dp_audit
from fedjax_pfi import audit


def test_directions_are_unit_and_canaries_replace_only_their_clients():
  template = {'a': jnp.zeros([3, 2]), 'b': jnp.zeros([4])}
  d = audit.directions(template, 5, jax.random.key(0))
  norms = np.sqrt(sum(np.sum(np.square(np.asarray(x)).reshape(5, -1), 1)
                      for x in jax.tree.leaves(d)))
  np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
  t = audit.canary_transform([7, 9], jax.tree.map(lambda x: x[:2], d),
                             scale=10.0)
  state = t.init(template)
  message = {'a': jnp.ones([3, 2]), 'b': jnp.ones([4])}
  for cid, row in ((7, 0), (9, 1), (8, None)):
    out, _ = t.apply(message, t.select(state, jnp.int32(cid)),
                     jax.random.key(1))
    want = message if row is None else jax.tree.map(
        lambda x, row=row: 10.0 * x[row], d)
    for k in out:
      np.testing.assert_allclose(out[k], want[k], rtol=1e-6)


def test_gaussian_epsilon_matches_dp_accounting():
  """mu-GDP is the Gaussian mechanism of std 1/mu (sensitivity 1)."""
  for mu in (0.5, 1.0, 2.0):
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.0 / mu))
    assert abs(audit.gaussian_epsilon(mu, 1e-5) - acc.get_epsilon(1e-5)) < 2e-3


def test_lower_bound_by_hand():
  """Inserted scores all above held-out ones, 100 each: TPR_lo and FPR_hi
  are Clopper-Pearson bounds at alpha / 200 thresholds; the bound is
  log(TPR_lo / FPR_hi) at the threshold between them."""
  inserted, held_out = np.linspace(1, 2, 100), np.linspace(-1, 0, 100)
  got = audit.epsilon_lower_bound(inserted, held_out, delta=0.0, alpha=0.05)
  lo, _ = audit._clopper_pearson(100, 100, 0.05 / 200)  # pylint: disable=protected-access
  _, hi = audit._clopper_pearson(0, 100, 0.05 / 200)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, np.log(lo / hi), rtol=1e-9)
  assert audit.epsilon_lower_bound(held_out, inserted, 0.0) == 0.0


def test_audited_run_stays_below_the_accountant(tmp_path):
  """Little noise (sigma 0.4): the canaries are found (a positive bound),
  and the bound stays below the accounted epsilon."""
  r = dp_audit.run(str(tmp_path), 0.4, clients=150, canaries=100, rounds=20,
                   per_round=40, delta=1e-5)
  assert r['score_inserted_mean'] > r['score_held_out_mean']
  assert 0 < r['epsilon_lower_bound'] <= r['epsilon_pld'] <= r['epsilon_rdp']
