r"""One FedAvg round over 10,000 clients on one CPU: chunked, so memory is O(chunk).

  python -m experiments.benchmarks.large_cohort --clients=10000 --lanes=200 \
      --chunk=20

The population is `synthetic.emnist_shaped` (as in `fedavg_throughput`) (examples per client
lognormal with mean 100, sigma 0.7, clipped to 10..400; Dirichlet(0.3)
labels) with ``--clients`` clients, and the round trains *every* one of them
(one epoch of batch 20, client SGD lr 0.1, server SGD lr 1.0) with the
FedAvg MLP (784-200-200-62): the clients are packed into ``--lanes`` vmap
lanes (`cohort.pack_cohort`), run ``--chunk`` lanes at a time in a
``lax.scan`` that adds up their weighted deltas.

Prints the time of the round (after compilation), XLA's memory figures for
the compiled chunked round and, compiled only, for the same round with every
lane at once (``--chunk=0``), the process's peak RSS, and with
``--compare_unchunked`` also runs that round and prints how far apart the
two new models are.
"""

from __future__ import annotations

import resource
import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax

from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import fedavg
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data import synthetic
from fedjax_pfi.models import zoo

_CLIENTS = flags.DEFINE_integer('clients', 10000, 'Clients, all in one round.')
_LANES = flags.DEFINE_integer('lanes', 200, 'Packed vmap lanes.')
_CHUNK = flags.DEFINE_integer('chunk', 20, 'Lanes per chunk.')
_COMPARE = flags.DEFINE_bool('compare_unchunked', False,
                             'Also run the round unchunked and compare.')
B = 20


def gib(n: float) -> str:
  return f'{n / 2**30:.2f} GiB'


def main(argv):
  del argv
  t0 = time.perf_counter()
  ds = synthetic.emnist_shaped(_CLIENTS.value)
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(200, 200))
  params = model.init(jax.random.key(0))
  ids = np.arange(ds.num_clients)
  cohort = cohort_lib.pack_cohort(ds, ids, num_lanes=_LANES.value,
                                  batch_size=B, seed=0, round_idx=0)
  print(f'{ds.num_clients} clients, {ds.num_examples} examples '
        f'({gib(ds.columns["x"].nbytes)} of pixels); packed into '
        f'{cohort.mask.shape} (lanes, steps, batch), padding efficiency '
        f'{cohort_lib.padding_efficiency(cohort, _CHUNK.value):.3f}; host '
        f'set-up {time.perf_counter() - t0:.1f} s', flush=True)

  def algorithm(chunk):
    return fedavg.fed_opt(model, optax.sgd(0.1),
                          server_optimizers.server_optimizer('fedavg', 1.0),
                          execution=core.Execution(chunk_size=chunk or None))

  on_device = jax.device_put(cohort)
  key = jax.random.key(0)
  for chunk in (_CHUNK.value, 0):
    alg = algorithm(chunk)
    mem = jax.jit(alg.apply_unjitted).lower(
        alg.init(params), on_device, key).compile().memory_analysis()
    if mem is not None:
      print(f'chunk={chunk or "all"}: XLA temporaries '
            f'{mem.temp_size_in_bytes / 2**20:.1f} MiB, arguments '
            f'{gib(mem.argument_size_in_bytes)}', flush=True)
  alg = algorithm(_CHUNK.value)
  state = alg.init(params)
  t = time.perf_counter()
  state, metrics = alg.apply(state, on_device, key)
  jax.block_until_ready(state)
  first = time.perf_counter() - t
  t = time.perf_counter()
  again, _ = alg.apply(alg.init(params), on_device, key)
  jax.block_until_ready(again)
  print(f'chunked round: {time.perf_counter() - t:.1f} s (first call, with '
        f'compilation, {first:.1f} s); {int(metrics["clients"])} clients, '
        f'{int(metrics["train_examples"])} examples, train loss '
        f'{float(metrics["train_loss"]):.4f}', flush=True)
  if _COMPARE.value:
    alg0 = algorithm(0)
    other, _ = alg0.apply(alg0.init(params), on_device, key)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(other.params)))
    print(f'unchunked round: max |param difference| {diff:.2e}')
  print(f'process peak RSS: '
        f'{gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}')


if __name__ == '__main__':
  app.run(main)
