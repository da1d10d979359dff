r"""FedProx vs FedAvg on Synthetic(1,1) with stragglers (Li et al., MLSys 2020).

  python -m experiments.main --config=experiments/configs/synthetic_fedprox.py:fedprox \
      --workdir=/tmp/fedjax_pfi/synthetic_fedprox
  python -m experiments.main --config=experiments/configs/synthetic_fedprox.py:fedavg \
      --workdir=/tmp/fedjax_pfi/synthetic_fedavg
  python -m experiments.fedprox_compare   # both, plus the comparison table

Expected (the FedProx paper's Figure 1, 90% stragglers): FedAvg, which drops
stragglers, has a noisier and higher training loss; FedProx with mu = 1, which
aggregates the stragglers' partial work, converges more stably. BUILD_NOTES.md
records what was measured.

Setup as in the paper: 30 devices of Synthetic(1,1), 10 per round,
multinomial logistic regression, 20 local epochs of batch 10 SGD at lr 0.01;
a fraction of each cohort are stragglers that do a uniformly random part of
their local work.

Variants: ``fedprox`` (mu = 1, partial work kept), ``fedavg`` (mu = 0,
stragglers dropped), ``fedprox0`` (mu = 0, partial work kept), and
``testing`` (tiny, seconds).
"""

from fedjax_pfi import training


def get_config(variant: str = 'fedprox'):
  c = training.default_config()
  c.rounds = 200
  c.clients_per_round = 10
  c.data.name = 'synthetic'
  c.data.alpha = 1.0
  c.data.beta = 1.0
  c.data.num_clients = 30
  c.data.test_fraction = 0.2
  c.data.heldout_fraction = 0.0
  c.model.name = 'logreg'
  c.client.optimizer = 'sgd'
  c.client.learning_rate = 0.01
  c.client.batch_size = 10
  c.client.epochs = 20
  c.server.optimizer = 'fedavg'
  c.stragglers.fraction = 0.9
  c.eval_every = 10
  c.checkpoint_every = 50
  if variant in ('fedprox', 'testing'):
    c.algorithm = 'fedprox'
    c.client.proximal_mu = 1.0
  elif variant == 'fedprox0':
    c.algorithm = 'fedprox'
    c.client.proximal_mu = 0.0
  elif variant == 'fedavg':
    c.algorithm = 'fedavg'
    c.stragglers.drop = True
  else:
    raise ValueError(f'unknown variant {variant!r}; accepted: fedprox, '
                     'fedprox0, fedavg, testing.')
  if variant == 'testing':
    c.rounds = 3
    c.clients_per_round = 4
    c.client.epochs = 2
    c.eval_every = 2
    c.checkpoint_every = 1
  return c
