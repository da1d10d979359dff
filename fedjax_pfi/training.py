"""The training loop behind ``experiments/main.py``: config in, workdir out.

One call of `run` ``(config, workdir)``:

1. checks the config (`fedjax_pfi.config.check`) and the workdir before
   anything is loaded, then against the data, before anything is traced;
2. restores the newest checkpoint in ``workdir`` if there is one;
3. for each round ``r``: the participants of ``(seed, r)``
   (`fedjax_pfi.participation`), stacked into a step bucket, run through the
   algorithm's jitted round with key ``fold_in(root, r)``; while the device
   computes, the next round's cohort is stacked on the host;
4. logs metrics to ``workdir/metrics.jsonl`` and TensorBoard
   (`fedjax_pfi.metrics_io`), evaluates every ``eval_every`` rounds
   (`fedjax_pfi.run_evaluator`), checkpoints every ``checkpoint_every``;
5. after the last round writes the personalization report: ``report.json``,
   ``clients_final.npz`` and PNG plots (`fedjax_pfi.personalization`).

`run_experiment` is the same loop over objects already built (`build`, or
a notebook's own model, data and algorithm in an `Experiment`).

Because every random choice is a pure function of ``(seed, round)``, a run
resumed from its workdir finishes with exactly the metrics of an uninterrupted
run (performance figures aside -- timings, padding efficiency -- which live
under ``time/``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
import warnings
from typing import Any, Optional

import jax
import numpy as np

from fedjax_pfi import asynchrony
from fedjax_pfi import attacks
from fedjax_pfi import canaries as canaries_lib
from fedjax_pfi import checkpoint as checkpoint_lib
from fedjax_pfi import client_store
from fedjax_pfi import compression
from fedjax_pfi import config as config_lib
from fedjax_pfi import devices as devices_lib
from fedjax_pfi import distributed
from fedjax_pfi import evaluation
from fedjax_pfi import participation
from fedjax_pfi import personalization
from fedjax_pfi import placement
from fedjax_pfi import privacy
from fedjax_pfi import secure_aggregation
from fedjax_pfi.algorithms import aggregators
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import robust
from fedjax_pfi.algorithms import rounds
from fedjax_pfi.algorithms import registry as algorithms
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data import registry
from fedjax_pfi.metrics_io import MetricsFileError
from fedjax_pfi.metrics_io import MetricsWriter
from fedjax_pfi.metrics_io import parse_metrics
from fedjax_pfi.metrics_io import read_metrics
from fedjax_pfi.metrics_io import ResumeWarning
from fedjax_pfi.models import zoo
from fedjax_pfi.placement import make_execution
from fedjax_pfi.run_evaluator import RunEvaluator

__all__ = ['Experiment', 'MetricsFileError', 'MetricsWriter',
           'NonFiniteLossError', 'NonFiniteStateError', 'RESUMABLE_KEYS',
           'ResumeWarning', 'RunEvaluator', 'build', 'config_fingerprint',
           'default_config', 'initial_params', 'make_cohort', 'make_execution',
           'parse_metrics', 'prepare_workdir', 'read_metrics', 'run',
           'run_experiment', 'step_buckets', 'validate']

RESUMABLE_KEYS = config_lib.RESUMABLE_KEYS
CLOCK_FILE = 'clients_clock.npz'  # per client, with a model of the devices
default_config = config_lib.default_config


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss; the run stopped before saving it."""


class NonFiniteStateError(FloatingPointError):
  """A round left NaN/inf in the server state (an overflowing server step,
  say); the run stopped before saving it."""


# -- building ------------------------------------------------------------------


def step_buckets(config, max_steps: int):
  """The allowed padded step counts: ``'pow2'``, ``'max'`` (one bucket, the
  longest a round can need: one compilation per run; the steps no client of
  a chunk needs are skipped at run time), ``'exact'`` or ``'4,8,16'``."""
  b = str(config.step_buckets)
  if b == 'pow2':
    return cohort_lib.power_of_two_buckets(max_steps)
  if b == 'max':
    return (max_steps,)
  if b == 'exact':
    return None
  try:
    buckets = tuple(sorted(int(x) for x in b.split(',')))
  except ValueError:
    buckets = ()
  if not buckets or buckets[0] < 1:
    raise ValueError(f"step_buckets must be 'pow2', 'max', 'exact' or "
                     f"comma-separated positive ints such as '4,8,16', got "
                     f'{b!r}.')
  if buckets[-1] < max_steps:
    raise ValueError(f'step_buckets {b!r} cannot hold the longest client '
                     f'({max_steps} local steps).')
  return buckets


def validate(config, splits) -> None:
  """Checks a config against its data; every message names the bad value."""
  n = splits.train.num_clients
  if not 0 < config.clients_per_round <= n:
    raise ValueError(
        f'clients_per_round={config.clients_per_round} but the training '
        f'population has {n} clients; choose 1..{n}.')
  empty = np.flatnonzero(splits.train.client_sizes == 0)
  if empty.size:
    raise ValueError(
        f'{empty.size} training clients have no examples, e.g. '
        f'{splits.train.client_names[empty[:3]].tolist()}; raise '
        'data.min_examples or lower data.test_fraction so every client keeps '
        'training data.')
  ex = config.execution
  if jax.process_count() > 1 and int(ex.devices) not in (
      0, jax.device_count()):
    raise ValueError(
        f'a {jax.process_count()}-process run shards every round over all '
        f'{jax.device_count()} devices; set execution.devices=0, got '
        f'{ex.devices}.')
  if int(ex.devices) > jax.device_count():
    raise ValueError(
        f'execution.devices={ex.devices} but JAX sees {jax.device_count()} '
        f'devices ({jax.devices()[0].platform}); choose 0 (all) to '
        f'{jax.device_count()}.')


def config_fingerprint(config) -> str:
  """A run's fingerprint: of the options that differ from their defaults
  (`config.non_default`), so adding an option with a default leaves every
  existing run's fingerprint as it was."""
  return checkpoint_lib.fingerprint(config_lib.non_default(config))


# -- the loop ------------------------------------------------------------------


@dataclasses.dataclass
class Experiment:
  """Everything `run` builds from a config (also handy in notebooks)."""
  config: Any
  splits: Any
  model: Any      # the model the clients train
  algorithm: Any
  buckets: Any
  max_steps: int
  init_params: Any  # key -> the initial params (pretrained weights, adapters)
  base_model: Any   # the model before PEFT wraps it (== model otherwise)
  execution: core.Execution = core.Execution()
  privacy: Any = None  # a `privacy.Mechanism` under DP
  base_task: Any = None  # columns of the trust report's base task
  canaries: Any = None  # `canaries.Canaries` planted in the training data
  secagg: Any = None  # a `secure_aggregation.Spec` under secure aggregation
  attack: Any = None  # an `attacks.Spec` when some clients attack
  devices: Any = None  # a `devices.Timeline` with a model of the devices


def build(config, *, splits=None, transform=None) -> Experiment:
  """Everything a run needs, from ``config``; ``splits`` (the data, already
  loaded) and ``transform`` (a `rounds.ClientTransform` of each client's
  message, e.g. `audit.canary_transform`) replace what the config would
  build.

  Checks the config (`fedjax_pfi.config.check`) before loading anything,
  then loads the data (`load_splits`; canaries planted, attackers' data
  poisoned), builds the model (`build_model`), the aggregator the trust
  mechanisms make (DP, secure aggregation, robust aggregation,
  compression, asynchrony), and the algorithm with the model it trains
  (`fedjax_pfi.algorithms.registry.build`; LoRA-wrapped for the PEFT
  algorithms).

  Returns:
    The `Experiment`, ready for `run_experiment`.
  """
  config_lib.check(config)  # before the data: cheap refusals first
  if splits is None:
    splits = registry.load_splits(config.data)
  planted = None
  if int(config.evaluation.canaries.num):
    splits, planted = canaries_lib.plant(
        splits, config.evaluation.canaries,
        config.data.get('tokenizer', None) or 'char')
  attack = attacks.build(config, splits.train.num_clients)
  if attack is not None:
    splits = attacks.poison(splits, attack,
                            config.data.get('tokenizer', None) or 'char')
  base_task = None
  if config.evaluation.base_task.to_dict():
    base_task = canaries_lib.base_task(
        config.evaluation.base_task, splits,
        int(config.evaluation.base_task_examples), config.seed)
  validate(config, splits)
  base_model = zoo.build_model(config.model.name,
                               splits.train.columns['x'][:2], splits.metadata,
                               pretrained=config.model.pretrained,
                               **config.model.kwargs.to_dict())
  execution = make_execution(config)
  population = splits.train.num_clients
  mechanism = privacy.build(
      config, population, participation.expected_clients(config, population))
  if mechanism is not None:
    aggregator = mechanism.aggregator
  elif config.server.weighting == 'uniform':
    aggregator = aggregators.weighted_mean('uniform')
  else:
    aggregator = None
  secagg = secure_aggregation.build(
      config, slots=execution.slots(participation.slots(config, population)),
      max_weight=(1.0 if aggregator is not None and
                  aggregator.weighting == 'uniform' else
                  float(splits.train.client_sizes.max())),
      dp_clip_norm=None if mechanism is None else mechanism.clip_norm,
      adaptive=config.privacy.mechanism == 'adaptive')
  if secagg is not None:
    aggregator = secure_aggregation.wrap(
        aggregator or aggregators.weighted_mean(), secagg)
  if config_lib.buffered(config):  # config.check refused DP and SecAgg
    spec = robust.from_config(
        config, int(config.clients_per_round),
        'uniform' if config.server.weighting == 'uniform' else 'examples')
    aggregator = robust.aggregator(spec, attacks.in_round(attack))
  compressed = compression.from_config(config)
  if compressed is not None:  # after DP's clip, before the sum or buffer
    aggregator = compression.wrap(aggregator or aggregators.weighted_mean(),
                                  compressed)
  if asynchrony.enabled(config):  # each client from its own version
    aggregator = asynchrony.wrap(aggregator or aggregators.weighted_mean(),
                                 asynchrony.spec(config))
  attack_transform = None if attack is None else attacks.transform(attack)
  if attack_transform is not None:  # first: it is the client's own code
    transform = attack_transform if transform is None else rounds.chain(
        attack_transform, transform)
  built = algorithms.build(config, base_model, population, execution,
                           aggregator, transform)
  timeline = _timeline(config, built, splits, secagg)
  max_steps = int(cohort_lib.client_steps(
      splits.train.client_sizes, config.client.batch_size,
      config.client.epochs, config.client.max_steps).max())
  lanes = int(config.execution.pack_lanes)
  if lanes:
    buckets = step_buckets(config, cohort_lib.lane_length_bound(
        cohort_lib.client_steps(splits.train.client_sizes,
                                config.client.batch_size, config.client.epochs,
                                config.client.max_steps),
        participation.slots(config, splits.train.num_clients),
        execution.slots(lanes)))
  else:
    buckets = step_buckets(config, max_steps)
  return Experiment(config, splits, built.model, built.algorithm, buckets,
                    max_steps, built.init_params, base_model, execution,
                    mechanism, base_task, planted, secagg, attack, timeline)


def _timeline(config, built, splits, secagg):
  """The run's `devices.Timeline` (None without ``config.devices``), with
  the bytes every client sends and receives in a round."""
  if not devices_lib.enabled(config):
    return None
  caps = built.algorithm.capabilities
  if not (caps.transforms and caps.compression_state):
    raise ValueError(
        f'devices.profile={config.devices.profile!r} with algorithm '
        f'{config.algorithm!r}: the device model times rounds that send '
        'each client the federated params and take one message back (the '
        'rounds built on `partitioned.fed_partitioned`: FedAvg, FedProx, '
        'FedOpt, the LoRA partitions, FedPer, FedRep, LG-FedAvg, FedBABU).')
  params = jax.eval_shape(lambda k: built.algorithm.init(
      built.init_params(k)), jax.random.key(0)).params
  down, up = devices_lib.nominal_bytes(config, params)
  if secagg is not None:  # the masked input and the protocol's messages
    sizes = secure_aggregation.client_bytes(secagg,
                                            compression.num_floats(params))
    up, down = float(sizes['upload']), down + float(sizes['download'])
  return devices_lib.build(config, splits.train.client_names,
                           splits.train.client_sizes, down, up)


def initial_params(exp: Experiment):
  """The params a run starts from: the pretrained weights where there are
  some, the rest from ``fold_in(key(seed), 2**31 - 1)``."""
  return exp.init_params(jax.random.fold_in(jax.random.key(exp.config.seed),
                                            2**31 - 1))


def load_state(exp: Experiment, workdir: str,
               round_idx: Optional[int] = None) -> core.ServerState:
  """A run's server state, restored from its checkpoint in ``workdir``.

  `run` and `run_experiment` return metrics; this reads back what they
  trained: ``state.params`` (the federated model, or the adapters over a
  frozen base), ``state.client_states`` (the per-client store: personal
  heads, FedSA-LoRA's B, ...). ``exp`` is the run's `Experiment` (`build` of
  its config). ``round_idx``: which checkpoint (default the newest). The
  checkpoint's digests are checked as on resumption; a workdir without one
  is refused naming it."""
  ckpt = checkpoint_lib.Checkpointer(workdir)
  if round_idx is None:
    round_idx = ckpt.latest_round()
    if round_idx is None:
      raise FileNotFoundError(f'{workdir} holds no checkpoint to load.')
  state, _ = ckpt.restore(round_idx, exp.algorithm.init(initial_params(exp)))
  return state


def make_cohort(exp: Experiment, round_idx: int,
                part: Optional[tuple[int, int]] = None):
  """Round ``round_idx``'s cohort: its participants (`participation`),
  stacked or packed.

  ``part=(lo, hi)``: only client slots (packed: lanes) ``lo:hi``, the share
  of one host in a multi-host run (cohort-level arrays of a packed cohort
  stay whole).
  """
  c = exp.config
  ds = exp.splits.train
  ids, steps, weights, stages = participation.participants(
      c, ds.client_sizes, round_idx, exp.devices)
  num_slots = exp.execution.slots(participation.slots(c, ds.num_clients))
  kw = dict(batch_size=c.client.batch_size, num_epochs=c.client.epochs,
            max_steps=c.client.max_steps, step_buckets=exp.buckets,
            seed=c.seed, round_idx=round_idx)
  if int(c.execution.pack_lanes):
    packed = cohort_lib.pack_cohort(
        ds, ids, num_lanes=exp.execution.slots(int(c.execution.pack_lanes)),
        num_slots=num_slots, steps_override=steps, weight_override=weights,
        lane_range=part, **kw)
    if exp.secagg is None:
      return packed
    return packed._replace(secagg=_secagg_plan(  # whole on every device
        exp, ids, weights, stages, num_slots, round_idx))
  arrivals = None
  if exp.devices is not None:
    arrivals = exp.devices.round(round_idx).arrivals  # asynchronous steps
  if exp.execution.chunk_size is not None:
    # Clients of similar length share a chunk, which then skips the steps
    # none of them has; the order changes nothing else.
    order = np.argsort(-steps, kind='stable')
    ids, steps, weights = ids[order], steps[order], weights[order]
    stages = None if stages is None else stages[order]
    if arrivals is not None:
      arrivals = type(arrivals)(*(x[order] for x in arrivals))
  rows = None
  if exp.secagg is not None:  # the whole cohort's graph, before a host's part
    rows = _secagg_plan(exp, ids, weights, stages, num_slots, round_idx)
  if part is not None:  # every host pads to the whole cohort's step bucket
    longest = int(steps.max())
    kw['step_buckets'] = (longest if exp.buckets is None else
                          cohort_lib.bucket_for(longest, exp.buckets),)
    lo, hi = part
    ids, steps, weights = ids[lo:hi], steps[lo:hi], weights[lo:hi]
    if rows is not None:
      rows = secure_aggregation.Plan(*(x[lo:hi] for x in rows))
    if arrivals is not None:
      arrivals = type(arrivals)(*(x[lo:hi] for x in arrivals))
    num_slots = hi - lo
  cohort = cohort_lib.stack_cohort(ds, ids, num_slots=num_slots,
                                   steps_override=steps,
                                   weight_override=weights, **kw)
  if arrivals is not None:  # padded slots: ring slot 0, weight 0
    pad = num_slots - ids.size
    cohort = cohort._replace(arrivals=type(arrivals)(
        *(np.pad(x, (0, pad)) for x in arrivals)))
  return cohort if rows is None else cohort._replace(secagg=rows)


def _secagg_plan(exp: Experiment, ids, weights, stages, num_slots: int,
                 round_idx: int):
  """The round's `secure_aggregation.Plan` over its slots, in the order of
  ``ids`` (padded slots: id -1, weight 0, gone before keys)."""
  pad = num_slots - ids.size
  return secure_aggregation.plan(
      exp.secagg, np.pad(ids, (0, pad), constant_values=-1),
      np.pad(weights, (0, pad)),
      np.pad(stages, (0, pad), constant_values=secure_aggregation.BEFORE_KEYS),
      exp.config.seed, round_idx)


def prepare_workdir(workdir: str) -> str:
  """Creates ``workdir`` and checks that it can be written, before anything
  is loaded; the message names ``--workdir`` and the cause."""
  if not workdir or not str(workdir).strip():
    raise ValueError('--workdir is empty: give the directory for metrics, '
                     'checkpoints and the report (it is created if missing; '
                     'an existing one is resumed).')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_check'):
      pass
  except OSError as e:
    raise ValueError(f'--workdir={workdir!r} cannot be written: '
                     f'{e.strerror or e} ({type(e).__name__}).') from e
  return workdir


def privacy_report(exp: Experiment) -> dict:
  """What ``report.json`` records of the privacy mechanism: the
  accountant's inputs (anyone can recompute epsilon with dp-accounting)
  and the clip norm; ``{}`` without DP."""
  if exp.privacy is None:
    return {}
  p = exp.config.privacy
  return {**exp.privacy.accountant.accounting.report(),
          'privacy/mechanism': p.mechanism,
          'privacy/clip_norm_initial': exp.privacy.clip_norm,
          'privacy/calibrated_to_epsilon': p.target_epsilon,
          'privacy/accountant': p.accountant,
          'privacy/rounds': exp.config.rounds}


def devices_report(exp: Experiment, workdir: str) -> dict:
  """With a model of the devices: writes ``clients_clock.npz`` (per
  training client: times selected and aggregated, busy seconds, joules,
  and its profile) and returns what ``report.json`` records of it."""
  if exp.devices is None:
    return {}
  t = exp.devices.totals(exp.config.rounds)
  p = exp.devices.profiles
  personalization.save_arrays(os.path.join(workdir, CLOCK_FILE), dict(
      client_names=exp.splits.train.client_names,
      num_examples=exp.splits.train.client_sizes,
      seconds_per_example=p.seconds_per_example,
      download_bps=p.download_bps, upload_bps=p.upload_bps, **t))
  done = t['completed']
  return {**devices_lib.describe(exp.devices),
          'clock/clients_never_aggregated_fraction': float(np.mean(done == 0)),
          'clock/completed_per_client_p10_p50_p90': [
              float(x) for x in np.quantile(done, [0.1, 0.5, 0.9])],
          'clock/busy_seconds_per_client_mean': float(
              t['busy_seconds'].mean())}


def _non_finite_advice(config) -> str:
  return (f'Lower client.learning_rate (now {config.client.learning_rate}) '
          f'or server.learning_rate (now {config.server.learning_rate}).')


def run(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """Runs (or resumes) the experiment ``config`` in ``workdir``: `build`,
  then `run_experiment` (the module docstring lists the steps).

  Args:
    config: the run's config (`default_config` with overrides).
    workdir: where metrics (``metrics.jsonl``, TensorBoard), checkpoints
      and the personalization report go; a run found there is resumed.
    stop_after: stop after this many rounds of *this call* (to test resuming).
  Returns:
    The last metrics row (with the final evaluation). Its ``round`` says
    which round it is: a workdir holding more rounds than ``config.rounds``
    runs nothing and returns its newest row (with a `ResumeWarning`).
  """
  prepare_workdir(workdir)
  return run_experiment(build(config), workdir, stop_after=stop_after)


def run_experiment(exp: Experiment, workdir: str, *,
                   stop_after: Optional[int] = None) -> dict:
  """`run` over an `Experiment` already built (by `build`, or by hand: a
  notebook's own model, data or algorithm); ``exp.config`` says the rest
  (rounds, cohorts, evaluation, checkpoints).

  Args:
    exp: the experiment.
    workdir: where metrics (``metrics.jsonl``), checkpoints and the report
      go; a run found there is resumed.
    stop_after: stop after this many rounds of *this call* (to test
      resuming).

  Returns:
    The last metrics row, as `run`'s.
  """
  prepare_workdir(workdir)
  config = exp.config
  fp = config_fingerprint(config)
  recorded = config_lib.to_json(config)
  multi = jax.process_count() > 1
  replicate = placement.replicator(exp.execution.mesh)
  root = jax.random.key(config.seed)
  params = initial_params(exp)
  state = exp.algorithm.init(params)
  state_paths = core.floating_paths(state)
  # One sharding from round 0: one trace.
  state = replicate(state) if exp.execution.mesh is not None else state
  # The frozen part (a pretrained base) is an argument of every round, shared
  # by all clients and never part of the state or the checkpoints.
  frozen = replicate(exp.algorithm.frozen_part(params))
  evaluate = RunEvaluator(exp, params, frozen,
                          workdir if distributed.is_primary() else None)
  del params
  ckpt = checkpoint_lib.Checkpointer(workdir)
  start = 0
  totals = {}
  latest = ckpt.latest_round()
  if latest is not None:
    state, meta = ckpt.restore(latest, state, fp, config=recorded)
    if exp.execution.mesh is not None:
      state = replicate(state)
    start = latest
    totals = meta.get('totals') or {}
  host = None  # the per-client store on the host (execution.client_store)
  if (config.execution.client_store == 'host' and
      jax.tree.leaves(state.client_states)):
    if multi:
      raise ValueError("execution.client_store='host' runs in one process; "
                       f'this run has {jax.process_count()}.')
    host = client_store.HostStore(jax.device_get(state.client_states),
                                  os.path.join(workdir, 'client_store'))
    state = state._replace(client_states=None)

  def full(s):  # the state with every client's rows (to save, evaluate)
    return s if host is None else s._replace(client_states=host.rows)
  if distributed.is_primary():  # only once the workdir's config is accepted
    tmp = os.path.join(workdir, 'config.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(recorded, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, 'config.json'))
  if latest is not None and latest > config.rounds:
    warnings.warn(
        f'{workdir} holds a run of {latest} rounds (its newest checkpoint), '
        f'more than rounds={config.rounds}: nothing was run, and the metrics '
        f'reported are those of round {latest}. Use a fresh --workdir to run '
        f'{config.rounds} rounds.', ResumeWarning, stacklevel=2)
  writer = MetricsWriter(workdir, start, enabled=distributed.is_primary())
  # Running totals: from the checkpoint (older checkpoints: the file's row).
  comm_total = {k: float(totals.get(k, writer.last_row.get(
      f'{k}_cumulative', 0.0))) for k in ('comm/download_bytes',
                                           'comm/upload_bytes')}
  end = config.rounds if stop_after is None else min(config.rounds,
                                                     start + stop_after)
  bar = None
  if config.progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=config.rounds, initial=start, unit='round',
               dynamic_ncols=True)
  row: dict = {}
  efficiency = {}
  apply, traces = exp.algorithm.apply, exp.algorithm.traces
  compiled_before = len(traces)
  lo, hi, rows = placement.local_part(exp)

  def prepare(r):  # sample, stack and start the transfer of round r's cohort
    cohort = make_cohort(exp, r, (lo, hi) if multi else None)
    if host is not None:  # slot i reads row i of the cohort's rows
      cohort = cohort._replace(store_rows=np.arange(
          cohort.client_ids.shape[0], dtype=np.int32))
      host_ids[r] = np.asarray(cohort.client_ids)
    # (multi-host: of this host's share)
    efficiency[r] = cohort_lib.padding_efficiency(
        cohort, exp.execution.chunk_size or rows // exp.execution.num_shards)
    shardings = placement.cohort_sharding(exp, cohort)
    if multi:
      return placement.to_global(cohort, shardings, rows)
    return cohort_lib.to_device(cohort, shardings)

  accountant = exp.privacy.accountant if exp.privacy is not None else None

  def epsilon(done: int) -> dict:
    """Epsilon spent by ``done`` rounds: RDP every round; PLD (0.3-2 s a
    call) at evaluation and checkpoint rounds and at the end. Asynchronous:
    by the most exposed client's steps (`devices.Clock.max_units`)."""
    units = done
    out = {}
    if accountant.accounting.sampling == privacy.SCHEDULED:
      units = exp.devices.max_units(done)
      out['privacy/max_client_steps'] = float(units)
    out['privacy/epsilon_rdp'] = accountant.epsilon_rdp(units)
    if accountant.has_pld and (done % config.eval_every == 0 or
                               done % config.checkpoint_every == 0 or
                               done == config.rounds):
      out['privacy/epsilon_pld'] = accountant.epsilon_pld(units)
    return out

  def kept() -> str:
    last = ckpt.latest_round()
    return (f'The last good checkpoint is round {last} in {ckpt.directory}'
            if last is not None else 'No checkpoint was written before it')

  host_ids = {}
  pending = prepare(start) if start < end else None
  t_prev = time.perf_counter()
  try:
    for r in range(start, end):
      done = r + 1  # rounds count from 1, as in metrics.jsonl and checkpoints
      if host is not None:  # the cohort's rows, gathered after last round's
        ids = host_ids.pop(r)
        state = state._replace(client_states=replicate(jax.device_put(
            host.gather(ids))))
      state, metrics = apply(state, pending,
                             replicate(jax.random.fold_in(root, r)), frozen)
      if r + 1 < end:  # host work for round r+1 overlaps device work for r
        pending = prepare(r + 1)
      if host is not None:  # the rows scattered back (waits for the round)
        host.scatter(ids, jax.device_get(state.client_states), ids >= 0)
      metrics = jax.device_get(metrics)
      finite = np.asarray(metrics.pop('state_finite'))
      row = evaluation.flat_metrics(metrics)
      # train_loss, and a personal model's (Ditto's personal_train_loss)
      bad = [k for k, v in row.items()
             if k.endswith('train_loss') and not math.isfinite(v)]
      if bad:
        raise NonFiniteLossError(
            f'round {done}: training loss {bad[0]} is {row[bad[0]]}; stopped '
            f'without saving it. {kept()}. {_non_finite_advice(config)}')
      if not finite.all():
        names = [p for p, ok in zip(state_paths, finite) if not ok]
        raise NonFiniteStateError(
            f'round {done}: its training loss was finite, but the state it '
            f'produced holds NaN or inf in {len(names)} array(s), e.g. '
            f'{names[0]}; stopped without saving it. {kept()}. '
            f'{_non_finite_advice(config)}')
      if done % config.eval_every == 0 or done == config.rounds:
        view = exp.algorithm.eval_view(full(state), frozen)
        if multi:  # evaluate on this process's devices, from host copies
          view = jax.tree.map(np.asarray, view)
        row.update(evaluate(view, done))
      for k in comm_total:
        comm_total[k] += row.get(k, 0.0)
        row[f'{k}_cumulative'] = comm_total[k]
      if exp.privacy is not None:
        row.update(epsilon(done))
      if exp.devices is not None:  # simulated time: a function of (seed, r)
        row.update(exp.devices.metrics(r))
      now = time.perf_counter()
      row['time/round_s'] = now - t_prev
      row['time/compilations'] = len(traces) - compiled_before
      row['time/padding_efficiency'] = efficiency.pop(r)
      t_prev = now
      row = {'round': done, **row}
      writer.write(done, row)
      if done == config.rounds and distributed.is_primary():
        evaluate.final_report(workdir, row, {**privacy_report(exp),
                                             **devices_report(exp, workdir)})
      if done % config.checkpoint_every == 0 or done == config.rounds:
        ckpt.save(done, full(state), {'fingerprint': fp, 'config': recorded,
                                      'totals': comm_total})
      if bar is not None:
        post = {'loss': f'{row["train_loss"]:.3f}',
                'r/s': f'{1.0 / max(row["time/round_s"], 1e-9):.2f}'}
        if 'test/accuracy' in row:
          post['acc'] = f'{row["test/accuracy"]:.3f}'
        if 'clock/simulated_seconds' in row:
          post['sim_h'] = f'{row["clock/simulated_seconds"] / 3600:.2f}'
        if 'privacy/epsilon_rdp' in row:
          post['eps'] = f'{row.get("privacy/epsilon_pld", row["privacy/epsilon_rdp"]):.2f}'
        bar.set_postfix(post)
        bar.update(1)
  finally:
    writer.close()
    if bar is not None:
      bar.close()
  if not row and os.path.exists(writer.path):  # nothing left to run
    rows = read_metrics(workdir)
    row = rows[-1] if rows else {}
  return row
