r"""User-level DP on Shakespeare by role: the privacy-utility trade-off, and
whom DP hurts.

  python -m experiments.privacy_utility --workdir=/tmp/fedjax_pfi/privacy_utility
  python -m experiments.main --config=experiments/configs/privacy_utility.py:fedavg,4 \
      --workdir=/tmp/fedjax_pfi/dp_fedavg_eps4

Variants ``MODEL,EPSILON`` (append ``,testing`` for a tiny run in seconds;
``testing`` alone is ``fedavg,4,testing``):

- ``MODEL``: ``fedavg`` (the embedded default's character transformer,
  trained from scratch on every (work, role) of the complete works, the
  shared ``shakespeare_speeches.jsonl.gz``), or ``fedit`` (LoRA on the
  pretrained byte-level GPT-2 of ``pretrain_shakespeare.py``; its clients
  are the roles of the works it was not pretrained on: the histories are
  left out);
- ``EPSILON``: ``inf`` (no noise and no clipping; uniform weights, like the
  private runs) or ``8``, ``4``, ``2``, ``1``: DP-FedAvg with Poisson
  sampling, ``delta = 1e-5`` and the noise multiplier calibrated to that
  epsilon (PLD) for the whole run before training.

Every role with at least two windows (80 characters; 64 bytes for
``fedit``) is a client, its windows split 80/20 into train/test; 50 clients
per round in expectation, at most 8 local steps of batch 10 (8), for 200
rounds (``fedit``: 40, about 6 minutes per epsilon on 2 CPU cores).

Expected (BUILD_NOTES.md, "User-level DP on Shakespeare", with the table
and how the clip norms were chosen): per-client mean accuracy 0.334
without DP and 0.130 at epsilon 8 for ``fedavg``; 0.455 and 0.402 for
``fedit``, whose pretrained model alone scores 0.453.
"""

from experiments.configs import shakespeare_fedavg
from experiments.configs import shakespeare_lora

MODELS = ('fedavg', 'fedit')
EPSILONS = ('inf', '8', '4', '2', '1')
# The pretrained model read the histories; in the jsonl they are these works.
HISTORIES = ('henry4p1', 'henry4p2', 'henry5', 'henry6p1', 'henry6p2',
             'henry6p3', 'henry8', 'kingjohn', 'richard2', 'richard3')
# The median of the clients' update norms in the non-private run's first
# rounds (BUILD_NOTES.md): half the clients are clipped.
CLIP = {'fedavg': 1.0, 'fedit': 0.45}


def get_config(variant: str = 'fedavg,4'):
  parts = [p for p in variant.split(',') if p]
  testing = 'testing' in parts
  parts = [p for p in parts if p != 'testing'] or ['fedavg', '4']
  if len(parts) != 2 or parts[0] not in MODELS or parts[1] not in EPSILONS:
    raise ValueError(f'unknown variant {variant!r}; accepted: MODEL,EPSILON '
                     f'with MODEL in {MODELS} and EPSILON in {EPSILONS}, '
                     'optionally with ",testing".')
  model, eps = parts
  if model == 'fedavg':
    c = shakespeare_fedavg.get_config()  # its model, seq_len 80, lr 0.5
    c.data.exclude_plays = None
    c.rounds = 200
  else:
    c = shakespeare_lora.get_config('fedit')  # the pretrained model's 64
    c.data.exclude_plays = HISTORIES
    c.rounds = 40
  c.data.name = 'shakespeare_jsonl'
  c.data.plays = None
  c.data.min_chars = 1
  c.data.min_examples = 2
  c.data.heldout_fraction = 0.0
  c.data.test_fraction = 0.2
  c.clients_per_round = 50
  c.client.max_steps = 8
  # Clients one after another in 10 vmap lanes (DP clips each at its last
  # step): 3-4x faster than padding 100 Poisson slots to the longest.
  c.execution.pack_lanes = 10
  c.step_buckets = 'max'
  c.server.optimizer = 'fedavgm'
  c.server.momentum = 0.9
  c.server.weighting = 'uniform'
  c.personalization.finetune_epochs = 0
  c.eval_every = 50
  c.checkpoint_every = 50
  if eps != 'inf':
    c.server.weighting = ''
    c.privacy.mechanism = 'gaussian'
    c.privacy.clip_norm = CLIP[model]
    c.privacy.target_epsilon = float(eps)
    c.privacy.delta = 1e-5
    c.privacy.sampling = 'poisson'
  if testing:
    c.rounds = 2
    c.clients_per_round = 6
    c.data.plays = ('macbeth', 'tempest')
    c.data.exclude_plays = None
    c.data.seq_len = 20
    c.model.kwargs.dim = 16
    c.model.kwargs.num_layers = 1
    c.model.kwargs.num_heads = 2
    c.model.pretrained = None
    c.client.max_steps = 2
    c.execution.pack_lanes = 2
    c.peft.rank = 2
    c.peft.alpha = 4.0
    c.eval_every = 1
    c.checkpoint_every = 1
    if eps != 'inf':
      c.privacy.delta = 1e-3
      c.privacy.accountant = 'rdp'
  return c
