r"""FedAvg with the FedAvg-paper CNN on FEMNIST (LEAF subset, natural writers).

  python -m experiments.main --config=experiments/configs/femnist_fedavg.py \
      --workdir=/tmp/fedjax_pfi/femnist_fedavg

Expected (measured, BUILD_NOTES.md): about 5 minutes on 2 CPU cores; after
100 rounds, 0.79 accuracy on the writers' own LEAF test images (the most
frequent class scores 0.09) and 0.54 on the 79 unseen writers.

The CNN uses `PatchConv` (``model.kwargs.conv='patches'``) with scanned local
steps: on XLA:CPU this was the fastest formulation measured, and ``nn.Conv``
inside the round's scan was 10x slower (BUILD_NOTES.md, "CNN formulation").

Data: ``../shared/data/femnist-leaf-subset`` (184 writers; the 105 with
training data form the population, the 79 test-only writers are held-out
unseen clients). Override the file with ``--config.data.path`` or read LEAF
json with ``--config.data.leaf_dir``. Variants: ``scaffold``, ``fedadam``,
``testing`` (seconds).
"""

from fedjax_pfi import training


def get_config(variant: str = ''):
  c = training.default_config()
  c.rounds = 100
  c.clients_per_round = 10
  c.data.name = 'femnist'
  c.data.val_fraction = 0.0
  c.model.name = 'cnn'
  c.model.kwargs.conv = 'patches'
  c.algorithm = 'fedavg'
  c.client.optimizer = 'sgd'
  c.client.learning_rate = 0.05
  c.client.batch_size = 20
  c.client.epochs = 1
  c.client.unroll = '1'
  c.server.optimizer = 'fedavg'
  c.server.learning_rate = 1.0
  c.eval_every = 10
  c.eval_batch_size = 256
  c.checkpoint_every = 10
  if variant == 'scaffold':
    c.algorithm = 'scaffold'
  elif variant == 'fedadam':
    c.server.optimizer = 'fedadam'
    c.server.learning_rate = 0.01
  elif variant == 'testing':
    c.rounds = 2
    c.clients_per_round = 2
    c.data.max_clients = 6
    c.client.max_steps = 2
    # The 79 held-out writers are still evaluated, but not fine-tuned: their
    # CNN adaptation compiled 3 programs and took 36 of the variant's 61 s.
    c.personalization.finetune_epochs = 0
    c.eval_every = 1
    c.checkpoint_every = 1
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; accepted: '', scaffold, "
                     'fedadam, testing.')
  return c
