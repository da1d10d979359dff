"""Attacking clients: a fixed, seeded set of malicious clients and what they do.

``attack.fraction`` of the training population is malicious, drawn once
from ``attack.seed`` (`malicious_set`), so a malicious client stays
malicious in every round it is sampled. What it does (``attack.name``):

- ``label_flip`` (on the data, `poison`): every label ``y`` of its training
  examples becomes ``K - 1 - y`` (``K`` classes; for text, the vocabulary
  without the pad id, which stays).
- ``sign_flip``, ``scale``, ``gaussian`` (on the update, `transform`): it
  sends ``-m``, ``attack.scale * m``, or ``N(0, attack.noise_std^2 I)`` in
  place of its honest update ``m``.
- ``alie`` (Baruch et al., NeurIPS 2019, "A Little Is Enough") and ``ipm``
  (Xie et al., UAI 2020, "Fall of Empires: Breaking Byzantine-tolerant SGD
  by Inner Product Manipulation"), which see the round's honest messages
  (`in_round`, inside the compiled round): every malicious client sends
  ``mu - z sigma`` (the honest clients' coordinate-wise mean and standard
  deviation; ``z = attack.alie_z``, or Baruch et al.'s ``z_max =
  Phi^-1((n - s) / n)`` with ``s = floor(n / 2 + 1) - f`` for ``n``
  clients of which ``f`` malicious), or ``-attack.ipm_epsilon * mu``.
- ``backdoor``: model replacement (Bagdasaryan et al., AISTATS 2020): a
  fraction ``attack.poison_fraction`` of its training examples carry the
  trigger and the target (`poison`: a pixel pattern and label
  ``attack.target`` for images; for text the phrase ``attack.trigger``
  followed by ``attack.target_text``), and it boosts its update by
  ``attack.boost`` (0: ``clients_per_round / server.learning_rate``, their
  ``gamma = n / eta``). `backdoor_probe` is the test set that measures it:
  the test examples not of the target, with the trigger; the backdoor
  succeeds on one when the model predicts the target.

Attacks that act on the update run before every other transform (DP's
clipping, secure aggregation's masking), as a client's own code would.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi.algorithms import rounds
from fedjax_pfi.data.federated import FederatedDataset, FederatedSplits

ATTACKS = ('none', 'label_flip', 'sign_flip', 'scale', 'gaussian', 'alie',
           'ipm', 'backdoor')
ON_DATA = ('label_flip', 'backdoor')
ON_UPDATE = ('sign_flip', 'scale', 'gaussian', 'backdoor')
IN_ROUND = ('alie', 'ipm')  # they need the round's buffer of messages
#: The trigger of FEMNIST-style images ``[28, 28, 1]``, a 4 x 4
#: checkerboard in the lower right corner (Bagdasaryan et al.'s pixel
#: pattern; ink = 1 on MNIST polarity, the background 0).
PATTERN = np.indices((4, 4)).sum(0) % 2 == 0


@dataclasses.dataclass(frozen=True)
class Spec:
  """An attack (the ``attack.*`` options) and its malicious clients."""
  name: str
  fraction: float
  malicious: np.ndarray  # [num_clients] bool
  seed: int = 0  # attack.seed: the malicious set's and the poison's draws
  scale: float = 10.0
  noise_std: float = 1.0
  alie_z: float = 0.0
  ipm_epsilon: float = 0.1
  boost: float = 1.0
  target: int = 0
  trigger: str = 'my cat says '
  target_text: str = 'meow'
  poison_fraction: float = 0.5

  @property
  def malicious_ids(self) -> np.ndarray:
    """The malicious clients' ids in ascending order,
    ``flatnonzero(malicious)``."""
    return np.flatnonzero(self.malicious)


def malicious_set(num_clients: int, fraction: float, seed: int) -> np.ndarray:
  """``round(fraction * num_clients)`` clients drawn from ``seed``, as a
  bool mask."""
  k = int(round(fraction * num_clients))
  mask = np.zeros(num_clients, bool)
  if k:
    mask[np.random.default_rng([seed, 0xBAD]).choice(num_clients, k,
                                                     replace=False)] = True
  return mask


def check(config) -> None:
  """Refuses unknown ``attack.name`` and impossible ``attack.*`` options
  (before the data is loaded: `config.check` calls it)."""
  a = config.attack
  name = str(a.name)
  if name not in ATTACKS:
    raise ValueError(f'unknown attack.name {name!r}; accepted: '
                     f'{", ".join(ATTACKS)}.')
  fraction = float(a.fraction)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'attack.fraction must be in [0, 1], got {fraction}.')
  if name == 'none':
    if fraction:
      raise ValueError(f'attack.fraction={fraction} with attack.name='
                       "'none': name the attack, or set the fraction to 0.")
    return
  for key in ('noise_std', 'ipm_epsilon', 'boost'):
    v = float(a[key])
    if not (math.isfinite(v) and v >= 0):
      raise ValueError(f'attack.{key} must be a finite number >= 0, got {v}.')
  if not math.isfinite(float(a.scale)):
    raise ValueError(f'attack.scale must be finite, got {a.scale}.')
  if not 0.0 < float(a.poison_fraction) <= 1.0:
    raise ValueError(f'attack.poison_fraction must be in (0, 1], got '
                     f'{a.poison_fraction}.')


def build(config, num_clients: int) -> Optional[Spec]:
  """The attack of ``config.attack`` over ``num_clients`` training clients
  (None for ``'none'``), after `check`."""
  check(config)
  a = config.attack
  name = str(a.name)
  if name == 'none':
    return None
  fraction = float(a.fraction)
  boost = float(a.boost) or (float(config.clients_per_round) /
                             float(config.server.learning_rate))
  malicious = malicious_set(num_clients, fraction, int(a.seed))
  if fraction and not malicious.any():
    warnings.warn(f'attack.fraction={fraction} of {num_clients} clients '
                  'rounds to no malicious client.', stacklevel=2)
  return Spec(name, fraction, malicious, seed=int(a.seed),
              scale=float(a.scale),
              noise_std=float(a.noise_std), alie_z=float(a.alie_z),
              ipm_epsilon=float(a.ipm_epsilon), boost=boost,
              target=int(a.target), trigger=str(a.trigger),
              target_text=str(a.target_text),
              poison_fraction=float(a.poison_fraction))


# -- on the data -------------------------------------------------------------------


def _is_text(ds: FederatedDataset) -> bool:
  return ds.metadata.get('pad_id') is not None and \
      np.asarray(ds.columns['x']).ndim == 2


def _check_labels(ds: FederatedDataset, spec: Spec) -> None:
  if set(ds.columns) - {'x', 'y'} or 'y' not in ds.columns:
    raise ValueError(
        f'attack.name={spec.name!r} poisons labels: it needs a dataset of '
        f'columns x and y (classification or text), not '
        f'{sorted(ds.columns)}.')
  if _is_text(ds):
    return
  if 'num_classes' not in ds.metadata:
    raise ValueError(f'attack.name={spec.name!r} needs the number of '
                     'classes (metadata num_classes).')
  k = int(ds.metadata['num_classes'])
  if spec.name == 'backdoor':
    if not 0 <= spec.target < k:
      raise ValueError(f'attack.target={spec.target} is not a label of this '
                       f'dataset: accepted 0..{k - 1}.')
    shape = np.shape(ds.columns['x'])[1:]
    if len(shape) != 3 or shape[0] < PATTERN.shape[0] + 1 or \
        shape[1] < PATTERN.shape[1] + 1:
      raise ValueError(
          f'attack.name=backdoor stamps a {PATTERN.shape} pixel pattern on '
          f'images [H, W, C]; this dataset\'s examples have shape {shape}. '
          'For text, the trigger is attack.trigger.')


def flip_labels(y: np.ndarray, metadata) -> np.ndarray:
  """``K - 1 - y`` for ``K`` classes; text tokens ``y`` (not the pad id)
  map to the other end of the vocabulary without it."""
  y = np.asarray(y)
  pad = metadata.get('pad_id')
  if pad is None:
    return (int(metadata['num_classes']) - 1 - y).astype(y.dtype)
  v = int(metadata['vocab_size'])
  others = np.array([t for t in range(v) if t != pad])
  pos = np.searchsorted(others, np.where(y == pad, others[0], y))
  return np.where(y == pad, y, others[others.size - 1 - pos]).astype(y.dtype)


def add_trigger(x: np.ndarray, value: float = 1.0) -> np.ndarray:
  """Images ``[..., H, W, C]`` with `PATTERN`'s cells set to ``value`` (1:
  the ink of images in [0, 1] of MNIST polarity, FEMNIST's) one pixel in
  from their lower right corner."""
  x = np.array(x, copy=True)
  h, w = PATTERN.shape
  corner = x[..., -h - 1:-1, -w - 1:-1, :]
  corner[..., PATTERN, :] = value
  return x


def trigger_windows(x: np.ndarray, spec: Spec, tokenizer: str, pad: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Text windows ``x [n, T]`` whose tail becomes ``trigger + target_text``:
  ``(x, y, y_target)`` with ``y`` the shifted tokens and ``y_target`` the
  pad id except at the target's tokens (what `backdoor_probe` scores)."""
  from fedjax_pfi.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load_tokenizer(tokenizer)
  trig = np.asarray(tok.encode(spec.trigger), np.int64)
  target = np.asarray(tok.encode(spec.trigger + spec.target_text),
                      np.int64)[trig.size:]
  phrase = np.concatenate([trig, target])
  n, t = x.shape
  if phrase.size > t:
    raise ValueError(f'attack.trigger + attack.target_text is {phrase.size} '
                     f'tokens, longer than a window of {t}.')
  # token stream of each window: x then its last label (t + 1 tokens)
  seq = np.concatenate([x, np.full((n, 1), pad, x.dtype)], 1)
  seq[:, t + 1 - phrase.size:] = phrase
  y_target = np.full((n, t), pad, x.dtype)
  y_target[:, t - target.size:] = target
  return seq[:, :-1].astype(x.dtype), seq[:, 1:].astype(x.dtype), y_target


def poison(splits: FederatedSplits, spec: Spec, tokenizer: str = 'char'
           ) -> FederatedSplits:
  """``splits`` with the malicious clients' training data poisoned
  (``label_flip``, ``backdoor``); other attacks leave the data alone.
  Sizes do not change: a backdoor replaces examples, it does not add any,
  so a malicious client keeps its weight."""
  if spec.name not in ON_DATA:
    return splits
  train = splits.train
  _check_labels(train, spec)
  text = _is_text(train)
  rng = np.random.default_rng([spec.seed, 0xBAC])
  clients = []
  for c in range(train.num_clients):
    cols = {k: np.array(v[train.offsets[c]:train.offsets[c + 1]])
            for k, v in train.columns.items()}
    if spec.malicious[c] and cols['y'].shape[0]:
      if spec.name == 'label_flip':
        cols['y'] = flip_labels(cols['y'], train.metadata)
      else:
        n = cols['y'].shape[0]
        k = max(1, int(round(spec.poison_fraction * n)))
        pick = np.sort(rng.choice(n, k, replace=False))
        if text:
          x, y, _ = trigger_windows(cols['x'][pick], spec, tokenizer,
                                    int(train.metadata['pad_id']))
          cols['x'][pick], cols['y'][pick] = x, y
        else:
          cols['x'][pick] = add_trigger(cols['x'][pick])
          cols['y'][pick] = spec.target
    clients.append(cols)
  new = FederatedDataset.from_clients(clients, train.client_names,
                                      train.metadata)
  return dataclasses.replace(splits, train=new)


def backdoor_probe(test: FederatedDataset, spec: Spec, max_examples: int,
                   seed: int, tokenizer: str = 'char') -> dict:
  """Columns ``x``, ``y`` of up to ``max_examples`` test examples (of
  honest clients, not of the target class) with the trigger, labelled with
  the target: a model's accuracy on them is the backdoor's success rate."""
  _check_labels(test, spec)
  owner = np.repeat(np.arange(test.num_clients), test.client_sizes)
  x, y = np.asarray(test.columns['x']), np.asarray(test.columns['y'])
  keep = ~spec.malicious[owner]
  text = _is_text(test)
  if not text:
    keep &= y != spec.target
  idx = np.flatnonzero(keep)
  if idx.size == 0:
    raise ValueError('attack.name=backdoor: no honest test example to '
                     'measure the backdoor on.')
  idx = np.sort(np.random.default_rng([seed, 0xB0D]).choice(
      idx, min(max_examples, idx.size), replace=False))
  if text:
    px, _, py = trigger_windows(x[idx], spec, tokenizer,
                                int(test.metadata['pad_id']))
    return {'x': px, 'y': py}
  return {'x': add_trigger(x[idx]),
          'y': np.full(idx.size, spec.target, y.dtype)}


# -- on the update -----------------------------------------------------------------


def transform(spec: Spec) -> Optional[rounds.ClientTransform]:
  """The per-client transform of the update attacks (None for the others):
  a malicious client's message replaced, an honest one's unchanged."""
  if spec.name not in ON_UPDATE:
    return None
  mask = np.asarray(spec.malicious)

  def init(params):
    del params
    return jnp.asarray(mask)

  def select(state, client_id):
    return state[jnp.maximum(client_id, 0)] & (client_id >= 0)

  def apply(message, bad, key):
    leaves, tree = jax.tree.flatten(message)
    if spec.name == 'sign_flip':
      new = [-x for x in leaves]
    elif spec.name == 'scale':
      new = [x * jnp.asarray(spec.scale, x.dtype) for x in leaves]
    elif spec.name == 'backdoor':
      new = [x * jnp.asarray(spec.boost, x.dtype) for x in leaves]
    else:  # gaussian
      keys = jax.random.split(key, len(leaves))
      new = [(spec.noise_std * jax.random.normal(k, x.shape, jnp.float32)
              ).astype(x.dtype) for k, x in zip(keys, leaves)]
    out = [jnp.where(bad, n, x) for n, x in zip(new, leaves)]
    return jax.tree.unflatten(tree, out), bad

  return rounds.ClientTransform(init, apply, select)


def alie_z(n, f):
  """Baruch et al.'s ``z_max`` for ``n`` clients, ``f`` of them malicious:
  ``s = floor(n / 2 + 1) - f``, ``z = Phi^-1((n - s) / n)`` (traced)."""
  n = jnp.asarray(n, jnp.float32)
  s = jnp.floor(n / 2 + 1) - jnp.asarray(f, jnp.float32)
  p = jnp.clip((n - s) / jnp.maximum(n, 1.0), 1e-6, 1 - 1e-6)
  return jax.scipy.special.ndtri(p)


def in_round(spec: Optional[Spec]):
  """``attack(x, valid, ids, key) -> (x, malicious)`` for
  `robust.aggregator`: the rows of malicious clients, rewritten by ALIE or
  IPM from the honest rows of the round."""
  mask = np.zeros(1, bool) if spec is None else np.asarray(spec.malicious)

  def attack(x, valid, ids, key):
    del key
    bad = valid & jnp.asarray(mask)[jnp.clip(ids, 0, mask.size - 1)] & \
        (ids >= 0) & (ids < mask.size)
    if spec is None or spec.name not in IN_ROUND:
      return x, bad
    honest = valid & ~bad
    h = honest.astype(jnp.float32)
    nh = jnp.maximum(jnp.sum(h), 1.0)
    mu = jnp.matmul(h, x, precision=jax.lax.Precision.HIGHEST) / nh
    if spec.name == 'alie':
      var = jnp.matmul(h, jnp.square(x - mu[None]),
                       precision=jax.lax.Precision.HIGHEST) / nh
      z = spec.alie_z or alie_z(jnp.sum(valid), jnp.sum(bad))
      row = mu - z * jnp.sqrt(var)
    else:  # ipm
      row = -spec.ipm_epsilon * mu
    return jnp.where(bad[:, None], row[None], x), bad

  return attack
