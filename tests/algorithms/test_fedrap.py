"""FedRAP against a plain per-client Python loop, and its round's invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pfi import training
from fedjax_pfi.algorithms import fedrap
from fedjax_pfi.algorithms import registry
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data import movielens
from fedjax_pfi.models import zoo
from tests import reference
from tests.data.test_movielens import generated_ratings

SEED, B, EPOCHS = 5, 3, 2
LR, ITEM_LR, LAM, MU, WD = 0.3, 2.0, 0.5, 0.2, 0.01
LR_DECAY, STEP_DECAY = 0.9, 0.8


@pytest.fixture(scope='module')
def setup():
  cols = movielens.parse_inter(
      ''.join(['user_id:token\titem_id:token\trating:float\ttimestamp:float\n']
              + [f'{u}\t{i}\t{r}\t{t}\n' for u, i, r, t in
                 generated_ratings(num_users=8)]).encode())
  splits = movielens.leave_one_out(cols, num_negatives=3, eval_negatives=9)
  ds = splits.train
  model = zoo.build_model('additive_mf', ds.columns['x'][:2], ds.metadata,
                          dim=4)
  return ds, model


def config_for(curriculum='tanh', **kw):
  c = training.default_config()
  c.algorithm = 'fedrap'
  c.client.learning_rate = LR
  c.client.epochs = EPOCHS
  c.client.batch_size = B
  c.client.lr_scales = f'_items/={ITEM_LR / LR}'
  c.personalization.update(dict(dict(
      fedrap_lambda=LAM, fedrap_mu=MU,
      fedrap_weight_decay=WD, fedrap_lr_decay=LR_DECAY,
      fedrap_step_decay=STEP_DECAY, fedrap_curriculum=curriculum), **kw))
  return c


def reference_objective(model, lam_t, mu_t):
  """BCE - lam_t * mean((D - C)^2) + mu_t * mean(|C|) over a batch's lists,
  written out plainly."""

  def objective(params, batch):
    logits = model.apply(params, batch['x'])
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(
        logits, batch['y'].astype(jnp.float32)))
    d = params['personal_items']['embedding'][batch['x']]
    c = params['global_items']['embedding'][batch['x']]
    return bce - lam_t * jnp.mean((d - c) ** 2) + mu_t * jnp.mean(jnp.abs(c))

  return objective


def cohort(ds, ids, r, slots=4, bucket=16):
  return cohort_lib.stack_cohort(ds, ids, batch_size=B, num_epochs=EPOCHS,
                                 seed=SEED, round_idx=r, step_buckets=(bucket,),
                                 num_slots=slots)


@pytest.mark.parametrize('curriculum', ['tanh', 'fixed'])
def test_fedrap_matches_reference_loop(setup, curriculum):
  ds, model = setup
  built = registry.build(config_for(curriculum), model, ds.num_clients)
  alg = built.algorithm
  params0 = built.init_params(jax.random.key(1))
  glob = params0['global_items']
  personal = {}
  state = alg.init(params0)
  rounds = [np.array([0, 3, 5]), np.array([3, 6, 1])]
  for r, ids in enumerate(rounds):
    ramp = np.tanh(r / 10) if curriculum == 'tanh' else 1.0
    grad = jax.jit(jax.grad(reference_objective(model, ramp * LAM, ramp * MU)))
    new_c = []
    for cid in map(int, ids):
      p = dict(personal.get(cid, {k: params0[k] for k in fedrap.PERSONAL}),
               global_items=glob)
      batches = reference.client_batches(ds, cid, B, EPOCHS, SEED, r)
      for k, batch in enumerate(batches):
        g = grad(p, batch)
        scale = LR_DECAY ** r * STEP_DECAY ** k
        p = {name: jax.tree.map(
            lambda x, gx, name=name: x - scale * (
                LR if name == 'score' else ITEM_LR) * (gx + WD * x),
            p[name], g[name]) for name in p}
      new_c.append(p['global_items'])
      personal[cid] = {k: p[k] for k in fedrap.PERSONAL}
    glob = jax.tree.map(lambda *c: sum(c) / len(c), *new_c)  # unweighted
    state, metrics = alg.apply(state, cohort(ds, ids, r), jax.random.key(r))
    assert float(metrics['fedrap/lambda']) == pytest.approx(ramp * LAM)
  view = alg.eval_view(state, None)
  chex.assert_trees_all_close(view.shared, {'global_items': glob}, atol=2e-5)
  for cid in range(ds.num_clients):
    mine = jax.tree.map(lambda x, c=cid: x[c], view.personal)
    want = personal.get(cid, {k: params0[k] for k in fedrap.PERSONAL})
    chex.assert_trees_all_close(mine, want, atol=2e-5)
  # A client's model is its own views added to the global one; a new user's
  # (held-out clients) the initial personal state with the global view.
  full = alg.combine(view.shared, jax.tree.map(lambda x: x[3], view.personal))
  chex.assert_trees_all_close(full, dict(personal[3], global_items=glob),
                              atol=2e-5)
  chex.assert_trees_all_close(
      view.params, dict({k: params0[k] for k in fedrap.PERSONAL},
                        global_items=glob), atol=2e-5)
  assert 0.0 <= float(metrics['fedrap/global_sparsity']) <= 1.0


def test_padding_changes_nothing(setup):
  """More padded client slots and a longer step bucket: the same round."""
  ds, model = setup
  alg = registry.build(config_for(), model, ds.num_clients).algorithm
  params0 = model.init(jax.random.key(2))
  ids = np.array([1, 2, 7])
  outs = []
  for slots, bucket in ((3, 8), (8, 32)):
    state = alg.init(params0)
    for r in range(2):
      state, _ = alg.apply(state, cohort(ds, ids, r, slots, bucket),
                           jax.random.key(r))
    outs.append(alg.eval_view(state, None))
  chex.assert_trees_all_close(outs[0].shared, outs[1].shared, atol=1e-6)
  chex.assert_trees_all_close(outs[0].personal, outs[1].personal, atol=1e-6)


def test_curriculum_weights():
  for r in (0, 1, 5, 30):
    lam_t, mu_t = fedrap.weights(r, 2.0, 0.5, 'tanh')
    assert float(lam_t) == pytest.approx(2.0 * np.tanh(r / 10))
    assert float(mu_t) == pytest.approx(0.5 * np.tanh(r / 10))
  assert [float(v) for v in fedrap.weights(0, 2.0, 0.5, 'fixed')] == [2.0, 0.5]


def test_config_errors(setup):
  ds, model = setup
  with pytest.raises(ValueError, match="unknown FedRAP curriculum 'cosine'"):
    registry.build(config_for('cosine'), model, ds.num_clients)
  c = config_for()
  c.client.lr_scales = 'personal_items/=10,global_items/=20'
  with pytest.raises(ValueError, match='different steps'):
    registry.build(c, model, ds.num_clients)
  c.client.lr_scales = '_items/=0'
  with pytest.raises(ValueError, match='positive factor'):
    registry.build(c, model, ds.num_clients)
  with pytest.raises(ValueError, match='step_decay must lie in'):
    registry.build(config_for(fedrap_step_decay=1.5), model, ds.num_clients)
  c = config_for()
  c.client.momentum = 0.9
  with pytest.raises(ValueError, match='plain SGD'):
    registry.build(c, model, ds.num_clients)
  mlp = zoo.build_model('mlp', np.zeros((2, 3), np.float32),
                        {'num_classes': 2})
  with pytest.raises(ValueError, match='model.name=additive_mf'):
    registry.build(config_for(), mlp, 4)
