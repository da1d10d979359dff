"""Algorithms by name, as the entry point's configs name them.

``build(config, base_model, num_clients)`` returns the algorithm, the model
it trains and the function that makes its initial params. Names:

- ``fedavg``, ``fedprox``: the FedAvg family (every parameter trained; with
  a pretrained model this is full fine-tuning);
- ``scaffold``: SCAFFOLD with per-client control variates;
- ``fedit``, ``ffa_lora``, ``fedsa_lora``, ``local_lora``: LoRA on a frozen
  base (`partitioned`), the adapters averaged, only ``B`` averaged over a
  frozen random ``A``, ``A`` averaged and ``B`` personal, or personal only;
- ``flora``, ``hetlora``: heterogeneous client ranks (`hetero_lora`);
- personalized (`personalized`): ``local_only``, ``fedavg_ft`` (FedAvg, then
  every client fine-tunes at evaluation), ``fedper`` (head personal),
  ``lg_fedavg`` (body personal), ``fedrep`` (head personal, trained first),
  ``fedbabu`` (head frozen at its random init; fine-tuned at evaluation),
  ``ditto`` (a personal model beside the global one), ``apfl`` (a personal
  model mixed with the global one by a learned weight), ``pfedme`` (Moreau
  envelopes), ``perfedavg_fo`` / ``perfedavg_hf`` (Per-FedAvg, first-order
  or Hessian-free), ``ifca`` / ``hypcluster`` (k cluster models);
- ``fedrap``: FedRAP's additive item views for recommendation
  (`algorithms.fedrap`; model ``additive_mf``); its user embedding steps with
  ``client.learning_rate`` and its item tables with that times their
  ``client.lr_scales`` factor.

Personalization options live in ``config.personalization``: ``head`` (regex
of the head's leaves; default the model's last layer), ``head_epochs``
(FedRep: of ``client.epochs``, those that train the head),
``ditto_lambda``, ``apfl_alpha`` (initial mixing weight), ``pfedme_lambda``,
``pfedme_inner_steps``, ``pfedme_personal_lr`` (0: client lr),
``perfedavg_alpha`` (the inner step), ``num_clusters``, ``fedrap_lambda``,
``fedrap_mu``, ``fedrap_weight_decay``,
``fedrap_lr_decay`` (per round), ``fedrap_step_decay`` (per local step),
``fedrap_curriculum`` (``'tanh'`` or ``'fixed'``), ``finetune_epochs``
(evaluation-time fine-tuning and held-out adaptation), ``local_epochs``
(the in-run local-only baseline; 0 off) and ``hurt_margin``.

LoRA options live in ``config.peft``: ``rank``, ``alpha``, ``dropout``,
``target`` (regex over ``nn.Dense`` paths), ``mode``, ``client_ranks``
(comma-separated ranks drawn per client, for ``flora``/``hetlora``; empty
means every client has ``rank``; the largest must equal ``rank``),
``prune_gamma``, ``prune_lambda`` (HetLoRA's self-pruning). Options an
algorithm does not use are refused rather than ignored.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from fedjax_pfi.algorithms import aggregators as aggregators_lib
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import clustered
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import fedavg
from fedjax_pfi.algorithms import fedrap
from fedjax_pfi.algorithms import hetero_lora
from fedjax_pfi.algorithms import meta_mixed
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import partitioned
from fedjax_pfi.algorithms import personalized
from fedjax_pfi.algorithms import scaffold
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.models import base
from fedjax_pfi.peft import lora

# (frozen, personal) regexes over the params {'base': ..., 'lora': ...}.
LORA_PARTITIONS = {
    'fedit': (r'^base/', None),
    'ffa_lora': (r'^base/|^lora/.*/a$', None),
    'fedsa_lora': (r'^base/', r'^lora/.*/b$'),
    'local_lora': (r'^base/', r'^lora/'),
}
HETERO_LORA = ('flora', 'hetlora')


class Built(NamedTuple):
  algorithm: core.FederatedAlgorithm
  model: base.Model            # what the clients train
  init_params: Callable[[Any], Any]  # key -> the params `algorithm.init` takes


class Context(NamedTuple):
  """What every builder reads: the config and what is built from it."""
  config: Any
  base_model: base.Model
  num_clients: int
  execution: core.Execution
  server: Any            # the server optimizer
  unroll: Any
  aggregator: Any        # None: the algorithm's own (the weighted mean)
  transform: Any = None  # a `rounds.ClientTransform`, or None

  def client_optimizer(self):
    cl = self.config.client
    return client_updates.client_optimizer(
        cl.optimizer, cl.learning_rate, momentum=cl.momentum,
        lr_scales=cl.lr_scales)


def parse_unroll(value) -> int | bool:
  """``client.unroll``: ``'full'`` unrolls every local step, ``'K'`` K of them."""
  value = str(value)
  if value == 'full':
    return True
  if value.isdigit() and int(value) >= 1:
    return int(value)
  raise ValueError(f"client.unroll must be 'full' or a positive integer, got "
                   f'{value!r}.')


def lora_config(peft) -> lora.LoraConfig:
  return lora.LoraConfig(rank=int(peft.rank), alpha=float(peft.alpha),
                         dropout=float(peft.dropout), target=str(peft.target),
                         mode=str(peft.mode))


def client_ranks(peft, num_clients: int, seed: int) -> np.ndarray:
  """Each client's rank: drawn from ``peft.client_ranks``, or ``peft.rank``."""
  spec = str(peft.client_ranks or '').strip()
  if not spec:
    return np.full(num_clients, int(peft.rank), np.int32)
  try:
    ranks = [int(r) for r in spec.split(',')]
  except ValueError:
    ranks = []
  if not ranks or min(ranks) < 1:
    raise ValueError(f"peft.client_ranks must be comma-separated positive "
                     f"ints such as '2,4,8', got {spec!r}.")
  if max(ranks) != int(peft.rank):
    raise ValueError(
        f'peft.client_ranks={spec!r} reaches rank {max(ranks)} but peft.rank='
        f'{peft.rank}; set peft.rank to the largest client rank (every client '
        'is allocated it, the extra components zeroed).')
  return lora.assign_ranks(num_clients, ranks, seed)


# -- the builders, one per family ------------------------------------------------


def _fedavg(name: str, ctx: Context) -> Built:
  cl = ctx.config.client
  alg = fedavg.fed_opt(ctx.base_model, ctx.client_optimizer(), ctx.server,
                       ctx.aggregator, transform=ctx.transform,
                       proximal_mu=cl.proximal_mu, unroll=ctx.unroll,
                       execution=ctx.execution, num_clients=ctx.num_clients,
                       name=name)
  return Built(alg, ctx.base_model, ctx.base_model.init)


def _scaffold(name: str, ctx: Context) -> Built:
  alg = scaffold.scaffold(ctx.base_model, ctx.config.client.learning_rate,
                          ctx.server, ctx.num_clients, unroll=ctx.unroll)
  return Built(alg, ctx.base_model, ctx.base_model.init)


def _lora_partition(name: str, ctx: Context) -> Built:
  model = lora.lora_model(ctx.base_model, lora_config(ctx.config.peft))
  frozen, personal = LORA_PARTITIONS[name]
  alg = partitioned.fed_partitioned(
      model, ctx.client_optimizer(), ctx.server, ctx.aggregator,
      transform=ctx.transform, frozen=frozen,
      personal=personal, num_clients=ctx.num_clients, unroll=ctx.unroll,
      execution=ctx.execution, federated=name != 'local_lora', name=name)
  return Built(alg, model, model.init)


def _flora(name: str, ctx: Context) -> Built:
  cfg = lora_config(ctx.config.peft)
  ranks = client_ranks(ctx.config.peft, ctx.num_clients, ctx.config.seed)
  alg = hetero_lora.flora(ctx.base_model, cfg, ctx.client_optimizer(),
                          ctx.server, ranks, unroll=ctx.unroll)
  return Built(alg, ctx.base_model, ctx.base_model.init)


def _hetlora(name: str, ctx: Context) -> Built:
  peft = ctx.config.peft
  cfg = lora_config(peft)
  ranks = client_ranks(peft, ctx.num_clients, ctx.config.seed)
  model = lora.lora_model(ctx.base_model, cfg)
  alg = hetero_lora.hetlora(
      model, cfg, ctx.client_optimizer(), ctx.server, ranks,
      prune_gamma=float(peft.prune_gamma),
      prune_lambda=float(peft.prune_lambda), unroll=ctx.unroll)
  return Built(alg, model, model.init)


def _ditto(name: str, ctx: Context) -> Built:
  alg = personalized.ditto(
      ctx.base_model, ctx.client_optimizer(), ctx.server, ctx.num_clients,
      lam=float(ctx.config.personalization.ditto_lambda), unroll=ctx.unroll,
      aggregator=ctx.aggregator, transform=ctx.transform)
  return Built(alg, ctx.base_model, ctx.base_model.init)


def _meta_mixed(name: str, ctx: Context) -> Built:
  pc, lr = ctx.config.personalization, float(ctx.config.client.learning_rate)
  m, agg = ctx.base_model, ctx.aggregator
  if name == 'apfl':
    alg = meta_mixed.apfl(m, lr, ctx.server, ctx.num_clients,
                          alpha=float(pc.apfl_alpha), aggregator=agg)
  elif name == 'pfedme':
    alg = meta_mixed.pfedme(
        m, lr, ctx.server, ctx.num_clients, lam=float(pc.pfedme_lambda),
        inner_steps=int(pc.pfedme_inner_steps),
        personal_lr=float(pc.pfedme_personal_lr) or lr, aggregator=agg)
  else:
    alg = meta_mixed.per_fedavg(
        m, lr, ctx.server, alpha=float(pc.perfedavg_alpha),
        hessian_free=name == 'perfedavg_hf', aggregator=agg, name=name)
  return Built(alg, m, m.init)


def _fedrap(name: str, ctx: Context) -> Built:
  pc, cl = ctx.config.personalization, ctx.config.client
  lr = float(cl.learning_rate)
  scales = client_updates.parse_lr_scales(cl.lr_scales)
  item_lr = {client_updates.lr_scale(scales, f'{k}/embedding')
             for k in ('personal_items', 'global_items')}
  if len(item_lr) > 1:
    raise ValueError(
        f'client.lr_scales={cl.lr_scales!r} gives the two item tables '
        'different steps; FedRAP steps both with one item lr.')
  if client_updates.lr_scale(scales, 'score/kernel') != 1.0:
    raise ValueError(
        f'client.lr_scales={cl.lr_scales!r} scales the user embedding; its '
        'step is client.learning_rate.')
  alg = fedrap.fedrap(
      ctx.base_model, ctx.server, ctx.num_clients, lr=lr,
      item_lr=lr * item_lr.pop(), lam=float(pc.fedrap_lambda),
      mu=float(pc.fedrap_mu), weight_decay=float(pc.fedrap_weight_decay),
      lr_decay=float(pc.fedrap_lr_decay),
      step_decay=float(pc.fedrap_step_decay),
      curriculum=str(pc.fedrap_curriculum), aggregator=ctx.aggregator)
  fedrap.split(jax.eval_shape(ctx.base_model.init, jax.random.key(0)))
  return Built(alg, ctx.base_model, ctx.base_model.init)


def _ifca(name: str, ctx: Context) -> Built:
  k = int(ctx.config.personalization.num_clusters)
  init = clustered.stack_inits(ctx.base_model.init, k)
  alg = clustered.ifca(ctx.base_model, ctx.client_optimizer(), ctx.server,
                       ctx.num_clients, num_clusters=k, unroll=ctx.unroll,
                       aggregator=ctx.aggregator, name=name)
  return Built(alg, ctx.base_model, init)


def _partition(name: str, ctx: Context) -> Built:
  """The personalized algorithms that are partitions (`personalized`)."""
  m, opt = ctx.base_model, ctx.client_optimizer()
  shapes = jax.eval_shape(m.init, jax.random.key(0))
  pc = ctx.config.personalization
  head = str(pc.head or '') or personalized.head_pattern(m, shapes)
  param_groups.split(shapes, head)  # a head that matches nothing fails here
  kw = dict(num_clients=ctx.num_clients, unroll=ctx.unroll,
            execution=ctx.execution, transform=ctx.transform, name=name)
  def fed(**more):
    return partitioned.fed_partitioned(
        m, opt, ctx.server, ctx.aggregator, **kw, **more)
  if name == 'fedavg_ft':
    alg = fed(finetune='trainable')
  elif name == 'fedbabu':
    alg = fed(frozen=head, finetune='all')
  elif name == 'local_only':
    alg = fed(personal='.', has_global_model=False, federated=False)
  elif name == 'fedper':
    alg = fed(personal=head, has_global_model=False)
  elif name == 'lg_fedavg':
    alg = fed(personal=personalized.body_pattern(head), has_global_model=False)
  else:  # fedrep
    alg = fed(personal=head, has_global_model=False,
              client_train=personalized.fedrep_training(
                  m, opt, head_epochs=int(pc.head_epochs),
                  epochs=int(ctx.config.client.epochs), unroll=ctx.unroll))
  return Built(alg, m, m.init)


BUILDERS: dict[str, Callable[[str, Context], Built]] = {
    'fedavg': _fedavg, 'fedprox': _fedavg, 'scaffold': _scaffold,
    **{n: _lora_partition for n in LORA_PARTITIONS},
    'flora': _flora, 'hetlora': _hetlora,
    **{n: _partition for n in ('local_only', 'fedavg_ft', 'fedper',
                               'lg_fedavg', 'fedrep', 'fedbabu')},
    'ditto': _ditto,
    **{n: _meta_mixed for n in ('apfl', 'pfedme', 'perfedavg_fo',
                                'perfedavg_hf')},
    'ifca': _ifca, 'hypcluster': _ifca, 'fedrap': _fedrap,
}
ALGORITHMS = tuple(BUILDERS)


def check(config, alg: core.FederatedAlgorithm,
          execution: core.Execution) -> None:
  """Refuses, by name and before tracing, what ``alg``'s capabilities
  (`core.Capabilities`) rule out for ``config``."""
  name, caps = alg.name, alg.capabilities
  lanes = int(config.get('execution', {}).get('pack_lanes', 0) or 0)
  if ((execution.chunk_size is not None and not caps.chunked) or
      (execution.mesh is not None and not caps.sharded) or
      (lanes and not caps.packed and not caps.chunked)):
    raise ValueError(
        f'algorithm {name!r} runs on one device, unchunked and unpacked (its '
        'server step needs every client\'s update, not only their weighted '
        'sum); execution.* options work with the algorithms whose round sums '
        'the clients\' messages: the FedAvg family, the LoRA partitions and '
        'the personalized partitions.')
  if lanes and not caps.packed:
    raise ValueError(
        f'algorithm {name!r} keeps personal state per client, which packed '
        'lanes do not carry; set execution.pack_lanes=0 (chunking and '
        'sharding work).')
  where = config.get('execution', {}).get('client_store', 'device')
  if where == 'host' and caps.personal_state and not caps.host_store:
    raise ValueError(
        f"execution.client_store='host': algorithm {name!r} reads its "
        'per-client store by client id inside the round; the host store '
        'serves the LoRA and personalized partitions (fedsa_lora, '
        "local_lora, fedper, ...). Use execution.client_store='device'.")
  if where == 'host' and str(config.get('asynchrony', {}).get(
      'mode', 'sync')) != 'sync':
    raise ValueError(
        "execution.client_store='host' runs synchronous rounds only; got "
        f"asynchrony.mode={config.asynchrony.mode!r}.")
  cl = config.client
  if caps.plain_sgd and (cl.optimizer != 'sgd' or cl.momentum):
    raise ValueError(f'{name} {caps.plain_sgd}; got client optimizer '
                     f'{cl.optimizer!r} with momentum {cl.momentum}.')
  if not caps.lr_scales and cl.lr_scales:
    raise ValueError(f'client.lr_scales={cl.lr_scales!r}: {name} takes one '
                     "step size for every leaf; set client.lr_scales=''.")


def build(config, base_model: base.Model, num_clients: int,
          execution: core.Execution = core.Execution(),
          aggregator: aggregators_lib.Aggregator | None = None,
          transform=None) -> Built:
  """The algorithm a config names (errors before any tracing).

  ``aggregator``: combines the federated part's messages (None: the
  algorithm's own, the weighted mean); `check` refuses it for an
  algorithm that does not aggregate deltas a DP aggregator could protect.
  ``transform``: a `rounds.ClientTransform` of each client's message
  (the rounds that sum messages chunk by chunk take one).
  """
  name = config.algorithm
  if name not in BUILDERS:
    raise ValueError(f'unknown algorithm {name!r}; accepted: '
                     f'{", ".join(ALGORITHMS)}.')
  cl, sv = config.client, config.server
  if name != 'fedprox' and cl.proximal_mu:
    raise ValueError(
        f'client.proximal_mu={cl.proximal_mu} is FedProx; set '
        "--config.algorithm=fedprox (or proximal_mu=0).")
  if str(config.peft.client_ranks or '') and name not in HETERO_LORA:
    raise ValueError(
        f'peft.client_ranks={config.peft.client_ranks!r} gives clients '
        f'different ranks, which only {", ".join(HETERO_LORA)} support; '
        f'algorithm {name!r} gives every client rank {config.peft.rank}.')
  if config.peft.prune_lambda and name != 'hetlora':
    raise ValueError(f'peft.prune_lambda={config.peft.prune_lambda} is '
                     f"HetLoRA's self-pruning; algorithm {name!r} has none.")
  server = server_optimizers.server_optimizer(
      sv.optimizer, sv.learning_rate, momentum=sv.momentum, b1=sv.b1,
      b2=sv.b2, tau=sv.tau)
  ctx = Context(config, base_model, num_clients, execution, server,
                parse_unroll(cl.unroll), aggregator, transform)
  built = BUILDERS[name](name, ctx)  # builds; nothing is traced yet
  if transform is not None and not built.algorithm.capabilities.transforms:
    raise ValueError(
        f'algorithm {name!r} takes no per-client transform: its round does '
        "not pass the clients' messages through one (the rounds built on "
        '`partitioned.fed_partitioned` do: FedAvg, FedProx, the LoRA '
        'partitions, FedPer, FedRep, LG-FedAvg, FedBABU; and Ditto).')
  check(config, built.algorithm, execution)
  spec = None if aggregator is None else aggregator.compression
  if spec is not None and not (built.algorithm.capabilities.transforms and
                               built.algorithm.capabilities.private):
    raise ValueError(
        f'compression.name={spec.compressor.name!r} cannot be used with '
        f'algorithm {name!r}: its round does not send one message per client '
        "through the aggregator's client step (the rounds built on "
        '`partitioned.fed_partitioned` do: FedAvg, FedProx, FedOpt, FedIT, '
        'FFA-LoRA, FedSA-LoRA, FedPer, FedRep, LG-FedAvg, FedBABU; and '
        'Ditto).')
  if spec is not None and (spec.error_feedback or spec.download) and not \
      built.algorithm.capabilities.compression_state:
    raise ValueError(
        f'compression.error_feedback={spec.error_feedback} and compression.'
        f'download={spec.download}: algorithm {name!r} keeps no residual per '
        'client and broadcasts its model uncompressed (the rounds built on '
        '`partitioned.fed_partitioned` do both); use compression.name alone.')
  if (aggregator is not None and aggregator.secure is not None and
      not built.algorithm.capabilities.secure_aggregation):
    raise ValueError(
        f'secure aggregation cannot be used with algorithm {name!r}: its '
        'round does not send every message through the aggregator (the '
        'rounds built on `partitioned.fed_partitioned` do: FedAvg, FedProx, '
        'FedOpt, the LoRA partitions, FedPer, FedRep, LG-FedAvg, FedBABU).')
  if (aggregator is not None and aggregator.needs == 'all' and
      not built.algorithm.capabilities.robust_aggregation):
    raise ValueError(
        f'aggregator {aggregator.name!r} needs every client\'s message, which '
        f'the round of algorithm {name!r} does not collect (the rounds built '
        'on `partitioned.fed_partitioned` do: FedAvg, FedProx, FedOpt, the '
        'LoRA partitions, FedPer, FedRep, LG-FedAvg, FedBABU; and Ditto).')
  if aggregator is not None and not built.algorithm.capabilities.private:
    raise ValueError(
        f'aggregator {aggregator.name!r} cannot be used with algorithm '
        f'{name!r}: it aggregates no federated part whose client deltas the '
        'aggregator sees (it sends nothing, or combines its clients\' '
        'updates its own way).')
  return built
