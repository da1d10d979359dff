r"""Auditing DP-FedAvg with canaries on a synthetic task (`fedjax_pfi.audit`).

  python -m experiments.dp_audit --workdir=/tmp/fedjax_pfi/dp_audit

For each noise multiplier of ``--noise``: FedAvg with DP-FedAvg on FedProx's
Synthetic(1,1) with a logistic-regression model, ``--clients`` real clients
plus ``--canaries`` canary clients (sampled like the others, Poisson
``q = clients_per_round / population``), for ``--rounds`` rounds; then the
canaries' scores against as many directions never inserted give an
empirical epsilon lower bound (`audit.epsilon_lower_bound`) and the one-shot
estimate (`audit.one_shot_epsilon`), printed beside the accountant's
epsilon. The bound must stay below the accountant's.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from fedjax_pfi import audit
from fedjax_pfi import training


def config_for(noise: float, *, clients: int, canaries: int, rounds: int,
               per_round: int, delta: float):
  c = training.default_config()
  c.rounds = rounds
  c.clients_per_round = per_round
  c.data.name = 'synthetic'
  c.data.num_clients = clients + canaries
  c.data.heldout_fraction = 0.0
  c.model.name = 'logreg'
  c.client.learning_rate = 0.05
  c.client.batch_size = 10
  c.client.max_steps = 5
  c.server.optimizer = 'fedavg'
  c.privacy.mechanism = 'gaussian'
  c.privacy.clip_norm = 1.0
  c.privacy.noise_multiplier = noise
  c.privacy.delta = delta
  c.privacy.sampling = 'poisson'
  c.eval_every = rounds
  c.checkpoint_every = rounds
  c.progress = False
  return c


def run(workdir: str, noise: float, *, clients: int, canaries: int,
        rounds: int, per_round: int, delta: float, seed: int = 0,
        alpha: float = 0.05) -> dict:
  """One audited run: the accountant's epsilon and the canaries'."""
  config = config_for(noise, clients=clients, canaries=canaries,
                      rounds=rounds, per_round=per_round, delta=delta)
  config.seed = seed
  plain = training.build(config)
  population = plain.splits.train.num_clients
  ids = np.arange(population - canaries, population)  # the last clients
  params0 = training.initial_params(plain)
  template = plain.algorithm.init(params0).params  # the federated part
  both = audit.directions(template, 2 * canaries,
                          jax.random.fold_in(jax.random.key(seed), 0xCA4A))
  inserted = jax.tree.map(lambda d: d[:canaries], both)
  exp = training.build(config, splits=plain.splits,
                       transform=audit.canary_transform(ids, inserted))
  training.run_experiment(exp, workdir)
  state = training.load_state(exp, workdir, rounds)
  change = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                        state.params, template)
  s = audit.scores(change, both)
  acc = exp.privacy.accountant
  return {'noise_multiplier': noise, 'rounds': rounds,
          'sampling_rate': acc.accounting.sampling_rate,
          'epsilon_pld': acc.epsilon_pld(rounds),
          'epsilon_rdp': acc.epsilon_rdp(rounds),
          'epsilon_lower_bound': audit.epsilon_lower_bound(
              s[:canaries], s[canaries:], delta, alpha),
          'epsilon_one_shot': audit.one_shot_epsilon(s[:canaries],
                                                     s[canaries:], delta),
          'score_inserted_mean': float(s[:canaries].mean()),
          'score_held_out_mean': float(s[canaries:].mean()),
          'score_held_out_std': float(s[canaries:].std())}


_FLAGS = {}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = {k: v.value for k, v in _FLAGS.items()}
  print('| noise mult. | rounds | q | eps (PLD) | eps (RDP) | empirical eps '
        'lower bound | one-shot estimate | canary score: inserted / held out '
        '(std) |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  for noise in (float(z) for z in f['noise']):
    r = run(os.path.join(f['workdir'], f'noise_{noise:g}'), noise,
            clients=f['clients'], canaries=f['canaries'], rounds=f['rounds'],
            per_round=f['per_round'], delta=f['delta'])
    print(f'| {noise:g} | {r["rounds"]} | {r["sampling_rate"]:.3f} | '
          f'{r["epsilon_pld"]:.2f} | {r["epsilon_rdp"]:.2f} | '
          f'{r["epsilon_lower_bound"]:.2f} | {r["epsilon_one_shot"]:.2f} | '
          f'{r["score_inserted_mean"]:.4f} / {r["score_held_out_mean"]:.4f} '
          f'({r["score_held_out_std"]:.4f}) |', flush=True)


if __name__ == '__main__':
  _FLAGS.update(
      workdir=flags.DEFINE_string('workdir', '/tmp/fedjax_pfi/dp_audit',
                                  'One subdirectory per noise multiplier.'),
      noise=flags.DEFINE_list('noise', ['0.3', '1.0', '3.0'],
                              'Noise multipliers.'),
      clients=flags.DEFINE_integer('clients', 300, 'Real clients.'),
      canaries=flags.DEFINE_integer('canaries', 200, 'Canaries inserted (as '
                                    'many are held out).'),
      rounds=flags.DEFINE_integer('rounds', 50, 'Rounds.'),
      per_round=flags.DEFINE_integer('per_round', 50, 'Expected clients per '
                                     'round.'),
      delta=flags.DEFINE_float('delta', 1e-5, 'delta.'))
  app.run(main)
