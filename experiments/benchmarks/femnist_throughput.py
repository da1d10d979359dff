r"""FedAvg throughput on FEMNIST with the CNN: one compiled round vs a Python loop.

  python -m experiments.benchmarks.femnist_throughput --clients=50 --rounds=5

Workload (issue 2's first throughput figure): the LEAF FEMNIST subset
(``../shared/data``, 105 writers with training data), the FedAvg-paper CNN,
``--clients`` writers per round sampled uniformly, one local epoch of batch 20
(last partial batch kept), client SGD lr 0.05, server FedAvg.

Three ways of doing the same rounds, timed in one process, interleaved:

- ``vectorised``: `fedjax_pfi`'s round, one jit per round (a ``lax.scan`` over
  local steps of the step vmapped over clients; ``--unroll`` unrolls it; steps
  that are padding for the whole cohort are skipped), the next cohort stacked
  on the host while the device computes. ``--conv=patches`` (the default) is
  the CNN with `PatchConv`, ``--conv=lax`` with ``nn.Conv`` (BUILD_NOTES.md,
  "CNN formulation").
- ``python_loop``: a Python loop over clients and their batches with one jitted
  per-step SGD function (fixed batch shape with a mask, so it compiles once),
  deltas averaged with a jitted weighted sum: how FedJAX-style simulators run.
- ``centralized``: a jitted SGD step over batches of ``clients x 20`` examples,
  as many steps as it takes to see the same examples: the machine's practical
  ceiling for this much work.

Prints s/round, client updates/s, examples/s, padding efficiency and the
ratios.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmarks import baselines
from fedjax_pfi.algorithms import fedavg
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data import registry
from fedjax_pfi.models import zoo

_CLIENTS = flags.DEFINE_integer('clients', 50, 'Clients per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds per method.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed rounds per method.')
_CONV = flags.DEFINE_enum('conv', 'patches', ['lax', 'patches'],
                          'CNN convolution formulation.')
_UNROLL = flags.DEFINE_string('unroll', '1',
                              "Local-step unroll: 'full' or an integer.")
_METHODS = flags.DEFINE_list('methods',
                             'vectorised,python_loop,centralized',
                             'Which methods to time.')
B = 20
LR = 0.05


def main(argv):
  del argv
  splits = registry.load_splits({'name': 'femnist'})
  ds = splits.train
  model = zoo.build_model('cnn', ds.columns['x'][:2], ds.metadata,
                          conv=_CONV.value)
  params0 = model.init(jax.random.key(0))
  unroll = True if _UNROLL.value == 'full' else int(_UNROLL.value)
  buckets = cohort_lib.power_of_two_buckets(
      int(cohort_lib.client_steps(ds.client_sizes, B, 1).max()))
  c = _CLIENTS.value
  cohorts = {}

  def cohort(r):
    if r not in cohorts:
      ids = cohort_lib.sample_cohort(ds.num_clients, c, 0, r)
      cohorts[r] = (ids, cohort_lib.stack_cohort(
          ds, ids, batch_size=B, step_buckets=buckets, seed=0, round_idx=r))
    return cohorts[r]

  # -- vectorised -------------------------------------------------------------
  alg = fedavg.fed_opt(model, optax.sgd(LR),
                       server_optimizers.server_optimizer('fedavg'),
                       unroll=unroll)

  def run_vectorised(rounds):
    state = alg.init(params0)
    pending = jax.device_put(cohort(rounds[0])[1])
    for i, r in enumerate(rounds):
      state, m = alg.apply(state, pending, jax.random.key(r))
      if i + 1 < len(rounds):
        pending = jax.device_put(cohort(rounds[i + 1])[1])
      jax.block_until_ready(m)
    return state.params

  # -- Python loop over clients -----------------------------------------------
  opt = optax.sgd(LR)

  step = baselines.sgd_step(model, opt)
  server_update = baselines.server_update()

  def run_loop(rounds):
    params = params0
    for r in rounds:
      ids, stacked = cohort(r)
      deltas, weights = [], []
      for j in range(len(ids)):
        p, s = params, opt.init(params)
        for k in range(stacked.mask.shape[1]):
          m = stacked.mask[j, k]
          if not m.any():
            break
          p, s = step(p, s, {n: v[j, k] for n, v in stacked.batches.items()},
                      m)
        deltas.append(jax.tree.map(jnp.subtract, p, params))
        weights.append(float(stacked.weight[j]))
      params = server_update(params, deltas, weights)
    return jax.block_until_ready(params)

  # -- centralized ceiling ------------------------------------------------------
  central_step = baselines.central_step(model, opt)

  def run_central(rounds):
    params, s = params0, opt.init(params0)
    for r in rounds:
      _, stacked = cohort(r)
      n = int(stacked.mask.sum())
      rows = np.random.default_rng(r).choice(ds.num_examples, n)
      big = c * B
      for lo in range(0, n - big + 1, big):
        batch = {k: v[rows[lo:lo + big]] for k, v in ds.columns.items()}
        params, s = central_step(params, s, batch)
    return jax.block_until_ready(params)

  methods = {'vectorised': run_vectorised, 'python_loop': run_loop,
             'centralized': run_central}
  methods = {k: methods[k] for k in _METHODS.value}
  warm = list(range(1000, 1000 + _WARMUP.value))
  timed = list(range(_ROUNDS.value))
  for r in warm + timed:
    cohort(r)  # stack once, outside the timings
  compile_s, times = {}, {k: [] for k in methods}
  for name, fn in methods.items():
    t = time.perf_counter()
    fn(warm)
    compile_s[name] = time.perf_counter() - t
    print(f'{name}: warm-up ({len(warm)} rounds, with compilation) '
          f'{compile_s[name]:.1f} s', flush=True)
  for r in timed:  # interleave methods round by round: shared noise
    for name, fn in methods.items():
      t = time.perf_counter()
      fn([r])
      times[name].append(time.perf_counter() - t)
      print(f'  round {r} {name}: {times[name][-1]:.3f} s', flush=True)
  examples = np.mean([cohort(r)[1].mask.sum() for r in timed])
  steps = np.mean([cohort(r)[1].mask.any(-1).sum(-1).max() for r in timed])
  # Padding efficiency: real examples / example slots computed. The vectorised
  # round computes every client lane for every step that some client needs
  # (steps padded for the whole cohort are skipped); the loop computes each
  # client's own steps, each a full batch of B.
  slots_vec = np.sum([c * B * cohort(r)[1].mask.any(-1).sum(-1).max()
                      for r in timed])
  slots_loop = np.sum([B * cohort(r)[1].mask.any(-1).sum() for r in timed])
  real = np.sum([cohort(r)[1].mask.sum() for r in timed])
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, '
        f'{jax.device_count()} device(s); CNN conv={_CONV.value}, '
        f'unroll={_UNROLL.value}')
  print(f'{c} clients/round, batch {B}, 1 epoch: {examples:.0f} examples and'
        f' up to {steps:.0f} local steps per round (step bucket '
        f'{cohort(timed[0])[1].mask.shape[1]})')
  print(f'padding efficiency (real / computed examples): vectorised '
        f'{real / slots_vec:.2f}, python_loop {real / slots_loop:.2f}')
  print(f'{"method":12s} {"s/round":>9s} {"rounds/s":>9s} '
        f'{"client-upd/s":>13s} {"examples/s":>11s} {"warm-up s":>10s}')
  med = {k: float(np.median(v)) for k, v in times.items()}
  for name in methods:
    print(f'{name:12s} {med[name]:9.3f} {1 / med[name]:9.2f} '
          f'{c / med[name]:13.1f} {examples / med[name]:11.0f} '
          f'{compile_s[name]:10.1f}')
  if 'vectorised' in med:
    for other in ('python_loop', 'centralized'):
      if other in med:
        print(f'vectorised is {med[other] / med["vectorised"]:.2f}x the '
              f'speed of {other}')


if __name__ == '__main__':
  app.run(main)
