"""Aggregators: how the server combines the cohort's messages.

A client's *message* is its update of the federated part of the model (the
whole model, the shared body, or the LoRA adapters; never a frozen base and
never the personal parts, which do not leave the client). An `Aggregator`
is optax-shaped, a tuple of pure functions over its own state:

- ``client(message, state, key) -> (message, stats)``: what happens to each
  client's message inside the round before it is weighted and summed
  (DP-FedAvg clips it), ``vmap``ped over the cohort; ``stats`` are
  per-client scalars summed over the real clients (how many were not
  clipped). None: the message as it is.
- ``finalize(sums, state, key) -> (mean, state, metrics)``: the aggregate
  from the round's sums (`rounds.message_sums`): ``sums['message']`` is
  ``sum_c w_c m_c``, ``sums['weight']`` is ``sum_c w_c``, ``sums[name]``
  each stat summed. ``key`` is the aggregator's own randomness (noise).

``weighting`` says what ``w_c`` is: ``'examples'`` (each client's training
examples, McMahan et al. 2017) or ``'uniform'`` (1 per client that trained).
``needs``: ``'sum'`` aggregators see only the sums (the messages never
exist together); ``'all'`` ones (`robust`) see the buffer of every
message, filled chunk by chunk (`rounds.message_sums`), in the rounds that
declare ``Capabilities.robust_aggregation`` (`registry.build` refuses the
rest by name before tracing).

The mechanisms:

- `weighted_mean`: FedAvg's aggregate.
- `gaussian`: DP-FedAvg (McMahan et al., "Learning Differentially Private
  Recurrent Language Models", ICLR 2018): each message clipped to L2 norm
  ``C``, Gaussian noise of std ``sigma * C`` added once to the sum, divided
  by a fixed denominator (the expected number of clients per round), with
  uniform weights; optionally with the adaptive clipping of Andrew et al.
  ("Differentially Private Learning with Adaptive Clipping", NeurIPS 2021).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Params = Any

WEIGHTINGS = ('examples', 'uniform')


class Aggregator(NamedTuple):
  """How the server combines the cohort's messages: ``init``, ``finalize``
  and optionally ``client``, pure functions over the aggregator's own state
  (optax-shaped; the module docstring says what each sees).

  Attributes:
    init: ``init(params) -> state`` (params: the federated part).
    finalize: ``finalize(sums, state, key) -> (aggregate, state, metrics)``:
      from the round's sums (``sums['message']``: ``sum_c w_c m_c``, a
      pytree like the params; ``sums['weight']``: ``sum_c w_c``, a scalar;
      each ``client`` stat summed); for ``needs='all'``, ``sums['message']``
      is the buffer of every message instead (leaves ``[C, ...]``, one row
      per cohort slot, with ``sums['buffer_weight']`` and
      ``sums['buffer_id']``).
    client: ``client(message, state, key) -> (message, stats)`` on each
      client's message, ``vmap``-ped over the cohort (DP-FedAvg's clipping);
      None: the message as it is.
    weighting: what ``w_c`` is: ``'examples'`` (the client's training
      examples) or ``'uniform'`` (1 per client that trained).
    needs: ``'sum'`` (only the weighted sums) or ``'all'`` (every message:
      robust aggregation).
    name: for metrics.
    secure: a `secure_aggregation.Spec` when the messages are masked
      (`secure_aggregation.wrap`), else None.
    compression: a `compression.Spec` when each message is compressed after
      ``client`` (`compression.wrap`), else None.
    asynchrony: an `asynchrony.Spec` in an asynchronous round
      (`asynchrony.wrap`), else None.
  """
  init: Callable[[Params], Any]
  finalize: Callable[[dict, Any, jax.Array], tuple[Params, Any, dict]]
  client: Optional[Callable[[Params, Any, jax.Array],
                            tuple[Params, dict]]] = None
  weighting: str = 'examples'
  needs: str = 'sum'
  name: str = 'mean'
  # A `secure_aggregation.Spec` when the messages are masked (`secure_
  # aggregation.wrap`): `rounds.message_sums` masks them, ``finalize``
  # unmasks.
  secure: Any = None
  # A `compression.Spec` when each message is compressed after ``client``
  # (`compression.wrap`; `rounds.message_sums` compresses, `rounds.finish`
  # counts the bytes).
  compression: Any = None
  # An `asynchrony.Spec` in an asynchronous round (`asynchrony.wrap`):
  # `partitioned.fed_partitioned` keeps a ring of model versions and starts
  # each client from its own.
  asynchrony: Any = None


def weighted_sum(deltas: Params, weights: jax.Array) -> Params:
  """``sum_c weights[c] * deltas[c]`` for every leaf."""
  return jax.tree.map(
      lambda d: jnp.tensordot(weights.astype(d.dtype), d, axes=1), deltas)


def _over(total: jax.Array, s: jax.Array) -> jax.Array:
  """``s / total``, a ``[k]`` total dividing ``[k, ...]`` sums row-wise."""
  t = jnp.maximum(total, 1e-12).astype(s.dtype)
  return s / t.reshape(t.shape + (1,) * (s.ndim - t.ndim))


def weighted_mean(weighting: str = 'examples') -> Aggregator:
  """The FedAvg aggregate ``sum_c w_c m_c / sum_c w_c``: with example
  weights McMahan et al.'s ("Communication-Efficient Learning of Deep
  Networks from Decentralized Data", AISTATS 2017), with uniform weights
  the plain mean of the clients that trained.

  Args:
    weighting: ``'examples'`` (``w_c``: client ``c``'s training examples)
      or ``'uniform'`` (1 per client that trained).

  Returns:
    An `Aggregator` whose ``finalize`` divides the sums' ``'message'``
    (a pytree like the federated params) by their ``'weight'``; no state,
    no randomness.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f'unknown weighting {weighting!r}; accepted: '
                     f'{", ".join(WEIGHTINGS)}.')

  def init(params):
    del params
    return ()

  def finalize(sums, state, key):
    del key
    mean = jax.tree.map(lambda s: _over(sums['weight'], s), sums['message'])
    return mean, state, {}

  return Aggregator(init, finalize, weighting=weighting,
                    name='mean' if weighting == 'examples' else
                    'uniform_mean')


def global_norm(tree: Params) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def clip_by_norm(message: Params, clip_norm) -> tuple[Params, jax.Array]:
  """``message * min(1, C / ||message||)`` and ``||message|| <= C``. An
  infinite ``C`` returns ``message`` itself (times exactly 1)."""
  norm = global_norm(message)
  factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
  return (jax.tree.map(lambda x: x * factor.astype(x.dtype), message),
          norm <= clip_norm)


class AdaptiveClipping(NamedTuple):
  """Andrew et al. (2021), Algorithm 1: after each round ``C <- C *
  exp(-learning_rate * (b - target_quantile))`` with ``b`` the noised
  fraction of clients whose update was not clipped: ``b = (sum_i (b_i -
  1/2) + N(0, count_noise_std^2)) / m + 1/2`` over the ``m`` expected
  clients, the bits shifted by 1/2 so that one client moves the released
  sum by at most 1/2 (their Section 3)."""
  target_quantile: float
  learning_rate: float = 0.2
  count_noise_std: float = 0.0


def delta_noise_multiplier(noise_multiplier: float,
                           count_noise_std: float) -> float:
  """The noise multiplier of the updates' sum when the unclipped count takes
  part of the budget: Andrew et al. (2021), Theorem 1, ``z_delta = (z^-2 -
  (2 sigma_b)^-2)^(-1/2)``, so that the two releases together are one
  Gaussian mechanism of multiplier ``z``."""
  if count_noise_std <= 0:
    return noise_multiplier
  if noise_multiplier == 0:
    return 0.0
  rest = noise_multiplier ** -2 - (2.0 * count_noise_std) ** -2
  if rest <= 0:
    raise ValueError(
        f'the count noise std {count_noise_std} is too small for noise '
        f'multiplier {noise_multiplier}: adaptive clipping needs 2 * '
        f'count_noise_std > noise_multiplier (Andrew et al. 2021, Thm. 1).')
  return rest ** -0.5


def check_clip_and_noise(clip_norm: float,
                         noise_multiplier: Optional[float] = None) -> None:
  """``clip_norm > 0`` and, unless None (to be calibrated), a finite
  ``noise_multiplier >= 0``; the messages name the config options."""
  if not clip_norm > 0:
    raise ValueError(f'privacy.clip_norm must be > 0 (inf: no clipping), got '
                     f'{clip_norm}.')
  if noise_multiplier is not None and not (noise_multiplier >= 0 and
                                           math.isfinite(noise_multiplier)):
    raise ValueError(f'privacy.noise_multiplier must be a finite number >= 0, '
                     f'got {noise_multiplier}.')


def gaussian(clip_norm: float, noise_multiplier: float,
             expected_clients: float, *, noise_scale: float = 1.0,
             adaptive: Optional[AdaptiveClipping] = None) -> Aggregator:
  """DP-FedAvg's aggregate (module docstring).

  Args:
    clip_norm: ``C``, the L2 bound on each message (the initial one with
      ``adaptive``); ``inf`` clips nothing.
    noise_multiplier: ``z``; the sum receives ``N(0, (z_delta C)^2 I)`` with
      ``z_delta`` = `delta_noise_multiplier` (``z`` without adaptive
      clipping).
    expected_clients: the fixed denominator (Poisson: ``q N``; fixed-size
      sampling: the cohort size).
    noise_scale: multiplies the noise std: ``n / n'`` simulates the noise a
      cohort of ``n'`` clients would see in its mean with ``n`` clients
      (pfl-research's ``noise_cohort_size``).
    adaptive: adaptive clipping, or None for a fixed ``C``.
  """
  check_clip_and_noise(clip_norm, noise_multiplier)
  if not expected_clients > 0:
    raise ValueError(f'the expected number of clients per round must be > 0, '
                     f'got {expected_clients}.')
  z_delta = delta_noise_multiplier(
      noise_multiplier, adaptive.count_noise_std if adaptive else 0.0)

  def init(params):
    del params
    return {'clip_norm': jnp.asarray(clip_norm, jnp.float32)}

  def client(message, state, key):
    del key
    clipped, unclipped = clip_by_norm(message, state['clip_norm'])
    return clipped, {'unclipped': unclipped.astype(jnp.float32)}

  def finalize(sums, state, key):
    c = state['clip_norm']
    std = jnp.float32(z_delta * noise_scale) * c
    leaves, tree = jax.tree.flatten(sums['message'])
    keys = jax.random.split(jax.random.fold_in(key, 0), len(leaves))
    noised = [s + (std * jax.random.normal(k, s.shape, jnp.float32)).astype(
        s.dtype) if z_delta else s for s, k in zip(leaves, keys)]
    mean = jax.tree.map(lambda s: s / jnp.asarray(expected_clients, s.dtype),
                        jax.tree.unflatten(tree, noised))
    unclipped = sums['unclipped']
    metrics = {'privacy/clip_norm': c, 'privacy/noise_std': std,
               # what the simulator knows and a real server does not
               'privacy/unclipped_fraction': unclipped / jnp.maximum(
                   sums['clients'], 1.0)}
    if adaptive is not None:
      # Each client's bit is released as b_i - 1/2, so adding or removing a
      # client moves the sum by 1/2 (the sensitivity Theorem 1's 2 sigma_b
      # assumes; TF Privacy's QuantileEstimatorQuery does the same), and
      # 1/2 is added back after dividing by the expected count.
      noisy = (unclipped - 0.5 * sums['clients'] +
               jnp.float32(adaptive.count_noise_std * noise_scale) *
               jax.random.normal(jax.random.fold_in(key, 1), (), jnp.float32))
      b = noisy / jnp.float32(expected_clients) + 0.5
      c = c * jnp.exp(-jnp.float32(adaptive.learning_rate) *
                      (b - jnp.float32(adaptive.target_quantile)))
      metrics['privacy/unclipped_fraction_noised'] = b
    return mean, {'clip_norm': c}, metrics

  return Aggregator(init, finalize, client=client, weighting='uniform',
                    name='dp_gaussian' if adaptive is None else
                    'dp_gaussian_adaptive')
