"""Chunked and packed rounds compute what the per-client reference loop does."""

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_pfi.algorithms import core
from fedjax_pfi.algorithms import fedavg
from fedjax_pfi.algorithms import partitioned
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.models import zoo
from tests import reference
from tests.algorithms.test_rounds import toy_dataset

SEED = 3
B = 4


@pytest.fixture(scope='module')
def setup():
  ds = toy_dataset(num_clients=12)
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(5,))
  return ds, model, model.init(jax.random.key(0))


def test_assign_lanes_balances_work():
  steps = np.array([5, 1, 3, 3, 2, 0, 4])
  lanes = cohort_lib.assign_lanes(steps, 3)
  # Longest first to the least-loaded lane: 5 | 4 | 3, then 3 -> lane 2
  # (load 3), 2 -> lane 1 (4), 1 -> lane 0 (5); the 0-step client is left out.
  assert lanes == [[0, 1], [6, 4], [2, 3]]
  assert [int(steps[lane].sum()) for lane in map(np.array, lanes)] == [6, 6, 6]


def test_pack_cohort_layout_and_efficiency(setup):
  ds, _, _ = setup
  ids = np.array([0, 3, 5, 7])
  steps = cohort_lib.client_steps(ds.client_sizes[ids], B, 1)
  packed = cohort_lib.pack_cohort(ds, ids, num_lanes=2, batch_size=B,
                                  num_slots=6, seed=SEED)
  stacked = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_slots=6,
                                    seed=SEED)
  # Every client's steps appear once, in order, with the same rows.
  for j, cid in enumerate(ids):
    where = packed.slot == j
    assert where.sum() == steps[j]
    lane = int(np.flatnonzero(where.any(1))[0])
    t = np.flatnonzero(where[lane])
    np.testing.assert_array_equal(packed.local_step[lane, t], np.arange(t.size))
    assert packed.first[lane, t[0]] and packed.last[lane, t[-1]]
    np.testing.assert_array_equal(packed.batches['x'][lane, t],
                                  stacked.batches['x'][j, :steps[j]])
    np.testing.assert_array_equal(packed.mask[lane, t],
                                  stacked.mask[j, :steps[j]])
  assert packed.mask.sum() == stacked.mask.sum() == ds.client_sizes[ids].sum()
  # Real / computed examples, by hand: the stacked cohort computes
  # max(steps) steps of 6 slots x B examples; the packed one its longest lane
  # of 2 lanes.
  real = ds.client_sizes[ids].sum()
  assert cohort_lib.padding_efficiency(stacked) == pytest.approx(
      real / (steps.max() * 6 * B))
  longest = max(np.sum(packed.slot[lane] >= 0) for lane in range(2))
  assert cohort_lib.padding_efficiency(packed) == pytest.approx(
      real / (longest * 2 * B))
  assert (cohort_lib.padding_efficiency(packed) >
          cohort_lib.padding_efficiency(stacked))


CLIENT_OPTS = {'sgd': lambda: optax.sgd(0.1),
               'adam': lambda: optax.adam(0.01),
               'momentum': lambda: optax.sgd(0.05, momentum=0.9)}


@pytest.mark.parametrize('layout', ['packed', 'chunked', 'packed_chunked'])
@pytest.mark.parametrize('opt', sorted(CLIENT_OPTS))
def test_layouts_match_reference_loop(setup, layout, opt):
  ds, model, params0 = setup
  mu = 0.3 if opt == 'sgd' else 0.0  # FedProx too
  server_opt = server_optimizers.server_optimizer('fedavgm', 0.5)
  chunk = None if layout == 'packed' else 2
  alg = fedavg.fed_opt(model, CLIENT_OPTS[opt](), server_opt, proximal_mu=mu,
                       execution=core.Execution(chunk_size=chunk))
  state = alg.init(params0)
  ref_params, ref_opt = params0, server_opt.init(params0)
  root = jax.random.key(11)
  for r in range(2):
    ids = cohort_lib.sample_cohort(ds.num_clients, 5, SEED, r)
    steps = cohort_lib.client_steps(ds.client_sizes[ids], B, 2)
    steps[0] = max(1, steps[0] // 2)  # a straggler's partial work
    kw = dict(batch_size=B, num_epochs=2, steps_override=steps, num_slots=6,
              seed=SEED, round_idx=r, step_buckets=(8, 16, 32, 64))
    if layout.startswith('packed'):
      cohort = cohort_lib.pack_cohort(ds, ids, num_lanes=4, **kw)
    else:
      cohort = cohort_lib.stack_cohort(ds, ids, **kw)
    key = jax.random.fold_in(root, r)
    state, metrics = alg.apply(state, cohort, key)
    ref_params, ref_opt = reference.fedopt_round(
        model, CLIENT_OPTS[opt](), server_opt, ref_params, ref_opt, ds, ids,
        batch_size=B, num_epochs=2, seed=SEED, round_idx=r, key=key, mu=mu,
        steps=steps)
    chex.assert_trees_all_close(state.params, ref_params, atol=2e-5,
                                rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(metrics['client_steps'])[:5],
                                  steps)
    seen = sum(len(b['y']) for j, cid in enumerate(ids)
               for b in reference.client_batches(ds, cid, B, 2, SEED, r,
                                                 steps[j]))
    assert int(metrics['train_examples']) == seen
    assert int(metrics['clients']) == 5


def test_per_client_metrics_do_not_depend_on_layout(setup):
  ds, model, params0 = setup
  server_opt = server_optimizers.server_optimizer('fedavg', 1.0)
  ids = cohort_lib.sample_cohort(ds.num_clients, 5, SEED, 0)
  kw = dict(batch_size=B, num_slots=8, seed=SEED)
  outs = []
  for chunk, cohort in [
      (None, cohort_lib.stack_cohort(ds, ids, **kw)),
      (4, cohort_lib.stack_cohort(ds, ids, **kw)),
      (None, cohort_lib.pack_cohort(ds, ids, num_lanes=2, **kw)),
      (1, cohort_lib.pack_cohort(ds, ids, num_lanes=2, **kw))]:
    alg = fedavg.fed_opt(model, optax.sgd(0.1), server_opt,
                         execution=core.Execution(chunk_size=chunk))
    outs.append(alg.apply(alg.init(params0), cohort, jax.random.key(1)))
  for state, metrics in outs[1:]:
    chex.assert_trees_all_close(state.params, outs[0][0].params, atol=1e-6,
                                rtol=1e-6)
    for k in ('client_loss', 'client_steps', 'train_examples', 'train_loss'):
      np.testing.assert_allclose(metrics[k], outs[0][1][k], rtol=1e-5,
                                 atol=1e-6)
  assert int(outs[0][1]['train_examples']) == ds.client_sizes[ids].sum()


def test_chunked_personal_state_matches_unchunked(setup):
  """FedPer-style: the output layer personal, the rest averaged."""
  ds, model, params0 = setup
  server_opt = server_optimizers.server_optimizer('fedavg', 1.0)
  personal = r'Dense_1/'
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params0)[0]]
  assert any('Dense_1' in p for p in paths), paths
  states = []
  for chunk in (None, 2):
    alg = partitioned.fed_partitioned(
        model, optax.sgd(0.1), server_opt, personal=personal,
        num_clients=ds.num_clients, execution=core.Execution(chunk_size=chunk))
    state = alg.init(params0)
    for r in range(3):
      ids = cohort_lib.sample_cohort(ds.num_clients, 5, SEED, r)
      cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_slots=6,
                                       seed=SEED, round_idx=r)
      state, _ = alg.apply(state, cohort, jax.random.fold_in(
          jax.random.key(2), r))
    states.append(state)
  chex.assert_trees_all_close(states[0].params, states[1].params, atol=1e-6,
                              rtol=1e-6)
  chex.assert_trees_all_close(states[0].client_states,
                              states[1].client_states, atol=1e-6, rtol=1e-6)
  assert any(np.any(np.asarray(x)) for x in
             jax.tree.leaves(states[0].client_states))


def test_layout_errors(setup):
  ds, model, params0 = setup
  server_opt = server_optimizers.server_optimizer('fedavg', 1.0)
  ids = np.arange(5)
  alg = partitioned.fed_partitioned(model, optax.sgd(0.1), server_opt,
                                    personal=r'Dense_1/',
                                    num_clients=ds.num_clients)
  packed = cohort_lib.pack_cohort(ds, ids, num_lanes=2, batch_size=B)
  with pytest.raises(ValueError, match='personal state'):
    alg.apply(alg.init(params0), packed, jax.random.key(0))
  alg = fedavg.fed_opt(model, optax.sgd(0.1), server_opt,
                       execution=core.Execution(chunk_size=2))
  with pytest.raises(ValueError, match='chunks of 2'):
    alg.apply(alg.init(params0), cohort_lib.stack_cohort(
        ds, ids, batch_size=B), jax.random.key(0))
  assert core.Execution(chunk_size=2).slots(5) == 6
  with pytest.raises(ValueError, match='num_lanes'):
    cohort_lib.assign_lanes(np.array([1]), 0)


def test_lane_length_bound_holds_for_every_cohort():
  rng = np.random.default_rng(0)
  population = rng.integers(1, 21, 300)
  for cohort_size, lanes in [(50, 1), (50, 2), (50, 7), (300, 16)]:
    bound = cohort_lib.lane_length_bound(population, cohort_size, lanes)
    for r in range(20):
      ids = rng.choice(population.size, cohort_size, replace=False)
      packed = cohort_lib.assign_lanes(population[ids], lanes)
      longest = max(int(population[ids][lane].sum()) for lane in packed)
      assert longest <= bound
  # By hand: the 3 largest of [5, 1, 3, 3] sum to 11; 2 lanes: 6 + 5 = 11.
  assert cohort_lib.lane_length_bound(np.array([5, 1, 3, 3]), 3, 2) == 11


def test_cohort_batches_are_aligned_zero_padded_and_not_copied(setup):
  ds, _, _ = setup
  ids = np.array([1, 2, 6])
  for cohort in (cohort_lib.pack_cohort(ds, ids, num_lanes=2, batch_size=B,
                                        seed=SEED),
                 cohort_lib.stack_cohort(ds, ids, batch_size=B, seed=SEED,
                                         num_slots=5)):
    for name, col in cohort.batches.items():
      assert col.ctypes.data % 64 == 0, name
      # Padded examples are zeros; the real ones are the clients' rows.
      assert not np.any(col[~cohort.mask])
      real = np.sort(col[cohort.mask].reshape(int(cohort.mask.sum()), -1),
                     axis=0)
      rows = np.concatenate([np.arange(ds.offsets[c], ds.offsets[c + 1])
                             for c in ids])
      want = np.sort(ds.columns[name][rows].reshape(rows.size, -1), axis=0)
      np.testing.assert_array_equal(real, want)
    if jax.default_backend() == 'cpu':  # the transfer aliases, not copies
      on_device = jax.device_put(cohort.batches['x'])
      assert (on_device.unsafe_buffer_pointer() ==
              cohort.batches['x'].ctypes.data)
