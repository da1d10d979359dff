"""Cohorts: sampling clients for a round and stacking them into fixed shapes.

Sampling and batching are pure functions of ``(seed, round, client id)``, so a
resumed run, a chunked round or a sharded round sees exactly the same batches.

A stacked `Cohort` has fixed-shape arrays ``[C, S, B, ...]`` (clients, local
steps, batch) and a mask ``[C, S, B]``. ``S`` is rounded up to a *step bucket*
so that the whole run compiles once per bucket rather than once per round.
A padded example has mask False; a padded step has an all-False mask and is
skipped exactly (parameters and optimizer state unchanged); a padded client
has weight 0 and id -1.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import numpy as np

from fedjax_pfi.data.federated import FederatedDataset


class Cohort(NamedTuple):
  """One round's clients, stacked. A pytree, so it goes straight into jit.

  Attributes:
    client_ids: int32 ``[C]``; -1 for padded clients.
    batches: column -> ``[C, S, B, ...]``.
    mask: bool ``[C, S, B]``; True for real examples.
    weight: float32 ``[C]``; the client's aggregation weight (its number of
      training examples; 0 for padded or dropped clients).
    secagg: the round's `secure_aggregation.Plan` (rows per slot) under
      secure aggregation, else None.
    arrivals: an asynchronous step's `asynchrony.Arrivals` (rows per slot:
      the version each client started from, its staleness weight), else
      None.
    store_rows: int32 ``[C]``: each slot's row of the state's per-client
      store when that store holds only the cohort's rows (a host store,
      `fedjax_pfi.client_store`); None: the store holds every client and
      a slot's row is its client id.
  """
  client_ids: np.ndarray
  batches: dict
  mask: np.ndarray
  weight: np.ndarray
  secagg: Any = None
  arrivals: Any = None
  store_rows: Any = None

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.mask.shape)


def sample_cohort(num_clients: int, cohort_size: int, seed: int,
                  round_idx: int) -> np.ndarray:
  """Client ids of a round: uniform without replacement, from (seed, round).

  Returns:
    int64 ``[cohort_size]``: sorted ids in ``[0, num_clients)``, a pure
    function of ``(seed, round_idx)`` (FedAvg's sampling of a fraction of
    the clients each round, McMahan et al., AISTATS 2017).
  """
  if not 0 < cohort_size <= num_clients:
    raise ValueError(
        f'cohort size {cohort_size} must lie in [1, {num_clients}] (the number'
        ' of training clients).')
  rng = np.random.default_rng([seed, round_idx, 0x5EED])
  return np.sort(rng.choice(num_clients, cohort_size, replace=False))


def ever_sampled(num_clients: int, clients_per_round: int, seed: int,
                 num_rounds: int) -> np.ndarray:
  """Bool ``[num_clients]``: in the cohort of one of rounds
  ``0..num_rounds-1`` (`sample_cohort`; a function of these values only)."""
  seen = np.zeros(num_clients, bool)
  for r in range(num_rounds):
    seen[sample_cohort(num_clients, clients_per_round, seed, r)] = True
  return seen


def power_of_two_buckets(max_steps: int) -> tuple[int, ...]:
  """Step buckets 1, 2, 4, ... up to the first power of two >= max_steps."""
  return tuple(2**i for i in range(max(0, math.ceil(math.log2(max(max_steps,
                                                                  1)))) + 1))


def bucket_for(steps: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if b >= steps:
      return b
  raise ValueError(
      f'{steps} local steps exceed the largest step bucket {max(buckets)}; '
      f'buckets are {tuple(buckets)}.')


def client_steps(num_examples: np.ndarray, batch_size: int, num_epochs: int,
                 max_steps: Optional[int] = None) -> np.ndarray:
  """Local steps of each client: ``epochs * ceil(n / B)`` (last batch kept)."""
  steps = num_epochs * -(-np.asarray(num_examples) // batch_size)
  if max_steps is not None:
    steps = np.minimum(steps, max_steps)
  return steps.astype(np.int64)


def client_batch_index(n: int, batch_size: int, num_epochs: int, steps: int,
                       rng: Optional[np.random.Generator]) -> np.ndarray:
  """Row indices (into a client's own examples) of its first ``steps`` batches.

  Each epoch is a fresh permutation (or the identity if ``rng`` is None) cut
  into ``ceil(n / B)`` batches, the last one partial. Returns int ``[steps, B]``
  with -1 marking padding.
  """
  per_epoch = -(-n // batch_size)
  out = np.full([num_epochs * per_epoch, batch_size], -1, np.int64)
  for e in range(num_epochs):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    padded = np.full(per_epoch * batch_size, -1, np.int64)
    padded[:n] = order
    out[e * per_epoch:(e + 1) * per_epoch] = padded.reshape(per_epoch,
                                                            batch_size)
  return out[:steps]


def _client_batches(ds: FederatedDataset, client_ids, *, batch_size: int,
                    num_epochs: int, max_steps, steps_override, seed: int,
                    round_idx: int, shuffle: bool):
  """Each client's batches as global row indices ``[steps_i, B]`` (-1 pads)."""
  client_ids = np.asarray(client_ids, dtype=np.int64)
  sizes = ds.client_sizes[client_ids]
  if np.any(sizes == 0):
    bad = client_ids[sizes == 0]
    raise ValueError(
        f'clients {bad[:10].tolist()} (names {ds.client_names[bad[:10]].tolist()})'
        ' have no training examples; drop them (e.g. '
        'FederatedDataset.drop_small_clients(1)) before sampling.')
  full = client_steps(sizes, batch_size, num_epochs, max_steps)
  steps = full if steps_override is None else np.minimum(
      np.asarray(steps_override, np.int64), full)
  rows = []
  for cid, n, k in zip(client_ids, sizes, steps):
    rng = (np.random.default_rng([seed, round_idx, int(cid)])
           if shuffle else None)
    idx = client_batch_index(int(n), batch_size, num_epochs, int(k), rng)
    rows.append(np.where(idx >= 0, idx + ds.offsets[cid], -1))
  return client_ids, sizes, steps, rows


_ALIGN = 64  # bytes; XLA:CPU aliases host buffers aligned to this


def _aligned_zeros(shape, dtype) -> np.ndarray:
  """Zeros whose buffer starts on a 64-byte boundary.

  `jax.device_put` on CPU then aliases the array instead of copying it (a
  padded MLP/50 cohort is ~50 MB: 40 ms per round of copying on this
  machine, on the cores the round computes on). The pages come from calloc,
  so padding that is never written costs no memory traffic.
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  buf = np.zeros(nbytes + _ALIGN, np.uint8)
  offset = -buf.ctypes.data % _ALIGN
  return buf[offset:offset + nbytes].view(dtype).reshape(shape)


def _gather(col: np.ndarray, rows: np.ndarray, mask: np.ndarray):
  """``col[rows]`` where ``mask``, zeros elsewhere, in an aligned buffer.

  Only the real rows are copied; padded examples are zeros (they are masked
  out of every loss and metric).
  """
  out = _aligned_zeros(rows.shape + col.shape[1:], col.dtype)
  real = np.flatnonzero(mask.reshape(-1))
  out.reshape((-1,) + col.shape[1:])[real] = col[rows.reshape(-1)[real]]
  return out


def _cohort_ids_weights(client_ids, sizes, c, weight_override):
  ids = np.full([c], -1, np.int32)
  ids[:len(client_ids)] = client_ids
  weight = np.zeros([c], np.float32)
  weight[:len(client_ids)] = (sizes if weight_override is None else
                              weight_override)
  return ids, weight


def stack_cohort(ds: FederatedDataset, client_ids: Sequence[int], *,
                 batch_size: int, num_epochs: int = 1,
                 max_steps: Optional[int] = None,
                 step_buckets: Optional[Sequence[int]] = None,
                 num_slots: Optional[int] = None,
                 steps_override: Optional[np.ndarray] = None,
                 weight_override: Optional[np.ndarray] = None,
                 seed: int = 0, round_idx: int = 0,
                 shuffle: bool = True) -> Cohort:
  """Stacks clients' training batches into a fixed-shape `Cohort`.

  Args:
    ds: the training population.
    client_ids: the cohort (indices into ``ds``).
    batch_size: ``B``.
    num_epochs: local epochs; each reshuffles the client's examples with
      ``default_rng([seed, round, client_id])``.
    max_steps: optional cap on local steps.
    step_buckets: allowed values of ``S``; ``S`` is the smallest bucket that
      fits the cohort's longest client (default: exactly that length).
    num_slots: ``C``; pads with empty clients up to this many.
    steps_override: optional per-client step counts (partial work of
      stragglers); each must be <= the client's full number of steps.
    weight_override: optional per-client weights (default: example counts).
  """
  client_ids, sizes, steps, rows_per_client = _client_batches(
      ds, client_ids, batch_size=batch_size, num_epochs=num_epochs,
      max_steps=max_steps, steps_override=steps_override, seed=seed,
      round_idx=round_idx, shuffle=shuffle)
  longest = int(steps.max()) if steps.size else 1
  s = longest if step_buckets is None else bucket_for(longest, step_buckets)
  c = len(client_ids) if num_slots is None else num_slots
  if c < len(client_ids):
    raise ValueError(f'num_slots={c} is smaller than the cohort '
                     f'({len(client_ids)} clients).')
  rows = np.zeros([c, s, batch_size], np.int64)
  mask = np.zeros([c, s, batch_size], bool)
  for slot, (idx, k) in enumerate(zip(rows_per_client, steps)):
    mask[slot, :k] = idx >= 0
    rows[slot, :k] = np.maximum(idx, 0)
  batches = {name: _gather(col, rows, mask)
             for name, col in ds.columns.items()}
  ids, weight = _cohort_ids_weights(client_ids, sizes, c, weight_override)
  return Cohort(ids, batches, mask, weight)


class PackedCohort(NamedTuple):
  """One round's clients packed one after another into ``L`` vmap lanes.

  A lane runs its clients sequentially: where a client starts (``first``)
  the lane's params and optimizer state reset to the broadcast model, and
  at its last step (``last``) its weighted delta joins the round's sum. The
  cohort-level arrays are those of `Cohort`; the lane arrays replace its
  ``[C, S, B]`` layout, so the computed examples approach the real ones.

  Attributes:
    client_ids: int32 ``[C]``; -1 for padded clients.
    weight: float32 ``[C]``; aggregation weights (0 for padded or dropped).
    batches: column -> ``[L, T, B, ...]``.
    mask: bool ``[L, T, B]``.
    slot: int32 ``[L, T]``; the cohort slot (index into ``client_ids``) the
      lane's step ``t`` belongs to, -1 for padding.
    local_step: int32 ``[L, T]``; that client's own step index.
    first: bool ``[L, T]``; the client's first step.
    last: bool ``[L, T]``; the client's last step.
    secagg: the round's `secure_aggregation.Plan` (rows per cohort slot,
      whole on every device) under secure aggregation, else None.
  """
  client_ids: np.ndarray
  weight: np.ndarray
  batches: dict
  mask: np.ndarray
  slot: np.ndarray
  local_step: np.ndarray
  first: np.ndarray
  last: np.ndarray
  secagg: Any = None

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.mask.shape)


def lane_length_bound(population_steps: np.ndarray, cohort_size: int,
                      num_lanes: int) -> int:
  """The most steps `assign_lanes` can put in one lane for any cohort of
  ``cohort_size`` clients from a population with these step counts: LPT
  keeps every lane within one client of the mean, so a lane holds at most
  ``ceil(sum of the cohort_size largest / num_lanes) + the largest``."""
  top = np.sort(np.asarray(population_steps))[::-1][:cohort_size]
  return int(-(-int(top.sum()) // num_lanes) + (top[0] if top.size else 0))


def assign_lanes(steps: np.ndarray, num_lanes: int) -> list[list[int]]:
  """Longest-processing-time-first packing of clients into lanes.

  Clients (indices into ``steps``) go in decreasing order of steps to the
  lane with the least work so far (ties: the lowest lane), so lanes end up
  within one client's work of each other. Clients with 0 steps are left out.
  Deterministic.
  """
  if num_lanes < 1:
    raise ValueError(f'num_lanes must be >= 1, got {num_lanes}.')
  load = np.zeros(num_lanes, np.int64)
  lanes: list[list[int]] = [[] for _ in range(num_lanes)]
  for i in sorted(range(len(steps)), key=lambda i: (-int(steps[i]), i)):
    if steps[i] <= 0:
      continue
    lane = int(np.argmin(load))
    lanes[lane].append(i)
    load[lane] += int(steps[i])
  return lanes


def pack_cohort(ds: FederatedDataset, client_ids: Sequence[int], *,
                num_lanes: int, batch_size: int, num_epochs: int = 1,
                max_steps: Optional[int] = None,
                step_buckets: Optional[Sequence[int]] = None,
                num_slots: Optional[int] = None,
                steps_override: Optional[np.ndarray] = None,
                weight_override: Optional[np.ndarray] = None,
                seed: int = 0, round_idx: int = 0,
                lane_range: Optional[tuple[int, int]] = None) -> PackedCohort:
  """Packs the cohort's clients into ``num_lanes`` lanes (`assign_lanes`):
  a `PackedCohort` whose lanes ``[L, T, B, ...]`` hold several clients'
  steps one after another, so short clients do not pad to the longest.

  Same arguments and the same batches as `stack_cohort`; ``step_buckets``
  bound the lane length ``T`` instead of ``S``. ``lane_range=(lo, hi)``
  materialises only lanes ``lo:hi`` (a host's share in a multi-host run;
  the lane arrays then have ``hi - lo`` rows, the cohort-level ones all
  ``C``).
  """
  client_ids, sizes, steps, rows_per_client = _client_batches(
      ds, client_ids, batch_size=batch_size, num_epochs=num_epochs,
      max_steps=max_steps, steps_override=steps_override, seed=seed,
      round_idx=round_idx, shuffle=True)
  c = len(client_ids) if num_slots is None else num_slots
  if c < len(client_ids):
    raise ValueError(f'num_slots={c} is smaller than the cohort '
                     f'({len(client_ids)} clients).')
  lanes = assign_lanes(steps, num_lanes)
  longest = max([int(sum(steps[i] for i in lane)) for lane in lanes] + [1])
  t = longest if step_buckets is None else bucket_for(longest, step_buckets)
  lo, hi = (0, num_lanes) if lane_range is None else lane_range
  rows = np.zeros([hi - lo, t, batch_size], np.int64)
  mask = np.zeros([hi - lo, t, batch_size], bool)
  slot = np.full([hi - lo, t], -1, np.int32)
  local_step = np.zeros([hi - lo, t], np.int32)
  first = np.zeros([hi - lo, t], bool)
  last = np.zeros([hi - lo, t], bool)
  for lane, members in enumerate(lanes[lo:hi]):
    pos = 0
    for i in members:
      k = int(steps[i])
      idx = rows_per_client[i]
      mask[lane, pos:pos + k] = idx >= 0
      rows[lane, pos:pos + k] = np.maximum(idx, 0)
      slot[lane, pos:pos + k] = i
      local_step[lane, pos:pos + k] = np.arange(k)
      first[lane, pos] = True
      last[lane, pos + k - 1] = True
      pos += k
  batches = {name: _gather(col, rows, mask)
             for name, col in ds.columns.items()}
  ids, weight = _cohort_ids_weights(client_ids, sizes, c, weight_override)
  return PackedCohort(ids, weight, batches, mask, slot, local_step, first,
                      last)


def padding_efficiency(cohort, chunk_size: Optional[int] = None) -> float:
  """Real examples / examples computed.

  The round runs its clients (or lanes) in consecutive chunks of
  ``chunk_size`` (default: all at once); a chunk computes only the steps at
  which at least one of its clients has a real example (the rest are
  skipped at run time), each costing ``chunk_size * B`` examples.
  """
  mask = np.asarray(cohort.mask)
  n, _, b = mask.shape
  k = n if chunk_size is None else chunk_size
  computed = 0
  for lo in range(0, n, k):
    part = mask[lo:lo + k]
    computed += int(np.any(part, axis=(0, 2)).sum()) * part.shape[0] * b
  return float(mask.sum()) / max(computed, 1)


def stack_eval(ds: FederatedDataset, client_ids: Sequence[int], *,
               batch_size: int, num_slots: Optional[int] = None,
               step_buckets: Optional[Sequence[int]] = None) -> Cohort:
  """Stacks clients' evaluation data (every example once, no shuffling)."""
  return stack_cohort(ds, client_ids, batch_size=batch_size, num_epochs=1,
                      step_buckets=step_buckets, num_slots=num_slots,
                      shuffle=False)


def to_device(cohort: Cohort, sharding=None) -> Cohort:
  """Moves a cohort to the device(s) (host -> device transfer, async)."""
  return jax.device_put(cohort, sharding)
