"""Runs the same rounds on 1, 2, 4 and 8 devices; prints their max differences.

Run as a subprocess by `test_sharding.py` (the device count is fixed when JAX
starts): ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import json
import sys

import jax
import numpy as np
import optax

from fedjax_pfi.algorithms import aggregators
from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import fedavg
from fedjax_pfi.algorithms import partitioned
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.models import zoo
from tests.algorithms.test_rounds import toy_dataset

B = 4
SEED = 3


def run(ds, model, params0, layout, execution):
  server_opt = server_optimizers.server_optimizer('fedavgm', 0.5)
  if layout == 'personal':
    alg = partitioned.fed_partitioned(
        model, optax.adam(0.01), server_opt, personal=r'Dense_1/',
        num_clients=ds.num_clients, execution=execution)
  elif layout == 'private':  # DP-FedAvg: clipped per client, noised once
    alg = fedavg.fed_opt(model, optax.sgd(0.1), server_opt,
                         aggregators.gaussian(0.3, 0.8, 7.0),
                         execution=execution)
  else:
    alg = fedavg.fed_opt(model, optax.sgd(0.1), server_opt, proximal_mu=0.1,
                         execution=execution)
  state = alg.init(params0)
  metrics = None
  for r in range(2):
    ids = cohort_lib.sample_cohort(ds.num_clients, 7, SEED, r)
    kw = dict(batch_size=B, seed=SEED, round_idx=r, step_buckets=(8, 16, 32))
    if layout == 'packed':
      lanes = execution.slots(5)
      cohort = cohort_lib.pack_cohort(ds, ids, num_lanes=lanes,
                                      num_slots=execution.slots(7), **kw)
    else:
      cohort = cohort_lib.stack_cohort(ds, ids, num_slots=execution.slots(7),
                                       **kw)
    state, metrics = alg.apply(state, cohort, jax.random.fold_in(
        jax.random.key(4), r))
  return jax.device_get((state.params, state.client_states,
                         metrics['client_loss'][:7]))


def main():
  assert jax.device_count() == 8, jax.devices()
  ds = toy_dataset(num_clients=12)
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(5,))
  params0 = model.init(jax.random.key(0))
  out = {}
  for layout in ('stacked', 'packed', 'personal', 'private'):
    results = {}
    for n in ((1, 2, 8) if layout == 'private' else (1, 2, 4, 8)):
      mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ('clients',))
      for chunk in (None, 1):
        results[(n, chunk)] = run(ds, model, params0, layout,
                                  core.Execution(chunk_size=chunk, mesh=mesh))
    ref = run(ds, model, params0, layout, core.Execution())
    out[layout] = {
        f'{n}x{chunk}': max(float(np.max(np.abs(a - b))) for a, b in zip(
            jax.tree.leaves(ref), jax.tree.leaves(res)))
        for (n, chunk), res in results.items()}
    out[layout + '_param_scale'] = max(
        float(np.max(np.abs(a))) for a in jax.tree.leaves(ref[0]))
  out['training'] = training_diffs()
  json.dump(out, sys.stdout)


def training_diffs():
  """The training loop on 1 device vs 4 (packed) and 2 (chunked) devices,
  and with secure aggregation (SecAgg+, dropouts) and with robust
  aggregation (Multi-Krum under ALIE) on 1 vs 2 chunked."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from fedjax_pfi import training  # pylint: disable=g-import-not-at-top
  from tests.test_training import small_config  # pylint: disable=g-import-not-at-top
  rows = {}
  secagg = {'secure_aggregation.enabled': True,
            'secure_aggregation.clip_norm': 20.0,
            'secure_aggregation.neighbors': 4,
            'secure_aggregation.threshold': 1,
            'secure_aggregation.dropout_upload': 0.4,
            'clients_per_round': 6}
  # Multi-Krum under ALIE: the buffer is all-gathered by the psum
  robust = {'aggregator.name': 'multi_krum', 'aggregator.f': 1,
            'attack.name': 'alie', 'attack.fraction': 0.25,
            'clients_per_round': 6}
  # top-k with error feedback: the residual rows are psum-ed like personal
  # rows, and the broadcast's draw is the round's
  compressed = {'compression.name': 'topk', 'compression.fraction': 0.1,
                'compression.error_feedback': True,
                'compression.download': True}
  # FedBuff with DP, secure aggregation and rotated QSGD: each step's
  # buffer sharded like a cohort, the ring of versions replicated
  fedbuff = {'devices.profile': 'lognormal', 'asynchrony.mode': 'fedbuff',
             'asynchrony.buffer_size': 4, 'asynchrony.concurrency': 6,
             'client.max_steps': 2, 'privacy.mechanism': 'gaussian',
             'privacy.clip_norm': 1.0, 'privacy.noise_multiplier': 0.3,
             'server.weighting': 'uniform',
             'secure_aggregation.enabled': True,
             'secure_aggregation.bits': 24,
             'compression.name': 'rotated_qsgd', 'compression.bits': 6}
  for name, kw in [('one', {}),
                   ('fedbuff_one', fedbuff),
                   ('fedbuff_two_chunked', {**fedbuff,
                                            'execution.devices': 2,
                                            'execution.chunk_size': 1}),
                   ('four_packed', {'execution.devices': 4,
                                    'execution.pack_lanes': 4}),
                   ('two_chunked', {'execution.devices': 2,
                                    'execution.chunk_size': 1}),
                   ('secagg_one', secagg),
                   ('secagg_two_chunked', {**secagg, 'execution.devices': 2,
                                           'execution.chunk_size': 1}),
                   ('robust_one', robust),
                   ('robust_two_chunked', {**robust, 'execution.devices': 2,
                                           'execution.chunk_size': 1}),
                   ('compressed_one', compressed),
                   ('compressed_two_chunked', {
                       **compressed, 'execution.devices': 2,
                       'execution.chunk_size': 1})]:
    with tempfile.TemporaryDirectory() as d:
      training.run(small_config(**kw), d)
      rows[name] = training.read_metrics(d)
  diffs = {}
  for name, base in (('four_packed', 'one'), ('two_chunked', 'one'),
                     ('secagg_two_chunked', 'secagg_one'),
                     ('robust_two_chunked', 'robust_one'),
                     ('compressed_two_chunked', 'compressed_one'),
                     ('fedbuff_two_chunked', 'fedbuff_one')):
    diffs[name] = max(
        abs(float(np.asarray(a[k], float).max() - np.asarray(b[k], float).max())
            if np.ndim(a[k]) else float(a[k]) - float(b[k]))
        for a, b in zip(rows[base], rows[name]) for k in a
        if not k.startswith('time/') and k != 'round')
  diffs['secagg_dropped'] = sum(r['secagg/dropped_before_upload']
                                for r in rows['secagg_one'])
  diffs['robust_malicious'] = sum(r['attack/malicious_clients']
                                  for r in rows['robust_one'])
  diffs['compressed_vnmse'] = rows['compressed_one'][-1]['compression/vnmse']
  diffs['fedbuff_staleness'] = max(r['async/staleness_max']
                                  for r in rows['fedbuff_one'])
  diffs['fedbuff_epsilon'] = rows['fedbuff_one'][-1]['privacy/epsilon_rdp']
  diffs['rounds'] = len(rows['one'])
  diffs['compilations'] = max(r['time/compilations'] for v in rows.values()
                              for r in v)
  return diffs


if __name__ == '__main__':
  main()
