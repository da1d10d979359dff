r"""The distribution of the clients' update norms, to choose DP's clip norm.

  python -m experiments.clip_probe --config=experiments/configs/privacy_utility.py:fedavg,inf --rounds=3

Runs the config's first ``--rounds`` rounds without noise or clipping and
prints, over the clients of those rounds, the fraction whose update of the
federated part has L2 norm at most each threshold (McMahan et al. 2018 clip
at about the median; Andrew et al. 2021 adapt towards it).
"""

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from fedjax_pfi import config as config_lib
from fedjax_pfi import training
from fedjax_pfi.algorithms import aggregators
from fedjax_pfi.algorithms import registry

THRESHOLDS = tuple(float(t) for t in np.geomspace(0.01, 100.0, 25))


def norm_probe() -> aggregators.Aggregator:
  """The uniform mean, with the count of clients at or under each
  threshold as the client step's stats."""
  mean = aggregators.weighted_mean('uniform')

  def client(message, state, key):
    del state, key
    norm = aggregators.global_norm(message)
    return message, {f'below/{t:g}': (norm <= t).astype(jnp.float32)
                     for t in THRESHOLDS}

  def finalize(sums, state, key):
    out, state, metrics = mean.finalize(sums, state, key)
    metrics = dict(metrics, **{f'probe/{k}': v for k, v in sums.items()
                               if k.startswith('below/') or k == 'clients'})
    return out, state, metrics

  return mean._replace(client=client, finalize=finalize, name='norm_probe')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  config.privacy.mechanism = 'none'
  config.server.weighting = 'uniform'
  config.rounds = _ROUNDS.value
  exp = training.build(config)
  built = registry.build(config, exp.base_model, exp.splits.train.num_clients,
                         exp.execution, norm_probe())
  alg = built.algorithm
  state = alg.init(training.initial_params(exp))
  frozen = alg.frozen_part(training.initial_params(exp))
  counts, clients = np.zeros(len(THRESHOLDS)), 0.0
  for r in range(_ROUNDS.value):
    cohort = training.make_cohort(exp, r)
    state, metrics = alg.apply(state, cohort,
                               jax.random.fold_in(jax.random.key(config.seed),
                                                  r), frozen)
    metrics = jax.device_get(metrics)
    clients += float(metrics['probe/clients'])
    counts += [float(metrics[f'probe/below/{t:g}']) for t in THRESHOLDS]
  print(f'{int(clients)} client updates in {_ROUNDS.value} rounds; fraction '
        'with L2 norm <= threshold:')
  for t, n in zip(THRESHOLDS, counts):
    print(f'  {t:9.4f}  {n / clients:.3f}')
  median = next(t for t, n in zip(THRESHOLDS, counts) if n >= clients / 2)
  print(f'median between the two thresholds at or below {median:.4g}')


if __name__ == '__main__':
  # Flags exist only when this module is the program, so that tests
  # can import experiment modules side by side.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config.',
                                            **config_lib.COMMAND_LINE)
  _ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds to probe.')
  app.run(main)
