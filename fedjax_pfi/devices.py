"""A model of the devices and the network, and the virtual clock of a run.

Each training client gets a **profile**, drawn once from ``devices.seed``
(or read from a trace file) and independent of the training seed, so runs
that differ in their algorithm or their seed see the same devices:

- ``seconds_per_example``: the time one training example (forward and
  backward) takes on the device;
- ``download_bps`` and ``upload_bps``: the link's bandwidth, bits/s;
- ``dropout``: the probability of leaving during each stage of a round
  (download, train, upload);
- its **availability**: the windows, within a period, when it is online.

``devices.profile='lognormal'`` draws speeds and bandwidths log-normally:
``seconds_per_example`` has median ``devices.seconds_per_example`` (5 ms,
the mean per-sample time of FedScale's lognormal completion model) and
log-std ``devices.speed_sigma`` (0.6, FedScale's ``tail_skew``, after the
PAPAYA paper's observation that device speeds are log-normal); download and
upload bandwidths have medians ``devices.download_mbps`` and
``devices.upload_mbps`` and log-std ``devices.bandwidth_sigma``.
``devices.size_correlation`` ties them to the clients' data (> 0: the small
clients have the slow devices and links). These
defaults are round figures for phones, not measurements of ours: set your
own. ``devices.profile='trace'`` reads ``devices.trace_path``: our CSV
(`read_csv_profiles`) or a FedScale device-capacity pickle
(`read_fedscale_capacity`).

``devices.availability``: ``'always'``; ``'diurnal'``, one window of
``devices.online_hours`` a day starting at a uniformly random hour per
client (phones train while charging and idle, mostly at night: Bonawitz et
al., SysML 2019, Sec. 2.1); or ``'trace'``, read from
``devices.availability_path`` (our CSV, `read_csv_availability`, or a
FedScale behaviour-trace pickle, `read_fedscale_behavior`).

**The synchronous round in simulated time** (`Timeline`). Round ``r`` starts
when round ``r - 1`` ended (or, when nobody is online then, at the first
moment somebody is). The server selects ``ceil(K (1 + devices.over_select))``
of the clients online at that moment, uniformly (under DP it samples the
whole population as the accountant assumes, and those offline are absent).
Each selected client downloads, trains its real number of local steps, and
uploads, with the real bytes of the round (the compressors', secure
aggregation's): ``t = 8 down_bytes / download_bps + examples x
seconds_per_example + 8 up_bytes / upload_bps``. It may leave during a stage
(``dropout``), or when its online window ends. Then:

- wait for all (the default): the round lasts until every selected client
  has finished or left;
- ``devices.over_select = o > 0``: the first K to finish are kept and the
  round ends with the K-th (Bonawitz et al. 2019, Sec. 2.2); the others are
  told to stop and are not part of the round's cohort;
- ``devices.deadline = D > 0`` seconds: the round ends at ``D`` at the
  latest; those not finished are dropped, or with ``devices.partial`` keep
  the local steps they did before they had to upload (FedProx, Li et al.
  2020: partial work).

A client's busy time is from the round's start until it finished, left or
was stopped; its energy is ``devices.power_compute_w`` while training and
``devices.power_radio_w`` while sending or receiving (assumed figures: set a
device's measured ones). All of it goes under ``clock/`` in the metrics,
never under ``time/`` (which is the simulator's own speed).

Every choice is a pure function of ``(seed, devices.seed, round)`` and the
profiles, so a resumed run recomputes the same timeline.
"""

from __future__ import annotations

import csv
import math
import os
import struct
from typing import Any, NamedTuple, Optional

import numpy as np

from fedjax_pfi.data import cohort as cohort_lib

PROFILES = ('none', 'lognormal', 'trace')
AVAILABILITIES = ('always', 'diurnal', 'trace')
STAGES = ('download', 'train', 'upload')
DAY = 86400.0
PROFILE_STREAM = 0xDE71
CLOCK_STREAM = 0xC10C
# FedScale's compute trace is inference latency per sample; its completion
# model multiplies it by 3 for the backward pass.
FEDSCALE_AUGMENTATION = 3.0


class Profiles(NamedTuple):
  """Every training client's device, float64 ``[N]`` (``dropout``: ``[N,
  3]``, the probability of leaving during download, train, upload)."""
  seconds_per_example: np.ndarray
  download_bps: np.ndarray
  upload_bps: np.ndarray
  dropout: np.ndarray


class Availability(NamedTuple):
  """Online windows ``[starts[i, j], ends[i, j]]`` within client ``i``'s
  period ``period[i]`` (seconds; NaN pads; ``period`` inf: always online)."""
  period: np.ndarray
  starts: np.ndarray
  ends: np.ndarray

  def until(self, t: float) -> np.ndarray:
    """``[N]``: when the window holding time ``t`` ends (``-inf``: offline
    at ``t``; ``inf``: never ends). A window that ends with the period and
    one that starts at 0 are one window across the boundary."""
    always = ~np.isfinite(self.period)
    period = np.where(always, 1.0, self.period)
    phase = np.mod(t, period)
    with np.errstate(invalid='ignore'):
      inside = (self.starts <= phase[:, None]) & (phase[:, None] < self.ends)
      head = np.where(self.starts == 0.0, self.ends, -np.inf).max(axis=1)
    end = np.where(inside, self.ends, -np.inf).max(axis=1)
    wraps = (end >= period) & np.isfinite(head)
    out = t - phase + end + np.where(wraps, head, 0.0)
    out = np.where((wraps & (head >= period)) | always, np.inf, out)
    return np.where(np.isfinite(end) | always, out, -np.inf)

  def next_online(self, t: float) -> float:
    """The earliest start of an online window at or after ``t`` (called
    when nobody is online at ``t``: then the first time somebody is)."""
    if (~np.isfinite(self.period)).any():
      return t
    phase = np.mod(t, self.period)[:, None]
    with np.errstate(invalid='ignore'):
      wait = np.where(self.starts >= phase, self.starts - phase,
                      self.period[:, None] - phase + self.starts)
    return float(t + np.nanmin(wait))


def always(n: int) -> Availability:
  return Availability(np.full(n, np.inf), np.zeros((n, 1)),
                      np.full((n, 1), np.inf))


def diurnal(n: int, online_hours: float, rng: np.random.Generator
            ) -> Availability:
  """One window of ``online_hours`` a day per client, from a uniformly random
  second of the day (split in two where it crosses midnight)."""
  if online_hours >= 24.0:
    return always(n)
  start = rng.uniform(0.0, DAY, n)
  end = start + online_hours * 3600.0
  over = end > DAY
  starts = np.stack([start, np.where(over, 0.0, np.nan)], axis=1)
  ends = np.stack([np.minimum(end, DAY), np.where(over, end - DAY, np.nan)],
                  axis=1)
  return Availability(np.full(n, DAY), starts, ends)


def _dropout(d, n: int) -> np.ndarray:
  return np.broadcast_to(np.asarray(
      [d.dropout_download, d.dropout_train, d.dropout_upload], np.float64),
                         (n, 3)).copy()


def size_scores(sizes: np.ndarray) -> np.ndarray:
  """The normal score of each client's rank by training examples (ties in
  id order): the Gaussian copula's coordinate for `lognormal`'s
  ``size_correlation``."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  n = len(sizes)
  rank = np.empty(n)
  rank[np.argsort(sizes, kind='stable')] = np.arange(n)
  return stats.norm.ppf((rank + 0.5) / n)


def lognormal(d, n: int, rng: np.random.Generator,
              sizes: Optional[np.ndarray] = None) -> Profiles:
  """The ``'lognormal'`` profile (module docstring). With
  ``devices.size_correlation = rho`` (and ``sizes``), each log-normal's
  normal draw is ``rho z + sqrt(1 - rho^2) e``, ``z`` the client's
  `size_scores`, so for ``rho > 0`` the small clients have the slow devices
  and links (a Gaussian copula; ``rho = 0``: the same draws as without)."""
  rho = float(d.get('size_correlation', 0.0))
  z = np.zeros(n) if sizes is None or not rho else size_scores(sizes)

  def normal(sign):
    return sign * rho * z + math.sqrt(1.0 - rho * rho) * rng.standard_normal(n)

  spe = float(d.seconds_per_example) * np.exp(float(d.speed_sigma) *
                                              normal(-1.0))
  down = float(d.download_mbps) * 1e6 * np.exp(float(d.bandwidth_sigma) *
                                               normal(1.0))
  up = float(d.upload_mbps) * 1e6 * np.exp(float(d.bandwidth_sigma) *
                                           normal(1.0))
  return Profiles(spe, down, up, _dropout(d, n))


# -- trace files ------------------------------------------------------------------


class TraceError(ValueError):
  """A trace file that cannot be read: the message names the file and line."""


def _is_pickle(path: str) -> bool:
  with open(path, 'rb') as f:
    return f.read(1) == b'\x80'


def _csv_rows(path: str, required: tuple[str, ...]):
  """``(line number, row dict)`` of a CSV with a header holding
  ``required``."""
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or ())]
    if missing:
      raise TraceError(
          f'{path}, line 1: the header {reader.fieldnames} lacks '
          f'{missing}; expected the columns {list(required)}.')
    for row in reader:
      yield reader.line_num, row


def _number(path: str, line: int, row: dict, column: str,
            positive: bool = True) -> float:
  text = row.get(column)
  try:
    value = float(text)
  except (TypeError, ValueError):
    raise TraceError(f'{path}, line {line}: {column}={text!r} is not a '
                     'number.') from None
  if not math.isfinite(value) or (value <= 0 if positive else value < 0):
    raise TraceError(
        f'{path}, line {line}: {column}={text!r} must be a finite number '
        f'{"> 0" if positive else ">= 0"}.')
  return value


def _by_client(path: str, found: dict, names: np.ndarray) -> list:
  index = {str(n): i for i, n in enumerate(names)}
  unknown = [k for k in found if k not in index]
  if unknown:
    raise TraceError(
        f'{path}: {len(unknown)} clients are not in the training data, '
        f'e.g. {unknown[:3]} (the client column names clients as the data '
        f'does, e.g. {[str(n) for n in names[:3]]}).')
  missing = [str(n) for n in names if str(n) not in found]
  if missing:
    raise TraceError(
        f'{path}: {len(missing)} of the {len(names)} training clients have '
        f'no row, e.g. {missing[:3]}; every client needs one.')
  return [found[str(n)] for n in names]


def read_csv_profiles(path: str, names: np.ndarray, d) -> Profiles:
  """Our device trace: a CSV with the header ``client,seconds_per_example,
  download_mbps,upload_mbps`` and optional ``dropout_download,
  dropout_train,dropout_upload`` (default: ``devices.dropout_*``); one row
  per training client, named as the data names it."""
  found = {}
  for line, row in _csv_rows(path, ('client', 'seconds_per_example',
                                    'download_mbps', 'upload_mbps')):
    name = (row.get('client') or '').strip()
    if not name:
      raise TraceError(f'{path}, line {line}: the client column is empty.')
    if name in found:
      raise TraceError(f'{path}, line {line}: client {name!r} has a second '
                       'row.')
    values = [_number(path, line, row, 'seconds_per_example'),
              _number(path, line, row, 'download_mbps') * 1e6,
              _number(path, line, row, 'upload_mbps') * 1e6]
    drops = []
    for stage, default in zip(STAGES, _dropout(d, 1)[0]):
      column = f'dropout_{stage}'
      if row.get(column) in (None, ''):
        drops.append(default)
        continue
      p = _number(path, line, row, column, positive=False)
      if p >= 1.0:
        raise TraceError(f'{path}, line {line}: {column}={p} must lie in '
                         '[0, 1).')
      drops.append(p)
    found[name] = values + drops
  rows = np.asarray(_by_client(path, found, names), np.float64)
  return Profiles(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3:6])


class _Mark:
  """The pickle stack's MARK."""


# opcode -> (struct format of its argument, or a length prefix's format)
_FIXED = {b'K': '<B', b'M': '<H', b'J': '<i', b'G': '>d', b'q': '<B',
          b'r': '<I', b'h': '<B', b'j': '<I'}
_SIZED = {b'\x8c': '<B', b'X': '<I', b'\x8d': '<Q', b'\x8a': '<B',
          b'\x8b': '<i', b'C': '<B', b'B': '<I'}


def read_plain_pickle(data: bytes, name: str = 'the pickle'):
  """The value of a pickle (protocols 2-5) made only of dicts, lists,
  tuples, numbers, strings, bytes, booleans and None, decoded opcode by
  opcode without the ``pickle`` module: no class is ever looked up, so no code
  can run. Any other opcode (a class, a function, a numpy scalar) is
  refused, naming it."""
  stack: list = []
  memo: list = []
  i = 0

  def pop_mark():
    for k in range(len(stack) - 1, -1, -1):
      if stack[k] is _Mark:
        items = stack[k + 1:]
        del stack[k:]
        return items
    raise TraceError(f'{name}: malformed (no MARK).')

  while i < len(data):
    op = data[i:i + 1]
    i += 1
    if op in _FIXED:
      fmt = _FIXED[op]
      (v,) = struct.unpack_from(fmt, data, i)
      i += struct.calcsize(fmt)
      if op in (b'q', b'r'):
        memo.extend([None] * (v + 1 - len(memo)))
        memo[v] = stack[-1]
      elif op in (b'h', b'j'):
        stack.append(memo[v])
      else:
        stack.append(v)
    elif op in _SIZED:
      fmt = _SIZED[op]
      (n,) = struct.unpack_from(fmt, data, i)
      i += struct.calcsize(fmt)
      raw = data[i:i + n]
      i += n
      if op in (b'\x8a', b'\x8b'):
        stack.append(int.from_bytes(raw, 'little', signed=True))
      elif op in (b'C', b'B'):
        stack.append(bytes(raw))
      else:
        stack.append(raw.decode('utf-8'))
    elif op == b'\x80':  # PROTO
      i += 1
    elif op == b'\x95':  # FRAME
      i += 8
    elif op == b'.':  # STOP
      if len(stack) != 1:
        raise TraceError(f'{name}: malformed (stack of {len(stack)} at '
                         'STOP).')
      return stack[0]
    elif op == b'(':
      stack.append(_Mark)
    elif op == b'}':
      stack.append({})
    elif op == b']':
      stack.append([])
    elif op == b')':
      stack.append(())
    elif op == b'N':
      stack.append(None)
    elif op in (b'\x88', b'\x89'):
      stack.append(op == b'\x88')
    elif op == b'\x94':  # MEMOIZE
      memo.append(stack[-1])
    elif op == b's':
      v = stack.pop()
      k = stack.pop()
      stack[-1][k] = v
    elif op == b'u':
      items = pop_mark()
      stack[-1].update(zip(items[::2], items[1::2]))
    elif op == b'a':
      v = stack.pop()
      stack[-1].append(v)
    elif op == b'e':
      items = pop_mark()
      stack[-1].extend(items)
    elif op == b't':
      stack.append(tuple(pop_mark()))
    elif op in (b'\x85', b'\x86', b'\x87'):
      n = op[0] - 0x84
      items = stack[len(stack) - n:]
      del stack[len(stack) - n:]
      stack.append(tuple(items))
    elif op == b'd':
      items = pop_mark()
      stack.append(dict(zip(items[::2], items[1::2])))
    elif op == b'l':
      stack.append(pop_mark())
    else:
      raise TraceError(
          f'{name}: opcode {op!r} at byte {i - 1} is not plain data (a '
          'class, a function or a numpy scalar); only dicts, lists, tuples, '
          'numbers and strings are read. Convert the trace to plain Python '
          'values, or to our CSV.')
  raise TraceError(f'{name}: malformed (no STOP).')


def _fedscale_pickle(path: str) -> dict:
  """A FedScale trace: a pickled dict of plain values, read by
  `read_plain_pickle` (nothing in it can run)."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    data = read_plain_pickle(raw, path)
  except (struct.error, IndexError, KeyError, TypeError, AttributeError,
          UnicodeDecodeError) as e:
    raise TraceError(f'{path}: not a readable FedScale pickle '
                     f'({type(e).__name__}: {e}).') from e
  if not isinstance(data, dict) or not data:
    raise TraceError(f'{path}: expected a non-empty dict of client traces, '
                     f'got {type(data).__name__}.')
  return data


def read_fedscale_capacity(path: str, n: int, d) -> Profiles:
  """FedScale's device-capacity trace (``client_device_capacity``: client
  id -> ``{'computation': ms per sample of inference, 'communication':
  kbit/s}``). Client ``i`` takes the ``(i mod len)``-th entry in key order,
  as FedScale maps its clients onto the trace; a training example costs
  ``3 x computation`` (FedScale's ``augmentation_factor``); one bandwidth
  both ways."""
  data = _fedscale_pickle(path)
  keys = sorted(data)
  spe, bw = [], []
  for k in keys:
    entry = data[k]
    try:
      comp, comm = float(entry['computation']), float(entry['communication'])
    except (KeyError, TypeError, ValueError):
      raise TraceError(
          f"{path}: client {k!r} has {entry!r}; expected {{'computation': "
          "ms per sample, 'communication': kbit/s}.") from None
    if not (comp > 0 and comm > 0 and math.isfinite(comp) and
            math.isfinite(comm)):
      raise TraceError(f'{path}: client {k!r} has computation={comp}, '
                       f'communication={comm}; both must be > 0.')
    spe.append(FEDSCALE_AUGMENTATION * comp / 1000.0)
    bw.append(comm * 1000.0)
  pick = np.arange(n) % len(keys)
  spe, bw = np.asarray(spe)[pick], np.asarray(bw)[pick]
  return Profiles(spe, bw, bw.copy(), _dropout(d, n))


def read_fedscale_behavior(path: str, n: int) -> Availability:
  """FedScale's behaviour trace (``client_behave_trace``: client id ->
  ``{'active': [...], 'inactive': [...], 'finish_time': T}``: online from
  ``active[j]`` to ``inactive[j]``, repeating every ``T`` seconds).
  Client ``i`` takes the ``(i mod len)``-th entry in key order."""
  data = _fedscale_pickle(path)
  keys = sorted(data)
  periods, windows = [], []
  for k in keys:
    entry = data[k]
    try:
      active = [float(x) for x in entry['active']]
      inactive = [float(x) for x in entry['inactive']]
      period = float(entry['finish_time'])
    except (KeyError, TypeError, ValueError):
      raise TraceError(
          f"{path}: client {k!r} lacks 'active', 'inactive' (lists of "
          "seconds) or 'finish_time'.") from None
    if len(active) != len(inactive) or not active or not period > 0:
      raise TraceError(
          f'{path}: client {k!r} has {len(active)} active and '
          f'{len(inactive)} inactive times and finish_time={period}; expected '
          'as many of each (at least one) and finish_time > 0.')
    periods.append(period)
    windows.append(list(zip(active, inactive)))
  pick = np.arange(n) % len(keys)
  return _availability(np.asarray(periods)[pick],
                       [windows[i] for i in pick], path)


def read_csv_availability(path: str, names: np.ndarray,
                          period_hours: float) -> Availability:
  """Our availability trace: a CSV with the header ``client,start,end``
  (seconds within a period of ``devices.period_hours``), one row per online
  window; every training client needs at least one."""
  found: dict[str, list] = {}
  period = float(period_hours) * 3600.0
  for line, row in _csv_rows(path, ('client', 'start', 'end')):
    name = (row.get('client') or '').strip()
    if not name:
      raise TraceError(f'{path}, line {line}: the client column is empty.')
    start = _number(path, line, row, 'start', positive=False)
    end = _number(path, line, row, 'end')
    if not start < end <= period:
      raise TraceError(
          f'{path}, line {line}: the window [{start}, {end}] must have start '
          f'< end <= the period ({period:g} s, devices.period_hours='
          f'{period_hours}).')
    found.setdefault(name, []).append((start, end))
  windows = _by_client(path, found, names)
  return _availability(np.full(len(names), period), windows, path)


def _merged(windows: list) -> list:
  """Sorted windows with touching or overlapping ones made one."""
  out = []
  for a, b in sorted(windows):
    if out and a <= out[-1][1]:
      out[-1] = (out[-1][0], max(out[-1][1], b))
    else:
      out.append((a, b))
  return out


def _availability(period: np.ndarray, windows: list, path: str
                  ) -> Availability:
  windows = [_merged(w) for w in windows]
  width = max(len(w) for w in windows)
  starts = np.full((len(windows), width), np.nan)
  ends = np.full((len(windows), width), np.nan)
  for i, w in enumerate(windows):
    for j, (a, b) in enumerate(w):
      if not 0 <= a < b <= period[i]:
        raise TraceError(f'{path}: client {i} has the window [{a}, {b}] '
                         f'outside its period [0, {period[i]}].')
      starts[i, j], ends[i, j] = a, b
  return Availability(period, starts, ends)


# -- the config -----------------------------------------------------------------------


def enabled(config) -> bool:
  d = config.get('devices')
  return d is not None and str(d.profile) != 'none'


def check(config) -> None:
  """Refuses ``devices.*`` values no run can use, before the data is read."""
  d = config.get('devices')
  if d is None:
    return
  if str(d.profile) not in PROFILES:
    raise ValueError(f'devices.profile must be one of {PROFILES}, got '
                     f'{d.profile!r}.')
  if str(d.availability) not in AVAILABILITIES:
    raise ValueError(f'devices.availability must be one of '
                     f'{AVAILABILITIES}, got {d.availability!r}.')
  for key in ('seconds_per_example', 'download_mbps', 'upload_mbps',
              'online_hours', 'period_hours'):
    v = float(d[key])
    if not (math.isfinite(v) and v > 0):
      raise ValueError(f'devices.{key} must be a finite number > 0, got '
                       f'{d[key]!r}.')
  for key in ('speed_sigma', 'bandwidth_sigma', 'deadline', 'over_select',
              'power_compute_w', 'power_radio_w'):
    v = float(d[key])
    if not (math.isfinite(v) and v >= 0):
      raise ValueError(f'devices.{key} must be a finite number >= 0, got '
                       f'{d[key]!r}.')
  if not -1.0 <= float(d.size_correlation) <= 1.0:
    raise ValueError(f'devices.size_correlation must lie in [-1, 1], got '
                     f'{d.size_correlation!r}.')
  for stage in STAGES:
    v = float(d[f'dropout_{stage}'])
    if not 0.0 <= v < 1.0:
      raise ValueError(f'devices.dropout_{stage} must lie in [0, 1), got '
                       f'{v!r}.')
  if not enabled(config):
    changed = [k for k in ('deadline', 'over_select', 'size_correlation',
                           'dropout_download',
                           'dropout_train', 'dropout_upload')
               if float(d[k])] + (['partial'] if d.partial else []) + (
                   [] if str(d.availability) == 'always' else
                   ['availability'])
    if changed:
      raise ValueError(
          f'devices.{changed[0]} needs a model of the devices: set '
          "devices.profile='lognormal' or 'trace' (now 'none').")
    return
  if str(d.profile) == 'trace' and not str(d.trace_path):
    raise ValueError("devices.profile='trace' needs devices.trace_path (our "
                     'CSV or a FedScale device-capacity pickle).')
  if str(d.availability) == 'trace' and not str(d.availability_path):
    raise ValueError(
        "devices.availability='trace' needs devices.availability_path (our "
        'CSV or a FedScale behaviour-trace pickle).')
  for key in ('trace_path', 'availability_path'):
    path = str(d[key])
    if path and not os.path.isfile(path):
      raise FileNotFoundError(f'devices.{key}={path!r} does not exist.')
  if d.partial and not float(d.deadline):
    raise ValueError('devices.partial keeps the work stragglers did before '
                     'the deadline: set devices.deadline > 0 too.')
  if float(config.stragglers.fraction):
    raise ValueError(
        f'stragglers.fraction={config.stragglers.fraction} with '
        f'devices.profile={d.profile!r}: the device model decides who is '
        'slow (devices.deadline, devices.partial); set '
        'stragglers.fraction=0.')
  dp = config.privacy.mechanism != 'none'
  if dp and float(d.over_select):
    raise ValueError(
        f'devices.over_select={d.over_select} with privacy.mechanism='
        f'{config.privacy.mechanism!r}: keeping the first K to finish makes '
        "whether a client takes part depend on the others' devices and "
        'data, which the accountant\'s sampling does not cover. Use '
        'devices.deadline instead, or no DP.')


def build(config, names: np.ndarray, client_sizes: np.ndarray,
          download_bytes: float, upload_bytes: float) -> Optional['Timeline']:
  """The run's `Timeline` (None without a device model); trace files are
  read (and refused, naming the line) here, before anything is traced."""
  if not enabled(config):
    return None
  d = config.devices
  n = len(client_sizes)
  rng = np.random.default_rng([int(d.seed), PROFILE_STREAM])
  if str(d.profile) == 'lognormal':
    profiles = lognormal(d, n, rng, np.asarray(client_sizes))
  elif _is_pickle(str(d.trace_path)):
    profiles = read_fedscale_capacity(str(d.trace_path), n, d)
  else:
    profiles = read_csv_profiles(str(d.trace_path), names, d)
  if str(d.availability) == 'always':
    availability = always(n)
  elif str(d.availability) == 'diurnal':
    availability = diurnal(n, float(d.online_hours), np.random.default_rng(
        [int(d.seed), PROFILE_STREAM, 1]))
  elif _is_pickle(str(d.availability_path)):
    availability = read_fedscale_behavior(str(d.availability_path), n)
  else:
    availability = read_csv_availability(str(d.availability_path), names,
                                         float(d.period_hours))
  from fedjax_pfi import asynchrony  # pylint: disable=g-import-not-at-top
  kind = asynchrony.AsyncTimeline if asynchrony.enabled(config) else Timeline
  return kind(config, client_sizes, profiles, availability, download_bytes,
              upload_bytes)


# -- the timeline ---------------------------------------------------------------------


class Round(NamedTuple):
  """Round ``r`` in simulated time.

  Attributes:
    ids, steps, weights: the cohort the round trains (steps and weight 0:
      selected, but dropped, late or absent).
    start, seconds: when it started and how long it lasted.
    selected: every client the server selected (with the over-selected).
    busy, energy: each selected client's busy seconds and joules.
    completed: bool per selected client: its update is aggregated.
    metrics: the round's ``clock/`` metrics (without running totals).
    arrivals: an asynchronous step's `asynchrony.Arrivals` (else None).
    staleness: an asynchronous step's staleness per cohort client.
  """
  ids: np.ndarray
  steps: np.ndarray
  weights: np.ndarray
  start: float
  seconds: float
  selected: np.ndarray
  busy: np.ndarray
  energy: np.ndarray
  completed: np.ndarray
  metrics: dict
  arrivals: Any = None
  staleness: Any = None


def _overlap(a, b, stop):
  """Length of ``[a, b]`` before ``stop``."""
  return np.clip(np.minimum(b, stop) - a, 0.0, None)


def compute_seconds(clock, ids: np.ndarray, steps: np.ndarray) -> np.ndarray:
  """The training time of clients ``ids`` doing ``steps`` local steps: their
  real examples (``min(steps B, epochs n)``) x seconds per example."""
  c = clock.config.client
  B, E = int(c.batch_size), int(c.epochs)
  return (np.minimum(steps * B, E * clock.sizes[ids]) *
          clock.profiles.seconds_per_example[ids])


def link_seconds(clock, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(download, upload)`` seconds of clients ``ids``: the round's bytes
  over their bandwidths."""
  p = clock.profiles
  return (8.0 * clock.download_bytes / p.download_bps[ids],
          8.0 * clock.upload_bytes / p.upload_bps[ids])


def leave_times(rng: np.random.Generator, dropout: np.ndarray,
                t_down, comp, t_up) -> np.ndarray:
  """When each client leaves (``inf``: it stays): during the first stage
  (download, train, upload) whose coin says so, at a uniform point of it."""
  n = dropout.shape[0]
  coins = rng.random((n, 3)) < dropout
  frac = rng.random(n)
  finish = t_down + comp + t_up
  stage = np.where(coins.any(axis=1), coins.argmax(axis=1), 3)
  begins = np.stack([np.zeros(n), t_down, t_down + comp, finish], axis=1)
  lengths = np.stack([t_down, comp, t_up, np.zeros(n)], axis=1)
  pick = np.arange(n), stage
  return np.where(stage < 3, begins[pick] + frac * lengths[pick], np.inf)


def energy_joules(d, t_down, comp, t_up, stop) -> np.ndarray:
  """Joules of the work done before ``stop`` (seconds from the start):
  ``devices.power_radio_w`` while sending or receiving,
  ``devices.power_compute_w`` while training."""
  radio = (_overlap(0.0, t_down, stop) +
           _overlap(t_down + comp, t_down + comp + t_up, stop))
  return (float(d.power_radio_w) * radio + float(d.power_compute_w) *
          _overlap(t_down, t_down + comp, stop))


class Clock:
  """What a run's timeline serves (`Timeline`, `asynchrony.AsyncTimeline`):
  ``round(r)`` memoized and computed in order by ``_advance``, the running
  energy, and per-client totals."""

  def __init__(self, config, client_sizes: np.ndarray, profiles: Profiles,
               availability: Availability, download_bytes: float,
               upload_bytes: float):
    self.config = config
    self.sizes = np.asarray(client_sizes)
    self.profiles = profiles
    self.availability = availability
    self.download_bytes = float(download_bytes)
    self.upload_bytes = float(upload_bytes)
    self._rounds: list[Round] = []
    self._energy: list[float] = []
    self._units = np.zeros(self.sizes.size, np.int64)
    self._max_units: list[int] = []

  def _advance(self) -> None:
    """Computes the next round and `_record`s it."""
    raise NotImplementedError

  def _record(self, one: Round) -> None:
    self._rounds.append(one)
    self._energy.append((self._energy[-1] if self._energy else 0.0) +
                        float(one.energy.sum()))
    ids, times = np.unique(self._aggregated(one), return_counts=True)
    self._units[ids] += times ** 2
    self._max_units.append(int(self._units.max()) if self._units.size else 0)

  def _aggregated(self, one: Round) -> np.ndarray:
    """The clients whose update round ``one`` aggregated."""
    return one.selected[one.completed]

  def round(self, r: int) -> Round:
    while len(self._rounds) <= r:
      self._advance()
    return self._rounds[r]

  def max_units(self, rounds: int) -> int:
    """``max_c sum_r k_cr^2`` over the first ``rounds`` rounds, ``k_cr`` the
    times client ``c``'s update is aggregated in round ``r`` (0 or 1, but
    for the sake of the bound any number): the rounds of Gaussian noise a
    scheduled DP accountant composes for the most exposed client
    (`privacy.Accountant`)."""
    if rounds <= 0:
      return 0
    self.round(rounds - 1)
    return self._max_units[rounds - 1]

  def metrics(self, r: int) -> dict:
    """Round ``r``'s ``clock/`` metrics, with the running totals."""
    one = self.round(r)
    return {**one.metrics,
            'clock/simulated_seconds': one.start + one.seconds,
            'clock/energy_joules': self._energy[r]}

  def totals(self, rounds: int) -> dict:
    """Per training client over the first ``rounds`` rounds: ``selected``
    and ``completed`` (aggregated) counts, ``busy_seconds`` and
    ``energy_joules``."""
    n = self.sizes.size
    out = {k: np.zeros(n) for k in ('selected', 'completed', 'busy_seconds',
                                    'energy_joules')}
    for r in range(rounds):
      one = self.round(r)
      np.add.at(out['selected'], one.selected, 1)
      np.add.at(out['completed'], self._aggregated(one), 1)
      np.add.at(out['busy_seconds'], one.selected, one.busy)
      np.add.at(out['energy_joules'], one.selected, one.energy)
    return out

  def ever_completed(self, rounds: int) -> np.ndarray:
    """Bool ``[N]``: aggregated in one of the first ``rounds`` rounds."""
    seen = np.zeros(self.sizes.size, bool)
    for r in range(rounds):
      seen[self._aggregated(self.round(r))] = True
    return seen


class Timeline(Clock):
  """The synchronous rounds of a run in simulated time (module docstring);
  each starts when the previous ended."""

  def _advance(self) -> None:
    prev = self._rounds[-1] if self._rounds else None
    self._record(self._compute(len(self._rounds), 0.0 if prev is None else
                               prev.start + prev.seconds))

  def _select(self, r: int, t0: float, until: np.ndarray):
    """``(selected ids, present mask)`` at time ``t0``."""
    c, d = self.config, self.config.devices
    from fedjax_pfi import participation  # pylint: disable=g-import-not-at-top
    online = until > t0
    if participation.sampling(c) == 'poisson' or c.privacy.mechanism != 'none':
      ids = participation.sample_ids(c, self.sizes.size, r)
      return ids, online[ids]
    # As `cohort.sample_cohort` draws (the same cohorts when all are online
    # and nobody is over-selected), from those online.
    pool = np.flatnonzero(online)
    # (rounded first: 50 x 1.1 is 55.000000000000007 in floating point)
    want = math.ceil(round(int(c.clients_per_round) *
                           (1.0 + float(d.over_select)), 9))
    pick = np.random.default_rng([int(c.seed), r, 0x5EED]).choice(
        pool.size, min(want, pool.size), replace=False)
    ids = np.sort(pool[pick])
    return ids, np.ones(ids.size, bool)

  def _compute(self, r: int, t0: float) -> Round:
    c, d, p = self.config, self.config.devices, self.profiles
    until = self.availability.until(t0)
    start = t0
    for _ in range(8):  # wait for somebody to come online
      if (until > t0).any():
        break
      # (a microsecond past the window's start, which rounding may miss)
      t0 = self.availability.next_online(t0) + 1e-6
      until = self.availability.until(t0)
    waited = t0 - start
    sel, present = self._select(r, t0, until)
    n = sel.size
    B = int(c.client.batch_size)
    sizes = self.sizes[sel]
    full = cohort_lib.client_steps(sizes, B, int(c.client.epochs),
                                   c.client.max_steps)
    t_down, t_up = link_seconds(self, sel)
    deadline = float(d.deadline) or np.inf
    steps = full
    if d.partial and math.isfinite(deadline):
      # FedProx's partial work: a client that cannot finish by the deadline
      # plans the steps that fit before it must upload.
      fit = np.floor((deadline - t_down - t_up) /
                     (B * p.seconds_per_example[sel])).astype(np.int64)
      late = t_down + compute_seconds(self, sel, full) + t_up > deadline
      steps = np.where(late & (fit >= 1), np.clip(fit, 0, full), full)
    comp = compute_seconds(self, sel, steps)
    finish = t_down + comp + t_up
    left = leave_times(np.random.default_rng([int(c.seed), r, CLOCK_STREAM]),
                       p.dropout[sel], t_down, comp, t_up)
    window = until[sel] - t0  # the online window's end, from the start
    gone = np.minimum(left, window)  # when it stops without finishing
    completes = present & (finish <= gone) & (finish <= deadline)
    end = np.minimum(finish, gone)
    steps = np.where(completes, steps, 0)
    k = int(c.clients_per_round)
    finished = completes  # before over-selection keeps the first K
    in_cohort = np.ones(n, bool)
    if float(d.over_select) and completes.sum() >= k:
      order = np.argsort(np.where(completes, end, np.inf), kind='stable')
      first = np.zeros(n, bool)
      first[order[:k]] = True
      seconds = float(end[first].max())
      completes, in_cohort = first, first
    else:
      seconds = float(np.minimum(end[present], deadline).max()
                      if present.any() else 0.0)
      if float(d.over_select):  # fewer than K finished: keep all who did
        in_cohort = completes
    stop = np.where(present, np.minimum(end, seconds), 0.0)
    energy = energy_joules(d, t_down, comp, t_up, stop)
    weights = np.where(completes, sizes, 0.0).astype(np.float32)
    busy = stop
    metrics = {
        'clock/round_seconds': seconds,
        'clock/wait_seconds': waited,
        'clock/online_clients': float((until > t0).sum()),
        'clock/selected': float(n),
        'clock/completed': float(completes.sum()),
        'clock/partial': float((completes & (steps < full)).sum()),
        'clock/dropped': float((present & ~finished).sum()),
        'clock/discarded': float((present & finished & ~in_cohort).sum()),
        'clock/absent': float((~present).sum()),
        'clock/busy_seconds_mean': float(busy[present].mean()
                                         if present.any() else 0.0),
        'clock/round_energy_joules': float(energy.sum()),
    }
    return Round(sel[in_cohort], steps[in_cohort].astype(np.int64),
                 weights[in_cohort], t0, seconds, sel, busy, energy,
                 completes, metrics)


def nominal_bytes(config, params) -> tuple[float, float]:
  """``(download, upload)`` bytes per client of a round that sends
  ``params`` (arrays or their shapes: a round built on
  `partitioned.fed_partitioned`) both ways, or what a compressor sends
  instead (`compression.message_bytes`)."""
  from fedjax_pfi import compression  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import param_groups  # pylint: disable=g-import-not-at-top
  down = up = float(param_groups.num_bytes(params))
  spec = compression.from_config(config)
  if spec is not None:
    up = compression.message_bytes(spec.compressor, params)
    if spec.download:
      down = compression.message_bytes(spec.compressor, params)
  return down, up


def describe(timeline: Optional[Timeline]) -> dict[str, Any]:
  """What ``report.json`` records of the devices (empty without)."""
  if timeline is None:
    return {}
  p = timeline.profiles

  def q(a):
    return [float(x) for x in np.quantile(a, [0.1, 0.5, 0.9])]

  return {'devices/seconds_per_example_p10_p50_p90': q(p.seconds_per_example),
          'devices/download_mbps_p10_p50_p90': q(p.download_bps / 1e6),
          'devices/upload_mbps_p10_p50_p90': q(p.upload_bps / 1e6),
          'devices/download_bytes_per_client': timeline.download_bytes,
          'devices/upload_bytes_per_client': timeline.upload_bytes}
