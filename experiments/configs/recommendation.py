r"""Personalize the pretrained SASRec to each MovieLens-100k user (issue 19).

  python -m experiments.pretrain --config=experiments/configs/pretrain_sasrec.py \
      --workdir=/tmp/fedjax_pfi/pretrained_sasrec
  python -m experiments.main --config=experiments/configs/recommendation.py:fedsa_lora \
      --workdir=/tmp/fedjax_pfi/rec/fedsa_lora
  python -m experiments.recommendation_compare --workdir=/tmp/fedjax_pfi/rec  # the table

The foundation model is `SASRec` pretrained centrally on the 20% held-out
users' histories (``pretrain_sasrec.py``); the federated clients are the
other 754 users, with the same ``data`` settings (so the same held-out
users, the same next-item task, and validation and test items ranked
against ``leave_one_out``'s 99 negatives, as the FedRAP table's). The
variant is the method (append ``,testing`` for a tiny run in seconds on a
random, untrained base; tests point ``data.path`` at generated ratings):

- ``fedavg``: FedAvg fine-tuning every weight;
- ``fedit``: LoRA on the blocks' attention q and v, A and B averaged
  (FedIT); ``ffa_lora``: A frozen at its initialisation, B averaged;
- ``fedsa_lora``: A averaged, B personal (FedSA-LoRA);
- ``local_lora``: each user's own LoRA, never sent;
- ``fedper``: FedPer with the item-embedding table personal (SASRec's
  traced head: it embeds the history and scores the candidates), the
  blocks averaged.

Client settings, shared by every method: SGD, batch 32, at most 8 local
steps, 1 epoch, 50 users per round; ``evaluation.vs_start`` compares each
user with the frozen pretrained model, ``evaluation.group_by`` reports the
gaps by gender and age band (``ml-100k.user``).
"""

from fedjax_pfi import training

VARIANTS = ('fedavg', 'fedit', 'ffa_lora', 'fedsa_lora', 'local_lora',
            'fedper')
PRETRAINED = '/tmp/fedjax_pfi/pretrained_sasrec/model'
#: Client SGD step sizes by method: adapters take larger steps than the
#: whole model (the validation sweep in BUILD_NOTES.md, "Federated
#: recommendation that preserves personality").
LEARNING_RATES = {'fedavg': 0.1, 'fedper': 0.1, 'fedit': 0.5,
                  'ffa_lora': 0.5, 'fedsa_lora': 0.5, 'local_lora': 0.5}


def get_config(variant: str = 'fedsa_lora'):
  parts = [p for p in variant.split(',') if p]
  testing = 'testing' in parts
  parts = [p for p in parts if p != 'testing'] or ['fedsa_lora']
  if len(parts) != 1 or parts[0] not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; accepted: one of '
                     f'{", ".join(VARIANTS)}, optionally with ",testing".')
  name = parts[0]
  c = training.default_config()
  c.algorithm = name
  c.rounds = 30
  c.clients_per_round = 50
  # the pretraining's data settings: the same held-out users and task
  c.data.name = 'movielens_sequential'
  c.data.seq_len = 50
  c.data.num_negatives = 4
  c.data.eval_negatives = 99
  c.data.top_k = 10
  c.data.heldout_fraction = 0.2
  c.data.seed = 0
  c.model.name = 'sasrec'
  c.model.pretrained = PRETRAINED
  c.peft.rank = 8
  c.peft.alpha = 16.0
  c.peft.target = r'block_\d+/attn/(q|v)$'
  c.client.optimizer = 'sgd'
  c.client.learning_rate = LEARNING_RATES[name]
  c.client.batch_size = 32
  c.client.max_steps = 8
  c.client.epochs = 1
  c.server.optimizer = 'fedavg'
  c.server.learning_rate = 1.0
  # The held-out users are the pretraining users: evaluated with the
  # global model, never adapted.
  c.personalization.finetune_epochs = 0
  c.evaluation.vs_start = True
  c.evaluation.group_by = 'gender,age_band'
  c.eval_every = 30
  c.checkpoint_every = 10
  c.eval_batch_size = 256
  c.progress = False
  if testing:
    c.rounds = 2
    c.clients_per_round = 3
    c.data.seq_len = 8
    c.data.eval_negatives = 9
    c.data.top_k = 3
    c.data.heldout_fraction = 0.25
    c.model.pretrained = None
    c.model.kwargs.dim = 8
    c.model.kwargs.num_layers = 1
    c.model.kwargs.num_heads = 2
    c.peft.rank = 2
    c.peft.alpha = 4.0
    c.client.max_steps = 2
    c.client.batch_size = 4
    c.eval_every = 1
    c.checkpoint_every = 1
    c.evaluation.group_by = ''  # generated ratings may come without users
  return c
