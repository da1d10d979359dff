"""Compressed client updates: what the server decodes, and its exact bytes.

Each compressor acts on one client's message flattened to a vector ``v``
of ``d`` floats (every leaf of the update, in `jax.flatten_util` order:
one scale for the whole message) and returns ``v_hat``, the vector the
server decodes, so that a round can aggregate it as it aggregates ``v``.
`Compressor.bits` counts what the client sends for it, exactly: the bits
per coordinate, the indices and the scales.

- ``qsgd`` (Alistarh et al., NeurIPS 2017, "QSGD"): each coordinate is
  ``||v||_2 * sign(v_i) * l_i / s`` with ``l_i`` the stochastic rounding of
  ``|v_i| s / ||v||_2`` to one of the ``s + 1`` levels ``0..s``, so
  ``E[v_hat] = v``. With ``b`` bits a coordinate (its sign and ``b - 1``
  bits of level), ``s = 2^(b - 1) - 1``: ``d b`` bits and a 32-bit norm.
- ``rotated_qsgd`` (Suresh et al., ICML 2017, "Distributed Mean Estimation
  with Limited Communication", pi_srk): a randomized Hadamard rotation
  ``R = H D / sqrt(d')`` (``D`` random signs, ``d'`` the next power of 2),
  then the same ``b``-bit stochastic rounding with the largest rotated
  coordinate as the scale, then ``R^T``. The rotation spreads a message
  over every coordinate, so the scale is about ``sqrt(2 log d' / d')
  ||v||`` instead of ``||v||_inf``. ``d' b`` bits and a 32-bit scale.
- ``drive`` (Vargaftik et al., NeurIPS 2021, "DRIVE: One-bit Distributed
  Mean Estimation"): the same rotation, then one bit a coordinate, the sign
  of ``Rv``, and the scale ``S = ||v||_2^2 / ||Rv||_1`` of the unbiased
  variant: ``v_hat = R^T (S sign(Rv))``. Its vNMSE ``E||v_hat - v||^2 /
  ||v||^2`` is ``d' ||v||^2 / ||Rv||_1^2 - 1``, which tends to ``pi/2 - 1``
  (about 0.571) as the rotated coordinates become Gaussian. ``d'`` bits and
  a 32-bit scale.
- ``topk``: the ``k = ceil(fraction d)`` coordinates of largest magnitude,
  as 32-bit values and ``ceil(log2 d)``-bit indices; biased, and meant to
  be used with error feedback (Stich et al., NeurIPS 2018, "Sparsified SGD
  with Memory"), `error_feedback`.

The rotation's signs come from the key the compressor is given (a
client's key in the round), which the server can derive too: no bits.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

#: The compressors ``compression.name`` may name.
NAMES = ('none', 'qsgd', 'rotated_qsgd', 'drive', 'topk')
SCALE_BITS = 32   # a float32 norm or scale
VALUE_BITS = 32   # a float32 value (top-k)


class Compressor(NamedTuple):
  """``apply(v, key) -> v_hat`` on a vector ``[d]``; ``bits(d)``: the bits
  a client sends for one such vector; ``unbiased``: ``E[v_hat] = v``.

  Attributes:
    name: one of `NAMES`.
    apply: ``apply(v [d], key) -> v_hat [d]``, the vector the server decodes.
    bits: ``bits(d)``: the bits a client sends for a vector of ``d`` floats.
    unbiased: whether ``E[v_hat] = v``.
    levels: qsgd's and rotated_qsgd's ``2^(bits - 1) - 1`` (else 0).
  """
  name: str
  apply: Callable[[jax.Array, jax.Array], jax.Array]
  bits: Callable[[int], int]
  unbiased: bool
  levels: int = 0  # qsgd's and rotated_qsgd's 2^(bits - 1) - 1


def next_pow2(d: int) -> int:
  return 1 << max(0, (int(d) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def sylvester(s: int) -> np.ndarray:
  """The Sylvester Hadamard matrix of order ``s`` (a power of 2)."""
  h = np.ones((1, 1), np.int8)
  while h.shape[0] < s:
    h = np.block([[h, h], [h, -h]])
  return h


def fwht(x: jax.Array, block: int = 7) -> jax.Array:
  """The (unnormalized, Sylvester-ordered) Walsh-Hadamard transform of the
  last axis, whose length ``d`` is a power of 2: ``x @ H_d`` (``H_d``
  symmetric, ``H_d H_d = d I``).

  ``H_d`` is the Kronecker product of smaller Sylvester matrices
  (``H_{2^a} (x) H_{2^b} = H_{2^(a+b)}``), so the last axis is reshaped into
  factors of at most ``2^block`` and each is multiplied by its own small
  ``H``: a few matmuls instead of ``log2 d`` butterfly passes over memory,
  2x faster on XLA:CPU for 50 x 2^18 (BUILD_NOTES.md)."""
  d = x.shape[-1]
  if d < 1 or d & (d - 1):
    raise ValueError(f'the Hadamard transform needs a power of 2, got {d}.')
  m, sizes = d.bit_length() - 1, []
  while m > 0:
    sizes.append(1 << min(block, m))
    m -= min(block, m)
  y = x.reshape(x.shape[:-1] + tuple(sizes))
  for i, s in enumerate(sizes):
    h = jnp.asarray(sylvester(s), x.dtype)
    axis = x.ndim - 1 + i
    y = jnp.moveaxis(jnp.tensordot(y, h, axes=[[axis], [0]]), -1, axis)
  return y.reshape(x.shape)


def _signs(key: jax.Array, n: int, dtype) -> jax.Array:
  return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1, -1).astype(dtype)


def rotate(v: jax.Array, key: jax.Array) -> jax.Array:
  """``R v = H D v / sqrt(d')``, ``v`` zero-padded to ``d'`` (a power of
  2); an orthonormal map, so ``||R v|| = ||v||``."""
  n = next_pow2(v.shape[0])
  x = jnp.pad(v, (0, n - v.shape[0])) * _signs(key, n, v.dtype)
  return fwht(x) / math.sqrt(n)


def unrotate(y: jax.Array, key: jax.Array, d: int) -> jax.Array:
  """``R^T y`` cut back to the first ``d`` coordinates."""
  n = y.shape[0]
  return (fwht(y) / math.sqrt(n) * _signs(key, n, y.dtype))[:d]


def stochastic_levels(v: jax.Array, scale: jax.Array, levels: int,
                      key: jax.Array) -> jax.Array:
  """``scale * sign(v) * l / levels`` with ``l`` the unbiased stochastic
  rounding of ``|v| levels / scale`` (``|v| <= scale``); 0 where
  ``scale`` is 0."""
  safe = jnp.where(scale > 0, scale, 1.0)
  u = jnp.abs(v) * (levels / safe)
  low = jnp.floor(u)
  up = jax.random.uniform(key, v.shape, v.dtype) < (u - low)
  q = jnp.minimum(low + up, levels)
  return jnp.where(scale > 0, jnp.sign(v) * q * (safe / levels), 0.0)


def levels_of(bits: int) -> int:
  if int(bits) != bits or bits < 2:
    raise ValueError(f'compression.bits must be an integer >= 2 for qsgd and '
                     f'rotated_qsgd (a sign and at least one bit of level), '
                     f'got {bits}; drive sends 1 bit a coordinate.')
  return 2 ** (int(bits) - 1) - 1


def qsgd(bits: int) -> Compressor:
  s = levels_of(bits)

  def apply(v, key):
    return stochastic_levels(v, jnp.linalg.norm(v), s, key)

  return Compressor('qsgd', apply, lambda d: int(d) * int(bits) + SCALE_BITS,
                    True, s)


def rotated_qsgd(bits: int) -> Compressor:
  s = levels_of(bits)

  def apply(v, key):
    rkey, qkey = jax.random.split(key)
    y = rotate(v, rkey)
    q = stochastic_levels(y, jnp.max(jnp.abs(y)), s, qkey)
    return unrotate(q, rkey, v.shape[0])

  return Compressor('rotated_qsgd', apply,
                    lambda d: next_pow2(d) * int(bits) + SCALE_BITS, True,
                    s)


def drive() -> Compressor:
  def apply(v, key):
    y = rotate(v, key)
    l1 = jnp.sum(jnp.abs(y))
    scale = jnp.where(l1 > 0, jnp.sum(y * y) / jnp.where(l1 > 0, l1, 1.0),
                      0.0)
    return unrotate(scale * jnp.where(y >= 0, 1.0, -1.0).astype(v.dtype),
                    key, v.shape[0])

  # Unbiased over uniformly random rotations; a randomized Hadamard
  # rotation makes it so to within the test's tolerance (not exactly).
  return Compressor('drive', apply, lambda d: next_pow2(d) + SCALE_BITS,
                    False)


def topk_count(fraction: float, d: int) -> int:
  return max(1, min(int(d), math.ceil(float(fraction) * int(d))))


def topk(fraction: float) -> Compressor:
  if not 0.0 < float(fraction) <= 1.0:
    raise ValueError(f'compression.fraction must be in (0, 1], got '
                     f'{fraction}.')

  def apply(v, key):
    del key
    k = topk_count(fraction, v.shape[0])
    _, idx = jax.lax.top_k(jnp.abs(v), k)
    return jnp.zeros_like(v).at[idx].set(v[idx])

  def bits(d):
    return topk_count(fraction, d) * (
        VALUE_BITS + max(1, math.ceil(math.log2(max(int(d), 2)))))

  return Compressor('topk', apply, bits, False)


def make(name: str, bits: int = 8, fraction: float = 0.01
         ) -> Compressor | None:
  """The compressor ``name`` (None for ``'none'``)."""
  if name == 'none':
    return None
  if name == 'qsgd':
    return qsgd(bits)
  if name == 'rotated_qsgd':
    return rotated_qsgd(bits)
  if name == 'drive':
    return drive()
  if name == 'topk':
    return topk(fraction)
  raise ValueError(f'unknown compression.name {name!r}; accepted: '
                   f'{", ".join(NAMES)}.')


def error_feedback(compressor: Compressor
                   ) -> Callable[[jax.Array, jax.Array, jax.Array],
                                 tuple[jax.Array, jax.Array]]:
  """``step(v, residual, key) -> (v_hat, residual')``: compress ``v`` plus
  what earlier rounds left out, and keep what this one leaves out
  (``residual' = v + residual - v_hat``; Stich et al. 2018)."""
  def step(v, residual, key):
    corrected = v + residual
    v_hat = compressor.apply(corrected, key)
    return v_hat, corrected - v_hat

  return step


def vnmse(v: jax.Array, v_hat: jax.Array) -> jax.Array:
  """``||v_hat - v||^2 / ||v||^2``."""
  return jnp.sum((v_hat - v) ** 2) / jnp.sum(v * v)


# -- in the round ---------------------------------------------------------------

# ``fold_in(a client's aggregator key, COMPRESSION_STREAM)``: the
# compressor's randomness, apart from the transforms' (1) and secure
# aggregation's (2) streams of the same key (`rounds.message_sums`).
COMPRESSION_STREAM = 3
#: The broadcast's compression draws from ``fold_in(round key,
#: DOWNLOAD_STREAM)``, one draw a round for the whole cohort (apart from
#: every client id's key and the aggregator's, ``2**31 - 2``).
DOWNLOAD_STREAM = 2**31 - 4


class Spec(NamedTuple):
  """Compression in a round: the ``compressor`` of each upload; with
  ``error_feedback`` each client adds what its earlier uploads left out
  (a residual per client, kept in the round's state); with ``download``
  the broadcast model is compressed too (one draw a round)."""
  compressor: Compressor
  error_feedback: bool = False
  download: bool = False


def compress_tree(compressor: Compressor, message, key: jax.Array):
  """``(message_hat, stats)``: ``message`` flattened to one vector,
  compressed, and shaped back; ``stats`` are its squared error and squared
  norm (summed over the cohort, their ratio is the round's vNMSE)."""
  flat, unravel = jax.flatten_util.ravel_pytree(message)
  v = flat.astype(jnp.float32)
  v_hat = compressor.apply(v, key)
  stats = {'compression/sq_error': jnp.sum((v_hat - v) ** 2),
           'compression/sq_norm': jnp.sum(v * v)}
  return unravel(v_hat.astype(flat.dtype)), stats


def client_step(spec: Spec, clip, message, agg_state, key: jax.Array,
                residual=None):
  """One client's upload after the aggregator's own step ``clip`` (DP's,
  or None) has run on ``message``: ``(message_hat, stats, residual')``.

  With error feedback ``residual`` (the message's shape) is added first
  and ``residual'`` is what this upload leaves out (Stich et al. 2018);
  otherwise ``residual'`` is None. What the server decodes goes through
  ``clip`` again, so that DP's sensitivity bound holds for what is summed
  (an unbiased compressor can lengthen a message: DRIVE's output is about
  sqrt(pi/2) times as long). ``key`` is the client's aggregator key."""
  if residual is not None:
    message = jax.tree.map(jnp.add, message, residual)
  sent, stats = compress_tree(spec.compressor, message,
                              jax.random.fold_in(key, COMPRESSION_STREAM))
  new_residual = None
  if residual is not None:
    new_residual = jax.tree.map(jnp.subtract, message, sent)
  if clip is not None:
    sent, _ = clip(sent, agg_state, key)
  return sent, stats, new_residual


def download(spec: Spec, params, round_key: jax.Array):
  """The model every client of the round starts from: ``params`` itself,
  or with ``spec.download`` what the server's compressed broadcast decodes
  to (one draw a round, `DOWNLOAD_STREAM`)."""
  if spec is None or not spec.download:
    return params
  return compress_tree(spec.compressor, params, jax.random.fold_in(
      round_key, DOWNLOAD_STREAM))[0]


def num_floats(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def message_bytes(compressor: Compressor, message) -> float:
  """What sending ``message`` (a pytree, or its shapes) costs compressed:
  ``compressor.bits`` of its flattened length, in bytes."""
  return compressor.bits(num_floats(message)) / 8.0


def wrap(inner, spec: Spec):
  """``inner`` (an `aggregators.Aggregator`) receiving compressed messages:
  `rounds.message_sums` runs `client_step` after ``inner``'s ``client``
  step; ``finalize`` adds ``compression/vnmse``, the cohort's ``sum
  ||m_hat - m||^2 / sum ||m||^2``; `rounds.finish` counts
  `message_bytes` per client as the upload (and the download, with
  ``spec.download``).

  Over secure aggregation (``inner.secure``, built with the compressor:
  `secure_aggregation.make_spec`) the protocol's fixed point is the
  quantizer: `rounds.message_sums` runs `secure_step` instead of
  `client_step`, ``finalize`` rotates the unmasked mean back
  (``rotated_qsgd``, `unrotate_mean`), and `rounds.finish` counts the
  masked input's bytes."""
  secure = inner.secure
  if secure is not None:
    check_secure(spec.compressor.name, spec.error_feedback)
    if secure.levels != spec.compressor.levels or secure.rotated != (
        spec.compressor.name == 'rotated_qsgd'):
      raise ValueError(
          f'secure aggregation was built for {secure.levels} levels '
          f'(rotated: {secure.rotated}), not for compression.name='
          f'{spec.compressor.name!r} with {spec.compressor.levels}: build it '
          'with the compressor (secure_aggregation.build reads '
          'config.compression).')

  def finalize(sums, state, key):
    mean, state, metrics = inner.finalize(sums, state, key)
    if secure is not None and secure.rotated:
      mean = unrotate_mean(mean, jax.random.fold_in(key, ROTATION_STREAM))
    metrics = {**metrics, 'compression/vnmse': (
        sums['compression/sq_error'] /
        jnp.maximum(sums['compression/sq_norm'], 1e-30))}
    if secure is not None:
      metrics['compression/clamped_coordinates'] = sums[
          'compression/clamped']
    return mean, state, metrics

  return inner._replace(finalize=finalize, compression=spec,
                        name=f'{spec.compressor.name}({inner.name})')


# -- under secure aggregation -------------------------------------------------
#
# The masked sum needs every client's message as integers on one scale that
# all clients share (`secure_aggregation`). QSGD's stochastic levels are
# such integers once the scale is the clip norm ``C`` instead of each
# client's own norm: ``qsgd`` with ``b`` bits becomes the protocol's fixed
# point with ``2^(b-1) - 1`` levels over ``[-C, C]``. ``rotated_qsgd``
# first rotates every client's message with one rotation a round (the
# server derives it too) and clamps each rotated coordinate to ``beta``
# (`rotated_bound`), so the same levels cover ``[-beta, beta]``, a range
# ``sqrt(d' / (2 ln(2 d' / delta)))`` times narrower than ``[-C, C]``
# (Suresh et al. 2017's rotation; Kairouz et al., ICML 2021, "The
# Distributed Discrete Gaussian Mechanism", flatten with it for the same
# reason). The upload is the masked input: ``secure_aggregation.bits`` a
# value, which must hold the cohort's weighted sum of the levels
# (`secure_aggregation.check_compressed_fits`). DRIVE (a scale per client)
# and top-k (each client's own coordinates) do not give shared integers.

#: The compressors whose messages secure aggregation can sum (above).
SECURE_NAMES = ('qsgd', 'rotated_qsgd')
# ``fold_in(the round's aggregator key, ROTATION_STREAM)``: the rotation
# every client of a round shares under secure aggregation (apart from the
# DP noise's streams 0 and 1 of that key).
ROTATION_STREAM = 2**31 - 5
#: The chance that a client's rotated message has a coordinate beyond
#: `rotated_bound` (then clamped, and counted).
CLAMP_DELTA = 2.0**-20


def check_secure(name: str, error_feedback: bool) -> None:
  """Refuses the compressors secure aggregation cannot sum."""
  if name not in SECURE_NAMES:
    why = ('a scale per client (||v||^2 / ||Rv||_1)' if name == 'drive' else
           "each client's own coordinates, which a masked sum must send "
           'densely anyway')
    raise ValueError(
        f'compression.name={name!r} with secure_aggregation.enabled: the '
        "masked sum needs every client's message as integers on one shared "
        f'scale, which {name} ({why}) does not give. Accepted with secure '
        f'aggregation: {", ".join(SECURE_NAMES)}, or none.')
  if error_feedback:
    raise ValueError(
        'compression.error_feedback with secure aggregation: the '
        'quantization happens inside the masking, where no client sees '
        'what it lost, and the compressors that fit (qsgd, rotated_qsgd) '
        'are unbiased; set compression.error_feedback=False.')


def rotated_bound(clip_norm: float, n: int) -> float:
  """``beta = C min(1, sqrt(2 ln(2 n / delta) / n))``: a rotated coordinate
  ``(R v)_j = sum_i H_ji s_i v_i / sqrt(n)`` of a message ``||v|| <= C`` is
  a Rademacher sum with ``sum_i (v_i / sqrt(n))^2 <= C^2 / n``, so by
  Hoeffding ``P(|(R v)_j| >= t) <= 2 exp(-t^2 n / (2 C^2))``, and over the
  ``n`` coordinates the chance that any exceeds ``beta`` is at most
  ``delta`` (`CLAMP_DELTA`)."""
  n = int(n)
  return float(clip_norm) * min(
      1.0, math.sqrt(2.0 * math.log(2.0 * n / CLAMP_DELTA) / n))


def secure_step(spec: Spec, clip_norm: float, message, key: jax.Array):
  """One client's message before secure aggregation's fixed point, and its
  stats: ``qsgd``: the message itself (the protocol's stochastic rounding
  at ``levels / C`` is the quantizer); ``rotated_qsgd``: ``{'rotated':
  the first d rotated coordinates shaped as message, 'tail': the other
  d' - d}``, each clamped to `rotated_bound`. ``key``: the round's rotation
  (every client's the same)."""
  flat, unravel = jax.flatten_util.ravel_pytree(message)
  v = flat.astype(jnp.float32)
  norm2 = jnp.sum(v * v)
  if spec.compressor.name != 'rotated_qsgd':
    zero = jnp.zeros((), jnp.float32)
    return message, {'compression/sq_error': zero,
                     'compression/sq_norm': norm2,
                     'compression/clamped': zero}
  y = rotate(v, key)
  beta = rotated_bound(clip_norm, y.shape[0])
  clamped = jnp.clip(y, -beta, beta)
  stats = {'compression/sq_error': jnp.sum((clamped - y) ** 2),
           'compression/sq_norm': norm2,
           'compression/clamped': jnp.sum(jnp.abs(y) > beta).astype(
               jnp.float32)}
  d = v.shape[0]
  return {'rotated': unravel(clamped[:d].astype(flat.dtype)),
          'tail': clamped[d:]}, stats


def unrotate_mean(mean, key: jax.Array):
  """`secure_step`'s ``{'rotated', 'tail'}`` (the unmasked mean) rotated
  back to the message's shape."""
  flat, unravel = jax.flatten_util.ravel_pytree(mean['rotated'])
  y = jnp.concatenate([flat.astype(jnp.float32),
                       mean['tail'].astype(jnp.float32)])
  return unravel(unrotate(y, key, flat.shape[0]).astype(flat.dtype))


def from_config(config) -> Spec | None:
  """The `Spec` of ``config.compression`` (None for ``'none'``); every
  refusal before the data is loaded."""
  cc = config.compression
  name = str(cc.name)
  if name != 'none' and bool(config.secure_aggregation.enabled):
    check_secure(name, bool(cc.error_feedback))
  compressor = make(name, bits=cc.bits, fraction=cc.fraction)
  if compressor is None:
    if cc.error_feedback or cc.download:
      raise ValueError(
          f'compression.error_feedback={cc.error_feedback} and compression.'
          f'download={cc.download} need a compressor; set compression.name '
          f'(one of {", ".join(NAMES[1:])}).')
    return None
  if cc.error_feedback and int(config.execution.pack_lanes):
    raise ValueError(
        'compression.error_feedback keeps a residual per client, which '
        'packed lanes do not carry; set execution.pack_lanes=0 (chunking and '
        'sharding work).')
  return Spec(compressor, bool(cc.error_feedback), bool(cc.download))
