"""Issue 19's methods on SASRec against a plain per-client reference loop.

Each method is built by name through the registry, as its config in
``experiments/configs/recommendation.py`` names it, on a tiny SASRec over
`movielens.sequential` lists. The reference loops over the cohort's users in
Python: plain SGD, from the global params joined to the user's own personal
leaves, on the mean sigmoid cross-entropy of its real lists (LoRA merged in
weight space, W + s A B), then the weighted mean of the shared leaves'
deltas. After two rounds (a padded slot in each cohort), every user's
evaluated params (`EvalView` joined by the algorithm's ``combine``) must
equal the reference's.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pfi import training
from fedjax_pfi.algorithms import registry
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data import movielens
from fedjax_pfi.models import zoo
from tests import reference
from tests.data.test_movielens import generated_ratings

SEED, B, LR = 2, 4, 0.3
RANK, ALPHA = 2, 4.0
# (frozen, personal) path regexes the reference trains by; FedPer's personal
# leaf is SASRec's traced head, the item table.
METHODS = {'fedavg': (None, None), 'fedper': (None, r'^items/'),
           **registry.LORA_PARTITIONS}


@pytest.fixture(scope='module')
def setup():
  rows = generated_ratings(num_users=8, num_items=30, seed=1)
  per_user = {u: sum(1 for r in rows if r[0] == u) for u, *_ in rows}
  cols = {k: np.asarray(v) for k, v in zip(
      ('user_id', 'item_id', 'rating', 'timestamp'),
      zip(*[r for r in rows if per_user[r[0]] >= 4]))}
  ds = movielens.sequential(cols, max_len=4, num_negatives=2,
                            eval_negatives=5).train
  model = zoo.build_model('sasrec', ds.columns['x'][:2], ds.metadata, dim=8,
                          num_layers=1, num_heads=2)
  return ds, model


def path_of(kp):
  return '/'.join(str(k.key) for k in kp)


def flat(tree):
  """Path -> numpy leaf (the reference's arithmetic stays in numpy: no
  small XLA programs compiled per step)."""
  return {path_of(kp): np.asarray(x) for kp, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('name', sorted(METHODS))
def test_method_matches_reference_loop(setup, name):
  ds, base_model = setup
  c = training.default_config()
  c.algorithm = name
  c.client.learning_rate = LR
  c.client.batch_size = B
  c.peft.rank = RANK
  c.peft.alpha = ALPHA
  c.peft.target = r'block_\d+/attn/(q|v)$'
  built = registry.build(c, base_model, ds.num_clients)
  alg = built.algorithm
  params0 = built.init_params(jax.random.key(1))
  lora_run = 'lora' in params0
  if lora_run:  # B away from zero, so the first round moves A too
    rng = np.random.default_rng(7)
    params0['lora'] = jax.tree.map(
        lambda x: x + np.float32(0.2) * rng.normal(size=x.shape).astype(
            np.float32), params0['lora'])
    apply = reference.merged_apply(base_model, ALPHA / RANK)
  else:
    apply = base_model.apply
  state = alg.init(params0)
  frozen_params = alg.frozen_part(params0)

  p0 = flat(params0)
  treedef = jax.tree.structure(params0)
  paths = list(p0)
  frozen_re, personal_re = METHODS[name]
  frozen = {p for p in paths if frozen_re and re.search(frozen_re, p)}
  personal = {p for p in paths if personal_re and re.search(personal_re, p)
              and p not in frozen}
  shared = [p for p in paths if p not in frozen | personal]
  if name == 'fedper':
    assert personal == {'items/embedding'}

  def loss(tree, x, y):  # one list: its mean sigmoid cross-entropy
    return jnp.mean(optax.sigmoid_binary_cross_entropy(
        apply(tree, x[None], None, True)[0], y.astype(jnp.float32)))
  one = jax.jit(jax.grad(loss))  # one shape: one compilation

  def grad(tree, batch):  # the batch mean's gradient: the mean of its lists'
    gs = [flat(one(tree, x, y)) for x, y in zip(batch['x'], batch['y'])]
    return {k: np.mean([g[k] for g in gs], 0, dtype=np.float32) for k in gs[0]}

  glob, store = dict(p0), {}
  for r, ids in enumerate([np.array([0, 2, 5]), np.array([2, 4, 1])]):
    cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, seed=SEED,
                                     round_idx=r, step_buckets=(4,),
                                     num_slots=4)
    state, _ = alg.apply(state, cohort, jax.random.key(r), frozen_params)
    deltas, weights = [], []
    for cid in ids:
      p = {**glob, **store.get(int(cid), {k: p0[k] for k in personal})}
      for batch in reference.client_batches(ds, cid, B, 1, SEED, r):
        g = grad(jax.tree.unflatten(treedef, [p[k] for k in paths]), batch)
        p = {k: v if k in frozen else v - np.float32(LR) * g[k]
             for k, v in p.items()}
      store[int(cid)] = {k: p[k] for k in personal}
      deltas.append({k: p[k] - glob[k] for k in shared})
      weights.append(float(ds.client_sizes[cid]))
    if name != 'local_lora':  # local-only: nothing is sent
      w = np.array(weights, np.float32) / np.float32(sum(weights))
      glob.update({k: glob[k] + sum(wi * d[k] for wi, d in zip(w, deltas))
                   for k in shared})

  view = alg.eval_view(state, frozen_params)
  for cid in range(ds.num_clients):
    want = {**glob, **store.get(cid, {k: p0[k] for k in personal})}
    if view.personal is None:
      got = flat(view.params)
    else:
      got = flat(alg.combine(view.shared, jax.tree.map(
          lambda x, i=cid: x[i], view.personal)))
    assert set(got) == set(want)
    for k in paths:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6,
                                 err_msg=f'{name}: user {cid}, {k}')
  # the trained part moved: the reference is not trivially the start
  assert any(not np.allclose(glob[k], p0[k]) for k in shared) or any(
      not np.allclose(v, p0[k]) for s in store.values() for k, v in s.items())
