"""A run's options: `default_config`, the checks every value passes before
anything is loaded or traced (`check`), and how two configs differ (`diff`).

Every optional field (default ``None``) is a typed
``ml_collections.FieldReference``, so that ``--config.data.leaf_dir=DIR``
and the like can be given on the command line: absl can override a field
only when it knows the field's type.
"""

from __future__ import annotations

import difflib
import json
import keyword
import math
import os
from typing import Any, Callable, Iterator, Optional

import ml_collections
import numpy as np

from fedjax_pfi import asynchrony
from fedjax_pfi import compression
from fedjax_pfi import devices
from fedjax_pfi import privacy

# Keys that may change between a run and its resumption: `execution` says how
# a round is laid out on the hardware, never what it computes, so a run may
# resume on another number of devices or chunk size.
RESUMABLE_KEYS = ('rounds', 'checkpoint_every', 'progress', 'execution')
# The trust report's options (all of `evaluation` but its canaries, which
# change the training data; the backdoor probe's size; retrieval, read at
# the final evaluation only): they change
# what is reported, never the training, so they may change on resumption
# too and no fingerprint covers them.
REPORT_KEYS = ('evaluation.alpha', 'evaluation.group_by',
               'evaluation.bootstrap_resamples', 'evaluation.private_epsilons',
               'evaluation.private_mechanism', 'evaluation.base_task',
               'evaluation.base_task_examples', 'evaluation.erosion_margin',
               'evaluation.probe_clients', 'evaluation.vs_start',
               'evaluation.reference_cache', 'attack.probe_examples',
               'retrieval')

FLOAT32_MAX = float(np.finfo(np.float32).max)

# Blocks whose keys are the user's to choose (a model's constructor
# arguments, a partitioner's): any key is accepted there, and only there.
OPEN_BLOCKS = ('model.kwargs', 'data.partitioner_kwargs',
               'evaluation.base_task')

# How ``experiments/main.py``'s ``--config`` flag is defined: new keys are
# accepted by the parser (``--config.model.kwargs.hidden="(16,)"``) and
# `check` refuses any outside `OPEN_BLOCKS` (a typo), naming the nearest
# option.
COMMAND_LINE = dict(lock_config=False, accept_new_attributes=True)


def command_line(argv: list[str]) -> list[str]:
  """``argv`` with each ``--config.`` path part that is a Python keyword
  written as a subscript, which is how ml_collections parses it:
  ``--config.retrieval.lambda=0.1`` -> ``--config.retrieval["lambda"]=0.1``."""
  out = []
  for arg in argv:
    if arg.startswith('--config.') and '=' in arg:
      path, value = arg[len('--config.'):].split('=', 1)
      parts = path.split('.')
      if any(keyword.iskeyword(p) for p in parts):
        head = parts[0]
        for p in parts[1:]:
          head += f'["{p}"]' if keyword.iskeyword(p) else '.' + p
        arg = f'--config.{head}={value}'
    out.append(arg)
  return out


def optional(field_type):
  """A field whose default is ``None`` that the command line can set."""
  return ml_collections.FieldReference(None, field_type=field_type)


def default_config() -> ml_collections.ConfigDict:
  """Every option of a run, with defaults. Configs override what they need.

  Returns:
    A fresh ``ml_collections.ConfigDict``: ``seed``, ``rounds``,
    ``clients_per_round`` and one block per part of a run (``data``,
    ``model``, ``peft``, ``personalization``, ``algorithm``, ``client``,
    ``server``, ``privacy``, ``stragglers``, ``compression``, ``devices``,
    ``asynchrony``, ``secure_aggregation``, ``aggregator``, ``attack``,
    ``execution``, ``evaluation``, ``retrieval``) and the loop's own
    (``step_buckets``, ``eval_every``, ``checkpoint_every``, ...). Every
    optional field is typed, so ``--config.x=...`` can set it; `check`
    refuses a bad value by name before anything is loaded.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rounds = 100
  c.clients_per_round = 10
  c.data = ml_collections.ConfigDict(dict(
      name='shakespeare', seq_len=80, min_chars=1000, plays=optional(tuple),
      exclude_plays=optional(tuple), path=optional(str),
      leaf_dir=optional(str), alpha=1.0, beta=1.0, num_clients=30, iid=False,
      data_seed=0, tfds_name=optional(str), split='train',
      client_key=optional(str), partitioner=optional(str),
      # a dict, e.g. --config.data.partitioner_kwargs="{'alpha': 0.1}"
      partitioner_kwargs=optional(object), label_key='label',
      data_dir=optional(str), max_examples=optional(int), min_examples=1,
      val_fraction=0.0, test_fraction=0.2, heldout_fraction=0.1,
      max_clients=optional(int), seed=0, tokenizer='char', num_negatives=4,
      eval_negatives=99, top_k=10))
  c.model = ml_collections.ConfigDict(dict(name='char_transformer'))
  c.model.kwargs = ml_collections.ConfigDict()
  # A Hugging Face safetensors directory (GPT-2 or Llama layout) for
  # model.name='transformer'; its config.json fixes the architecture.
  c.model.pretrained = optional(str)
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
      epochs=1, max_steps=optional(int), proximal_mu=0.0, unroll='1',
      lr_scales=''))
  # weighting: '' (each client by its examples; uniformly under DP),
  # 'examples' or 'uniform'.
  c.server = ml_collections.ConfigDict(dict(
      optimizer='fedavg', learning_rate=1.0, momentum=0.9, b1=0.9, b2=0.99,
      tau=1e-3, weighting=''))
  # User-level DP (fedjax_pfi/privacy.py): mechanism 'none', 'gaussian'
  # (DP-FedAvg) or 'adaptive' (adaptive clipping); target_epsilon
  # calibrates noise_multiplier before training with `accountant`.
  c.privacy = ml_collections.ConfigDict(dict(
      mechanism='none', clip_norm=1.0, noise_multiplier=1.0,
      target_epsilon=optional(float), delta=1e-5, sampling='poisson',
      accountant='pld', target_quantile=0.5, clip_learning_rate=0.2,
      count_noise_std=optional(float), noise_cohort_size=optional(int),
      noise_population=optional(int)))
  c.stragglers = ml_collections.ConfigDict(dict(fraction=0.0, drop=False))
  # Compressed client updates (fedjax_pfi/compression.py): name, one of
  # none, qsgd, rotated_qsgd, drive, topk; bits per coordinate (qsgd,
  # rotated_qsgd: a sign and bits - 1 of level); fraction of coordinates
  # kept (topk); error_feedback, a residual per client added to its next
  # upload; download, the broadcast model compressed too.
  c.compression = ml_collections.ConfigDict(dict(
      name='none', bits=8, fraction=0.01, error_feedback=False,
      download=False))
  # A model of the devices and a virtual clock (fedjax_pfi/devices.py):
  # profile none, lognormal or trace (trace_path: our CSV or a FedScale
  # device-capacity pickle); seed of the profiles (not the training seed);
  # the lognormal's medians and log-stds, and their correlation with the
  # clients' sizes (> 0: small clients are slow); availability always, diurnal
  # (online_hours a day) or trace (availability_path, windows within
  # period_hours); the probability of leaving at each stage; the round's
  # deadline in seconds (0: wait for all) and partial (keep stragglers'
  # steps); over_select (select ceil(K (1 + o)), keep the first K); the
  # powers that give energy.
  c.devices = ml_collections.ConfigDict(dict(
      profile='none', seed=0, trace_path='', seconds_per_example=0.005,
      speed_sigma=0.6, download_mbps=20.0, upload_mbps=5.0,
      bandwidth_sigma=0.5, size_correlation=0.0, availability='always', availability_path='',
      online_hours=8.0, period_hours=24.0, dropout_download=0.0,
      dropout_train=0.0, dropout_upload=0.0, deadline=0.0, partial=False,
      over_select=0.0, power_compute_w=2.0, power_radio_w=1.0))
  # Asynchronous aggregation in simulated time (fedjax_pfi/asynchrony.py):
  # mode sync, fedbuff or fedasync; buffer_size K (0: clients_per_round;
  # fedasync: 1); concurrency, the clients training at once (0:
  # clients_per_round); staleness weights constant or polynomial
  # (1 + tau)^-staleness_exponent; max_staleness, the stalest arrival kept.
  c.asynchrony = ml_collections.ConfigDict(dict(
      mode='sync', buffer_size=0, concurrency=0, staleness='polynomial',
      staleness_exponent=0.5, max_staleness=8))
  # Secure aggregation (fedjax_pfi/secure_aggregation.py), simulated in the
  # round: bits b of Z_2^b; neighbors k of SecAgg+ (0: every other client,
  # Bonawitz et al.); threshold t of live neighbours to rebuild a secret (0:
  # a majority); clip_norm, the L2 bound without DP (under DP
  # privacy.clip_norm); scale of the fixed point (0: the largest that cannot
  # overflow); the probability of leaving at each stage of the protocol.
  c.secure_aggregation = ml_collections.ConfigDict(dict(
      enabled=False, bits=32, neighbors=0, threshold=0, clip_norm=0.0,
      scale=0.0, dropout_keys=0.0, dropout_upload=0.0, dropout_unmask=0.0))
  # Robust aggregation (fedjax_pfi/algorithms/robust.py): name, one of
  # mean, median, trimmed_mean, krum, multi_krum, geometric_median,
  # centered_clipping, norm_bound; pre, none, nnm or bucketing; f, the
  # Byzantine clients per round the server assumes (-1: ceil(attack.fraction
  # * clients_per_round)); beta (trimmed mean); multi_krum_m (0: m - f);
  # iterations and nu (geometric median), iterations and tau (centered
  # clipping); norm_bound (M); bucket_size (s).
  c.aggregator = ml_collections.ConfigDict(dict(
      name='mean', pre='none', f=-1, beta=0.1, multi_krum_m=0, iterations=3,
      nu=1e-6, tau=1.0, norm_bound=1.0, bucket_size=2))
  # Attacking clients (fedjax_pfi/attacks.py): name, one of none,
  # label_flip, sign_flip, scale, gaussian, alie, ipm, backdoor; fraction of
  # the population malicious (a fixed set drawn from seed); scale
  # (scale), noise_std (gaussian), alie_z (0: Baruch et al.'s z_max),
  # ipm_epsilon, boost (backdoor; 0: clients_per_round /
  # server.learning_rate), target (an image label), trigger and target_text
  # (text), poison_fraction (of a malicious client's examples);
  # probe_examples, the backdoor's test examples.
  c.attack = ml_collections.ConfigDict(dict(
      name='none', fraction=0.0, seed=0, scale=10.0, noise_std=1.0,
      alie_z=0.0, ipm_epsilon=0.1, boost=0.0, target=0,
      trigger='my cat says ', target_text='meow', poison_fraction=0.5,
      probe_examples=512))
  # 'pow2', 'max' (one bucket: compile once), 'exact', or ints '4,8'
  c.step_buckets = 'pow2'
  # How rounds run on the hardware (results agree to float tolerance):
  # devices: local devices the cohort is sharded over (0 = all of them);
  # chunk_size: clients (lanes) per chunk per device, None = all at once;
  # pack_lanes: pack the cohort's clients one after another into this many
  # vmap lanes (0 = one lane per client, padded to the longest).
  # client_store: where the per-client store (personal adapters, heads)
  # lives between rounds: 'device', or 'host' (numpy, memory-mapped under the
  # workdir when large; the cohort's rows travel with its batches).
  c.execution = ml_collections.ConfigDict(dict(devices=1, pack_lanes=0,
                                               client_store='device'))
  c.execution.chunk_size = optional(int)
  # The trust report (fedjax_pfi/trust.py; README "What the trust report
  # measures"): alpha, the level of the per-client paired tests; group_by,
  # comma-separated client attributes for group gaps ('size' always; the
  # data's own, e.g. 'genre', 'gender', 'age_band'); private_epsilons, the
  # DP gain histogram's releases ('' for none); base_task, a data config
  # whose test split is text no client owns (empty: none); canaries.num > 0
  # plants canaries (fedjax_pfi/canaries.py). Base task and canaries run at
  # the final evaluation, on the canary holders and probe_clients others.
  # vs_start: also compare with the model the run starts from (the
  # pretrained one: "no fine-tuning"). reference_cache: a directory where
  # the local-only reference is kept under a key of its inputs, shared by
  # the runs that have the same (fedjax_pfi/reference_cache.py; '': none).
  c.evaluation = ml_collections.ConfigDict(dict(
      alpha=0.05, group_by='', bootstrap_resamples=1000,
      private_epsilons='1,4,inf', private_mechanism='gaussian',
      base_task_examples=64, erosion_margin=0.02, probe_clients=32,
      vs_start=False, reference_cache=''))
  c.evaluation.base_task = ml_collections.ConfigDict()
  c.evaluation.canaries = ml_collections.ConfigDict(dict(
      num=0, repeats=10, prefix='my pin is ', digits=4, candidates=255,
      seed=0))
  # Retrieval over each client's private store (fedjax_pfi/retrieval/):
  # mode none, knn_lm or in_context; k neighbours or chunks; lambda and
  # temperature of kNN-LM; chunk_len and stride of in-context retrieval;
  # metric l2 or ip ('': l2 for knn_lm, ip for in_context); store host or
  # device; tune none, global or client (lambda and k from lambdas x ks on
  # the validation split). Evaluated at the final evaluation.
  c.retrieval = ml_collections.ConfigDict(dict(
      mode='none', k=8, temperature=1.0, chunk_len=16, stride=0,
      metric='', store='host', tune='none', lambdas='', ks=''))
  c.retrieval['lambda'] = 0.25
  c.eval_every = 10
  c.eval_train = False      # also evaluate the global model on all train data
  c.eval_batch_size = 64
  c.eval_clients_per_chunk = 32
  c.checkpoint_every = 10
  c.progress = True
  return c


# -- checks before anything is loaded -------------------------------------------

def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, (int, np.integer)) and not isinstance(
      v, bool) and v >= low), f'>= {low}'


def _fraction(closed_high: bool) -> tuple[Callable[[Any], bool], str]:
  if closed_high:
    return (lambda v: 0.0 <= v <= 1.0), 'a number in [0, 1]'
  return (lambda v: 0.0 <= v < 1.0), 'a number in [0, 1)'


_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0.0,
                 'a finite number >= 0')
_POSITIVE = (lambda v: math.isfinite(v) and v > 0.0, 'a finite number > 0')
_OPTIONAL_POSITIVE_INT = (
    lambda v: v is None or _int_at_least(1)[0](v), '>= 1 or None')

# key -> (accepts(value), what is accepted). Checked by `check`, in order,
# before data loading; checks that need the data are `training.validate`'s.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # jax.random.key keeps a seed's low 32 bits (without jax_enable_x64):
    # seeds 0 and 2**32 would be the same run.
    'seed': (lambda v: _int_at_least(0)[0](v) and v < 2**32,
             'an integer in [0, 2**32)'),
    'rounds': _int_at_least(1),
    'clients_per_round': _int_at_least(1),
    'eval_every': _int_at_least(1),
    'checkpoint_every': _int_at_least(1),
    'eval_batch_size': _int_at_least(1),
    'eval_clients_per_chunk': _int_at_least(1),
    'client.batch_size': _int_at_least(1),
    'client.epochs': _int_at_least(1),
    'client.max_steps': _OPTIONAL_POSITIVE_INT,
    'client.momentum': _fraction(closed_high=False),
    'client.proximal_mu': _NON_NEGATIVE,
    'server.momentum': _fraction(closed_high=False),
    'server.b1': _fraction(closed_high=False),
    'server.b2': _fraction(closed_high=False),
    'server.tau': _POSITIVE,
    'stragglers.fraction': _fraction(closed_high=True),
    'data.seq_len': _int_at_least(1),
    'data.min_chars': _int_at_least(0),
    'data.num_clients': _int_at_least(1),
    'data.min_examples': _int_at_least(0),
    'data.max_examples': _OPTIONAL_POSITIVE_INT,
    'data.max_clients': _OPTIONAL_POSITIVE_INT,
    'data.val_fraction': _fraction(closed_high=False),
    'data.test_fraction': _fraction(closed_high=False),
    'data.heldout_fraction': _fraction(closed_high=False),
    'data.num_negatives': _int_at_least(1),
    'data.eval_negatives': _int_at_least(1),
    'data.top_k': _int_at_least(1),
    'peft.rank': _int_at_least(1),
    'peft.dropout': _fraction(closed_high=False),
    'personalization.head_epochs': _int_at_least(1),
    'personalization.finetune_epochs': _int_at_least(0),
    'personalization.local_epochs': _int_at_least(0),
    'personalization.num_clusters': _int_at_least(1),
    'personalization.pfedme_inner_steps': _int_at_least(1),
    'personalization.hurt_margin': _NON_NEGATIVE,
    'evaluation.alpha': ((lambda v: 0.0 < v < 1.0), 'a number in (0, 1)'),
    'evaluation.bootstrap_resamples': _int_at_least(1),
    'evaluation.base_task_examples': _int_at_least(1),
    'evaluation.erosion_margin': _NON_NEGATIVE,
    'evaluation.probe_clients': _int_at_least(0),
    'evaluation.canaries.num': _int_at_least(0),
    'evaluation.canaries.repeats': _int_at_least(1),
    'evaluation.canaries.digits': _int_at_least(1),
    'evaluation.canaries.candidates': _int_at_least(1),
    'execution.devices': _int_at_least(0),
    'execution.pack_lanes': _int_at_least(0),
    'execution.chunk_size': _OPTIONAL_POSITIVE_INT,
    'attack.fraction': _fraction(closed_high=True),
    'attack.seed': _int_at_least(0),
    'devices.seed': _int_at_least(0),
    'attack.probe_examples': _int_at_least(1),
    'aggregator.f': _int_at_least(-1),
    'aggregator.multi_krum_m': _int_at_least(0),
    'aggregator.iterations': _int_at_least(1),
    'aggregator.bucket_size': _int_at_least(1),
    'aggregator.nu': _POSITIVE,
    'aggregator.tau': _POSITIVE,
    'aggregator.norm_bound': _POSITIVE,
}

# Learning rates are positive (the optimizers say so when they are built) and
# must be float32 numbers: 1e39 becomes inf in the round.
LEARNING_RATES = ('client.learning_rate', 'server.learning_rate',
                  'personalization.pfedme_personal_lr')


def get(config, key: str):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def check(config) -> None:
  """Refuses a value no run can use, naming the option, the value and what
  is accepted, and an option that does not exist, naming the nearest one.
  Runs before the data is loaded and before any tracing."""
  known = dict(_leaves(to_json(default_config())))
  for key, _ in _leaves(to_json(config)):
    if key not in known and not any(
        key == b or key.startswith(b + '.') for b in OPEN_BLOCKS):
      near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
      hint = f'; did you mean {near[0]}?' if near else '.'
      raise ValueError(
          f'unknown option {key}{hint} Every option is in '
          'fedjax_pfi/config.py:default_config(); new keys are accepted only '
          f'under {" and ".join(OPEN_BLOCKS)}.')
  for key, (accepts, accepted) in CHECKS.items():
    value = get(config, key)
    try:
      ok = bool(accepts(value))
    except TypeError:  # e.g. a string where a number belongs
      ok = False
    if not ok:
      raise ValueError(f'{key} must be {accepted}, got {value!r}.')
  if get(config, 'execution.client_store') not in ('device', 'host'):
    raise ValueError(
        "execution.client_store must be 'device' or 'host', got "
        f"{get(config, 'execution.client_store')!r}.")
  if get(config, 'server.weighting') not in ('', 'examples', 'uniform'):
    raise ValueError(
        f"server.weighting must be '', 'examples' or 'uniform', got "
        f"{get(config, 'server.weighting')!r}.")
  privacy.check(config)
  check_robust(config)
  from fedjax_pfi import retrieval  # pylint: disable=g-import-not-at-top
  retrieval.check_config(config.retrieval)
  compression.from_config(config)
  devices.check(config)
  asynchrony.check(config)
  if get(config, 'evaluation.private_mechanism') not in (
      'gaussian', 'randomized_response'):
    raise ValueError(
        "evaluation.private_mechanism must be 'gaussian' or "
        f"'randomized_response', got "
        f"{get(config, 'evaluation.private_mechanism')!r}.")
  from fedjax_pfi import trust  # pylint: disable=g-import-not-at-top
  trust.parse_epsilons(get(config, 'evaluation.private_epsilons'))
  for key in LEARNING_RATES:
    value = float(get(config, key))
    if value > 0 and not (math.isfinite(value) and value <= FLOAT32_MAX):
      raise ValueError(
          f'{key}={value!r} does not fit float32 (the largest float32 is '
          f'{FLOAT32_MAX:.4g}): every step would be inf or NaN. Choose a '
          'finite learning rate.')
  for key in ('data.path', 'data.leaf_dir'):
    value = get(config, key)
    if value is not None and not os.path.exists(str(value)):
      raise FileNotFoundError(
          f'{key}={value!r} does not exist (data.name='
          f'{get(config, "data.name")!r}).')
  pretrained = get(config, 'model.pretrained')
  if pretrained is not None and not os.path.exists(pretrained):
    raise FileNotFoundError(
        f'model.pretrained={pretrained!r} does not exist: give a Hugging Face '
        'checkpoint directory (config.json + model.safetensors), or pretrain '
        'the embedded foundation model with `python -m experiments.pretrain '
        '--config=experiments/configs/pretrain_shakespeare.py --workdir=DIR` '
        '(it writes DIR/model).')
  if pretrained is not None and not os.path.isfile(
      os.path.join(pretrained, 'config.json')):
    raise FileNotFoundError(
        f'model.pretrained={pretrained!r} has no config.json: expected a '
        'Hugging Face checkpoint directory (config.json + model.safetensors '
        'or its shards).')


def check_robust(config) -> None:
  """``aggregator.*`` and ``attack.*`` (`robust.check`, `attacks.check`),
  and the combinations no round runs: a robust aggregator (or an attack
  that sees the round's messages) with DP or secure aggregation."""
  from fedjax_pfi import attacks  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import robust  # pylint: disable=g-import-not-at-top
  attacks.check(config)
  name = str(get(config, 'attack.name'))
  fraction = float(get(config, 'attack.fraction'))
  n = int(get(config, 'clients_per_round'))
  spec = robust.from_config(config, n, 'examples')
  robust.check(spec, n, fraction)
  if not buffered(config):
    return
  why = (f'aggregator.name={spec.name!r}' if spec.name != 'mean' else
         f'aggregator.pre={spec.pre!r}' if spec.pre != 'none' else
         f'attack.name={name!r} (it sees every message of the round)')
  if get(config, 'secure_aggregation.enabled'):
    raise ValueError(
        f'{why} needs every client\'s message, and secure aggregation hides '
        'them: the server sees only their sum. Turn one of them off '
        '(secure_aggregation.enabled=False, or aggregator.name=mean, '
        "aggregator.pre=none and an attack that is not 'alie' or 'ipm').")
  if get(config, 'privacy.mechanism') != 'none':
    raise ValueError(
        f'{why} with privacy.mechanism='
        f'{get(config, "privacy.mechanism")!r}: DP-FedAvg calibrates its '
        'noise to the sum of clipped messages, and a robust aggregate has '
        'another sensitivity; run robust aggregation without DP.')


def buffered(config) -> bool:
  """Whether the round aggregates a buffer of every message: a robust
  aggregator or pre-aggregator, or an attack that reads the round."""
  from fedjax_pfi import attacks  # pylint: disable=g-import-not-at-top
  return (str(get(config, 'aggregator.name')) != 'mean' or
          str(get(config, 'aggregator.pre')) != 'none' or
          str(get(config, 'attack.name')) in attacks.IN_ROUND)


# -- comparing configs ------------------------------------------------------------

def to_json(config_or_dict) -> dict:
  """The config as plain JSON values (tuples become lists), as it is stored
  in checkpoints and ``config.json``."""
  d = config_or_dict.to_dict() if hasattr(config_or_dict, 'to_dict') \
      else config_or_dict
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def _leaves(d: dict, prefix: str = '') -> Iterator[tuple[str, Any]]:
  for k, v in d.items():
    if isinstance(v, dict) and v:
      yield from _leaves(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def _filled(d: dict) -> dict:
  """``d``'s leaves over the defaults': a key ``d`` lacks (a config written
  before that option existed) holds its default."""
  return {**dict(_leaves(to_json(default_config()))), **dict(_leaves(d))}


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
  return any(key == i or key.startswith(i + '.') for i in ignore)


def diff(old: dict, new: dict,
         ignore: tuple[str, ...] = RESUMABLE_KEYS + REPORT_KEYS
         ) -> list[tuple[str, Any, Any]]:
  """``[(key, old value, new value)]`` for every key on which two configs
  (`to_json` form) differ, keys under ``ignore`` left out. A key one side
  lacks holds its default there (an option added since the other was
  written); one that is not an option at all shows ``'(absent)'``."""
  a, b = _filled(to_json(old)), _filled(to_json(new))
  return [(k, a.get(k, '(absent)'), b.get(k, '(absent)'))
          for k in sorted(set(a) | set(b))
          if not _ignored(k, ignore) and
          a.get(k, '(absent)') != b.get(k, '(absent)')]


def non_default(config) -> dict:
  """``{key: value}`` of the leaves that differ from `default_config`'s,
  resumable keys left out: what a run's fingerprint covers, so that adding
  an option with a default changes no existing run's fingerprint."""
  return {k: b for k, _, b in diff(default_config(), config)}


def _restricted(d: dict, like: dict) -> dict:
  """``d`` with only the keys ``like`` has (recursively; a block ``like``
  holds whole, such as ``model.kwargs``, is kept whole)."""
  out = {}
  for k, v in d.items():
    if k not in like:
      continue
    if isinstance(v, dict) and isinstance(like[k], dict) and like[k]:
      out[k] = _restricted(v, like[k])
    else:
      out[k] = v
  return out


def legacy_fingerprint_dict(config, written: Optional[dict] = None) -> dict:
  """What checkpoints written before `non_default` fingerprinted: the whole
  config minus the resumable keys, restricted to the keys of the config
  that was ``written`` (its ``config.json``), so options added since do not
  count."""
  d = to_json(config)
  if written is not None:
    d = _restricted(d, to_json(written))
  for k in RESUMABLE_KEYS:
    d.pop(k, None)
  return d
