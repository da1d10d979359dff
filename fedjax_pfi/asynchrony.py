"""Asynchronous aggregation in simulated time: FedBuff and FedAsync.

**FedBuff** (Nguyen et al., AISTATS 2022, "Federated Learning with Buffered
Asynchronous Aggregation"). ``asynchrony.concurrency`` clients train at once,
each from the model version current when it started; they start at the
times the device model (`fedjax_pfi.devices`) gives (a slot freed by an
arrival or a dropout is refilled at once from the clients online and idle)
and arrive when they finish. The server keeps the arrivals in a buffer and
steps after ``K = asynchrony.buffer_size`` of them, each delta weighted by
its staleness ``tau`` (server steps since the client started): ``s(tau) =
1`` (``constant``) or ``(1 + tau)^-a`` (``polynomial``, ``a =
asynchrony.staleness_exponent``, FedBuff's 0.5). An arrival staler than
``asynchrony.max_staleness`` is discarded. The aggregate is
``sum_i w_i s(tau_i) delta_i / sum_i w_i`` with the run's weights ``w``
(examples, or 1 each: FedBuff's ``1/K``), and the server optimizer steps on
it as in a synchronous round.

**FedAsync** (Xie et al. 2019, "Asynchronous Federated Optimization"): one
arrival per step (``K = 1``) and the mixing rule ``x <- (1 - alpha_t) x +
alpha_t x_client`` with ``alpha_t = alpha s(tau)``, ``alpha`` the server's
learning rate (``server.optimizer='fedavg'``). With ``x_client = x_v +
delta`` (``x_v`` the version it started from) that is the step ``x <- x +
alpha s(tau) (delta + x_v - x)``: FedBuff with ``K = 1`` plus the drift
term ``x_v - x``, zero when the client is fresh.

**One compiled program per server step.** The ``K`` clients of a buffer are
the step's cohort and train together in one ``vmap``; each starts from its
own version, gathered from a ring of the last ``max_staleness + 1`` versions
of the federated params kept in the server state (`Spec.ring`), so a stale
client costs nothing more than a fresh one. The host computes the timeline
(`AsyncTimeline`) before each step, as a pure function of ``(seed,
devices.seed)`` and the profiles; the ring is checkpointed with the state, so
a run resumed between steps, with clients in flight, continues exactly.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import numpy as np

from fedjax_pfi import devices
from fedjax_pfi.data import cohort as cohort_lib

MODES = ('sync', 'fedbuff', 'fedasync')
STALENESS = ('constant', 'polynomial')
SELECT_STREAM = 0x5EED  # as `cohort.sample_cohort`
# A step that needs more client starts and ends than this never comes.
MAX_EVENTS_PER_STEP = 1_000_000
COIN_STREAM = 0xC10C


class Spec(NamedTuple):
  """What the round needs: the ring's length and FedAsync's mixing.

  Attributes:
    ring: the number of model versions kept in the server state's ring
      (``max_staleness + 1``; ``[ring, ...]`` of the federated params).
    mixing: FedAsync's mixing: a client's message gains the drift term
      ``x_v - x`` (False: FedBuff's delta).
  """
  ring: int
  mixing: bool


class Arrivals(NamedTuple):
  """Per cohort slot: the ring slot of the version the client started from
  (int32) and its staleness weight ``s(tau)`` (float32; 0 for padding)."""
  slot: np.ndarray
  scale: np.ndarray


def mode(config) -> str:
  a = config.get('asynchrony')
  return 'sync' if a is None else str(a.mode)


def enabled(config) -> bool:
  return mode(config) != 'sync'


def buffer_size(config) -> int:
  a = config.asynchrony
  if str(a.mode) == 'fedasync':
    return 1
  return int(a.buffer_size) or int(config.clients_per_round)


def concurrency(config) -> int:
  return int(config.asynchrony.concurrency) or int(config.clients_per_round)


def spec(config) -> Spec | None:
  if not enabled(config):
    return None
  return Spec(int(config.asynchrony.max_staleness) + 1,
              mode(config) == 'fedasync')


def staleness_weight(tau: np.ndarray, rule: str, exponent: float
                     ) -> np.ndarray:
  tau = np.asarray(tau, np.float64)
  if rule == 'constant':
    return np.ones_like(tau)
  return (1.0 + tau) ** -float(exponent)


def check(config) -> None:
  """Refuses ``asynchrony.*`` values and combinations no run can use,
  before the data is loaded."""
  a = config.get('asynchrony')
  if a is None:
    return
  if str(a.mode) not in MODES:
    raise ValueError(f'asynchrony.mode must be one of {MODES}, got '
                     f'{a.mode!r}.')
  if str(a.staleness) not in STALENESS:
    raise ValueError(f'asynchrony.staleness must be one of {STALENESS}, got '
                     f'{a.staleness!r}.')
  for key in ('buffer_size', 'concurrency', 'max_staleness'):
    v = a[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f'asynchrony.{key} must be an integer >= 0, got '
                       f'{v!r}.')
  e = float(a.staleness_exponent)
  if not (math.isfinite(e) and e >= 0):
    raise ValueError(f'asynchrony.staleness_exponent must be a finite '
                     f'number >= 0, got {a.staleness_exponent!r}.')
  if not enabled(config):
    return
  m = str(a.mode)
  if m == 'fedasync' and int(a.buffer_size) not in (0, 1):
    raise ValueError(f'asynchrony.buffer_size={a.buffer_size} with '
                     "asynchrony.mode='fedasync': FedAsync steps on every "
                     'arrival (K = 1); use fedbuff for a buffer.')
  k, conc = buffer_size(config), concurrency(config)
  if k > conc:
    raise ValueError(
        f'asynchrony.buffer_size={k} is larger than asynchrony.concurrency='
        f'{conc}: the buffer could never fill. Lower the buffer or raise '
        'the concurrency.')
  d = config.devices
  if str(d.profile) == 'none':
    raise ValueError(f"asynchrony.mode={m!r} runs in simulated time: set "
                     "devices.profile='lognormal' or 'trace'.")
  sync_only = [key for key in ('deadline', 'over_select') if float(d[key])]
  if d.partial:
    sync_only.append('partial')
  if sync_only:
    raise ValueError(
        f'devices.{sync_only[0]} is a synchronous strategy; asynchrony.mode='
        f'{m!r} has none (its staleness bound is asynchrony.max_staleness).')
  if m == 'fedasync' and config.secure_aggregation.enabled:
    raise ValueError("asynchrony.mode='fedasync' with secure aggregation: "
                     'one client a step has no sum to hide its update in.')
  if config.server.optimizer != 'fedavg' and m == 'fedasync':
    raise ValueError(
        f"asynchrony.mode='fedasync' mixes x <- x + alpha s (x_client - x) "
        f"with alpha = server.learning_rate: set server.optimizer='fedavg' "
        f'(got {config.server.optimizer!r}).')
  if config.compression.download:
    raise ValueError('compression.download with asynchronous aggregation: '
                     'each client starts from its own version, which is sent '
                     'uncompressed.')
  if int(config.execution.pack_lanes):
    raise ValueError('asynchronous aggregation runs unpacked (each client '
                     'starts from its own version): set '
                     'execution.pack_lanes=0.')


def wrap(inner, spec_: Spec):
  """``inner`` (an `aggregators.Aggregator`) in an asynchronous round:
  `partitioned.fed_partitioned` reads ``asynchrony`` to keep the ring of
  versions and to start each client from its own."""
  return inner._replace(asynchrony=spec_)


# -- the timeline ---------------------------------------------------------------------


class _Client(NamedTuple):
  id: int
  version: int
  start: float
  end: float        # when it finished or stopped
  completes: bool   # finished (else left or went offline)
  steps: int
  busy: float
  energy: float


class AsyncTimeline(devices.Clock):
  """The server steps of an asynchronous run in simulated time (module
  docstring). ``round(r)`` is step ``r`` as a `devices.Round` whose
  ``arrivals`` are the buffer's versions and staleness weights; memoized,
  computed in order."""

  def __init__(self, config, client_sizes: np.ndarray, profiles,
               availability, download_bytes: float, upload_bytes: float):
    super().__init__(config, client_sizes, profiles, availability,
                     download_bytes, upload_bytes)
    a = config.asynchrony
    self.k = buffer_size(config)
    self.concurrency = concurrency(config)
    self.max_staleness = int(a.max_staleness)
    self.ring = self.max_staleness + 1
    self.rule, self.exponent = str(a.staleness), float(a.staleness_exponent)
    if self.concurrency > self.sizes.size:
      raise ValueError(
          f'asynchrony.concurrency={self.concurrency} is larger than the '
          f'{self.sizes.size} training clients.')
    self._heap: list = []
    self._seq = 0
    self._busy_ids: set[int] = set()
    # clients whose update waits in the buffer: at most one update of a
    # client per server step (DP's sensitivity, secure aggregation's ids)
    self._waiting: set[int] = set()
    self._unfilled = 0
    self._buffer: list[tuple[_Client, int]] = []  # (client, staleness)
    self._ended: list[_Client] = []
    self._discarded = 0
    self._fills: dict[int, int] = {}
    self._version = 0
    self._last = 0.0
    self._started = False

  def _aggregated(self, one) -> np.ndarray:
    return one.ids  # a step's cohort is its buffer

  def totals(self, rounds: int) -> dict:
    """`devices.Clock.totals` and ``staleness``: every aggregated update's."""
    out = super().totals(rounds)
    out['staleness'] = (np.concatenate([self.round(r).staleness
                                        for r in range(rounds)])
                        if rounds else np.zeros(0, np.int64))
    return out

  # -- the event loop -------------------------------------------------------------

  def _start(self, t: float, n: int) -> None:
    """Starts up to ``n`` idle online clients at time ``t`` from the current
    version (idle: neither training nor with an update in the buffer); the
    rest of the ``n`` slots retry when somebody comes online, or, when
    somebody is always online, at the next arrival or step."""
    n, self._unfilled = n + self._unfilled, 0
    if n <= 0:
      return
    c, p = self.config, self.profiles
    v = self._version
    j = self._fills.get(v, 0)
    self._fills[v] = j + 1
    tail = [] if j == 0 else [j]
    until = self.availability.until(t)
    idle = np.ones(self.sizes.size, bool)
    idle[list(self._busy_ids | self._waiting)] = False
    pool = np.flatnonzero((until > t) & idle)
    take = min(n, pool.size)
    if take < n:  # the rest wait for somebody to come online
      again = self.availability.next_online(t)
      if again > t:
        heapq.heappush(self._heap, (again + 1e-6, self._seq, 'retry',
                                    n - take))
        self._seq += 1
      else:  # online but busy or waiting: freed by an arrival or a step
        self._unfilled = n - take
    if not take:
      return
    pick = np.random.default_rng([int(c.seed), v, SELECT_STREAM] + tail
                                 ).choice(pool.size, take, replace=False)
    ids = np.sort(pool[pick])
    steps = cohort_lib.client_steps(self.sizes[ids], int(c.client.batch_size),
                                    int(c.client.epochs), c.client.max_steps)
    t_down, t_up = devices.link_seconds(self, ids)
    comp = devices.compute_seconds(self, ids, steps)
    finish = t_down + comp + t_up
    left = devices.leave_times(
        np.random.default_rng([int(c.seed), v, COIN_STREAM, j]),
        p.dropout[ids], t_down, comp, t_up)
    gone = np.minimum(left, until[ids] - t)
    completes = finish <= gone
    stop = np.minimum(finish, gone)
    energy = devices.energy_joules(c.devices, t_down, comp, t_up, stop)
    for i, cid in enumerate(ids):
      one = _Client(int(cid), v, t, t + float(stop[i]), bool(completes[i]),
                    int(steps[i]), float(stop[i]), float(energy[i]))
      heapq.heappush(self._heap, (one.end, self._seq, 'end', one))
      self._seq += 1
      self._busy_ids.add(int(cid))

  def _advance(self) -> None:
    """Runs the events until the next server step, and records it."""
    if not self._started:
      self._started = True
      self._start(0.0, self.concurrency)
    events = 0
    while True:
      if not self._heap:
        raise RuntimeError('the asynchronous run has no client in flight and '
                           'none waiting: nobody can ever arrive.')
      events += 1
      if events > MAX_EVENTS_PER_STEP:
        raise RuntimeError(
            f'server step {len(self._rounds) + 1}: {MAX_EVENTS_PER_STEP:,} '
            f'client starts and ends (simulated time {self._heap[0][0]:.0f} '
            f's) without {self.k} arrivals to step on. Every client leaves '
            'before it finishes or arrives staler than asynchrony.'
            'max_staleness: check the online windows against the work '
            '(devices.*), the dropout probabilities and max_staleness.')
      t = self._heap[0][0]
      freed, stepped = 0, 0
      while self._heap and self._heap[0][0] == t:  # arrivals at one instant
        _, _, kind, what = heapq.heappop(self._heap)
        if kind == 'retry':
          freed += what
          continue
        self._busy_ids.discard(what.id)
        self._ended.append(what)
        freed += 1
        if what.completes:
          tau = self._version - what.version
          if tau > self.max_staleness:
            self._discarded += 1
          else:
            self._buffer.append((what, tau))
            self._waiting.add(what.id)
        while len(self._buffer) >= self.k:
          self._step(t)
          stepped += 1
      self._start(t, freed)  # from the version current after the arrivals
      if stepped:
        for one in self._rounds[-stepped:]:  # after the refill
          one.metrics['async/in_flight'] = float(len(self._busy_ids))
        return

  def _step(self, t: float) -> None:
    batch, self._buffer = self._buffer[:self.k], self._buffer[self.k:]
    self._waiting.difference_update(c.id for c, _ in batch)
    ended, self._ended = self._ended, []
    aggregated = {id(c) for c, _ in batch}
    ids = np.asarray([c.id for c, _ in batch], np.int64)
    tau = np.asarray([s for _, s in batch], np.int64)
    versions = np.asarray([c.version for c, _ in batch], np.int64)
    scale = staleness_weight(tau, self.rule, self.exponent)
    selected = np.asarray([c.id for c in ended], np.int64)
    busy = np.asarray([c.busy for c in ended])
    energy = np.asarray([c.energy for c in ended])
    completed = np.asarray([id(c) in aggregated for c in ended], bool)
    metrics = {
        'clock/round_seconds': t - self._last,
        'clock/wait_seconds': 0.0,
        'clock/selected': float(len(ended)),
        'clock/completed': float(ids.size),
        'clock/dropped': float(sum(not c.completes for c in ended)),
        'clock/busy_seconds_mean': float(busy.mean()) if busy.size else 0.0,
        'clock/round_energy_joules': float(energy.sum()),
        'async/staleness_mean': float(tau.mean()),
        'async/staleness_max': float(tau.max()),
        'async/staleness_weight_mean': float(scale.mean()),
        'async/discarded_stale': float(self._discarded),
        'async/in_flight': 0.0,  # set after the refill (`_advance`)
    }
    one = devices.Round(
        ids, np.asarray([c.steps for c, _ in batch], np.int64),
        self.sizes[ids].astype(np.float32), self._last, t - self._last,
        selected, busy, energy, completed, metrics,
        Arrivals((versions % self.ring).astype(np.int32),
                 scale.astype(np.float32)), tau)
    self._record(one)
    self._version += 1
    self._last = t
