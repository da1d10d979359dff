"""Personalized FL algorithms against plain per-client reference loops.

Each round of the vectorised algorithm (built by name through the registry,
as a config names it) must equal a Python loop over clients that trains
full parameter trees with plain SGD, freezing leaves by zeroing their
gradients at the steps the paper freezes them.
"""

import re

import chex
import jax.flatten_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfi import training
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import personalized
from fedjax_pfi.algorithms import registry
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.models import zoo
from tests import reference
from tests.algorithms.test_rounds import toy_dataset

SEED, B, LR, EPOCHS = 5, 4, 0.2, 2
HEAD = '^Dense_1/'


@pytest.fixture(scope='module')
def setup():
  ds = toy_dataset(num_clients=8)
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(5,))
  return ds, model


def gshapes_leaf(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def config_for(name, **personalization):
  c = training.default_config()
  c.algorithm = name
  c.client.learning_rate = LR
  c.client.epochs = EPOCHS
  c.client.batch_size = B
  c.personalization.update(personalization)
  return c


def path_of(kp):
  return '/'.join(str(k.key) for k in kp)


def masked_sgd(model, p, batches, trainable, *, anchor=None, lam=0.0):
  """SGD on the leaves ``trainable(step, path)`` accepts."""
  grad = jax.jit(jax.grad(lambda q, b: reference.mean_loss(model, q, b, None)))
  for s, batch in enumerate(batches):
    g = grad(p, batch)
    if lam:
      g = jax.tree.map(lambda g, w, a: g + lam * (w - a), g, p, anchor)
    p = jax.tree_util.tree_map_with_path(
        lambda kp, w, d: w - LR * d if trainable(s, path_of(kp)) else w, p, g)
  return p


def weighted_mean(trees, weights):
  total = float(sum(weights))
  return jax.tree.map(lambda *x: sum(w * v for w, v in zip(weights, x)) /
                      total, *trees)


def test_head_pattern_is_the_output_layer(setup):
  ds, model = setup
  params = model.init(jax.random.key(0))
  assert personalized.head_pattern(model, params) == HEAD
  cnn = zoo.build_model('cnn', np.zeros((2, 28, 28, 1), np.float32),
                        {'num_classes': 62})
  assert personalized.head_pattern(cnn, jax.eval_shape(
      cnn.init, jax.random.key(0))) == '^Dense_1/'
  # Flax sorts params by name ('pos_embedding' last); the head is the output
  # projection, called after the final LayerNorm.
  lm = zoo.build_model('char_transformer', np.zeros((2, 8), np.int32),
                       {'vocab_size': 20, 'pad_id': 0}, dim=8, num_layers=1,
                       num_heads=2)
  shapes = jax.eval_shape(lm.init, jax.random.key(0))
  assert list(shapes)[-1] == 'pos_embedding'
  assert personalized.head_pattern(lm, shapes) == '^Dense_0/'
  assert shapes['Dense_0']['kernel'].shape[-1] == 20
  # GPT-2 ties the output to the token embedding (``Embed.attend``): the
  # head is the embedding table, not the final LayerNorm.
  gpt = zoo.build_model('transformer', np.zeros((2, 8), np.int32),
                        {'vocab_size': 20, 'pad_id': 0, 'seq_len': 8},
                        style='gpt2', dim=8, num_layers=1, num_heads=2)
  gshapes = jax.eval_shape(gpt.init, jax.random.key(0))
  head = personalized.head_pattern(gpt, gshapes)
  leaves = [p for p in param_groups.leaf_paths(gshapes) if re.search(head, p)]
  assert [gshapes_leaf(gshapes, p).shape for p in leaves] == [(20, 8)], leaves
  body = re.compile(personalized.body_pattern(HEAD))
  assert body.search('Dense_0/kernel') and not body.search('Dense_1/kernel')


# name -> (personal leaves, trainable(step, path, n_steps)); the global part
# is every leaf that is not personal (FedBABU: minus the frozen head).
PARTITIONS = {
    'local_only': (lambda path: True, lambda s, path, n: True),
    'fedper': (lambda path: path.startswith('Dense_1'),
               lambda s, path, n: True),
    'lg_fedavg': (lambda path: not path.startswith('Dense_1'),
                  lambda s, path, n: True),
    # Of n = 2 epochs of steps, the first half trains the head only.
    'fedrep': (lambda path: path.startswith('Dense_1'),
               lambda s, path, n: (s < n // 2) == path.startswith('Dense_1')),
    'fedbabu': (lambda path: False,
                lambda s, path, n: not path.startswith('Dense_1')),
    'fedavg_ft': (lambda path: False, lambda s, path, n: True),
}


@pytest.mark.parametrize('name', sorted(PARTITIONS))
def test_partition_matches_reference_loop(setup, name):
  ds, model = setup
  is_personal, trainable = PARTITIONS[name]
  built = registry.build(config_for(name), model, ds.num_clients)
  alg = built.algorithm
  params0 = built.init_params(jax.random.key(1))
  state = alg.init(params0)
  frozen = alg.frozen_part(params0)
  chex.clear_trace_counter()  # the counter is keyed by the code, shared by
  apply = chex.assert_max_traces(alg.apply_unjitted, n=1)  # every parameter
  apply = jax.jit(apply)

  # The reference: the global model and every client's personal leaves.
  glob = params0
  personal = {}
  for r, ids in enumerate([np.array([0, 3, 5]), np.array([3, 6, 1])]):
    cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=EPOCHS,
                                     seed=SEED, round_idx=r,
                                     step_buckets=(16,), num_slots=4)
    state, metrics = apply(state, cohort, jax.random.key(r), frozen)
    deltas, weights = [], []
    for cid in ids:
      batches = reference.client_batches(ds, cid, B, EPOCHS, SEED, r)
      start = jax.tree_util.tree_map_with_path(
          lambda kp, g: personal.get((int(cid), path_of(kp)), g)
          if is_personal(path_of(kp)) else g, glob)
      n = len(batches)
      end = masked_sgd(model, start, batches,
                       lambda s, path: trainable(s, path, n))
      for kp, leaf in jax.tree_util.tree_flatten_with_path(end)[0]:
        if is_personal(path_of(kp)):
          personal[(int(cid), path_of(kp))] = leaf
      deltas.append(jax.tree.map(jnp.subtract, end, glob))
      weights.append(ds.client_sizes[cid])
    mean = weighted_mean(deltas, weights)
    glob = jax.tree_util.tree_map_with_path(
        lambda kp, g, d: g if is_personal(path_of(kp)) else g + d, glob, mean)

  view = alg.eval_view(state, frozen)
  got_global = view.params
  want_global = jax.tree_util.tree_map_with_path(
      lambda kp, g, p0: p0 if is_personal(path_of(kp)) else g, glob, params0)
  chex.assert_trees_all_close(got_global, want_global, atol=2e-6)
  if view.personal is not None:
    for (cid, path), want in personal.items():
      got = view.personal
      for k in path.split('/'):
        got = got[k]
      np.testing.assert_allclose(got[cid], want, atol=2e-6, err_msg=path)
    # Clients that never trained keep the initial params.
    untouched = 2
    got = jax.tree.map(lambda x: x[untouched], view.personal)
    want = jax.tree.map(lambda x: x, params0)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(got)[0]:
      ref = want
      for k in path_of(kp).split('/'):
        ref = ref[k]
      np.testing.assert_array_equal(leaf, ref)
  assert alg.has_global_model == (name in ('fedbabu', 'fedavg_ft'))
  assert alg.finetune == {'fedbabu': 'all', 'fedavg_ft': 'trainable'}.get(
      name, '')
  # Bytes: only the global part travels.
  sent = sum(x.size * 4 for kp, x in jax.tree_util.tree_flatten_with_path(
      params0)[0] if not is_personal(path_of(kp)) and not (
          name == 'fedbabu' and path_of(kp).startswith('Dense_1')))
  assert float(metrics['comm/upload_bytes']) == 3 * sent


def test_ditto_matches_reference_loop(setup):
  ds, model = setup
  lam = 0.5
  built = registry.build(config_for('ditto', ditto_lambda=lam), model,
                         ds.num_clients)
  alg = built.algorithm
  params0 = built.init_params(jax.random.key(1))
  state = alg.init(params0)
  glob, own = params0, {}
  def everything(s, path):
    return True
  for r, ids in enumerate([np.array([0, 3, 5]), np.array([3, 6, 1])]):
    cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=EPOCHS,
                                     seed=SEED, round_idx=r,
                                     step_buckets=(16,), num_slots=4)
    state, _ = alg.apply(state, cohort, jax.random.key(r))
    deltas, weights = [], []
    for cid in ids:
      batches = reference.client_batches(ds, cid, B, EPOCHS, SEED, r)
      deltas.append(jax.tree.map(jnp.subtract,
                                 masked_sgd(model, glob, batches, everything),
                                 glob))
      weights.append(ds.client_sizes[cid])
      own[int(cid)] = masked_sgd(model, own.get(int(cid), params0), batches,
                                 everything, anchor=glob, lam=lam)
    glob = jax.tree.map(jnp.add, glob, weighted_mean(deltas, weights))
  view = alg.eval_view(state, None)
  chex.assert_trees_all_close(view.params, glob, atol=2e-6)
  for cid, want in own.items():
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[cid], view.personal),
                                want, atol=2e-6)
  # The proximal pull is real: without it the personal models differ.
  assert lam > 0 and not np.allclose(
      view.personal['Dense_0']['kernel'][0],
      masked_sgd(model, params0, reference.client_batches(
          ds, 0, B, EPOCHS, SEED, 0), everything)['Dense_0']['kernel'])


def test_config_errors(setup):
  ds, model = setup
  with pytest.raises(ValueError, match='head_epochs'):
    registry.build(config_for('fedrep', head_epochs=2), model, ds.num_clients)
  with pytest.raises(ValueError, match='matches no parameter'):
    registry.build(config_for('fedper', head='^nope/'), model, ds.num_clients)
  with pytest.raises(ValueError, match='lambda'):
    registry.build(config_for('ditto', ditto_lambda=-1.0), model,
                   ds.num_clients)
  c = config_for('fedper')
  c.execution.pack_lanes = 2
  with pytest.raises(ValueError, match='personal state'):
    registry.build(c, model, ds.num_clients)


def grad_of(model):
  return jax.jit(jax.grad(lambda q, b: reference.mean_loss(model, q, b, None)))


def tree_vdot(x, y):
  return sum(float(jnp.vdot(u, v)) for u, v in zip(jax.tree.leaves(x),
                                                  jax.tree.leaves(y)))


def run_rounds(alg, params0, ds, reference_round):
  """Two rounds of ``alg`` and of ``reference_round(r, ids)``."""
  state = alg.init(params0)
  for r, ids in enumerate([np.array([0, 3, 5]), np.array([3, 6, 1])]):
    cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=EPOCHS,
                                     seed=SEED, round_idx=r,
                                     step_buckets=(16,), num_slots=4)
    state, _ = alg.apply(state, cohort, jax.random.key(r))
    reference_round(r, ids)
  return state


def test_apfl_matches_reference_loop(setup):
  ds, model = setup
  alpha0 = 0.3
  built = registry.build(config_for('apfl', apfl_alpha=alpha0), model,
                         ds.num_clients)
  params0 = built.init_params(jax.random.key(1))
  grad = grad_of(model)
  ref = {'w': params0, 'v': {}, 'a': {}}

  def reference_round(r, ids):
    glob, deltas, weights = ref['w'], [], []
    for cid in ids:
      cid = int(cid)
      w, v, a = glob, ref['v'].get(cid, params0), ref['a'].get(cid, alpha0)
      for batch in reference.client_batches(ds, cid, B, EPOCHS, SEED, r):
        gw = grad(w, batch)
        vbar = jax.tree.map(lambda x, y: a * x + (1 - a) * y, v, w)
        gbar = grad(vbar, batch)
        ga = tree_vdot(gbar, jax.tree.map(jnp.subtract, v, w))
        w, v, a = (jax.tree.map(lambda x, g: x - LR * g, w, gw),
                   jax.tree.map(lambda x, g: x - LR * a * g, v, gbar),
                   float(np.clip(a - LR * ga, 0.0, 1.0)))
      ref['v'][cid], ref['a'][cid] = v, a
      deltas.append(jax.tree.map(jnp.subtract, w, glob))
      weights.append(ds.client_sizes[cid])
    ref['w'] = jax.tree.map(jnp.add, glob, weighted_mean(deltas, weights))

  state = run_rounds(built.algorithm, params0, ds, reference_round)
  view = built.algorithm.eval_view(state, None)
  chex.assert_trees_all_close(view.params, ref['w'], atol=3e-6)
  for cid, v in ref['v'].items():
    mine = jax.tree.map(lambda x: x[cid], view.personal)
    np.testing.assert_allclose(mine['alpha'], ref['a'][cid], atol=3e-6)
    chex.assert_trees_all_close(mine['v'], v, atol=3e-6)
    # The personalized model is the mixture with the global model.
    a = ref['a'][cid]
    chex.assert_trees_all_close(
        built.algorithm.combine(view.shared, mine),
        jax.tree.map(lambda x, y: a * x + (1 - a) * y, v, ref['w']),
        atol=3e-6)
  assert any(abs(a - alpha0) > 1e-4 for a in ref['a'].values())


def test_pfedme_matches_reference_loop(setup):
  ds, model = setup
  lam, k, plr = 2.0, 3, 0.05
  built = registry.build(
      config_for('pfedme', pfedme_lambda=lam, pfedme_inner_steps=k,
                 pfedme_personal_lr=plr), model, ds.num_clients)
  params0 = built.init_params(jax.random.key(1))
  grad = grad_of(model)
  ref = {'w': params0, 'theta': {}}

  def reference_round(r, ids):
    glob, deltas, weights = ref['w'], [], []
    for cid in ids:
      cid = int(cid)
      w, theta = glob, glob  # theta restarts from the received model
      for batch in reference.client_batches(ds, cid, B, EPOCHS, SEED, r):
        for _ in range(k):
          g = grad(theta, batch)
          theta = jax.tree.map(lambda t, gi, wi: t - plr * (gi + lam * (
              t - wi)), theta, g, w)
        w = jax.tree.map(lambda wi, t: wi - LR * lam * (wi - t), w, theta)
      ref['theta'][cid] = theta
      deltas.append(jax.tree.map(jnp.subtract, w, glob))
      weights.append(ds.client_sizes[cid])
    ref['w'] = jax.tree.map(jnp.add, glob, weighted_mean(deltas, weights))

  state = run_rounds(built.algorithm, params0, ds, reference_round)
  view = built.algorithm.eval_view(state, None)
  chex.assert_trees_all_close(view.params, ref['w'], atol=3e-6)
  for cid, theta in ref['theta'].items():
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[cid], view.personal),
                                theta, atol=3e-6)


@pytest.mark.parametrize('name', ['perfedavg_fo', 'perfedavg_hf'])
def test_per_fedavg_matches_reference_loop(setup, name):
  ds, model = setup
  alpha = 0.1
  built = registry.build(config_for(name, perfedavg_alpha=alpha), model,
                         ds.num_clients)
  params0 = built.init_params(jax.random.key(1))
  flat0, unravel = jax.flatten_util.ravel_pytree(params0)
  def loss(q, b):
    return reference.mean_loss(model, q, b, None)
  grad = grad_of(model)
  ref = {'w': params0}

  def reference_round(r, ids):
    glob, deltas, weights = ref['w'], [], []
    for cid in ids:
      w = glob
      for batch in reference.client_batches(ds, int(cid), B, EPOCHS, SEED, r):
        n = batch['y'].shape[0]
        d1 = {k: v[:(n + 1) // 2] for k, v in batch.items()}
        d2 = {k: v[(n + 1) // 2:] for k, v in batch.items()}
        if not d2['y'].shape[0]:
          continue  # no second half: the masked step changes nothing
        tmp = jax.tree.map(lambda x, g: x - alpha * g, w, grad(w, d1))
        g2 = grad(tmp, d2)
        if name == 'perfedavg_hf':  # the full Hessian, then its product
          hess = jax.hessian(lambda f: loss(unravel(f), d1))(
              jax.flatten_util.ravel_pytree(w)[0])
          g2 = unravel(jax.flatten_util.ravel_pytree(g2)[0] - alpha * (
              hess @ jax.flatten_util.ravel_pytree(g2)[0]))
        w = jax.tree.map(lambda x, g: x - LR * g, w, g2)
      deltas.append(jax.tree.map(jnp.subtract, w, glob))
      weights.append(ds.client_sizes[cid])
    ref['w'] = jax.tree.map(jnp.add, glob, weighted_mean(deltas, weights))

  del flat0
  state = run_rounds(built.algorithm, params0, ds, reference_round)
  chex.assert_trees_all_close(state.params, ref['w'], atol=3e-6)
  assert built.algorithm.finetune == 'trainable'
  assert built.algorithm.finetune_lr == alpha


def test_ifca_matches_reference_loop(setup):
  ds, model = setup
  k = 3
  built = registry.build(config_for('ifca', num_clusters=k), model,
                         ds.num_clients)
  models0 = built.init_params(jax.random.key(1))
  assert jax.tree.leaves(models0)[0].shape[0] == k
  grad = grad_of(model)
  ref = {'models': [jax.tree.map(lambda p, j=j: p[j], models0)
                    for j in range(k)], 'choice': {}}

  def reference_round(r, ids):
    models = ref['models']
    sums = [None] * k
    totals = [0.0] * k
    for cid in ids:
      batches = reference.client_batches(ds, int(cid), B, EPOCHS, SEED, r)
      x = np.concatenate([b['x'] for b in batches])
      y = np.concatenate([b['y'] for b in batches])
      losses = [float(reference.mean_loss(model, m, {'x': x, 'y': y}, None))
                for m in models]
      j = int(np.argmin(losses))
      ref['choice'][int(cid)] = j
      w = models[j]
      for batch in batches:
        w = jax.tree.map(lambda p, g: p - LR * g, w, grad(w, batch))
      n = float(ds.client_sizes[cid])
      d = jax.tree.map(lambda a, b: n * (a - b), w, models[j])
      sums[j] = d if sums[j] is None else jax.tree.map(jnp.add, sums[j], d)
      totals[j] += n
    ref['models'] = [m if sums[j] is None else jax.tree.map(
        lambda p, s, t=totals[j]: p + s / t, m, sums[j])
                     for j, m in enumerate(models)]

  state = run_rounds(built.algorithm, models0, ds, reference_round)
  for j in range(k):
    chex.assert_trees_all_close(jax.tree.map(lambda p, j=j: p[j],
                                             state.params), ref['models'][j],
                                atol=3e-6)
  chosen = np.asarray(state.client_states['cluster'])
  for cid, j in ref['choice'].items():
    assert chosen[cid] == j
  assert chosen[2] == -1  # never sampled
  assert len(set(ref['choice'].values())) > 1  # the clusters differ
  assert built.algorithm.clusters == k
