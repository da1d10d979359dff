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
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from fedjax_pfi import checkpoint as checkpoint_lib
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
# Keys that may change between a run and its resumption: `execution` says how
# a round is laid out on the hardware, never what it computes, so a run may
# resume on another number of devices or chunk size.
RESUMABLE_KEYS = ('rounds', 'checkpoint_every', 'progress', 'execution')


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss; the run stopped before saving it."""


def default_config() -> ml_collections.ConfigDict:
  """Every option of a run, with defaults. Configs override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rounds = 100
  c.clients_per_round = 10
  c.data = ml_collections.ConfigDict(dict(
      name='shakespeare', seq_len=80, min_chars=1000, plays=None,
      exclude_plays=None, path=None, leaf_dir=None, alpha=1.0, beta=1.0,
      num_clients=30, iid=False, data_seed=0, tfds_name=None, split='train',
      client_key=None, partitioner=None, partitioner_kwargs=None,
      label_key='label', data_dir=None, max_examples=None, min_examples=1,
      val_fraction=0.0, test_fraction=0.2, heldout_fraction=0.1,
      max_clients=None, seed=0, tokenizer='char', num_negatives=4,
      eval_negatives=99, top_k=10))
  c.model = ml_collections.ConfigDict(dict(name='char_transformer'))
  c.model.kwargs = ml_collections.ConfigDict()
  # A Hugging Face safetensors directory (GPT-2 or Llama layout) for
  # model.name='transformer'; its config.json fixes the architecture.
  c.model.pretrained = ml_collections.FieldReference(None, field_type=str)
  # LoRA for the PEFT algorithms (fedjax_pfi/algorithms/registry.py).
  c.peft = ml_collections.ConfigDict(dict(
      rank=8, alpha=16.0, dropout=0.0, target=r'attn/(q|v)$',
      mode='activation', client_ranks='', prune_gamma=0.99,
      prune_lambda=0.0))
  # Personalized FL (fedjax_pfi/algorithms/registry.py) and its evaluation
  # (fedjax_pfi/personalization.py).
  c.personalization = ml_collections.ConfigDict(dict(
      head='', head_epochs=1, ditto_lambda=0.1, apfl_alpha=0.25,
      pfedme_lambda=15.0, pfedme_inner_steps=5, pfedme_personal_lr=0.0,
      perfedavg_alpha=0.01, num_clusters=2, fedrap_lambda=0.1,
      fedrap_mu=1e-3, fedrap_weight_decay=0.0,
      fedrap_lr_decay=1.0, fedrap_step_decay=1.0, fedrap_curriculum='tanh',
      finetune_epochs=1, local_epochs=0, hurt_margin=0.0))
  c.algorithm = 'fedavg'
  c.client = ml_collections.ConfigDict(dict(
      optimizer='sgd', learning_rate=0.1, momentum=0.0, batch_size=10,
      epochs=1, max_steps=None, proximal_mu=0.0, unroll='1', lr_scales=''))
  c.server = ml_collections.ConfigDict(dict(
      optimizer='fedavg', learning_rate=1.0, momentum=0.9, b1=0.9, b2=0.99,
      tau=1e-3))
  c.stragglers = ml_collections.ConfigDict(dict(fraction=0.0, drop=False))
  # 'pow2', 'max' (one bucket: compile once), 'exact', or ints '4,8'
  c.step_buckets = 'pow2'
  # How rounds run on the hardware (results agree to float tolerance):
  # devices: local devices the cohort is sharded over (0 = all of them);
  # chunk_size: clients (lanes) per chunk per device, None = all at once;
  # pack_lanes: pack the cohort's clients one after another into this many
  # vmap lanes (0 = one lane per client, padded to the longest).
  c.execution = ml_collections.ConfigDict(dict(devices=1, pack_lanes=0))
  c.execution.chunk_size = ml_collections.FieldReference(None, field_type=int)
  c.eval_every = 10
  c.eval_train = False      # also evaluate the global model on all train data
  c.eval_batch_size = 64
  c.eval_clients_per_chunk = 32
  c.checkpoint_every = 10
  c.progress = True
  return c


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
  for key in ('batch_size', 'epochs'):
    if int(config.client[key]) < 1:
      raise ValueError(f'client.{key} must be >= 1, got {config.client[key]}.')
  if config.rounds < 0:
    raise ValueError(f'rounds must be >= 0, got {config.rounds}.')
  if not 0.0 <= config.stragglers.fraction <= 1.0:
    raise ValueError('stragglers.fraction must lie in [0, 1], got '
                     f'{config.stragglers.fraction}.')
  for key in ('eval_every', 'checkpoint_every'):
    if int(config[key]) < 1:
      raise ValueError(f'{key} must be >= 1, got {config[key]}.')
  ex = config.execution
  if ex.chunk_size is not None and int(ex.chunk_size) < 1:
    raise ValueError(f'execution.chunk_size must be >= 1 or None, got '
                     f'{ex.chunk_size}.')
  if int(ex.pack_lanes) < 0:
    raise ValueError(f'execution.pack_lanes must be >= 0 (0: no packing), '
                     f'got {ex.pack_lanes}.')
  if jax.process_count() > 1 and int(ex.devices) not in (
      0, jax.device_count()):
    raise ValueError(
        f'a {jax.process_count()}-process run shards every round over all '
        f'{jax.device_count()} devices; set execution.devices=0, got '
        f'{ex.devices}.')
  if int(ex.devices) < 0 or int(ex.devices) > jax.device_count():
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


class MetricsWriter:
  """Appends one JSON object per line; TensorBoard scalars beside it."""

  def __init__(self, workdir: str, resume_round: int, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    kept = []
    if os.path.exists(self.path):  # drop rows past the restored checkpoint
      with open(self.path) as f:
        kept = [l for l in f if l.strip() and
                json.loads(l)['round'] <= resume_round]
    self.last_row = json.loads(kept[-1]) if kept else {}
    self.enabled = enabled  # a multi-host run's other processes write nothing
    if not enabled:
      return
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
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


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


def run(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """Runs (or resumes) the experiment ``config`` in ``workdir``.

  Args:
    stop_after: stop after this many rounds of *this call* (to test resuming).
  Returns:
    The last metrics row (with the final evaluation).
  """
  os.makedirs(workdir, exist_ok=True)
  exp = build(config)
  fp = config_fingerprint(config)
  if distributed.is_primary():
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f, indent=1, sort_keys=True, default=str)

  traces = []

  def counted_apply(state, cohort, key, frozen):
    traces.append(cohort.mask.shape)
    return exp.algorithm.apply_unjitted(state, cohort, key, frozen)

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
  latest = ckpt.latest_round()
  if latest is not None:
    state, _ = ckpt.restore(latest, state, fp)
    if replicated is not None:
      state = jax.device_put(state, replicated)
    start = latest
  writer = MetricsWriter(workdir, start, enabled=distributed.is_primary())
  comm_total = {k: writer.last_row.get(f'{k}_cumulative', 0.0)
                for k in ('comm/download_bytes', 'comm/upload_bytes')}
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

  pending = prepare(start) if start < end else None
  t_prev = time.perf_counter()
  try:
    for r in range(start, end):
      state, metrics = apply(state, pending,
                             replicate(jax.random.fold_in(root, r)), frozen)
      if r + 1 < end:  # host work for round r+1 overlaps device work for r
        pending = prepare(r + 1)
      row = evaluation.flat_metrics(jax.device_get(metrics))
      # train_loss, and a personal model's (Ditto's personal_train_loss)
      bad = [k for k, v in row.items()
             if k.endswith('train_loss') and not math.isfinite(v)]
      if bad:
        last = ckpt.latest_round()
        kept = (f'The last good checkpoint is round {last} in {ckpt.directory}'
                if last is not None else 'No checkpoint was written before it')
        raise NonFiniteLossError(
            f'round {r}: training loss {bad[0]} is {row[bad[0]]}; stopped '
            f'without saving it. {kept}. Lower '
            f'client.learning_rate (now {config.client.learning_rate}) or '
            f'server.learning_rate (now {config.server.learning_rate}).')
      done = r + 1
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
        ckpt.save(done, state, {'fingerprint': fp})
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
