"""User-level differential privacy: the mechanism a config asks for, and its
accounting with the ``dp-accounting`` package.

``config.privacy.mechanism``:

- ``'none'``: no privacy (the default).
- ``'gaussian'``: DP-FedAvg (McMahan et al., ICLR 2018): every client's
  message (its update of the federated part) is clipped to L2 norm
  ``clip_norm``, the sum gets Gaussian noise of std ``noise_multiplier *
  clip_norm`` and is divided by the expected number of clients per round;
  clients weigh equally (`aggregators.gaussian`).
- ``'adaptive'``: the same with the clip norm adapted towards the
  ``target_quantile`` of the clients' update norms (Andrew et al., NeurIPS
  2021), from a noised count whose share of the budget is accounted.

The privacy unit is a client (user-level DP): a client's whole contribution
to a round is its clipped message. The personal parts of the personalized
algorithms and a foundation model's frozen base never leave the client and
are not in the message.

Sampling (``privacy.sampling``): ``'poisson'`` (each client takes part
independently with ``q = clients_per_round / population``; accounted with
RDP and PLD under add-or-remove-one) or ``'fixed'`` (``clients_per_round``
drawn without replacement; accounted with RDP under replace-one, which PLD
does not support; replacing a client moves the sum by up to ``2 C``, so the
accountant's Gaussian has multiplier ``z / 2``).

`Accountant` gives epsilon at ``privacy.delta`` after ``t`` rounds:
``epsilon_rdp`` (cheap: one round's RDP curve times ``t``) and
``epsilon_pld`` (0.3-2 s a call here, so the loop computes it at evaluation
and checkpoint rounds and at the end). `calibrate` finds the noise
multiplier of a ``target_epsilon`` before training. ``noise_cohort_size``
(pfl-research's option of that name) accounts for a cohort of that size
drawn from ``noise_population`` clients while simulating fewer: the noise
is scaled by ``clients_per_round / noise_cohort_size`` so that the
simulated mean is as noisy as the larger cohort's, and the report labels
the epsilon an extrapolation.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional
import warnings

import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_pfi.algorithms import aggregators

MECHANISMS = ('none', 'gaussian', 'adaptive')
SAMPLINGS = ('poisson', 'fixed')
#: The sampling of asynchronous aggregation's accounting (`Accounting`),
#: where the device model's schedule is public and nothing is sampled.
SCHEDULED = 'scheduled'
ACCOUNTANTS = ('pld', 'rdp')
# The bracket `calibrate` searches for a noise multiplier in.
NOISE_BRACKET = (0.1, 1e3)


class Accounting(NamedTuple):
  """The accountant's inputs: what anyone needs to recompute epsilon.

  Attributes:
    noise_multiplier: ``z``, the std of the noise over the sensitivity
      (adaptive clipping's count included, Andrew et al. 2021 Thm. 1).
    sampling: ``'poisson'``, ``'fixed'``, or `SCHEDULED` (asynchronous
      aggregation: who trains in a step is the device model's schedule,
      taken as public; no amplification by sampling, and the rounds
      composed are a client's own steps, `Accountant`'s ``units``).
    population: clients the cohort is drawn from.
    cohort: ``q * population`` (Poisson), the cohort size (fixed), the
      buffer ``K`` (scheduled).
    delta: the target delta.
    extrapolated: the population and cohort are ``noise_population`` and
      ``noise_cohort_size``, larger than the simulation's.
  """
  noise_multiplier: float
  sampling: str
  population: int
  cohort: int
  delta: float
  extrapolated: bool = False

  @property
  def sampling_rate(self) -> float:
    """``q = cohort / population``."""
    return self.cohort / self.population

  @property
  def relation(self) -> str:
    """The neighbouring relation's name, ``'add_or_remove_one'``
    (Poisson), ``'replace_one'`` (fixed) or ``'zero_out'`` (scheduled)."""
    return {'poisson': 'add_or_remove_one', 'fixed': 'replace_one',
            SCHEDULED: 'zero_out'}[self.sampling]

  @property
  def sensitivity(self) -> float:
    """How far one client moves the noised sum, in clip norms. Adding or
    removing a client moves it by at most ``C``, replacing one by ``2 C``,
    zeroing out its update (scheduled: its place in the schedule stays) by
    ``C`` (and adaptive clipping's count of bits in {-1/2, 1/2} by 1/2 and
    1)."""
    return 2.0 if self.sampling == 'fixed' else 1.0

  @property
  def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
    """`relation` as dp-accounting's ``NeighboringRelation``."""
    return {'poisson': dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            'fixed': dp_accounting.NeighboringRelation.REPLACE_ONE,
            SCHEDULED: dp_accounting.NeighboringRelation.REPLACE_SPECIAL}[
                self.sampling]

  def event(self, rounds: int, noise_multiplier: Optional[float] = None
            ) -> dp_accounting.DpEvent:
    """``rounds`` rounds as one `dp_accounting.DpEvent`, whose Gaussian's
    multiplier is the noise std over the sensitivity: ``z / sensitivity``
    (dp-accounting's ``GaussianDpEvent`` takes it relative to the
    l2-sensitivity under the accountant's neighbouring relation)."""
    z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
    gauss = dp_accounting.GaussianDpEvent(z / self.sensitivity)
    if self.sampling == SCHEDULED:  # a step the client is in: no sampling
      one = gauss
    elif self.sampling == 'poisson':
      one = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gauss)
    else:
      one = dp_accounting.SampledWithoutReplacementDpEvent(
          self.population, self.cohort, gauss)
    return dp_accounting.SelfComposedDpEvent(one, rounds)

  def rdp_accountant(self) -> rdp_privacy_accountant.RdpAccountant:
    """A fresh RDP accountant under `neighboring_relation`."""
    return rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=self.neighboring_relation)

  def pld_accountant(self) -> pld_privacy_accountant.PLDAccountant:
    """A fresh PLD accountant under `neighboring_relation`."""
    return pld_privacy_accountant.PLDAccountant(
        neighboring_relation=self.neighboring_relation)

  def report(self) -> dict:
    """``privacy/...`` entries of ``report.json``: the inputs beside epsilon."""
    return {'privacy/noise_multiplier': self.noise_multiplier,
            'privacy/sampling': self.sampling,
            # nothing is sampled in a scheduled (asynchronous) run
            'privacy/sampling_rate': (None if self.sampling == SCHEDULED
                                      else self.sampling_rate),
            'privacy/population': self.population,
            'privacy/cohort': self.cohort,
            'privacy/delta': self.delta,
            'privacy/neighboring_relation': self.relation,
            'privacy/sensitivity_clip_norms': self.sensitivity,
            # what dp-accounting's GaussianDpEvent is given
            'privacy/event_noise_multiplier': (self.noise_multiplier /
                                               self.sensitivity),
            'privacy/extrapolated': self.extrapolated}


class Accountant:
  """Epsilon after ``t`` rounds of an `Accounting`'s mechanism.

  Scheduled (asynchronous) accounting passes ``t`` = the largest number of
  server steps any one client has been aggregated in (a client ``k`` times
  in one step counts ``k^2``: its sensitivity there is ``k C``), from the
  device model (`devices.Clock.max_units`): a client's privacy loss is the
  composition of the Gaussian releases of the steps it is in, and the
  others' releases do not depend on its data (zero-out neighbours)."""

  def __init__(self, accounting: Accounting):
    self.accounting = accounting
    one = accounting.rdp_accountant()
    one.compose(accounting.event(1))
    self._orders, self._rdp_one = one.orders, one.rdp

  def epsilon_rdp(self, rounds: int) -> float:
    """RDP's epsilon: one round's RDP curve times ``rounds`` (RDP composes
    additively, as `dp_accounting.SelfComposedDpEvent` does)."""
    if rounds <= 0:
      return 0.0
    return float(rdp_privacy_accountant.compute_epsilon(
        self._orders, self._rdp_one * rounds, self.accounting.delta)[0])

  @property
  def has_pld(self) -> bool:
    """Whether a PLD accountant applies (Poisson or scheduled sampling)."""
    return self.accounting.sampling in ('poisson', SCHEDULED)

  @functools.lru_cache(maxsize=64)
  def epsilon_pld(self, rounds: int) -> Optional[float]:
    """PLD's epsilon (Poisson sampling or scheduled; None otherwise)."""
    if not self.has_pld:
      return None
    if rounds <= 0:
      return 0.0
    acc = self.accounting.pld_accountant()
    acc.compose(self.accounting.event(rounds))
    return float(acc.get_epsilon(self.accounting.delta))


def _accountant_for(kind: str, accounting: Accounting):
  if kind == 'pld':
    if accounting.sampling == 'fixed':
      raise ValueError(
          "privacy.accountant='pld' needs Poisson sampling: dp-accounting's "
          'PLD does not support sampling without replacement; set '
          "privacy.accountant='rdp' or privacy.sampling='poisson'.")
    return accounting.pld_accountant()
  return accounting.rdp_accountant()


def calibrate(accounting: Accounting, rounds: int, target_epsilon: float,
              kind: str = 'pld') -> float:
  """The smallest noise multiplier whose epsilon after ``rounds`` rounds is
  at most ``target_epsilon`` by ``kind``'s accountant
  (`dp_accounting.mechanism_calibration`), to within 0.1% of it.

  RDP's multiplier comes first (each evaluation takes milliseconds); PLD,
  which is tighter (its multiplier is never above RDP's) and takes 1-25 s
  an evaluation here, then searches ``[z_rdp / 2, z_rdp]``.
  """
  if not target_epsilon > 0:
    raise ValueError(f'privacy.target_epsilon must be > 0, got '
                     f'{target_epsilon}.')

  def epsilon(z, kind):
    acc = _accountant_for(kind, accounting)
    acc.compose(accounting.event(rounds, z))
    return acc.get_epsilon(accounting.delta)

  def search(lo, hi, kind):
    return float(mechanism_calibration.calibrate_dp_mechanism(
        lambda: _accountant_for(kind, accounting),
        lambda z: accounting.event(rounds, z), target_epsilon,
        accounting.delta, mechanism_calibration.ExplicitBracketInterval(lo, hi),
        tol=1e-3 * lo))

  lo, hi = NOISE_BRACKET
  if epsilon(hi, 'rdp') > target_epsilon and (
      kind == 'rdp' or epsilon(hi, kind) > target_epsilon):
    raise ValueError(
        f'privacy.target_epsilon={target_epsilon} cannot be reached in '
        f'{rounds} rounds at sampling rate {accounting.sampling_rate:.4g}: '
        f'even noise multiplier {hi:g} gives epsilon '
        f'{epsilon(hi, kind):.4g} ({kind}). Raise the target, or lower '
        'rounds or clients_per_round.')
  z = lo if epsilon(lo, 'rdp') <= target_epsilon else search(lo, hi, 'rdp')
  if kind == 'rdp' or z == lo:
    return z
  if epsilon(z / 2, kind) <= target_epsilon:  # (not seen: PLD saves < 2x)
    return search(max(lo, z / 8), z / 2, kind) if z / 2 > lo else lo
  return search(z / 2, z, kind)


class Mechanism(NamedTuple):
  """What `build` makes of ``config.privacy``."""
  aggregator: aggregators.Aggregator
  accountant: Accountant
  clip_norm: float
  noise_multiplier: float
  calibrated: bool


def check(config) -> None:
  """``config.privacy``'s values, before anything is loaded."""
  p = config.privacy
  if p.mechanism not in MECHANISMS:
    raise ValueError(f'unknown privacy.mechanism {p.mechanism!r}; accepted: '
                     f'{", ".join(MECHANISMS)}.')
  if p.mechanism == 'none':
    return
  for key, values in (('sampling', SAMPLINGS), ('accountant', ACCOUNTANTS)):
    if p[key] not in values:
      raise ValueError(f'unknown privacy.{key} {p[key]!r}; accepted: '
                       f'{", ".join(values)}.')
  aggregators.check_clip_and_noise(
      p.clip_norm, p.noise_multiplier if p.target_epsilon is None else None)
  if (p.target_epsilon is not None and p.accountant == 'pld' and
      p.sampling != 'poisson' and not scheduled(config)):
    raise ValueError(
        "privacy.accountant='pld' needs Poisson sampling to calibrate: "
        "dp-accounting's PLD does not support sampling without replacement; "
        "set privacy.accountant='rdp' or privacy.sampling='poisson'.")
  if not 0 < p.delta < 1:
    raise ValueError(f'privacy.delta must lie in (0, 1), got {p.delta}.')
  if p.mechanism == 'adaptive' and not 0 < p.target_quantile < 1:
    raise ValueError(f'privacy.target_quantile must lie in (0, 1), got '
                     f'{p.target_quantile}.')
  if config.server.weighting == 'examples':
    raise ValueError(
        "server.weighting='examples' cannot be used with DP: a client's "
        'example count would scale its contribution past the clip norm (the '
        "sensitivity); DP-FedAvg weighs clients uniformly. Leave "
        "server.weighting unset or 'uniform'.")


def scheduled(config) -> bool:
  """Asynchronous aggregation (``asynchrony.mode`` fedbuff or fedasync):
  accounted as `SCHEDULED`."""
  from fedjax_pfi import asynchrony  # pylint: disable=g-import-not-at-top
  return asynchrony.enabled(config)


def build(config, population: int, expected_clients: float
          ) -> Optional[Mechanism]:
  """The mechanism of ``config.privacy`` for a population of ``population``
  clients of which ``expected_clients`` take part per round, or None."""
  p = config.privacy
  if p.mechanism == 'none':
    return None
  extrapolated = p.noise_cohort_size is not None
  sampling = SCHEDULED if scheduled(config) else p.sampling
  if extrapolated and sampling == SCHEDULED:
    raise ValueError(
        f'privacy.noise_cohort_size={p.noise_cohort_size} with asynchrony.'
        f'mode={config.asynchrony.mode!r}: the extrapolation scales the '
        'noise of a sampled cohort, and an asynchronous step samples none; '
        'unset privacy.noise_cohort_size.')
  if extrapolated:
    cohort = int(p.noise_cohort_size)
    pop = int(p.noise_population or population)
    if not 0 < cohort <= pop:
      raise ValueError(
          f'privacy.noise_cohort_size={cohort} must lie in 1..'
          f'privacy.noise_population ({pop}).')
    noise_scale = expected_clients / cohort
  elif sampling == SCHEDULED:  # the buffer: the DP mean's denominator
    cohort, pop, noise_scale = int(expected_clients), population, 1.0
  else:
    cohort = (int(config.clients_per_round) if p.sampling == 'fixed' else
              config.clients_per_round)
    pop, noise_scale = population, 1.0
  if p.delta >= 1.0 / pop:
    warnings.warn(
        f'privacy.delta={p.delta:g} is not below 1/population = '
        f'{1.0 / pop:g}: a mechanism that publishes one client\'s data whole '
        f'satisfies such a delta. Choose delta well below 1/{pop}.',
        UserWarning, stacklevel=2)
  accounting = Accounting(float(p.noise_multiplier), sampling, pop, cohort,
                          float(p.delta), extrapolated)
  calibrated = p.target_epsilon is not None
  if calibrated:
    z = calibrate(accounting, int(config.rounds), float(p.target_epsilon),
                  p.accountant)
    accounting = accounting._replace(noise_multiplier=z)
  z = accounting.noise_multiplier
  adaptive = None
  if p.mechanism == 'adaptive':
    # Andrew et al. take sigma_b = m / 20; a small cohort needs more for the
    # count's share of the budget to leave the updates some (2 sigma_b > z).
    count_std = (float(p.count_noise_std) if p.count_noise_std is not None
                 else max(expected_clients / 20.0, z))
    adaptive = aggregators.AdaptiveClipping(
        float(p.target_quantile), float(p.clip_learning_rate), count_std)
  agg = aggregators.gaussian(float(p.clip_norm), z, expected_clients,
                             noise_scale=noise_scale, adaptive=adaptive)
  return Mechanism(agg, Accountant(accounting), float(p.clip_norm), z,
                   calibrated)
