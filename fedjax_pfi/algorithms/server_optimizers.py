"""Server optimizers: optax transforms applied to the averaged client delta.

The server treats ``-mean_delta`` as a pseudo-gradient (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, Algorithm 1/2):

- ``fedavg``: SGD with server learning rate ``eta`` (``eta = 1`` is FedAvg).
- ``fedavgm``: SGD with heavy-ball momentum (Hsu et al., 2019).
- ``fedadagrad``, ``fedadam``, ``fedyogi``: Reddi et al.'s Algorithm 2,
  written out exactly: ``m_t = b1 m + (1 - b1) g``; ``v_t`` updated by the
  Adagrad, Adam or Yogi rule from ``v_{-1} = tau^2``;
  ``x += -eta m_t / (sqrt(v_t) + tau)``; no bias correction (the paper has
  none, unlike ``optax.adam``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ReddiState(NamedTuple):
  m: optax.Updates
  v: optax.Updates


def scale_by_reddi(rule: str, b1: float, b2: float, tau: float
                   ) -> optax.GradientTransformation:
  """Reddi et al. (2021) Algorithm 2's direction ``m / (sqrt(v) + tau)``."""
  if rule not in ('adagrad', 'adam', 'yogi'):
    raise ValueError(f'rule must be adagrad, adam or yogi, got {rule!r}.')

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return ReddiState(m=zeros, v=jax.tree.map(
        lambda p: jnp.full_like(p, tau**2), params))

  def update(g, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, g)
    if rule == 'adagrad':
      v = jax.tree.map(lambda v, g: v + g * g, state.v, g)
    elif rule == 'adam':
      v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.v, g)
    else:
      v = jax.tree.map(
          lambda v, g: v - (1 - b2) * g * g * jnp.sign(v - g * g), state.v, g)
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
    return direction, ReddiState(m, v)

  return optax.GradientTransformation(init, update)


def server_optimizer(name: str, learning_rate: float = 1.0,
                     momentum: float = 0.9, b1: float = 0.9,
                     b2: float = 0.99, tau: float = 1e-3
                     ) -> optax.GradientTransformation:
  """A server optimizer by name (see module docstring).

  Defaults follow Reddi et al. (2021): ``b1 = 0.9``, ``b2 = 0.99``,
  ``tau = 1e-3``.

  Args:
    name: ``'fedavg'`` (SGD; FedAvg, McMahan et al., AISTATS 2017, at
      ``learning_rate = 1``), ``'fedavgm'`` (SGD with ``momentum``; Hsu et
      al., 2019), or ``'fedadagrad'``, ``'fedadam'``, ``'fedyogi'`` (FedOpt:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm
      2; `scale_by_reddi`).
    learning_rate: the server step ``eta``, > 0.
    momentum: FedAvgM's, in ``[0, 1)``.
    b1, b2, tau: FedOpt's ``beta_1``, ``beta_2`` and adaptivity ``tau``.

  Returns:
    An optax transform applied by the server step to ``-mean_delta`` (the
    aggregate of the clients' deltas, a pytree like the federated params)
    as a pseudo-gradient.
  """
  if not learning_rate > 0:
    raise ValueError(
        f'server learning rate must be positive, got {learning_rate}.')
  if name == 'fedavg':
    return optax.sgd(learning_rate)
  if name == 'fedavgm':
    if not 0 <= momentum < 1:
      raise ValueError(f'fedavgm momentum must lie in [0, 1), got {momentum}.')
    return optax.sgd(learning_rate, momentum=momentum)
  rules = {'fedadagrad': 'adagrad', 'fedadam': 'adam', 'fedyogi': 'yogi'}
  if name in rules:
    return optax.chain(scale_by_reddi(rules[name], b1, b2, tau),
                       optax.scale(-learning_rate))
  raise ValueError(
      f'unknown server optimizer {name!r}; accepted: fedavg, fedavgm, '
      'fedadagrad, fedadam, fedyogi.')

