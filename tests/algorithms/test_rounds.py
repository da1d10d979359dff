"""The vectorised round equals the plain per-client loop, for every algorithm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import fedavg
from fedjax_pfi.algorithms import scaffold
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.models import zoo
from tests import reference

SEED = 3
B = 4


def toy_dataset(num_clients=9, num_classes=4, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(3, 17, num_clients)  # ragged: 1..5 steps per epoch
  n = int(sizes.sum())
  x = rng.normal(size=(n, dim)).astype(np.float32)
  w = rng.normal(size=(dim, num_classes))
  y = np.argmax(x @ w + rng.normal(size=(n, num_classes)), -1).astype(np.int32)
  return FederatedDataset.from_client_index(
      {'x': x, 'y': y}, np.repeat(np.arange(num_clients), sizes),
      metadata={'num_classes': num_classes})


@pytest.fixture(scope='module')
def setup():
  ds = toy_dataset()
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(5,))
  return ds, model, model.init(jax.random.key(0))


CASES = {
    'fedavg_sgd': (lambda: optax.sgd(0.1), 'fedavg', {}, 0.0),
    'fedavgm_momentum_client': (lambda: optax.sgd(0.05, momentum=0.9),
                                'fedavgm', {'learning_rate': 0.5}, 0.0),
    'fedadam_adam_client': (lambda: optax.adam(0.01), 'fedadam',
                            {'learning_rate': 0.03}, 0.0),
    'fedyogi': (lambda: optax.sgd(0.1), 'fedyogi', {'learning_rate': 0.03},
                0.0),
    'fedadagrad': (lambda: optax.sgd(0.1), 'fedadagrad',
                   {'learning_rate': 0.03}, 0.0),
    'fedprox': (lambda: optax.sgd(0.1), 'fedavg', {}, 0.7),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_fedopt_matches_reference_loop(setup, case):
  ds, model, params0 = setup
  make_client_opt, server_name, server_kw, mu = CASES[case]
  server_opt = server_optimizers.server_optimizer(server_name, **server_kw)
  alg = fedavg.fed_opt(model, make_client_opt(), server_opt, proximal_mu=mu)
  state = alg.init(params0)
  ref_params, ref_opt = params0, server_opt.init(params0)
  root = jax.random.key(11)
  for r in range(2):
    ids = cohort_lib.sample_cohort(ds.num_clients, 4, SEED, r)
    # Stragglers doing partial work (FedProx): the first client stops early.
    steps = cohort_lib.client_steps(ds.client_sizes[ids], B, 2)
    steps[0] = max(1, steps[0] // 2)
    cohort = cohort_lib.stack_cohort(
        ds, ids, batch_size=B, num_epochs=2, steps_override=steps,
        step_buckets=(4, 8, 16), num_slots=6, seed=SEED, round_idx=r)
    key = jax.random.fold_in(root, r)
    state, metrics = alg.apply(state, cohort, key)
    ref_params, ref_opt = reference.fedopt_round(
        model, make_client_opt(), server_opt, ref_params, ref_opt, ds, ids,
        batch_size=B, num_epochs=2, seed=SEED, round_idx=r, key=key, mu=mu,
        steps=steps)
    chex.assert_trees_all_close(state.params, ref_params, atol=2e-5,
                                rtol=2e-5)
    assert int(metrics['clients']) == 4
  assert int(state.round) == 2


def test_scaffold_matches_reference_loop(setup):
  ds, model, params0 = setup
  lr = 0.1
  server_opt = server_optimizers.server_optimizer('fedavg', 1.0)
  alg = scaffold.scaffold(model, lr, server_opt, ds.num_clients)
  state = alg.init(params0)
  ref = (params0, server_opt.init(params0),
         jax.tree.map(jnp.zeros_like, params0), {})
  root = jax.random.key(5)
  for r in range(3):  # rounds 2+ reuse stored client control variates
    ids = cohort_lib.sample_cohort(ds.num_clients, 5, SEED, r)
    cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=1,
                                     step_buckets=(8,), num_slots=7,
                                     seed=SEED, round_idx=r)
    key = jax.random.fold_in(root, r)
    state, _ = alg.apply(state, cohort, key)
    ref = reference.scaffold_round(
        model, lr, server_opt, *ref, ds.num_clients, ds, ids, batch_size=B,
        num_epochs=1, seed=SEED, round_idx=r, key=key)
  params, _, c, store = ref
  chex.assert_trees_all_close(state.params, params, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(state.extra['c'], c, atol=2e-5, rtol=2e-5)
  for cid, c_i in store.items():
    chex.assert_trees_all_close(
        jax.tree.map(lambda s: s[cid], state.client_states), c_i, atol=2e-5,
        rtol=2e-5)
  untouched = sorted(set(range(ds.num_clients)) - set(store))
  for cid in untouched:
    for leaf in jax.tree.leaves(state.client_states):
      assert not np.any(np.asarray(leaf[cid]))


def test_padded_steps_and_clients_change_nothing(setup):
  """Extra all-masked steps and zero-weight clients are exact no-ops, even
  with client momentum and Adam (whose state would drift on a zero grad)."""
  ds, model, params0 = setup
  for client_opt in (optax.sgd(0.1, momentum=0.9), optax.adam(0.01)):
    alg = fedavg.fed_opt(model, client_opt,
                         server_optimizers.server_optimizer('fedadam', 0.05))
    ids = cohort_lib.sample_cohort(ds.num_clients, 3, SEED, 0)
    tight = cohort_lib.stack_cohort(ds, ids, batch_size=B, seed=SEED)
    padded = cohort_lib.stack_cohort(ds, ids, batch_size=B, seed=SEED,
                                     step_buckets=(tight.shape[1] + 5,),
                                     num_slots=8)
    assert padded.shape[0] == 8 and padded.shape[1] == tight.shape[1] + 5
    key = jax.random.key(2)
    s1, m1 = alg.apply(alg.init(params0), tight, key)
    s2, m2 = alg.apply(alg.init(params0), padded, key)
    chex.assert_trees_all_equal(s1.params, s2.params)
    chex.assert_trees_all_equal(s1.opt_state, s2.opt_state)
    assert float(m1['train_loss']) == float(m2['train_loss'])


def test_steps_padded_for_the_whole_cohort_are_not_computed(setup):
  """A step bucket's extra steps cost nothing: the (vmapped) forward pass runs
  once per step in which some client of the cohort has data, whatever the
  bucket (the model counts its calls through a host callback)."""
  ds, model, params0 = setup
  calls = []

  def counted_stats(params, batch, rng=None, train=False):
    jax.debug.callback(lambda: calls.append(1))
    return model.example_stats(params, batch, rng, train)

  counting = model._replace(example_stats=counted_stats)
  alg = fedavg.fed_opt(counting, optax.sgd(0.1),
                       server_optimizers.server_optimizer('fedavg'))
  ids = cohort_lib.sample_cohort(ds.num_clients, 3, SEED, 0)
  tight = cohort_lib.stack_cohort(ds, ids, batch_size=B, seed=SEED)
  padded = cohort_lib.stack_cohort(ds, ids, batch_size=B, seed=SEED,
                                   step_buckets=(tight.shape[1] + 6,))
  counts = []
  for cohort in (tight, padded):
    calls.clear()
    state, _ = alg.apply(alg.init(params0), cohort, jax.random.key(0))
    jax.block_until_ready(state)
    jax.effects_barrier()
    counts.append(len(calls))
  assert counts == [tight.shape[1]] * 2, (counts, padded.shape)


def test_cohort_order_does_not_matter(setup):
  ds, model, params0 = setup
  alg = fedavg.fed_opt(model, optax.sgd(0.1),
                       server_optimizers.server_optimizer('fedavg'))
  ids = cohort_lib.sample_cohort(ds.num_clients, 4, SEED, 0)
  a = cohort_lib.stack_cohort(ds, ids, batch_size=B, seed=SEED)
  b = cohort_lib.stack_cohort(ds, ids[::-1], batch_size=B, seed=SEED)
  s1, _ = alg.apply(alg.init(params0), a, jax.random.key(0))
  s2, _ = alg.apply(alg.init(params0), b, jax.random.key(0))
  chex.assert_trees_all_close(s1.params, s2.params, atol=1e-6)


def test_fedavg_by_hand():
  """One client, one example, logistic regression from zero weights:
  grad W = (softmax(0) - onehot(y)) x, so W1 = -lr * grad (verifiable)."""
  x = np.array([[1.0, 2.0]], np.float32)
  y = np.array([2], np.int32)
  ds = FederatedDataset.from_client_index({'x': x, 'y': y}, np.array([0]),
                                          metadata={'num_classes': 3})
  model = zoo.build_model('logreg', x, ds.metadata)
  params = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0)))
  alg = fedavg.fed_opt(model, optax.sgd(0.5),
                       server_optimizers.server_optimizer('fedavg'))
  cohort = cohort_lib.stack_cohort(ds, [0], batch_size=1)
  state, metrics = alg.apply(alg.init(params), cohort, jax.random.key(0))
  p = 1.0 / 3.0
  expected_grad = np.array([[p, p, p - 1], [2 * p, 2 * p, 2 * (p - 1)]])
  np.testing.assert_allclose(state.params['Dense_0']['kernel'],
                             -0.5 * expected_grad, rtol=1e-6)
  np.testing.assert_allclose(state.params['Dense_0']['bias'],
                             -0.5 * np.array([p, p, p - 1]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['train_loss']), np.log(3.0),
                             rtol=1e-6)


def test_fedadam_server_step_by_hand():
  """Reddi et al. Algorithm 2 on a scalar: delta = 0.5, b1 = 0.9, b2 = 0.99,
  tau = 1e-3: m = 0.05, v = 0.99e-6 + 0.0025, x1 = eta m / (sqrt(v) + tau)."""
  opt = server_optimizers.server_optimizer('fedadam', 0.1, b1=0.9, b2=0.99,
                                           tau=1e-3)
  x = {'w': jnp.zeros([])}
  updates, _ = opt.update({'w': jnp.asarray(-0.5)}, opt.init(x), x)
  v = 0.99 * 1e-6 + 0.01 * 0.25
  np.testing.assert_allclose(float(updates['w']),
                             0.1 * 0.05 / (np.sqrt(v) + 1e-3), rtol=1e-5)


def test_one_trace_per_step_bucket(setup):
  ds, model, params0 = setup
  alg = fedavg.fed_opt(model, optax.sgd(0.1),
                       server_optimizers.server_optimizer('fedavg'))
  traces = []

  def counted(*args):
    traces.append(args[1].shape)
    return alg.apply_unjitted(*args)

  apply = jax.jit(chex.assert_max_traces(counted, n=2), donate_argnums=0)
  state = alg.init(params0)
  buckets = []
  for r in range(8):
    ids = cohort_lib.sample_cohort(ds.num_clients, 3, SEED, r)
    cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=1,
                                     step_buckets=(2, 8), num_slots=3,
                                     seed=SEED, round_idx=r)
    buckets.append(cohort.shape[1])
    state, _ = apply(state, cohort, jax.random.key(r))
  assert len(traces) == len(set(buckets))
  chex.clear_trace_counter()


def test_client_optimizer_errors():
  with pytest.raises(ValueError, match="unknown client optimizer 'rmsprop'"):
    client_updates.client_optimizer('rmsprop', 0.1)
  with pytest.raises(ValueError, match='must be positive, got -1'):
    client_updates.client_optimizer('sgd', -1)
  with pytest.raises(ValueError, match="unknown server optimizer 'fedsgd'"):
    server_optimizers.server_optimizer('fedsgd')
  with pytest.raises(ValueError, match='must be positive, got 0'):
    server_optimizers.server_optimizer('fedadam', 0)


def test_client_optimizer_lr_scales():
  """Leaves matched by a regex step with lr * factor (the first match
  wins); with momentum or Adam the factor scales the whole update."""
  params = {'a': {'w': 1.0}, 'c': {'b': 1.0, 'ab': 1.0}, 'd': 1.0}
  grads = jax.tree.map(lambda _: 1.0, params)
  opt = client_updates.client_optimizer('sgd', 0.1,
                                        lr_scales='^a/=10, b$=2,a=3')
  updates, _ = opt.update(grads, opt.init(params), params)
  chex.assert_trees_all_close(
      updates, {'a': {'w': -1.0}, 'c': {'b': -0.2, 'ab': -0.2}, 'd': -0.1})
  adam = client_updates.client_optimizer('adam', 0.1, lr_scales='^d$=4')
  updates, _ = adam.update(grads, adam.init(params), params)
  np.testing.assert_allclose(updates['d'], 4 * updates['a']['w'], rtol=1e-6)
  for bad in ('items', '[=2', 'a=-1', '=3', 'a=x'):
    with pytest.raises(ValueError, match='REGEX=FACTOR'):
      client_updates.client_optimizer('sgd', 0.1, lr_scales=bad)
