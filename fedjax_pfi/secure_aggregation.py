"""Secure aggregation, simulated inside the compiled round.

The protocol of Bonawitz et al. ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017) and its sparse version
SecAgg+ (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020), in which each client shares masks
with its ``k`` neighbours on a random k-regular (Harary) graph; with ``k =
n - 1`` the two are the same.

What the round computes, client by client (``vmap``-ped, chunk by chunk,
sharded like any sum):

1. **Fixed point.** Each client's message ``m_c`` (already clipped: to
   ``privacy.clip_norm`` under DP, else to ``secure_aggregation.clip_norm``)
   is quantized to ``Z_{2^b}``: ``r = floor(m s) + [u < frac(m s)]``, ``u ~
   U[0, 1)`` (stochastic rounding, unbiased), negative values in two's
   complement, then multiplied by its integer weight ``w_c`` (example
   count, or 1) mod ``2^b``: ``q_c = w_c r_c``. The weight itself rides
   along as one more value. Each coordinate of the decoded weighted mean is
   within ``1 / s`` of the exact one (every ``r`` is within 1 of ``m s``),
   plus float32's own rounding of the decoded value (relative ``2^-24``).
2. **Masks.** Client ``c`` holds two secrets, its mask key ``s_c`` and its
   self-mask seed ``b_c`` (full-width JAX PRNG keys). Simulated key
   agreement gives each neighbouring pair one key ``k_cj = k_jc`` derived
   from both secrets (a hash of ``s_c XOR s_j``), so each end expands the
   same mask ``p_cj = PRG(k_cj)``. The client sends ``y_c = q_c + PRG(b_c) +
   sum_{j in N(c)} sign(c, j) p_cj mod 2^b``, ``sign = +1`` towards a
   larger id and ``-1`` towards a smaller one.
3. **The server's sum.** ``sum_{c in U} y_c mod 2^b`` over the clients ``U``
   that uploaded. Pairwise masks between two uploaders cancel.
4. **Recovery.** The server removes every uploader's self mask (from
   ``b_c``, rebuilt from its neighbours' shares) and, for each client that
   dropped after sharing keys, the masks its uploading neighbours added
   (from its ``s_d``, rebuilt the same way). Rebuilding a secret needs
   ``t`` (``secure_aggregation.threshold``) of the client's neighbours
   alive at unmasking; when a client that must be rebuilt has fewer,
   `plan` raises `UnrecoverableRound` naming the clients and ``t``, before
   the round runs. The result is ``sum_{c in U} q_c mod 2^b`` bit for bit,
   decoded as signed and divided by ``s``.

A mask the server rebuilds is the same number the client expanded (same
key), so the simulation expands each once and sums the rebuilt ones
beside the masked inputs (``sums['message']['removed']``); the server's
subtraction happens in `wrap`'s ``finalize``. Dropouts at each stage come
from the participation schedule (`draw_stages`), a function of (seed,
round) like every other participation draw.

**Central DP composes**: the DP aggregator clips each message before it is
quantized, and its noise is added to the *unmasked* sum, which trusts the
server to add it (distributed DP, with Skellam or discrete Gaussian noise
added by the clients, is not simulated).

**Bytes** (`protocol_bytes`): a model of the protocol's messages, per
client: 2 public keys (2 x 32 B) up; the neighbours' public keys (64 B
each) and shares (80 B each: two 32-B shares and a 16-B tag) down; its
shares (80 B per neighbour) up; the masked input (``L b / 8`` B) up; at
unmasking one 32-B share per neighbour up. O(k + L) per client for
SecAgg+, O(n + L) for the complete graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi import compression
from fedjax_pfi.algorithms import aggregators as aggregators_lib

#: Stages at which a client can leave the protocol (`draw_stages`).
SURVIVED, BEFORE_KEYS, BEFORE_UPLOAD, BEFORE_UNMASK = 0, 1, 2, 3
STAGE_NAMES = ('survived', 'dropped_before_keys', 'dropped_before_upload',
               'dropped_before_unmask')
# fold_in(round key, SECAGG_STREAM): the protocol's secrets, apart from the
# clients' training keys and the aggregator's noise.
SECAGG_STREAM = 2**31 - 3
# Above 2**23 a float32 has no fractional bits, so x * scale is kept below.
FLOAT32_EXACT = 2.0**23


class UnrecoverableRound(ValueError):
  """A round whose masks the server cannot remove (too few live
  neighbours of a client whose secret must be rebuilt)."""


class Spec(NamedTuple):
  """The protocol's parameters, fixed before tracing (`build`).

  Attributes:
    bits: ``b``: sums live in ``Z_{2^b}``.
    scale: ``s``: fixed point ``x -> round(x s)``.
    neighbors: ``k``: neighbours per client (SecAgg+); 0: every other
      client of the round (Bonawitz et al.).
    threshold: ``t``: live neighbours needed to rebuild a secret; 0: a
      majority of the client's neighbours, ``floor(k / 2) + 1``.
    clip_norm: the L2 bound of each message before it is weighted (every
      coordinate lies in ``[-clip_norm, clip_norm]``).
    clip: the round clips to ``clip_norm`` itself (False under DP, whose
      aggregator clips).
    max_weight: the largest ``w_c`` (1 with uniform weights).
    slots: the cohort's slots (the most clients a round sums).
    degree: the static width of the neighbour lists (``k``, or ``slots -
      1`` for the complete graph).
    dropout: probabilities of leaving before keys, before upload, before
      unmasking (each among those still in).
    levels: 0, or ``2^(b_c - 1) - 1`` when a compressor (``compression.
      bits = b_c``) sets the fixed point (`make_spec`): each value ``|x|
      <= clip_norm`` (``beta`` once rotated) maps to an integer in
      ``[-levels, levels]``.
    rotated: the messages are rotated (``rotated_qsgd``) and clamped to
      `compression.rotated_bound` before the fixed point, whose scale then
      depends on the message's length (`value_scale`).
  """
  bits: int
  scale: float
  neighbors: int
  threshold: int
  clip_norm: float
  clip: bool
  max_weight: float
  slots: int
  degree: int
  dropout: tuple[float, float, float]
  levels: int = 0
  rotated: bool = False


def max_scale(bits: int, clip_norm: float, max_weight: float,
              slots: int) -> float:
  """The largest ``s`` for which a sum of ``slots`` quantized messages
  cannot overflow: ``slots * max_weight * (clip_norm s + 1) <= 2^(b-1) -
  1`` (each rounded value is within 1 of ``m s``), and ``clip_norm s <=
  2^23`` (float32 rounds exactly)."""
  room = (2.0**(bits - 1) - 1) / (slots * max_weight) - 1
  # a hair below the bound, so that float rounding cannot cross it
  return min(room, FLOAT32_EXACT) / clip_norm * (1 - 1e-9)


def check_fits(spec: Spec) -> None:
  """Refuses a modulus the clip, the weights and the cohort can overflow,
  and one too small to resolve a message at all."""
  if spec.scale * spec.clip_norm < 1:
    raise ValueError(
        f'Z_2^{spec.bits} is too small for {spec.slots} clients of weight up '
        f'to {spec.max_weight:g}: the largest safe scale maps the whole range '
        f'of a message (clip {spec.clip_norm:g}) to less than one step '
        f'(scale {spec.scale:.3g}). Raise secure_aggregation.bits or use '
        'uniform weights (server.weighting=uniform).')
  bound = spec.slots * spec.max_weight * (spec.clip_norm * spec.scale + 1)
  limit = 2.0**(spec.bits - 1) - 1
  if bound > limit or spec.clip_norm * spec.scale > FLOAT32_EXACT:
    raise ValueError(
        f'secure aggregation can overflow Z_2^{spec.bits}: {spec.slots} '
        f'clients x weight {spec.max_weight:g} x (clip {spec.clip_norm:g} x '
        f'scale {spec.scale:g} + 1) = {bound:.4g} exceeds '
        f'2^{spec.bits - 1} - 1 = {limit:.4g}. Raise secure_aggregation.bits, '
        'lower secure_aggregation.scale (0 picks the largest safe one) or the '
        'clip norm, or use uniform weights (server.weighting=uniform); '
        'clip x scale must also stay <= 2^23 (float32 rounds exactly).')


def check_compressed_fits(compressor_bits: int, bits: int, slots: int,
                          max_weight: float) -> int:
  """The levels of a ``compressor_bits``-bit compressor under secure
  aggregation, refused when the cohort's weighted sum of them can overflow
  ``Z_{2^bits}``: ``slots * max_weight * (levels + 1) <= 2^(bits-1) - 1``
  (`check_fits`'s bound, with ``clip x scale = levels``)."""
  levels = compression.levels_of(compressor_bits)
  limit = 2.0**(bits - 1) - 1
  need = slots * max_weight * (levels + 1)
  if need > limit or levels > FLOAT32_EXACT:
    fit = [b for b in range(2, 25)
           if slots * max_weight * 2.0**(b - 1) <= limit]
    lower = (f'lower compression.bits to at most {fit[-1]}' if fit else
             'no compression.bits >= 2 fits')
    wide = next((b for b in range(bits, 33) if need <= 2.0**(b - 1) - 1),
                None)
    raise ValueError(
        f'compression.bits={compressor_bits} does not fit the secure-'
        f'aggregation modulus Z_2^{bits}: {slots} clients x weight '
        f'{max_weight:g} x ({levels} levels + 1) = {need:.4g} exceeds '
        f'2^{bits - 1} - 1 = {limit:.4g}, so the masked sum can overflow. '
        f'Accepted: {lower}'
        + (f', or raise secure_aggregation.bits to at least {wide}'
           if wide is not None and levels <= FLOAT32_EXACT else '')
        + ', or use uniform weights (server.weighting=uniform); '
        'compression.bits <= 24 (float32 rounds exactly).')
  return levels


def value_scale(spec: Spec, num_values: int) -> float:
  """The fixed point's scale for a message of ``num_values`` values
  (per client, the weight apart): ``spec.scale``, or with a rotating
  compressor ``levels / rotated_bound(clip_norm, num_values)``."""
  if not spec.rotated:
    return spec.scale
  return spec.levels / compression.rotated_bound(spec.clip_norm,
                                                 int(num_values))


def make_spec(*, bits: int = 32, neighbors: int = 0, threshold: int = 0,
              clip_norm: float, clip: bool = True, max_weight: float = 1.0,
              slots: int, dropout=(0.0, 0.0, 0.0), scale: float = 0.0,
              compressor: str = 'none', compressor_bits: int = 8) -> Spec:
  """A checked `Spec` (`Spec` says what each value is; ``scale=0``: the
  largest that cannot overflow, `max_scale`). The messages name the
  ``secure_aggregation.*`` options.

  ``compressor`` (`compression.SECURE_NAMES`): ``qsgd`` or
  ``rotated_qsgd`` with ``compressor_bits`` bits a value sets the fixed
  point instead: ``2^(b_c - 1) - 1`` levels over ``[-clip_norm,
  clip_norm]`` (QSGD's stochastic levels on one scale that every client
  shares), over ``[-beta, beta]`` after the rotation
  (`compression.rotated_bound`)."""
  bits, k, t = int(bits), int(neighbors), int(threshold)
  if not 2 <= bits <= 32:
    raise ValueError(f'secure_aggregation.bits must be in [2, 32], got '
                     f'{bits}.')
  if not (float(clip_norm) > 0 and math.isfinite(float(clip_norm))):
    raise ValueError(
        f'secure aggregation needs a finite clip norm > 0 (it sizes the '
        f'fixed-point range), got {clip_norm}: set privacy.clip_norm (under '
        'DP) or secure_aggregation.clip_norm to a finite value.')
  levels = 0
  if compressor != 'none':
    compression.check_secure(compressor, error_feedback=False)
    if float(scale):
      raise ValueError(
          f'secure_aggregation.scale={scale} and compression.name='
          f'{compressor!r}: the compressor sets the fixed point (2^(bits-1) '
          '- 1 levels over the clip); unset secure_aggregation.scale.')
    levels = check_compressed_fits(compressor_bits, bits, slots, max_weight)
    scale = levels / float(clip_norm)
  if k < 0 or k % 2:
    raise ValueError(
        f'secure_aggregation.neighbors must be 0 (every other client) or an '
        f'even number >= 2 (a Harary graph: each client joins the k/2 before '
        f'and after it on a random ring), got {neighbors}.')
  if t < 0:
    raise ValueError(f'secure_aggregation.threshold must be >= 1, or 0 for a '
                     f'majority of the neighbours, got {t}.')
  degree = slots - 1 if k == 0 or k >= slots - 1 else k
  if t > max(degree, 1):
    raise ValueError(
        f'secure_aggregation.threshold={t} exceeds the {degree} neighbours '
        'a client has: no secret could ever be rebuilt.')
  dropout = tuple(float(p) for p in dropout)
  for name, p in zip(('dropout_keys', 'dropout_upload', 'dropout_unmask'),
                     dropout):
    if not 0.0 <= p < 1.0:
      raise ValueError(f'secure_aggregation.{name} must be in [0, 1), got '
                       f'{p}.')
  if not (float(scale) >= 0 and math.isfinite(float(scale))):
    raise ValueError(f'secure_aggregation.scale must be > 0, or 0 for the '
                     f'largest safe one, got {scale}.')
  scale = float(scale) or max_scale(bits, clip_norm, max_weight, slots)
  spec = Spec(bits, scale, k, t, float(clip_norm), clip, float(max_weight),
              slots, degree, dropout, levels, compressor == 'rotated_qsgd')
  check_fits(spec)
  return spec


def build(config, *, slots: int, max_weight: float,
          dp_clip_norm: Optional[float], adaptive: bool = False
          ) -> Optional[Spec]:
  """The `Spec` of ``config.secure_aggregation`` (None when disabled),
  every refusal before tracing."""
  sa = config.secure_aggregation
  if not sa.enabled:
    return None
  if adaptive:
    raise ValueError(
        "privacy.mechanism='adaptive' moves the clip norm every round, and "
        'with it the fixed-point range; secure aggregation needs a fixed one. '
        "Use privacy.mechanism='gaussian'.")
  own_clip = float(sa.clip_norm)
  if dp_clip_norm is not None:
    if own_clip:
      raise ValueError(
          f'secure_aggregation.clip_norm={own_clip} is set, but under DP '
          f'privacy.clip_norm={dp_clip_norm} bounds the messages; unset '
          'secure_aggregation.clip_norm.')
    clip, clip_norm = False, float(dp_clip_norm)
  else:
    if not (own_clip > 0 and math.isfinite(own_clip)):
      raise ValueError(
          'secure aggregation without DP needs secure_aggregation.clip_norm, '
          'a finite L2 bound > 0 on each message, which sizes the fixed-point '
          f'range; got {sa.clip_norm}.')
    clip, clip_norm = True, own_clip
  return make_spec(
      bits=sa.bits, neighbors=sa.neighbors, threshold=sa.threshold,
      clip_norm=clip_norm, clip=clip, max_weight=max_weight, slots=slots,
      dropout=(sa.dropout_keys, sa.dropout_upload, sa.dropout_unmask),
      scale=sa.scale, compressor=str(config.compression.name),
      compressor_bits=config.compression.bits)


# -- the host's part: who drops, the graph, recoverability ---------------------


def draw_stages(dropout, seed: int, round_idx: int,
                ids: np.ndarray) -> np.ndarray:
  """Each client's stage (`SURVIVED` ... `BEFORE_UNMASK`), ``[n]`` int8: a
  client leaves before keys with ``dropout[0]``, else before upload with
  ``dropout[1]``, else before unmasking with ``dropout[2]`` (a function of
  (seed, round) and the cohort's size)."""
  rng = np.random.default_rng([seed, round_idx, 0x5EC])
  u = rng.random((3, ids.size))
  stage = np.zeros(ids.size, np.int8)
  for s in (BEFORE_UNMASK, BEFORE_UPLOAD, BEFORE_KEYS):  # earliest wins
    stage[u[s - 1] < float(dropout[s - 1])] = s
  return stage


def harary(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
  """Neighbour lists of a random k-regular Harary graph on ``n`` nodes
  (Bell et al. 2020): nodes on a ring in random order, each joined to the
  ``k/2`` before and after it; the complete graph when ``k >= n - 1``."""
  if k == 0 or k >= n - 1:
    return [np.delete(np.arange(n), i) for i in range(n)]
  ring = rng.permutation(n)
  pos = np.empty(n, np.int64)
  pos[ring] = np.arange(n)
  offsets = np.concatenate([np.arange(1, k // 2 + 1),
                            -np.arange(1, k // 2 + 1)])
  return [np.sort(ring[(pos[i] + offsets) % n]) for i in range(n)]


class Plan(NamedTuple):
  """A round's protocol, per cohort slot (rows travel with the cohort).

  Attributes:
    neighbors: int32 ``[C, degree]``: neighbours' client ids, -1 padding.
    neighbor_dropped: bool ``[C, degree]``: that neighbour shared keys and
      then did not upload (its masks are rebuilt).
    stage: int8 ``[C]``: the slot's stage (padded slots: `BEFORE_KEYS`).
  """
  neighbors: np.ndarray
  neighbor_dropped: np.ndarray
  stage: np.ndarray


def plan(spec: Spec, ids: np.ndarray, weights: np.ndarray,
         stages: np.ndarray, seed: int, round_idx: int) -> Plan:
  """The graph over the clients that shared keys, and the check that the
  server can remove every mask (else `UnrecoverableRound`).

  ``ids``, ``weights``, ``stages``: per slot (-1 ids pad). A client with
  weight 0 and id >= 0 that shared keys (a dropped straggler, or stage
  `BEFORE_UPLOAD`) counts as dropped before upload.
  """
  c = ids.size
  if np.any(weights != np.round(weights)):
    raise ValueError(
        'secure aggregation multiplies each quantized message by its weight '
        'in Z_2^b, so weights must be integers (example counts, or 1 with '
        f'uniform weighting); got {weights[weights != np.round(weights)][:3]}.')
  stages = np.where(ids >= 0, stages, BEFORE_KEYS).astype(np.int8)
  stages = np.where((stages != BEFORE_KEYS) & (weights <= 0), BEFORE_UPLOAD,
                    stages).astype(np.int8)
  keyed = np.flatnonzero(stages != BEFORE_KEYS)
  # the graph over client ids, not slots: chunked rounds order the slots
  # by length, and the graph (hence an abort) must not depend on layout
  keyed = keyed[np.argsort(ids[keyed], kind='stable')]
  rng = np.random.default_rng([seed, round_idx, 0x6A9])
  lists = harary(keyed.size, spec.neighbors, rng)
  neighbors = np.full((c, spec.degree), -1, np.int32)
  dropped = np.zeros((c, spec.degree), bool)
  uploaded = stages[keyed] != BEFORE_UPLOAD
  alive = (stages[keyed] == SURVIVED)
  short = []
  for i, nb in enumerate(lists):
    slot = keyed[i]
    neighbors[slot, :nb.size] = ids[keyed[nb]]
    dropped[slot, :nb.size] = ~uploaded[nb]
    t = spec.threshold or nb.size // 2 + 1
    live = int(alive[nb].sum())
    # An uploader's self-mask seed must be rebuilt (one that left before
    # unmasking uploaded too), and the mask key of a client that dropped
    # before uploading whenever a neighbour of it uploaded.
    rebuilt = uploaded[i] or bool(uploaded[nb].any())
    if rebuilt and live < t:
      short.append((int(ids[slot]), live, t))
  if short:
    names = ', '.join(f'{i} ({live} live < t={t})' for i, live, t in
                      short[:10])
    more = f' and {len(short) - 10} more' if len(short) > 10 else ''
    raise UnrecoverableRound(
        f'secure aggregation cannot finish round {round_idx + 1}: clients '
        f'{names}{more} kept fewer than t live neighbours at unmasking, so '
        'their secrets cannot be rebuilt and the sum cannot be unmasked. '
        'Lower secure_aggregation.threshold, raise secure_aggregation.'
        'neighbors, or lower the dropout.')
  return Plan(neighbors, dropped, stages)


def protocol_bytes(degree: int, num_values: int, bits: int) -> dict:
  """Bytes per client (module docstring): ``upload``, ``download`` and the
  protocol's ``overhead`` beyond the masked input."""
  masked = -(-num_values * bits // 8)
  up = 64 + 80 * degree + masked + 32 * degree
  down = 64 * degree + 80 * degree
  return {'upload': up, 'download': down, 'overhead': up - masked,
          'masked_input': masked}


def client_bytes(spec: Spec, num_floats: int) -> dict:
  """`protocol_bytes` for a client whose message has ``num_floats`` floats:
  it masks them (``d'``, the next power of 2, once rotated) and its
  weight."""
  values = compression.next_pow2(num_floats) if spec.rotated else num_floats
  return protocol_bytes(spec.degree, int(values) + 1, spec.bits)


# -- the device's part ----------------------------------------------------------


def _modulus_mask(bits: int) -> jax.Array:
  return jnp.uint32(2**bits - 1 if bits < 32 else 0xFFFFFFFF)


def quantize(tree, scale: float, bits: int, key: jax.Array):
  """``x -> floor(x s) + [u < frac(x s)] mod 2^b`` per leaf (uint32)."""
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for i, x in enumerate(leaves):
    y = x.astype(jnp.float32) * jnp.float32(scale)
    fl = jnp.floor(y)
    u = jax.random.uniform(jax.random.fold_in(key, i), y.shape, jnp.float32)
    q = (fl + (u < y - fl).astype(jnp.float32)).astype(jnp.int32)
    out.append(jax.lax.bitcast_convert_type(q, jnp.uint32) &
               _modulus_mask(bits))
  return jax.tree.unflatten(treedef, out)


def dequantize(tree, scale: float, bits: int):
  """Elements of ``Z_{2^b}`` (uint32) read as signed, divided by ``s``."""
  def one(z):
    z = z & _modulus_mask(bits)
    if bits < 32:
      signed = jnp.where(z >= 2**(bits - 1), z.astype(jnp.float32) - 2.0**bits,
                         z.astype(jnp.float32))
    else:
      signed = jax.lax.bitcast_convert_type(z, jnp.int32).astype(jnp.float32)
    return signed / jnp.float32(scale)
  return jax.tree.map(one, tree)


def expand(key: jax.Array, like, bits: int):
  """``PRG(key)``: uint32 values in ``Z_{2^b}`` shaped like ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  return jax.tree.unflatten(treedef, [
      jax.random.bits(jax.random.fold_in(key, i), x.shape, jnp.uint32) &
      _modulus_mask(bits) for i, x in enumerate(leaves)])


def secrets(round_key: jax.Array, client_id) -> tuple[jax.Array, jax.Array]:
  """``(s_c, b_c)``: client ``client_id``'s mask key and self-mask seed."""
  root = jax.random.fold_in(jax.random.fold_in(round_key, SECAGG_STREAM),
                            jnp.maximum(client_id, 0))
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def pair_key(s_a: jax.Array, s_b: jax.Array) -> jax.Array:
  """The key two clients agree on, the same from either end: a hash of the
  XOR of their mask keys' bits (simulated Diffie-Hellman)."""
  data = jax.random.key_data(s_a) ^ jax.random.key_data(s_b)
  return jax.random.fold_in(jax.random.wrap_key_data(data), 0x4B41)


def masked_input(q, client_id, neighbors, neighbor_dropped, round_key,
                 bits: int):
  """One client's ``(y_c, removed_c)``: its masked input, and the masks the
  server rebuilds for it (its self mask plus its masks with neighbours
  that dropped before uploading). ``neighbors`` ``[degree]`` ids, -1 pad."""
  s_c, b_c = secrets(round_key, client_id)
  own = expand(b_c, q, bits)
  y = jax.tree.map(jnp.add, q, own)

  def step(carry, nb):
    y, removed = carry
    j, gone = nb
    s_j, _ = secrets(round_key, j)
    p = expand(pair_key(s_c, s_j), q, bits)
    signed = jax.tree.map(
        lambda m: jnp.where(j < 0, jnp.uint32(0),
                            jnp.where(client_id < j, m, jnp.uint32(0) - m)), p)
    y = jax.tree.map(jnp.add, y, signed)
    removed = jax.tree.map(
        lambda r, m: r + jnp.where(gone, m, jnp.uint32(0)), removed, signed)
    return (y, removed), None

  (y, removed), _ = jax.lax.scan(step, (y, own),
                                 (neighbors, neighbor_dropped))
  mask = _modulus_mask(bits)
  return (jax.tree.map(lambda v: v & mask, y),
          jax.tree.map(lambda v: v & mask, removed))


def client_sums(spec: Spec, messages, weights: jax.Array, keys: jax.Array,
                ids: jax.Array, rows, round_key: jax.Array) -> dict:
  """A chunk's part of the protocol: ``{'masked': sum y_c, 'removed': sum
  of the rebuilt masks}`` over the uploaders (``weights > 0``), each a
  uint32 tree ``{'message': ..., 'weight': ...}``.
  ``messages`` are clipped, not yet weighted; ``weights`` integers (`plan`
  checks); ``keys`` the clients' own."""
  mask = _modulus_mask(spec.bits)

  def one(m, w, key, cid, nb, gone):
    wq = jax.lax.bitcast_convert_type(jnp.round(w).astype(jnp.int32),
                                      jnp.uint32)
    r = quantize(m, value_scale(spec, compression.num_floats(m)), spec.bits,
                 key)
    q = {'message': jax.tree.map(lambda v: (v * wq) & mask, r),
         'weight': wq.reshape(1) & mask}
    return masked_input(q, cid, nb, gone, round_key, spec.bits)

  y, removed = jax.vmap(one)(messages, weights, keys, ids, rows.neighbors,
                             rows.neighbor_dropped)
  up = weights > 0
  finite = jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
                      for x in jax.tree.leaves(messages)]).all(0)

  def total(v):
    keep = up.reshape(up.shape + (1,) * (v.ndim - 1))
    return jnp.sum(jnp.where(keep, v, jnp.uint32(0)), axis=0,
                   dtype=jnp.uint32)

  # A non-finite update has no fixed point: it is counted, and `unmask`
  # turns the sum into NaN, so the run stops as it would without masks.
  return {'masked': jax.tree.map(total, y),
          'removed': jax.tree.map(total, removed),
          'secagg/non_finite_clients': jnp.sum(up & ~finite).astype(
              jnp.float32)}


def stage_counts(plan: Plan, ids: jax.Array) -> dict:
  """``secagg/<stage>``: how many of the round's clients ended at each
  stage (the whole cohort's plan)."""
  stage = plan.stage.astype(jnp.int32)
  return {f'secagg/{n}': jnp.sum((stage == s) & (ids >= 0)).astype(
      jnp.float32) for s, n in enumerate(STAGE_NAMES)}


def unmask(spec: Spec, sums: dict, non_finite=0.0) -> tuple[dict, dict]:
  """The server's last step: ``sum y - removed mod 2^b``, decoded. Returns
  ``(message sum, weight sum)`` as floats; NaN where ``non_finite`` clients
  sent a non-finite update (the simulator's stand-in for a corrupted one)."""
  mask = _modulus_mask(spec.bits)
  z = jax.tree.map(lambda a, b: (a - b) & mask, sums['masked'],
                   sums['removed'])
  scale = value_scale(spec, compression.num_floats(z['message']))
  total = jax.tree.map(lambda v: jnp.where(non_finite > 0, jnp.nan, v),
                       dequantize(z['message'], scale, spec.bits))
  return total, dequantize(z['weight'], 1.0, spec.bits)[0]


def wrap(inner: aggregators_lib.Aggregator,
         spec: Spec) -> aggregators_lib.Aggregator:
  """``inner`` with its messages securely aggregated: its ``client`` step
  (DP's clip) runs first, or a clip to ``spec.clip_norm``; the round then
  masks (`client_sums`, via `rounds.message_sums`), and ``finalize`` unmasks
  before ``inner``'s (DP's noise goes on the unmasked sum)."""
  if inner.needs != 'sum':
    raise ValueError(
        f'aggregator {inner.name!r} needs every client\'s message, which '
        'secure aggregation hides from the server; use the mean (or DP) with '
        'secure_aggregation.enabled, or disable it.')
  client = inner.client
  if spec.clip:
    if client is not None:
      raise ValueError(f'aggregator {inner.name!r} already transforms each '
                       'message; secure aggregation would clip it again.')

    def client(message, state, key):
      del state, key
      return aggregators_lib.clip_by_norm(message, spec.clip_norm)[0], {}

  def finalize(sums, state, key):
    total, weight = unmask(spec, sums['message'],
                           sums.get('secagg/non_finite_clients', 0.0))
    masked = compression.num_floats(sums['message']['masked']['message'])
    sizes = protocol_bytes(spec.degree, masked + 1, spec.bits)
    mean, state, metrics = inner.finalize(
        {**sums, 'message': total, 'weight': weight}, state, key)
    scale = value_scale(spec, masked)
    metrics = {**metrics, 'secagg/scale': jnp.float32(scale),
               'secagg/upload_bytes_per_client': jnp.float32(sizes['upload']),
               'secagg/download_bytes_per_client': jnp.float32(
                   sizes['download']),
               'secagg/overhead_bytes_per_client': jnp.float32(
                   sizes['overhead']),
               'secagg/degree': jnp.float32(spec.degree),
               **{k: v for k, v in sums.items() if k.startswith('secagg/')}}
    return mean, state, metrics

  return inner._replace(finalize=finalize, client=client, secure=spec,
                        name=f'secagg({inner.name})')
