"""Who takes part in round ``r``, with how many local steps and which weight.

A participation schedule is a pure function of ``(config, r)``: the training
loop stacks the cohort it names, the evaluation asks which clients have
trained so far, and the privacy accountant reads the same sampling the
rounds ran.

- ``'uniform'`` (`sample_cohort`): ``clients_per_round`` clients drawn
  without replacement, independently each round (what the DP accountant
  calls fixed-size sampling without replacement).
- ``'poisson'``: each client takes part independently with probability
  ``q = clients_per_round / population``, so the cohort size varies; it is
  padded to `poisson_slots` (a bound it exceeds with probability below
  ``1e-12`` per round), so the round compiles once.
- stragglers (``config.stragglers``): a fraction of the cohort does a
  uniformly random part of its local work (FedProx, Li et al. 2020, Sec.
  5.2), or is dropped (weight and steps 0) with ``stragglers.drop``.
- a model of the devices (``config.devices``, `fedjax_pfi.devices`): the
  clients online in simulated time, with the steps they finish before the
  round ends (`devices.Timeline`).
- secure aggregation's dropouts (``config.secure_aggregation.dropout_*``):
  the stage of the protocol at which each client leaves.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats

from fedjax_pfi import secure_aggregation
from fedjax_pfi.data import cohort as cohort_lib

SAMPLINGS = ('uniform', 'poisson')
POISSON_TAIL = 1e-12


class Participants(NamedTuple):
  """Round ``r``'s cohort before it is stacked.

  Attributes:
    ids: the clients, int64 ``[n]``.
    steps: each one's local steps (0: a dropped straggler).
    weights: each one's example weight, float32 (0: dropped).
    stages: under secure aggregation, the stage of the protocol each one
      leaves at (`secure_aggregation.draw_stages`; those leaving before
      they upload train nothing and weigh 0), else None.
  """
  ids: np.ndarray
  steps: np.ndarray
  weights: np.ndarray
  stages: np.ndarray | None = None


def sampling(config) -> str:
  """The sampling a config runs: ``privacy.sampling`` under DP, else
  ``'uniform'``."""
  privacy = config.get('privacy')
  if privacy is None or privacy.get('mechanism', 'none') == 'none':
    return 'uniform'
  return 'poisson' if privacy.sampling == 'poisson' else 'uniform'


def poisson_rate(config, population: int) -> float:
  return min(1.0, config.clients_per_round / population)


def poisson_slots(expected: float, population: int) -> int:
  """The padded cohort size under Poisson sampling: the smallest ``s`` with
  ``P(Binomial(population, q) > s) < POISSON_TAIL``, ``q = expected /
  population``."""
  q = min(1.0, expected / population)
  return max(1, int(stats.binom.isf(POISSON_TAIL, population, q)) + 1)


def sample_ids(config, population: int, round_idx: int) -> np.ndarray:
  """The ids of round ``round_idx``'s cohort (module docstring)."""
  if sampling(config) == 'poisson':
    rng = np.random.default_rng([config.seed, round_idx, 0x9015])
    q = poisson_rate(config, population)
    return np.flatnonzero(rng.random(population) < q).astype(np.int64)
  return cohort_lib.sample_cohort(population, config.clients_per_round,
                                  config.seed, round_idx)


def slots(config, population: int) -> int:
  """How many client slots every round's cohort is padded to (before
  `core.Execution.slots` rounds it up for chunks and devices)."""
  from fedjax_pfi import asynchrony  # pylint: disable=g-import-not-at-top
  if asynchrony.enabled(config):  # a server step aggregates one buffer
    return asynchrony.buffer_size(config)
  if sampling(config) == 'poisson':
    return poisson_slots(config.clients_per_round, population)
  return config.clients_per_round


def participants(config, client_sizes: np.ndarray, round_idx: int,
                 timeline=None) -> Participants:
  """Who takes part in round ``round_idx`` and with how much work; with a
  model of the devices (a `devices.Timeline`), the clients it selects, with
  the steps they finish in simulated time."""
  cap = slots(config, client_sizes.size)
  if timeline is not None:
    one = timeline.round(round_idx)
    ids = one.ids
  else:
    ids = sample_ids(config, client_sizes.size, round_idx)
  if ids.size > cap:
    raise RuntimeError(
        f'round {round_idx + 1} drew {ids.size} clients under Poisson '
        f'sampling, more than the {cap} slots sized to be exceeded with '
        f'probability {POISSON_TAIL:g}.')
  if timeline is not None:
    return _with_stages(config, round_idx, ids, one.steps, one.weights)
  full = cohort_lib.client_steps(client_sizes[ids], config.client.batch_size,
                                 config.client.epochs, config.client.max_steps)
  steps, weights = full, client_sizes[ids].astype(np.float32)
  if config.stragglers.fraction > 0:
    rng = np.random.default_rng([config.seed, round_idx, 0x57A6])
    slow = rng.random(ids.size) < config.stragglers.fraction
    partial = rng.integers(1, full + 1)
    steps = np.where(slow, 0 if config.stragglers.drop else partial, full)
    weights = np.where(slow & config.stragglers.drop, 0.0, weights)
  return _with_stages(config, round_idx, ids, steps, weights)


def _with_stages(config, round_idx: int, ids, steps, weights
                 ) -> Participants:
  """Adds secure aggregation's dropouts (module docstring)."""
  stages = None
  sa = config.get('secure_aggregation')
  if sa is not None and sa.enabled:
    stages = secure_aggregation.draw_stages(
        (sa.dropout_keys, sa.dropout_upload, sa.dropout_unmask), config.seed,
        round_idx, ids)
    gone = ((stages == secure_aggregation.BEFORE_KEYS) |
            (stages == secure_aggregation.BEFORE_UPLOAD))
    steps = np.where(gone, 0, steps)
    weights = np.where(gone, 0.0, weights).astype(np.float32)
  return Participants(ids, steps, weights, stages)


def ever_sampled(config, population: int, num_rounds: int,
                 timeline=None) -> np.ndarray:
  """Bool ``[population]``: in the cohort of one of rounds
  ``0..num_rounds-1`` (with a `devices.Timeline`: aggregated in one)."""
  if timeline is not None:
    return timeline.ever_completed(num_rounds)
  if sampling(config) == 'uniform':
    return cohort_lib.ever_sampled(population, config.clients_per_round,
                                   config.seed, num_rounds)
  seen = np.zeros(population, bool)
  for r in range(num_rounds):
    seen[sample_ids(config, population, r)] = True
  return seen


def expected_clients(config, population: int) -> float:
  """The expected cohort size: the DP aggregator's fixed denominator (an
  asynchronous step's: its buffer, ``K``)."""
  from fedjax_pfi import asynchrony  # pylint: disable=g-import-not-at-top
  if asynchrony.enabled(config):
    return float(asynchrony.buffer_size(config))
  if sampling(config) == 'poisson':
    return poisson_rate(config, population) * population
  return float(config.clients_per_round)
