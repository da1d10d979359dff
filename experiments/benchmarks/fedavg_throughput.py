r"""FedAvg rounds/s against a Python loop and the machine's centralized ceiling.

  python -m experiments.benchmarks.fedavg_throughput --model=mlp --clients=50
  python -m experiments.benchmarks.fedavg_throughput --model=cnn --clients=500

The workload (issue 4): FedAvg over 1,000 clients with EMNIST-shaped data
(28x28x1 pixels, 62 classes; the pixels are uniform noise, this measures
speed), examples per client lognormal with mean 100 and sigma 0.7 clipped to
10..400, each client's labels drawn from its own Dirichlet(0.3) over the
classes; ``--clients`` clients per round sampled uniformly; one local epoch
of batch 20 (last partial batch kept), client SGD lr 0.1, server SGD lr 1.0,
example-weighted; the FedAvg paper's MLP (784-200-200-62) or CNN (two 5x5
convolutions, 32 and 64 channels, each with 2x2 max-pooling, a 512 dense layer;
`PatchConv`); ``--warmup`` untimed rounds, then ``--rounds`` timed ones.

Three ways of doing the same rounds, in one process, each method's timed
rounds back to back (s/round is their mean):

- ``simulator``: `fedjax_pfi`'s round, the algorithm's jitted ``apply``
  that the training loop runs (with its check of the new state), one
  program for the whole run:
  the clients packed into ``--lanes`` vmap lanes (0: one lane per client,
  padded to the longest; see `cohort.pack_cohort`), optionally in chunks of
  ``--chunk`` lanes, the next cohort stacked and transferred while the
  current round computes;
- ``simulator_dp``: the same round with DP-FedAvg (clip 1, noise
  multiplier 1, uniform weights): its cost is the ratio ``simulator /
  simulator_dp``;
- ``simulator_secagg`` and ``simulator_secagg_full``: the same round with
  secure aggregation (32 bits, each message clipped to L2 norm 100, which
  clips nothing here, example weights), SecAgg+ with
  ``--secagg_neighbors`` neighbours per client and the complete graph of
  Bonawitz et al. The masks are expanded
  inside the round (``1 + k`` vectors of the message's size per client);
- ``simulator_secagg_qsgd`` and ``simulator_secagg_rotated_qsgd``: SecAgg+
  as ``simulator_secagg`` with the compressor's ``--compression_bits``
  levels as its fixed point (`compression.secure_step`; the rotated one
  masks ``d'`` values, the next power of 2);
- ``simulator_robust_<rule>`` (``<rule>`` one of `robust.RULES`, e.g.
  ``simulator_robust_krum``): the same round with that robust aggregator
  (``--robust_f`` Byzantine clients assumed), which fills the ``[C, ...]``
  buffer of every client's delta (packed: each client's row at its last
  step) and runs the rule on it: its cost is ``simulator /
  simulator_robust_<rule>``;
- ``simulator_compress_<name>`` (``<name>`` one of `compression.NAMES`
  but ``none``, e.g. ``simulator_compress_drive``): the same round with each
  client's delta compressed (``--compression_bits``,
  ``--compression_fraction``) inside the aggregator's client step: its cost
  is ``simulator / simulator_compress_<name>``;
- ``simulator_devices``: the same round with a model of the devices
  (`fedjax_pfi.devices`: log-normal profiles, always online, wait for all,
  so the cohorts and the work are the simulator's): its cost is the host's
  timeline of each round in simulated time, ``simulator /
  simulator_devices``;
- ``simulator_fedbuff``: FedBuff (`fedjax_pfi.asynchrony`) on the same
  workload: a server step aggregates a buffer of ``--clients`` arrivals out
  of twice as many in flight, each client starting from its own model
  version (a ring of 9 in the state); the host's event loop gives each
  step its buffer. Its client updates per second against the synchronous
  round's is the price of asynchrony in simulation speed; ``python_loop``
  (one client at a time, as FLSim's asynchronous trainer runs them) is the
  Python baseline for both;
- ``python_loop``: a Python loop over clients and their batches with one
  jitted per-step SGD function (fixed batch shape with a mask, so it
  compiles once) and a jitted weighted mean: how FedJAX-style simulators run;
- ``centralized``: a jitted SGD step over batches of ``clients x 20``
  examples, as many as it takes to see the round's examples: the practical
  ceiling of this machine for this much work.

Prints s/round, client updates/s, examples/s, padding efficiency (real
examples / examples computed), the compiled round's memory (XLA's own
figures: arguments + temporaries), the process's peak RSS, the number of
compilations, and the ratios.
"""

from __future__ import annotations

import functools
import resource
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmarks import baselines
from fedjax_pfi import asynchrony
from fedjax_pfi import compression
from fedjax_pfi import devices
from fedjax_pfi import secure_aggregation
from fedjax_pfi import training
from fedjax_pfi.algorithms import aggregators
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import partitioned
from fedjax_pfi.algorithms import robust
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data import synthetic
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.models import zoo
from fedjax_pfi.peft import lora

_MODEL = flags.DEFINE_enum('model', 'mlp', ['mlp', 'cnn', 'lora'],
                           'The model (lora: FedIT on a frozen GPT-2).')
_DIM = flags.DEFINE_integer('dim', 128, 'lora: the transformer\'s width.')
_LAYERS = flags.DEFINE_integer('layers', 3, 'lora: transformer blocks.')
_HEADS = flags.DEFINE_integer('heads', 4, 'lora: attention heads.')
_SEQ = flags.DEFINE_integer('seq_len', 64, 'lora: tokens per example.')
_CLIENTS = flags.DEFINE_integer('clients', 50, 'Clients per round.')
_POPULATION = flags.DEFINE_integer('population', 1000, 'Clients in all.')
_ROUNDS = flags.DEFINE_integer('rounds', 20, 'Timed rounds.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed rounds (compilation).')
_LANES = flags.DEFINE_integer('lanes', 0, 'Packed lanes (0: unpacked).')
_CHUNK = flags.DEFINE_integer('chunk', 0, 'Lanes (clients) per chunk; 0: all.')
_DEVICES = flags.DEFINE_integer(
    'devices', 1, 'Devices the lanes are sharded over (on CPU: start with '
    'XLA_FLAGS=--xla_force_host_platform_device_count=N, one per core).')
_UNROLL = flags.DEFINE_integer('unroll', 1, 'lax.scan unroll of local steps.')
_REPEATS = flags.DEFINE_integer(
    'repeats', 1, 'Time every method this many times, in turn (the median '
    'is reported): close variants need it on a noisy machine.')
_METHODS = flags.DEFINE_list(
    'methods', 'simulator,simulator_dp,python_loop,centralized',
    'Which methods to time (also simulator_secagg, simulator_secagg_full, '
    'simulator_secagg_qsgd, simulator_secagg_rotated_qsgd, '
    'simulator_robust_<rule>, simulator_compress_<name>).')
_ROBUST_F = flags.DEFINE_integer(
    'robust_f', 5, 'simulator_robust_*: the Byzantine clients per round the '
    'rule assumes (Krum, Multi-Krum, NNM).')
_COMPRESSION_BITS = flags.DEFINE_integer(
    'compression_bits', 8, 'simulator_compress_qsgd, _rotated_qsgd: bits per '
    'coordinate.')
_COMPRESSION_FRACTION = flags.DEFINE_float(
    'compression_fraction', 0.01, 'simulator_compress_topk: the fraction of '
    'coordinates kept.')
_SECAGG_K = flags.DEFINE_integer(
    'secagg_neighbors', 16, 'simulator_secagg: neighbours per client '
    '(SecAgg+); simulator_secagg_full masks with every other client.')
B = 20
CLIENT_LR = 0.1
SERVER_LR = 1.0
VOCAB = 257
LORA = lora.LoraConfig(rank=8, alpha=16.0, target=r'attn/(q|v)$')


def build_model(ds):
  if _MODEL.value == 'mlp':
    return zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                           hidden=(200, 200))
  if _MODEL.value == 'lora':
    base_model = zoo.build_model('transformer', ds.columns['x'][:2],
                                 ds.metadata, dim=_DIM.value,
                                 num_layers=_LAYERS.value,
                                 num_heads=_HEADS.value)
    return lora.lora_model(base_model, LORA)
  return zoo.build_model('cnn', ds.columns['x'][:2], ds.metadata,
                         conv='patches')


def population(num_clients: int):
  """The issue's clients; for ``lora`` the same sizes with random byte
  sequences (the pretrained model's shape: 257 symbols, 0 padding)."""
  ds = synthetic.emnist_shaped(num_clients)
  if _MODEL.value != 'lora':
    return ds
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, VOCAB, (ds.num_examples, _SEQ.value + 1),
                        dtype=np.int32)
  return FederatedDataset(
      {'x': tokens[:, :-1], 'y': tokens[:, 1:]}, ds.offsets, ds.client_names,
      {'vocab_size': VOCAB, 'pad_id': 0, 'seq_len': _SEQ.value})


def trainable_only(model, frozen):
  """``model`` over its trainable params, ``frozen`` merged in (the
  centralized and looped baselines of LoRA train what FedIT trains)."""
  if frozen is None:
    return model
  return model._replace(
      apply=lambda p, *a, **k: model.apply(param_groups.merge(frozen, p), *a,
                                           **k),
      example_stats=lambda p, *a, **k: model.example_stats(
          param_groups.merge(frozen, p), *a, **k))


def main(argv):
  del argv
  ds = population(_POPULATION.value)
  model = build_model(ds)
  params0 = model.init(jax.random.key(0))
  frozen_regex = r'^base/' if _MODEL.value == 'lora' else None
  c = _CLIENTS.value
  lanes = _LANES.value
  chunk = _CHUNK.value or None
  max_steps = int(cohort_lib.client_steps(ds.client_sizes, B, 1).max())
  mesh = None
  if _DEVICES.value > 1:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:_DEVICES.value]),
                             ('clients',))
  execution = core.Execution(chunk_size=chunk, mesh=mesh)
  if lanes:
    lanes = execution.slots(lanes)
  # One step bucket, the longest any cohort can need, so the whole run
  # compiles once; steps that are padding for every client (lane) of a chunk
  # are skipped at run time, so the spare length costs memory, not time.
  if lanes:
    buckets = (cohort_lib.lane_length_bound(
        cohort_lib.client_steps(ds.client_sizes, B, 1), c,
        execution.slots(lanes)),)
  else:
    buckets = (max_steps,)

  def stack(r, spec=None, one=None):
    ids = cohort_lib.sample_cohort(ds.num_clients, c, 0, r)
    kw = dict(batch_size=B, step_buckets=buckets, seed=0, round_idx=r)
    if one is not None:  # the device model's cohort, steps and weights
      if lanes:
        raise ValueError('simulator_devices runs unpacked (--lanes=0).')
      ids = one.ids
      kw.update(steps_override=one.steps, weight_override=one.weights)
    if lanes:
      cohort = cohort_lib.pack_cohort(ds, ids, num_lanes=lanes,
                                      num_slots=execution.slots(c), **kw)
    else:
      if chunk:  # clients of similar length share a chunk
        order = np.argsort(-ds.client_sizes[ids], kind='stable')
        ids = ids[order]
        if one is not None:
          kw.update(steps_override=one.steps[order],
                    weight_override=one.weights[order])
      cohort = cohort_lib.stack_cohort(ds, ids, num_slots=execution.slots(c),
                                       **kw)
    if one is not None and one.arrivals is not None:  # FedBuff's versions
      pad = execution.slots(c) - one.ids.size
      cohort = cohort._replace(arrivals=asynchrony.Arrivals(
          *(np.pad(x, (0, pad)) for x in one.arrivals)))
    if spec is not None:  # the round's graph and (no) dropouts, on the host
      cohort = cohort._replace(secagg=secure_aggregation.plan(
          spec, cohort.client_ids, cohort.weight,
          np.zeros(cohort.client_ids.size, np.int8), 0, r))
    return ids, cohort

  warm = list(range(1000, 1000 + _WARMUP.value))
  timed = list(range(_ROUNDS.value))
  # Only the masks are kept for the statistics (the simulator stacks each
  # round's cohort as it goes, inside its timing).
  masks = {r: stack(r)[1].mask for r in timed}

  # -- simulator ----------------------------------------------------------------
  def simulator(aggregator=None):
    return partitioned.fed_partitioned(
        model, optax.sgd(CLIENT_LR),
        server_optimizers.server_optimizer('fedavg', SERVER_LR), aggregator,
        frozen=frozen_regex, execution=execution, unroll=_UNROLL.value)

  alg = simulator()
  frozen = alg.frozen_part(params0)
  trained = alg.init(params0).params  # what the clients train (all, or B)
  loop_model = trainable_only(model, frozen)
  # DP-FedAvg on the same round: every client clipped inside the vmapped
  # round (packed: at its last step), Gaussian noise once on the sum.
  private = simulator(aggregators.gaussian(1.0, 1.0, float(c)))
  secure, specs = {}, {}
  for name, k in (('secagg', _SECAGG_K.value), ('secagg_full', 0)):
    if f'simulator_{name}' in _METHODS.value:
      specs[name] = secure_aggregation.make_spec(
          neighbors=k, clip_norm=100.0, max_weight=float(
              ds.client_sizes.max()), slots=execution.slots(c))
      secure[name] = simulator(secure_aggregation.wrap(
          aggregators.weighted_mean(), specs[name]))
  for name in compression.SECURE_NAMES:  # SecAgg+ with a compressor's levels
    k = f'secagg_{name}'
    if f'simulator_{k}' in _METHODS.value:
      specs[k] = secure_aggregation.make_spec(
          neighbors=_SECAGG_K.value, clip_norm=100.0, max_weight=float(
              ds.client_sizes.max()), slots=execution.slots(c),
          compressor=name, compressor_bits=_COMPRESSION_BITS.value)
      secure[k] = simulator(compression.wrap(
          secure_aggregation.wrap(aggregators.weighted_mean(), specs[k]),
          compression.Spec(compression.make(
              name, bits=_COMPRESSION_BITS.value))))
  robust_algs = {}
  for name in _METHODS.value:
    if name.startswith('simulator_robust_'):
      rule = name[len('simulator_robust_'):]
      spec = robust.Spec(name=rule, f=_ROBUST_F.value)
      robust.check(spec, c)
      robust_algs[name[len('simulator_'):]] = simulator(robust.aggregator(spec))
  compressed, compressors = {}, {}
  for name in _METHODS.value:
    if name.startswith('simulator_compress_'):
      k = name[len('simulator_'):]
      compressors[k] = compression.make(
          name[len('simulator_compress_'):], bits=_COMPRESSION_BITS.value,
          fraction=_COMPRESSION_FRACTION.value)
      compressed[k] = simulator(compression.wrap(
          aggregators.weighted_mean(), compression.Spec(compressors[k])))
  # FedBuff: each client from its own version, a ring of 9 in the state.
  buffered_alg = simulator(asynchrony.wrap(aggregators.weighted_mean(),
                                           asynchrony.Spec(9, False)))
  traces = alg.traces
  replicate = (lambda s: s) if mesh is None else (
      lambda s: jax.device_put(s, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec())))
  # The state lives replicated on the mesh from round 0.
  sim = {'state': replicate(alg.init(params0)),
         'private': replicate(private.init(params0)),
         **{k: replicate(a.init(params0)) for k, a in secure.items()},
         **{k: replicate(a.init(params0)) for k, a in robust_algs.items()},
         **{k: replicate(a.init(params0)) for k, a in compressed.items()},
         'devices': replicate(alg.init(params0)),
         'fedbuff': replicate(buffered_alg.init(params0))}

  def put(cohort):
    if mesh is None:
      return jax.device_put(cohort)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        'clients'))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shard = jax.tree.map(lambda _: split, cohort)
    if lanes:
      shard = shard._replace(client_ids=whole, weight=whole, secagg=jax.tree.map(
          lambda _: whole, cohort.secagg))
    return jax.device_put(cohort, shard)

  def timeline(asynchronous=False):
    """A fresh device model: its round i is the simulator's round i (or
    FedBuff's step i: a buffer of c arrivals of 2c in flight)."""
    config = training.default_config()
    config.clients_per_round, config.seed = c, 0
    config.client.batch_size, config.client.max_steps = B, None
    config.devices.profile = 'lognormal'
    if asynchronous:
      config.asynchrony.mode = 'fedbuff'
      config.asynchrony.concurrency = 2 * c
    size = float(param_groups.num_bytes(trained))
    kind = asynchrony.AsyncTimeline if asynchronous else devices.Timeline
    return kind(
        config, ds.client_sizes,
        devices.lognormal(config.devices, ds.num_clients,
                          np.random.default_rng(0)),
        devices.always(ds.num_clients), size, size)

  clocks, steps_done = {}, {}

  def run_simulator(rounds, which='state', algorithm=alg):
    state = sim[which]
    spec = specs.get(which)
    clock, first = None, 0
    if which == 'devices':  # fresh: its timed rounds are the simulator's
      clock = timeline()
    elif which == 'fedbuff':  # one timeline: the state's versions go on
      clock = clocks.setdefault(which, timeline(True))
      first = steps_done.get(which, 0)
      steps_done[which] = first + len(rounds)

    def one(i):  # the round's cohort, from the device model's timeline
      return None if clock is None else clock.round(first + i)

    pending = put(stack(rounds[0], spec, one(0))[1])
    for i, r in enumerate(rounds):
      state, m = algorithm.apply(state, pending, jax.random.key(r), frozen)
      if i + 1 < len(rounds):  # host work for r+1 overlaps device work for r
        pending = put(stack(rounds[i + 1], spec, one(i + 1))[1])
      if not np.asarray(m['state_finite']).all():  # as the training loop
        raise FloatingPointError(f'round {r}: non-finite state')
    sim[which] = state

  # -- Python loop over clients -----------------------------------------------
  opt = optax.sgd(CLIENT_LR)

  step = baselines.sgd_step(loop_model, opt)
  server_update = baselines.server_update(SERVER_LR)

  loop = {'params': trained}

  def run_loop(rounds):
    params = loop['params']
    for r in rounds:
      ids = cohort_lib.sample_cohort(ds.num_clients, c, 0, r)
      deltas, weights = [], []
      for cid in ids:
        n = int(ds.client_sizes[cid])
        idx = cohort_lib.client_batch_index(
            n, B, 1, -(-n // B), np.random.default_rng([0, r, int(cid)]))
        data = ds.client(cid)
        p, s = params, opt.init(params)
        for rows in idx:
          m = rows >= 0
          batch = {k: v[np.maximum(rows, 0)] for k, v in data.items()}
          p, s = step(p, s, batch, m)
        deltas.append(jax.tree.map(jnp.subtract, p, params))
        weights.append(float(n))
      params = server_update(params, deltas, weights)
    loop['params'] = jax.block_until_ready(params)

  # -- centralized ceiling ------------------------------------------------------
  central_step = baselines.central_step(loop_model, opt)

  central = {'params': trained, 'opt': opt.init(trained)}

  def run_central(rounds):
    params, s = central['params'], central['opt']
    big = c * B
    for r in rounds:
      n = int(ds.client_sizes[cohort_lib.sample_cohort(ds.num_clients, c, 0,
                                                       r)].sum())
      rows = np.random.default_rng(r).choice(ds.num_examples,
                                             -(-n // big) * big)
      for lo in range(0, rows.size, big):
        batch = {k: v[rows[lo:lo + big]] for k, v in ds.columns.items()}
        params, s = central_step(params, s, batch)
    central['params'], central['opt'] = jax.block_until_ready((params, s))

  methods = {'simulator': run_simulator,
             'simulator_dp': lambda r: run_simulator(r, 'private', private),
             **{f'simulator_{k}': functools.partial(
                 run_simulator, which=k, algorithm=a)
                for k, a in secure.items()},
             **{f'simulator_{k}': functools.partial(
                 run_simulator, which=k, algorithm=a)
                for k, a in robust_algs.items()},
             **{f'simulator_{k}': functools.partial(
                 run_simulator, which=k, algorithm=a)
                for k, a in compressed.items()},
             'simulator_devices': functools.partial(run_simulator,
                                                    which='devices'),
             'simulator_fedbuff': functools.partial(
                 run_simulator, which='fedbuff', algorithm=buffered_alg),
             'python_loop': run_loop, 'centralized': run_central}
  methods = {k: methods[k] for k in _METHODS.value}
  compile_s, times = {}, {k: [] for k in methods}
  for name, fn in methods.items():
    t = time.perf_counter()
    fn(warm)
    compile_s[name] = time.perf_counter() - t
    print(f'{name}: {len(warm)} warm-up rounds (with compilation) '
          f'{compile_s[name]:.1f} s', flush=True)
  for _ in range(_REPEATS.value):
    for name, fn in methods.items():
      # Each method's timed rounds back to back, as a run does them: the
      # simulator's pipeline stacks round r+1 while round r computes (timing
      # rounds one call at a time would put every stacking on the clock).
      t = time.perf_counter()
      fn(timed)
      times[name].append((time.perf_counter() - t) / len(timed))

  examples = np.mean([masks[r].sum() for r in timed])

  class _Masked:  # what padding_efficiency reads
    def __init__(self, mask):
      self.mask = mask

  eff = np.mean([cohort_lib.padding_efficiency(
      _Masked(masks[r]), chunk or masks[r].shape[0] // _DEVICES.value)
                 for r in timed])
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, '
        f'{jax.device_count()} device(s), simulator on {_DEVICES.value}, '
        f'{_MODEL.value}, {c} clients/round '
        f'of {ds.num_clients}, lanes={lanes or "unpacked"}, '
        f'chunk={chunk or "all"}, unroll={_UNROLL.value}')
  print(f'{examples:.0f} examples per round on average; simulator padding '
        f'efficiency {eff:.3f}; layout {masks[timed[0]].shape}')
  if 'simulator' in methods:
    compiled = jax.jit(alg.apply_unjitted).lower(
        sim['state'], put(stack(timed[0])[1]), jax.random.key(0),
        frozen).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
      print(f'simulator round memory (XLA): arguments '
            f'{mem.argument_size_in_bytes / 2**20:.1f} MiB, temporaries '
            f'{mem.temp_size_in_bytes / 2**20:.1f} MiB, outputs '
            f'{mem.output_size_in_bytes / 2**20:.1f} MiB')
    print(f'simulator compilations for the whole run: {len(traces)}')
    if 'simulator_dp' in methods:
      print('simulator_dp compilations for the whole run: '
            f'{len(private.traces)}')
    for k, a in compressed.items():
      d = sum(x.size for x in jax.tree.leaves(trained))
      print(f'simulator_{k} compilations for the whole run: '
            f'{len(a.traces)}; upload bytes per client '
            f'{compressors[k].bits(d) / 8:,.0f} against the plain '
            f'float32 message {param_groups.num_bytes(trained):,}')
    for k, a in secure.items():
      sizes = secure_aggregation.client_bytes(
          specs[k], compression.num_floats(trained))
      print(f'simulator_{k} compilations for the whole run: '
            f'{len(a.traces)}; {specs[k].degree} neighbours; bytes per '
            f'client (model): upload {sizes["upload"]:,} (masked input '
            f'{sizes["masked_input"]:,}), download {sizes["download"]:,}; '
            f'the plain float32 message {param_groups.num_bytes(trained):,}')
    if 'simulator_fedbuff' in methods:
      print('simulator_fedbuff compilations for the whole run: '
            f'{len(buffered_alg.traces)}')
    for k, a in robust_algs.items():
      print(f'simulator_{k} compilations for the whole run: '
            f'{len(a.traces)}; buffer {c} x '
            f'{param_groups.num_bytes(trained):,} bytes')
  print(f'process peak RSS: '
        f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    print(f'device peak memory: {stats["peak_bytes_in_use"] / 2**30:.2f} GiB '
          f'({jax.devices()[0].device_kind})')
  else:
    print(f'device peak memory: not reported by {jax.default_backend()}')
  print(f'{"method":12s} {"s/round":>9s} {"client-upd/s":>13s} '
        f'{"examples/s":>11s} {"warm-up s":>10s}')
  med = {k: float(np.median(v)) for k, v in times.items()}
  for name in methods:
    spread = (f'   (repeats {min(times[name]):.4f}..{max(times[name]):.4f})'
              if len(times[name]) > 1 else '')
    print(f'{name:12s} {med[name]:9.4f} {c / med[name]:13.1f} '
          f'{examples / med[name]:11.0f} {compile_s[name]:10.1f}{spread}')
  if 'simulator' in med:
    for other in ('simulator_dp', 'simulator_secagg', 'simulator_secagg_full',
                  *(f'simulator_secagg_{n}' for n in compression.SECURE_NAMES),
                  *(f'simulator_{k}' for k in robust_algs),
                  *(f'simulator_{k}' for k in compressed),
                  'simulator_devices', 'simulator_fedbuff', 'python_loop',
                  'centralized'):
      if other in med:
        print(f'simulator / {other} throughput: '
              f'{med[other] / med["simulator"]:.2f}x')


if __name__ == '__main__':
  app.run(main)
