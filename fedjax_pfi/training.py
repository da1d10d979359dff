"""The training loop behind ``experiments/main.py``: config in, workdir out.

One call of `run(config, workdir)`:

1. validates the config against the data before anything is traced;
2. restores the newest checkpoint in ``workdir`` if there is one;
3. for each round ``r``: samples the cohort from ``(seed, r)``, stacks it into
   a step bucket, runs the jitted round with key ``fold_in(root, r)``, and,
   while the device computes, stacks the next round's cohort on the host;
4. logs metrics to ``workdir/metrics.jsonl`` and TensorBoard, evaluates every
   ``eval_every`` rounds (`RunEvaluator`: personalized, global and local-only
   per client), checkpoints every ``checkpoint_every`` rounds;
5. after the last round writes the personalization report: ``report.json``,
   ``clients_final.npz`` and PNG plots (`fedjax_pfi.personalization`).

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

from absl import logging
import jax
import numpy as np

from fedjax_pfi import checkpoint as checkpoint_lib
from fedjax_pfi import config as config_lib
from fedjax_pfi import distributed
from fedjax_pfi import evaluation
from fedjax_pfi import personalization
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import registry as algorithms
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data import registry
from fedjax_pfi.models import zoo

ALGORITHMS = algorithms.ALGORITHMS
RESUMABLE_KEYS = config_lib.RESUMABLE_KEYS
default_config = config_lib.default_config


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss; the run stopped before saving it."""


class NonFiniteStateError(FloatingPointError):
  """A round left NaN/inf in the server state (an overflowing server step,
  say); the run stopped before saving it."""


class ResumeWarning(UserWarning):
  """What a resumed run found in its workdir that does not match its
  checkpoint (a lost or cut ``metrics.jsonl``, more rounds than asked)."""


class MetricsFileError(ValueError):
  """A row of ``metrics.jsonl`` before the checkpoint cannot be read."""


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


def make_execution(config) -> core.Execution:
  """The `core.Execution` of ``config.execution``: a one-axis mesh over
  ``devices`` devices (all processes' devices in a multi-host run)."""
  ex = config.execution
  n = int(ex.devices) or jax.device_count()
  mesh = None
  if n > 1:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ('clients',))
  chunk = None if ex.chunk_size is None else int(ex.chunk_size)
  return core.Execution(chunk_size=chunk, mesh=mesh)


def config_fingerprint(config) -> str:
  d = config.to_dict()
  for k in RESUMABLE_KEYS:
    d.pop(k, None)
  return checkpoint_lib.fingerprint(d)


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


def build(config) -> Experiment:
  config_lib.check(config)  # before the data: cheap refusals first
  splits = registry.load_splits(config.data)
  validate(config, splits)
  base_model = zoo.build_model(config.model.name,
                               splits.train.columns['x'][:2], splits.metadata,
                               pretrained=config.model.pretrained,
                               **config.model.kwargs.to_dict())
  execution = make_execution(config)
  built = algorithms.build(config, base_model, splits.train.num_clients,
                           execution)
  max_steps = int(cohort_lib.client_steps(
      splits.train.client_sizes, config.client.batch_size,
      config.client.epochs, config.client.max_steps).max())
  lanes = int(config.execution.pack_lanes)
  if lanes:
    buckets = step_buckets(config, cohort_lib.lane_length_bound(
        cohort_lib.client_steps(splits.train.client_sizes,
                                config.client.batch_size, config.client.epochs,
                                config.client.max_steps),
        config.clients_per_round, execution.slots(lanes)))
  else:
    buckets = step_buckets(config, max_steps)
  return Experiment(config, splits, built.model, built.algorithm, buckets,
                    max_steps, built.init_params, base_model, execution)


def initial_params(exp: Experiment):
  """The params a run starts from: the pretrained weights where there are
  some, the rest from ``fold_in(key(seed), 2**31 - 1)``."""
  return exp.init_params(jax.random.fold_in(jax.random.key(exp.config.seed),
                                            2**31 - 1))


def make_cohort(exp: Experiment, round_idx: int,
                part: Optional[tuple[int, int]] = None):
  """Round ``round_idx``'s cohort: ids, straggler work, stacked batches.

  ``part=(lo, hi)``: only client slots (packed: lanes) ``lo:hi``, the share
  of one host in a multi-host run (cohort-level arrays of a packed cohort
  stay whole).
  """
  c = exp.config
  ds = exp.splits.train
  ids = cohort_lib.sample_cohort(ds.num_clients, c.clients_per_round, c.seed,
                                 round_idx)
  full = cohort_lib.client_steps(ds.client_sizes[ids], c.client.batch_size,
                                 c.client.epochs, c.client.max_steps)
  steps, weights = full, ds.client_sizes[ids].astype(np.float32)
  if c.stragglers.fraction > 0:
    # FedProx (Li et al. 2020, Sec. 5.2): a straggler does a uniformly random
    # amount of its local work; FedAvg drops stragglers instead.
    rng = np.random.default_rng([c.seed, round_idx, 0x57A6])
    slow = rng.random(ids.size) < c.stragglers.fraction
    partial = rng.integers(1, full + 1)
    steps = np.where(slow, 0 if c.stragglers.drop else partial, full)
    weights = np.where(slow & c.stragglers.drop, 0.0, weights)
  num_slots = exp.execution.slots(c.clients_per_round)
  kw = dict(batch_size=c.client.batch_size, num_epochs=c.client.epochs,
            max_steps=c.client.max_steps, step_buckets=exp.buckets,
            seed=c.seed, round_idx=round_idx)
  if int(c.execution.pack_lanes):
    return cohort_lib.pack_cohort(
        ds, ids, num_lanes=exp.execution.slots(int(c.execution.pack_lanes)),
        num_slots=num_slots, steps_override=steps, weight_override=weights,
        lane_range=part, **kw)
  if exp.execution.chunk_size is not None:
    # Clients of similar length share a chunk, which then skips the steps
    # none of them has; the order changes nothing else.
    order = np.argsort(-steps, kind='stable')
    ids, steps, weights = ids[order], steps[order], weights[order]
  if part is not None:  # every host pads to the whole cohort's step bucket
    longest = int(steps.max())
    kw['step_buckets'] = (longest if exp.buckets is None else
                          cohort_lib.bucket_for(longest, exp.buckets),)
    lo, hi = part
    ids, steps, weights = ids[lo:hi], steps[lo:hi], weights[lo:hi]
    num_slots = hi - lo
  return cohort_lib.stack_cohort(ds, ids, num_slots=num_slots,
                                 steps_override=steps,
                                 weight_override=weights, **kw)


def cohort_sharding(exp: Experiment, cohort):
  """Shardings for ``cohort``: the client (lane) axis split over the mesh,
  cohort-level arrays of a packed cohort replicated."""
  mesh = exp.execution.mesh
  if mesh is None:
    return None
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('clients'))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if isinstance(cohort, cohort_lib.PackedCohort):
    return cohort._replace(
        client_ids=whole, weight=whole,
        batches={k: split for k in cohort.batches},
        **{k: split for k in ('mask', 'slot', 'local_step', 'first', 'last')})
  return jax.tree.map(lambda _: split, cohort)


def local_part(exp: Experiment) -> tuple[int, int, int]:
  """``(lo, hi, n)``: this process feeds client slots (packed: lanes)
  ``lo:hi`` of ``n`` (all of them in a one-process run)."""
  c = exp.config
  n = (exp.execution.slots(int(c.execution.pack_lanes))
       if int(c.execution.pack_lanes) else
       exp.execution.slots(c.clients_per_round))
  if jax.process_count() == 1:
    return 0, n, n
  split = jax.sharding.NamedSharding(exp.execution.mesh,
                                     jax.sharding.PartitionSpec('clients'))
  idx = [i[0] for i in split.addressable_devices_indices_map((n,)).values()]
  lo, hi = min(i.start or 0 for i in idx), max(i.stop or n for i in idx)
  if sum((i.stop or n) - (i.start or 0) for i in idx) != hi - lo:
    raise ValueError('this process\'s devices do not hold one contiguous '
                     'block of the client axis; order the mesh by process.')
  return lo, hi, n


def to_global(cohort, shardings, full_rows: int):
  """A process's share of a cohort -> global arrays over every host's
  devices (``jax.make_array_from_process_local_data``); replicated
  (cohort-level) arrays are whole on every process."""
  def put(x, sharding):
    x = np.asarray(x)
    if sharding.spec == jax.sharding.PartitionSpec():
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(
        sharding, x, (full_rows,) + x.shape[1:])
  return jax.tree.map(put, cohort, shardings)


def parse_metrics(path: str, upto: Optional[int] = None
                  ) -> tuple[list[str], list[str]]:
  """The rows of a ``metrics.jsonl`` worth keeping, as lines, and notes on
  what was dropped.

  ``upto`` (a checkpoint's round): rows past it are dropped, and so is
  anything unreadable past the last row at or before it. An unreadable last
  line (a run stopped while writing it) is dropped anywhere. Any other
  unreadable row raises `MetricsFileError` naming the file and the line.
  """
  with open(path, 'rb') as f:
    lines = f.read().decode('utf-8', errors='replace').split('\n')
  numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
  kept, notes, past, torn = [], [], False, 0  # notes: what a resume says
  for n, (lineno, line) in enumerate(numbered):
    try:
      row = json.loads(line)
      r = int(row['round'])
    except (ValueError, KeyError, TypeError) as e:
      if n == len(numbered) - 1:
        notes.append(f'dropped its torn last line (line {lineno}), cut off '
                     'while it was written')
        torn = 1
        break
      if past:
        continue
      raise MetricsFileError(
          f'{path} line {lineno} is not a metrics row ({e}: '
          f'{line[:80]!r}), and it lies before the checkpoint (round '
          f'{upto}). Repair or delete that line, or use a fresh --workdir.'
      ) from e
    if upto is not None and r > upto:
      past = True
      continue
    kept.append(line + '\n')
  dropped = len(numbered) - len(kept) - torn
  if dropped:
    where = (f'past the checkpoint (round {upto})' if upto else
             'of rounds that no checkpoint holds')
    notes.append(f'dropped {dropped} row(s) {where}, which resuming computes '
                 'again')
  return kept, notes


class MetricsWriter:
  """Appends one JSON object per line; TensorBoard scalars beside it.

  Opening it on a resumed run keeps the rows up to the checkpoint's round
  (`parse_metrics`) and warns (`ResumeWarning`) where the file does not
  reach that round: a lost or cut file keeps its gap, and the running totals
  come from the checkpoint, not from the file.
  """

  def __init__(self, workdir: str, resume_round: int, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    kept, notes = [], []
    if os.path.exists(self.path):  # drop rows past the restored checkpoint
      kept, notes = parse_metrics(self.path, resume_round)
    self.last_row = json.loads(kept[-1]) if kept else {}
    self.enabled = enabled  # a multi-host run's other processes write nothing
    if not enabled:
      return
    if notes:  # what any crash leaves: said, not warned about
      logging.warning('%s: %s.', self.path, '; '.join(notes))
    if resume_round and self.last_row.get('round') != resume_round:
      have = (f'ends at round {self.last_row["round"]}' if kept else
              'has no rows' if os.path.exists(self.path) else 'is missing')
      warnings.warn(
          f'{self.path} {have} but the checkpoint is round {resume_round}: '
          'the rows in between are lost. The run continues from the '
          'checkpoint (with its running totals); the file keeps the gap.',
          ResumeWarning, stacklevel=2)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, 'a')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:  # TensorBoard logging is optional
      self._tb = None

  def write(self, round_idx: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps({'round': round_idx, **metrics}) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, round_idx)

  def close(self):
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl`` (a torn last line left out)."""
  kept, _ = parse_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return [json.loads(line) for line in kept]


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


def finite_flags(tree):
  """One bool per floating leaf of ``tree``: all its values finite. Inside
  the round, so checking the new state costs one reduction, no copy."""
  leaves = [x for x in jax.tree.leaves(tree) if _floating(x)]
  if not leaves:
    return jax.numpy.ones((0,), bool)
  return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves])


def _floating(x) -> bool:
  return hasattr(x, 'dtype') and jax.numpy.issubdtype(x.dtype,
                                                      jax.numpy.inexact)


def floating_paths(tree) -> list[str]:
  """The paths of `finite_flags`'s leaves, in its order."""
  return [jax.tree_util.keystr(p) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0] if _floating(x)]


class RunEvaluator:
  """A run's evaluation: who personalization helps and whom it hurts.

  Every evaluation reports, on each training client's own test data:

  - ``test/``: the personalized model of each client (its personal state,
    or the global model fine-tuned on its training data for algorithms with
    ``finetune``; the global model for plain FedAvg);
  - ``global/``: the global model, where the algorithm has one and
    personalizes it, with ``vs_global/`` per-client gains and the fraction
    of clients it hurts (`personalization.compare`);
  - ``local/``: with ``personalization.local_epochs`` > 0, each client's
    model trained on its own data alone from the initial params (computed
    once, a pure function of the config), with ``vs_local/`` gains;
  - ``heldout/``: clients never seen in training, with the model a new
    client starts from, and ``heldout_adapted/`` after
    ``personalization.finetune_epochs`` epochs on their own adaptation data;
  - ``trainset/`` with ``eval_train``;
  - ``val/``: the personalized models on each client's validation split,
    where the data has one (MovieLens' second-latest item;
    ``data.val_fraction``), for choosing hyperparameters without the test
    split.

  Each is the distribution of per-client accuracy (`evaluation.summarize`)
  over every client with test data; the gains and hurt fractions cover the
  clients sampled so far (``test/never_sampled_fraction`` says how many are
  left out: they still hold their initial personal state).
  ``last`` keeps the per-client results of the latest evaluation for the
  final report.
  """

  def __init__(self, exp: Experiment, initial_params, frozen):
    c = exp.config
    self.exp = exp
    model = exp.algorithm.eval_model or exp.model
    self.evaluator = evaluation.Evaluator(
        model, c.eval_batch_size, c.eval_clients_per_chunk,
        combine=exp.algorithm.combine)
    pc = c.personalization
    opt = client_updates.client_optimizer(
        c.client.optimizer, c.client.learning_rate, momentum=c.client.momentum,
        lr_scales=c.client.lr_scales)
    adapter = lambda epochs, opt=opt: personalization.Adapter(
        model, opt, epochs=epochs, batch_size=c.client.batch_size,
        clients_per_chunk=c.eval_clients_per_chunk,
        eval_batch_size=c.eval_batch_size, seed=c.seed)
    ft_opt = opt if not exp.algorithm.finetune_lr else \
        client_updates.client_optimizer(
            c.client.optimizer, exp.algorithm.finetune_lr,
            momentum=c.client.momentum, lr_scales=c.client.lr_scales)
    self.finetuner = adapter(int(pc.finetune_epochs), ft_opt)
    self.local_epochs = int(pc.local_epochs)
    self.margin = float(pc.hurt_margin)
    self._local_adapter = adapter(self.local_epochs) if self.local_epochs \
        else None
    if self.local_epochs and exp.algorithm.clusters:  # one of the k models
      initial_params = jax.tree.map(lambda p: p[0], initial_params)
    self._initial = initial_params if self.local_epochs else None
    self._frozen = frozen
    self._local = None
    self.last: dict = {}
    self.last_sampled = np.zeros(exp.splits.train.num_clients, bool)

  def _trainable(self, full, mode: str):
    """``(start, frozen)``: what adaptation trains, and the rest."""
    if mode == 'all' or self._frozen is None or not jax.tree.leaves(
        self._frozen):
      return full, None
    paths = set(param_groups.leaf_paths(self._frozen))
    return (param_groups.select(full, lambda p: p not in paths),
            self._frozen)

  def _adapt(self, adapter, full, mode, train, test):
    start, frozen = self._trainable(full, mode)
    if not jax.tree.leaves(start):  # nothing a client could adapt
      return self.evaluator.evaluate(full, test)
    return adapter.evaluate(start, train, test, frozen)

  def _best_cluster(self, clusters, train, test):
    """Each client with the cluster model of lowest loss on ``train``."""
    k = jax.tree.leaves(clusters)[0].shape[0]
    models = [jax.tree.map(lambda p, j=j: p[j], clusters) for j in range(k)]
    on_train = [self.evaluator.evaluate(m, train) for m in models]
    on_test = [self.evaluator.evaluate(m, test) for m in models]
    ids = on_test[0].client_ids
    loss = np.stack([np.full(train.num_clients, np.inf)] * k)
    for j, m in enumerate(on_train):
      loss[j, m.client_ids] = m.loss
    pick = np.argmin(loss[:, ids], axis=0)
    take = lambda f: np.take_along_axis(
        np.stack([getattr(m, f) for m in on_test]), pick[None], 0)[0]
    return evaluation.ClientMetrics(ids, take('loss_sum'), take('correct'),
                                    take('count'), on_test[0].num_examples)

  def sampled(self, rounds_done: int) -> np.ndarray:
    """Bool per training client: sampled in one of the first rounds."""
    c = self.exp.config
    return cohort_lib.ever_sampled(self.exp.splits.train.num_clients,
                                   c.clients_per_round, c.seed, rounds_done)

  def __call__(self, view, rounds_done: Optional[int] = None
               ) -> dict[str, float]:
    """The metrics of one evaluation; ``rounds_done`` (default: all of
    ``config.rounds``) says which clients have trained: the gains and
    hurt fractions cover those only."""
    exp, ev, alg = self.exp, self.evaluator, self.exp.algorithm
    splits = exp.splits
    rounds_done = exp.config.rounds if rounds_done is None else rounds_done
    self.last_sampled = self.sampled(rounds_done)
    personalizes = view.personal is not None or bool(alg.finetune)

    def own(ds, train=splits.train):  # each client with its own params
      if view.clusters is not None:
        return self._best_cluster(view.clusters, train, ds)
      if alg.finetune:
        return self._adapt(self.finetuner, view.params, alg.finetune,
                           splits.train, ds)
      if view.personal is None:
        return ev.evaluate(view.params, ds)
      return ev.evaluate(view.shared, ds, personal_params=view.personal)

    mine = own(splits.test)
    results = {'personalized': mine}
    if splits.val.num_examples:  # each client's own validation data: tune here
      out_val = evaluation.summarize(own(splits.val), 'val/')
    else:
      out_val = {}
    among = self.last_sampled[mine.client_ids]
    out = evaluation.summarize(mine, 'test/')
    out.update(out_val)
    out['test/never_sampled_fraction'] = float(1.0 - among.mean())
    if splits.metadata.get('task') == 'ranking':  # HR@k of a random order
      out['test/random_baseline'] = float(splits.metadata['top_k']) / \
          splits.test.columns['x'].shape[-1]
    else:
      out['test/majority_baseline'] = evaluation.majority_baseline(
          splits.train, splits.test, splits.metadata.get('pad_id'))
    if personalizes and alg.has_global_model:
      results['global'] = ev.evaluate(view.params, splits.test)
      out.update(evaluation.summarize(results['global'], 'global/'))
      out.update(personalization.compare(mine, results['global'], 'global',
                                         self.margin, among)[0])
    if self.local_epochs:
      if self._local is None:  # depends on the config only: computed once
        # What this algorithm's clients may train: FedBABU's frozen head
        # too, but never a foundation model's base.
        self._local = self._adapt(self._local_adapter, self._initial,
                                  alg.finetune or 'trainable', splits.train,
                                  splits.test)
      results['local'] = self._local
      out.update(evaluation.summarize(self._local, 'local/'))
      out.update(personalization.compare(mine, self._local, 'local',
                                         self.margin, among)[0])
    if exp.config.eval_train:  # the FedProx paper's "training loss"
      out.update(evaluation.summarize(own(splits.train), 'trainset/'))
    if splits.heldout_test is not None and view.clusters is not None:
      if splits.heldout_train is not None:  # choose a cluster by own data
        out.update(evaluation.summarize(
            own(splits.heldout_test, splits.heldout_train), 'heldout/'))
    elif splits.heldout_test is not None:
      out.update(evaluation.summarize(
          ev.evaluate(view.params, splits.heldout_test), 'heldout/'))
      if self.finetuner.epochs and splits.heldout_train is not None:
        adapted = self._adapt(self.finetuner, view.params,
                              alg.finetune or 'trainable',
                              splits.heldout_train, splits.heldout_test)
        out.update(evaluation.summarize(adapted, 'heldout_adapted/'))
    self.last = results
    return out

  def final_report(self, workdir: str, row: dict) -> None:
    """Per-client results, ``report.json`` and the plots, in ``workdir``."""
    personalization.save_clients(workdir, self.last,
                                 self.exp.splits.train.client_sizes,
                                 self.last_sampled)
    personalization.write_report(workdir, row)
    personalization.plot_run(
        workdir, read_metrics(workdir),
        personalization.load_clients(workdir),
        title=f'{self.exp.config.algorithm} on {self.exp.config.data.name}')


def _non_finite_advice(config) -> str:
  return (f'Lower client.learning_rate (now {config.client.learning_rate}) '
          f'or server.learning_rate (now {config.server.learning_rate}).')


def run(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """Runs (or resumes) the experiment ``config`` in ``workdir``.

  Args:
    stop_after: stop after this many rounds of *this call* (to test resuming).
  Returns:
    The last metrics row (with the final evaluation). Its ``round`` says
    which round it is: a workdir holding more rounds than ``config.rounds``
    runs nothing and returns its newest row (with a `ResumeWarning`).
  """
  prepare_workdir(workdir)
  exp = build(config)
  fp = config_fingerprint(config)
  recorded = config_lib.to_json(config)

  traces = []

  def counted_apply(state, cohort, key, frozen):
    traces.append(cohort.mask.shape)
    state, metrics = exp.algorithm.apply_unjitted(state, cohort, key, frozen)
    return state, metrics, finite_flags(state)

  multi = jax.process_count() > 1
  replicated = None
  if exp.execution.mesh is not None:
    replicated = jax.sharding.NamedSharding(exp.execution.mesh,
                                            jax.sharding.PartitionSpec())
  # Metrics come back replicated: every process reads them whole.
  apply = jax.jit(counted_apply, donate_argnums=0, out_shardings=replicated)
  root = jax.random.key(config.seed)
  params = initial_params(exp)
  state = exp.algorithm.init(params)
  state_paths = floating_paths(state)

  def replicate(tree):
    """On every device of the mesh, from host copies (which is what a
    multi-host run accepts), or on the default device without a mesh."""
    if replicated is None:
      return jax.device_put(tree)
    def put(x):
      if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
          x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                        impl=jax.random.key_impl(x))
      return jax.device_put(np.asarray(x), replicated)
    return jax.tree.map(put, tree)

  # One sharding from round 0: one trace.
  state = replicate(state) if replicated is not None else state
  # The frozen part (a pretrained base) is an argument of every round, shared
  # by all clients and never part of the state or the checkpoints.
  frozen = replicate(exp.algorithm.frozen_part(params))
  evaluate = RunEvaluator(exp, params, frozen)
  del params
  ckpt = checkpoint_lib.Checkpointer(workdir)
  start = 0
  totals = {}
  latest = ckpt.latest_round()
  if latest is not None:
    state, meta = ckpt.restore(latest, state, fp, config=recorded)
    if replicated is not None:
      state = jax.device_put(state, replicated)
    start = latest
    totals = meta.get('totals') or {}
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

  lo, hi, rows = local_part(exp)

  def prepare(r):  # sample, stack and start the transfer of round r's cohort
    cohort = make_cohort(exp, r, (lo, hi) if multi else None)
    # (multi-host: of this host's share)
    efficiency[r] = cohort_lib.padding_efficiency(
        cohort, exp.execution.chunk_size or rows // exp.execution.num_shards)
    if multi:
      return to_global(cohort, cohort_sharding(exp, cohort), rows)
    return cohort_lib.to_device(cohort, cohort_sharding(exp, cohort))

  def kept() -> str:
    last = ckpt.latest_round()
    return (f'The last good checkpoint is round {last} in {ckpt.directory}'
            if last is not None else 'No checkpoint was written before it')

  pending = prepare(start) if start < end else None
  t_prev = time.perf_counter()
  try:
    for r in range(start, end):
      done = r + 1  # rounds count from 1, as in metrics.jsonl and checkpoints
      state, metrics, finite = apply(
          state, pending, replicate(jax.random.fold_in(root, r)), frozen)
      if r + 1 < end:  # host work for round r+1 overlaps device work for r
        pending = prepare(r + 1)
      row = evaluation.flat_metrics(jax.device_get(metrics))
      # train_loss, and a personal model's (Ditto's personal_train_loss)
      bad = [k for k, v in row.items()
             if k.endswith('train_loss') and not math.isfinite(v)]
      if bad:
        raise NonFiniteLossError(
            f'round {done}: training loss {bad[0]} is {row[bad[0]]}; stopped '
            f'without saving it. {kept()}. {_non_finite_advice(config)}')
      finite = np.asarray(jax.device_get(finite))
      if not finite.all():
        names = [p for p, ok in zip(state_paths, finite) if not ok]
        raise NonFiniteStateError(
            f'round {done}: its training loss was finite, but the state it '
            f'produced holds NaN or inf in {len(names)} array(s), e.g. '
            f'{names[0]}; stopped without saving it. {kept()}. '
            f'{_non_finite_advice(config)}')
      if done % config.eval_every == 0 or done == config.rounds:
        view = exp.algorithm.eval_view(state, frozen)
        if multi:  # evaluate on this process's devices, from host copies
          view = jax.tree.map(np.asarray, view)
        row.update(evaluate(view, done))
      for k in comm_total:
        comm_total[k] += row.get(k, 0.0)
        row[f'{k}_cumulative'] = comm_total[k]
      now = time.perf_counter()
      row['time/round_s'] = now - t_prev
      row['time/compilations'] = len(traces)
      row['time/padding_efficiency'] = efficiency.pop(r)
      t_prev = now
      row = {'round': done, **row}
      writer.write(done, row)
      if done == config.rounds and distributed.is_primary():
        evaluate.final_report(workdir, row)
      if done % config.checkpoint_every == 0 or done == config.rounds:
        ckpt.save(done, state, {'fingerprint': fp, 'config': recorded,
                                'totals': comm_total})
      if bar is not None:
        post = {'loss': f'{row["train_loss"]:.3f}',
                'r/s': f'{1.0 / max(row["time/round_s"], 1e-9):.2f}'}
        if 'test/accuracy' in row:
          post['acc'] = f'{row["test/accuracy"]:.3f}'
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
