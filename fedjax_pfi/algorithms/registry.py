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
- ``fedrap``: FedRAP's additive item views for recommendation (`fedrap`;
  model ``additive_mf``); its user embedding steps with
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
# Personalized FL (`personalized`); those keeping per-client state:
PERSONAL_STATE = ('local_only', 'fedper', 'lg_fedavg', 'fedrep', 'ditto',
                  'apfl', 'pfedme', 'fedrap')
# Their own rounds (not partitions): one device, unchunked, unpacked.
OWN_ROUNDS = ('ditto', 'apfl', 'pfedme', 'perfedavg_fo', 'perfedavg_hf',
              'ifca', 'hypcluster', 'fedrap')
PLAIN_SGD = ('apfl', 'pfedme', 'perfedavg_fo', 'perfedavg_hf', 'fedrap')
PERSONALIZED = (('fedavg_ft', 'fedbabu') + PERSONAL_STATE +
                ('perfedavg_fo', 'perfedavg_hf', 'ifca', 'hypcluster'))
ALGORITHMS = (('fedavg', 'fedprox', 'scaffold') + tuple(LORA_PARTITIONS) +
              HETERO_LORA + PERSONALIZED)


class Built(NamedTuple):
  algorithm: core.FederatedAlgorithm
  model: base.Model            # what the clients train
  init_params: Callable[[Any], Any]  # key -> the params `algorithm.init` takes


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


# Algorithms whose rounds run chunked, packed or sharded (`core.Execution`):
# the rest aggregate something other than a weighted sum of deltas.
SCALABLE = (('fedavg', 'fedprox') + tuple(LORA_PARTITIONS) +
            tuple(n for n in PERSONALIZED if n not in OWN_ROUNDS))


def build(config, base_model: base.Model, num_clients: int,
          execution: core.Execution = core.Execution()) -> Built:
  """The algorithm a config names (errors before any tracing)."""
  name = config.algorithm
  if name not in ALGORITHMS:
    raise ValueError(f'unknown algorithm {name!r}; accepted: '
                     f'{", ".join(ALGORITHMS)}.')
  if name not in SCALABLE and (execution != core.Execution() or int(
      config.get('execution', {}).get('pack_lanes', 0) or 0)):
    raise ValueError(
        f'algorithm {name!r} runs on one device, unchunked and unpacked (its '
        'server step needs every client\'s update, not only their weighted '
        f'sum); execution.* options work with {", ".join(SCALABLE)}.')
  personal = (name in LORA_PARTITIONS and LORA_PARTITIONS[name][1] is not None
              or name in PERSONAL_STATE)
  if personal and int(config.get('execution', {}).get('pack_lanes', 0) or 0):
    raise ValueError(
        f'algorithm {name!r} keeps personal state per client, which packed '
        'lanes do not carry; set execution.pack_lanes=0 (chunking and '
        'sharding work).')
  cl, sv = config.client, config.server
  server = server_optimizers.server_optimizer(
      sv.optimizer, sv.learning_rate, momentum=sv.momentum, b1=sv.b1,
      b2=sv.b2, tau=sv.tau)
  unroll = parse_unroll(cl.unroll)
  if name == 'scaffold':
    if cl.optimizer != 'sgd' or cl.momentum:
      raise ValueError(
          'scaffold needs plain client SGD (its control-variate update divides'
          f' by K * lr); got client optimizer {cl.optimizer!r} with momentum '
          f'{cl.momentum}.')
    alg = scaffold.scaffold(base_model, cl.learning_rate, server, num_clients,
                            unroll=unroll)
    return Built(alg, base_model, base_model.init)
  if name != 'fedprox' and cl.proximal_mu:
    raise ValueError(
        f'client.proximal_mu={cl.proximal_mu} is FedProx; set '
        "--config.algorithm=fedprox (or proximal_mu=0).")
  opt = client_updates.client_optimizer(cl.optimizer, cl.learning_rate,
                                        momentum=cl.momentum,
                                        lr_scales=cl.lr_scales)
  if name in PERSONALIZED:
    return _personalized(name, config, base_model, opt, server, num_clients,
                         unroll, execution)
  if name in ('fedavg', 'fedprox'):
    alg = fedavg.fed_opt(base_model, opt, server, proximal_mu=cl.proximal_mu,
                         unroll=unroll, execution=execution, name=name)
    return Built(alg, base_model, base_model.init)
  cfg = lora_config(config.peft)
  if str(config.peft.client_ranks or '') and name not in HETERO_LORA:
    raise ValueError(
        f'peft.client_ranks={config.peft.client_ranks!r} gives clients '
        f'different ranks, which only {", ".join(HETERO_LORA)} support; '
        f'algorithm {name!r} gives every client rank {cfg.rank}.')
  if config.peft.prune_lambda and name != 'hetlora':
    raise ValueError(f'peft.prune_lambda={config.peft.prune_lambda} is '
                     f"HetLoRA's self-pruning; algorithm {name!r} has none.")
  if name in LORA_PARTITIONS:
    model = lora.lora_model(base_model, cfg)
    frozen, personal = LORA_PARTITIONS[name]
    alg = partitioned.fed_partitioned(
        model, opt, server, frozen=frozen, personal=personal,
        num_clients=num_clients, unroll=unroll, execution=execution,
        name=name)
    return Built(alg, model, model.init)
  ranks = client_ranks(config.peft, num_clients, config.seed)
  if name == 'flora':
    alg = hetero_lora.flora(base_model, cfg, opt, server, ranks,
                            unroll=unroll)
    return Built(alg, base_model, base_model.init)
  model = lora.lora_model(base_model, cfg)
  alg = hetero_lora.hetlora(
      model, cfg, opt, server, ranks,
      prune_gamma=float(config.peft.prune_gamma),
      prune_lambda=float(config.peft.prune_lambda), unroll=unroll)
  return Built(alg, model, model.init)


def _personalized(name, config, base_model, opt, server, num_clients, unroll,
                  execution) -> Built:
  """The personalized algorithms (`personalized`) on the base model."""
  pc = config.personalization
  cl = config.client
  if name in PLAIN_SGD and (cl.optimizer != 'sgd' or cl.momentum):
    raise ValueError(
        f'{name} takes the paper\'s plain SGD steps (client.learning_rate is '
        f'its step size); got client optimizer {cl.optimizer!r} with '
        f'momentum {cl.momentum}.')
  if name in PLAIN_SGD and name != 'fedrap' and cl.lr_scales:
    raise ValueError(f'client.lr_scales={cl.lr_scales!r}: {name} takes one '
                     "step size for every leaf; set client.lr_scales=''.")
  lr = float(cl.learning_rate)
  if name == 'ditto':
    alg = personalized.ditto(base_model, opt, server, num_clients,
                             lam=float(pc.ditto_lambda), unroll=unroll)
    return Built(alg, base_model, base_model.init)
  if name == 'apfl':
    alg = meta_mixed.apfl(base_model, lr, server, num_clients,
                          alpha=float(pc.apfl_alpha))
    return Built(alg, base_model, base_model.init)
  if name == 'pfedme':
    alg = meta_mixed.pfedme(
        base_model, lr, server, num_clients, lam=float(pc.pfedme_lambda),
        inner_steps=int(pc.pfedme_inner_steps),
        personal_lr=float(pc.pfedme_personal_lr) or lr)
    return Built(alg, base_model, base_model.init)
  if name in ('perfedavg_fo', 'perfedavg_hf'):
    alg = meta_mixed.per_fedavg(
        base_model, lr, server, alpha=float(pc.perfedavg_alpha),
        hessian_free=name == 'perfedavg_hf', name=name)
    return Built(alg, base_model, base_model.init)
  if name == 'fedrap':
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
        base_model, server, num_clients, lr=lr,
        item_lr=lr * item_lr.pop(), lam=float(pc.fedrap_lambda),
        mu=float(pc.fedrap_mu), weight_decay=float(pc.fedrap_weight_decay),
        lr_decay=float(pc.fedrap_lr_decay),
        step_decay=float(pc.fedrap_step_decay),
        curriculum=str(pc.fedrap_curriculum))
    fedrap.split(jax.eval_shape(base_model.init, jax.random.key(0)))
    return Built(alg, base_model, base_model.init)
  if name in ('ifca', 'hypcluster'):
    k = int(pc.num_clusters)
    init = clustered.stack_inits(base_model.init, k)
    alg = clustered.ifca(base_model, opt, server, num_clients, num_clusters=k,
                         unroll=unroll, name=name)
    return Built(alg, base_model, init)
  shapes = jax.eval_shape(base_model.init, jax.random.key(0))
  head = str(pc.head or '') or personalized.head_pattern(
      base_model, shapes)
  param_groups.split(shapes, head)  # a head that matches nothing fails here
  kw = dict(num_clients=num_clients, unroll=unroll, execution=execution,
            name=name)
  if name == 'fedavg_ft':
    alg = partitioned.fed_partitioned(base_model, opt, server,
                                      finetune='trainable', **kw)
  elif name == 'fedbabu':
    alg = partitioned.fed_partitioned(base_model, opt, server, frozen=head,
                                      finetune='all', **kw)
  elif name == 'local_only':
    alg = partitioned.fed_partitioned(base_model, opt, server, personal='.',
                                      has_global_model=False, **kw)
  elif name == 'fedper':
    alg = partitioned.fed_partitioned(base_model, opt, server, personal=head,
                                      has_global_model=False, **kw)
  elif name == 'lg_fedavg':
    alg = partitioned.fed_partitioned(
        base_model, opt, server, personal=personalized.body_pattern(head),
        has_global_model=False, **kw)
  else:  # fedrep
    alg = partitioned.fed_partitioned(
        base_model, opt, server, personal=head,
        client_train=personalized.fedrep_training(
            base_model, opt, head_epochs=int(pc.head_epochs),
            epochs=int(config.client.epochs), unroll=unroll),
        has_global_model=False, **kw)
  return Built(alg, base_model, base_model.init)
