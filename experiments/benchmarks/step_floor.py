r"""The floor of per-client training on this machine: what one client step of
batch 20 costs, however it is driven, against the centralized step.

  python -m experiments.benchmarks.step_floor --model=mlp

FedAvg's clients each take their own SGD steps on batches of 20 from their
own weights; the centralized ceiling of `fedavg_throughput` takes steps on
batches of ``clients x 20`` with one set of weights. This times, for the
same number of examples (``--steps`` x 20), plain SGD steps (no FedAvg
bookkeeping):

- ``python_loop``: a Python loop of one jitted step;
- ``scan_1_lane``: one ``lax.scan`` over the steps (one client after another);
- ``scan_L_lanes``: the step ``vmap``ped over L clients with their own
  weights, scanned over ``steps / L`` steps;
- ``centralized``: steps of ``--central_batch`` examples, one set of weights.

and prints the time per 20 examples and each method's throughput relative to
the centralized one: the best a simulator of per-client steps can reach.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi.models import base
from fedjax_pfi.models import zoo

_MODEL = flags.DEFINE_enum('model', 'mlp', ['mlp', 'cnn'], 'The model.')
_STEPS = flags.DEFINE_integer('steps', 240, 'Client steps of 20 examples.')
_LANES = flags.DEFINE_list('lanes', '2,5,10,50', 'Lane counts to time.')
_CENTRAL = flags.DEFINE_integer('central_batch', 1000, 'Centralized batch.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repetitions (median).')
B = 20


def main(argv):
  del argv
  x = np.random.rand(2, 28, 28, 1).astype(np.float32)
  kw = {'hidden': (200, 200)} if _MODEL.value == 'mlp' else {'conv': 'patches'}
  model = zoo.build_model(_MODEL.value, x, {'num_classes': 62}, **kw)
  p0 = model.init(jax.random.key(0))

  def sgd(p, batch, mask):
    g = jax.grad(lambda q: base.masked_mean_loss(model, q, batch, mask,
                                                 None)[0])(p)
    return jax.tree.map(lambda a, d: a - 0.1 * d, p, g)

  rng = np.random.default_rng(0)

  def data(shape):
    return ({'x': jnp.asarray(rng.random(shape + (28, 28, 1),
                                         dtype=np.float32)),
             'y': jnp.asarray(rng.integers(0, 62, shape).astype(np.int32))},
            jnp.ones(shape, bool))

  def bench(f, *args):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      times.append(time.perf_counter() - t)
    return float(np.median(times))

  steps = _STEPS.value
  step = jax.jit(sgd)
  b, m = data((steps, B))

  def loop(p):
    for t in range(steps):
      p = step(p, {k: v[t] for k, v in b.items()}, m[t])
    return p

  @jax.jit
  def scan(p, batches, masks):
    return jax.lax.scan(lambda q, bm: (sgd(q, *bm), None), p,
                        (batches, masks))[0]

  per20 = {'python_loop': bench(loop, p0) / steps,
           'scan_1_lane': bench(scan, p0, b, m) / steps}
  for lanes in map(int, _LANES.value):
    bl, ml = data((steps // lanes, lanes, B))
    pl = jax.tree.map(lambda a: jnp.broadcast_to(a, (lanes,) + a.shape), p0)

    @jax.jit
    def scan_lanes(p, batches, masks):
      return jax.lax.scan(lambda q, bm: (jax.vmap(sgd)(q, *bm), None), p,
                          (batches, masks))[0]

    per20[f'scan_{lanes}_lanes'] = bench(scan_lanes, pl, bl,
                                         ml) / (steps // lanes * lanes)
  n_central = max(1, steps * B // _CENTRAL.value)
  bc, mc = data((n_central, _CENTRAL.value))
  per20['centralized'] = bench(scan, p0, bc, mc) / (n_central * _CENTRAL.value
                                                    / B)
  print(f'jax {jax.__version__}, {jax.default_backend()}, {_MODEL.value}, '
        f'{steps} steps of {B} examples')
  print(f'{"method":16s} {"ms / 20 examples":>17s} {"vs centralized":>15s}')
  for name, t in per20.items():
    print(f'{name:16s} {1e3 * t:17.3f} {per20["centralized"] / t:14.2f}x')


if __name__ == '__main__':
  app.run(main)
