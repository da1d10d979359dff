r"""Peak memory of one federated round as the cohort grows: full fine-tuning vs LoRA.

  python -m experiments.benchmarks.lora_memory --cohorts=8,64,256 --rss

Model: by default the embedded foundation model's architecture (byte-level
GPT-2, dim 128, 3 layers, 4 heads, 636,160 params; ``--dim``, ``--layers``,
``--heads`` change it), random weights. Methods:

- ``full``: FedAvg fine-tuning every weight (each client trains a copy);
- ``lora``: FedIT with rank-8 adapters on q and v (12,288 at dim 128), applied at
  the activations (``x W + s (x A) B``) with the base frozen and unbatched;
- ``lora_merge``: the same adapters merged into the weights inside the loss
  (``W + s A B`` per client), for comparison.

For each method and cohort size ``C`` the round is compiled ahead of time
and XLA's buffer assignment reports the bytes it plans: arguments (state,
cohort, frozen base) + outputs - aliased (donated) + temporaries. The per-
client slope between the smallest and the largest cohort is printed beside
the model's and the adapters' sizes. ``--rss`` also runs one real round per
configuration in a fresh process and reports its peak resident memory.

Every client of a vmapped round holds its own activations, so the per-client
slope is weights (what differs between the methods) plus activations (the
same for all, and what dominates a small model on long batches). Workloads:
``--batch=8 --seq_len=64`` (what ``shakespeare_lora.py`` trains),
``--batch=1 --seq_len=8`` (activations negligible: the slope isolates what
each client holds of the weights) and a wider model, ``--dim=512 --layers=4
--batch=2 --seq_len=32``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pfi.algorithms import fedavg
from fedjax_pfi.algorithms import partitioned
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.models import zoo
from fedjax_pfi.peft import lora

_COHORTS = flags.DEFINE_list('cohorts', ['8', '64', '256'], 'Cohort sizes.')
_METHODS = flags.DEFINE_list('methods', ['full', 'lora', 'lora_merge'],
                             'Methods.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Examples per local step.')
_SEQ = flags.DEFINE_integer('seq_len', 64, 'Bytes per example.')
_STEPS = flags.DEFINE_integer('steps', 4, 'Local steps.')
_DIM = flags.DEFINE_integer('dim', 128, 'Model width.')
_LAYERS = flags.DEFINE_integer('layers', 3, 'Transformer blocks.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Attention heads.')
_RSS = flags.DEFINE_bool('rss', False, 'Also run one round per configuration '
                         'in a fresh process and report peak RSS.')
_CHILD = flags.DEFINE_string('child', None, 'Internal: method,C to run.')

VOCAB = 257
CFG = lora.LoraConfig(rank=8, alpha=16.0, target=r'attn/(q|v)$')


def build(method: str):
  meta = {'vocab_size': VOCAB, 'pad_id': 0, 'seq_len': _SEQ.value}
  base = zoo.build_model('transformer', np.zeros((1, _SEQ.value), np.int32),
                         meta, dim=_DIM.value, num_layers=_LAYERS.value,
                         num_heads=_HEADS.value)
  server = server_optimizers.server_optimizer('fedavg')
  if method == 'full':
    return fedavg.fed_opt(base, optax.sgd(0.1), server), base.init
  if method not in ('lora', 'lora_merge'):
    raise ValueError(f'unknown method {method!r}; accepted: full, lora, '
                     'lora_merge.')
  model = lora.lora_model(base, CFG._replace(
      mode='merge' if method == 'lora_merge' else 'activation'))
  alg = partitioned.fed_partitioned(model, optax.sgd(0.1), server,
                                    frozen=r'^base/', name='fedit')
  return alg, model.init


def cohort(c: int, concrete: bool = False):
  shape = (c, _STEPS.value, _BATCH.value)
  if concrete:
    return cohort_lib.Cohort(
        jnp.arange(c, dtype=jnp.int32),
        {'x': jnp.ones(shape + (_SEQ.value,), jnp.int32),
         'y': jnp.ones(shape + (_SEQ.value,), jnp.int32)},
        jnp.ones(shape, bool), jnp.ones([c], jnp.float32))
  s = jax.ShapeDtypeStruct
  return cohort_lib.Cohort(
      s((c,), jnp.int32), {'x': s(shape + (_SEQ.value,), jnp.int32),
                           'y': s(shape + (_SEQ.value,), jnp.int32)},
      s(shape, jnp.bool_), s((c,), jnp.float32))


def planned_bytes(method: str, c: int) -> dict:
  alg, init = build(method)
  params = jax.eval_shape(init, jax.random.key(0))
  state = jax.eval_shape(alg.init, params)
  frozen = jax.eval_shape(alg.frozen_part, params)
  compiled = jax.jit(alg.apply_unjitted, donate_argnums=0).lower(
      state, cohort(c), jax.random.key(0), frozen).compile()
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes -
           m.alias_size_in_bytes + m.temp_size_in_bytes)
  return {'args': m.argument_size_in_bytes, 'temp': m.temp_size_in_bytes,
          'total': total}


def run_child(method: str, c: int) -> None:
  """One real round in this process; prints peak RSS (bytes) as JSON."""
  alg, init = build(method)
  params = init(jax.random.key(0))
  state, frozen = alg.init(params), alg.frozen_part(params)
  del params
  state, m = alg.apply(state, cohort(c, concrete=True), jax.random.key(1),
                       frozen)
  jax.block_until_ready((state, m))
  print(json.dumps({'rss': resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main(argv):
  del argv
  if _CHILD.value:
    method, c = _CHILD.value.split(',')
    run_child(method, int(c))
    return
  cohorts = [int(c) for c in _COHORTS.value]
  _, init = build('lora')
  p = jax.eval_shape(init, jax.random.key(0))
  def nbytes(t):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  model_b, adapter_b = nbytes(p['base']), nbytes(p['lora'])
  print(f'jax {jax.__version__}, {jax.default_backend()}; model dim '
        f'{_DIM.value} x {_LAYERS.value} layers, {model_b / 1e6:.2f} MB, adapters {adapter_b / 1e6:.3f} MB; batch '
        f'{_BATCH.value} x {_SEQ.value} bytes, {_STEPS.value} local steps')
  print(f'{"method":11s} {"C":>5s} {"planned MB":>11s} {"temp MB":>9s}'
        + (f' {"peak RSS MB":>12s}' if _RSS.value else ''))
  results = {}
  for method in _METHODS.value:
    for c in cohorts:
      r = planned_bytes(method, c)
      if _RSS.value:
        out = subprocess.run(
            [sys.executable, '-m', 'experiments.benchmarks.lora_memory',
             f'--child={method},{c}', f'--batch={_BATCH.value}',
             f'--seq_len={_SEQ.value}', f'--steps={_STEPS.value}',
             f'--dim={_DIM.value}', f'--layers={_LAYERS.value}',
             f'--heads={_HEADS.value}'],
            capture_output=True, text=True, check=True)
        r['rss'] = json.loads(out.stdout.strip().splitlines()[-1])['rss']
      results[method, c] = r
      print(f'{method:11s} {c:5d} {r["total"] / 1e6:11.1f} '
            f'{r["temp"] / 1e6:9.1f}' +
            (f' {r["rss"] / 1e6:12.1f}' if _RSS.value else ''), flush=True)
  lo, hi = cohorts[0], cohorts[-1]
  print(f'per-client slope of planned bytes, C={lo} -> {hi}:')
  for method in _METHODS.value:
    slope = (results[method, hi]['total'] - results[method, lo]['total']) / (
        hi - lo)
    print(f'  {method:11s} {slope / 1e6:8.3f} MB/client = '
          f'{slope / model_b:6.2f} x model, {slope / adapter_b:8.1f} x '
          'adapters')


if __name__ == '__main__':
  app.run(main)
