"""LoRA adapters and the federated PEFT algorithms against per-client loops.

The vectorised rounds apply adapters at the activations (x W + s (x A) B) and
vmap over clients; the references in `tests.reference` apply them in weight
space (W + s A B) and loop over clients in Python.
"""

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pfi.algorithms import hetero_lora
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import partitioned
from fedjax_pfi.algorithms import server_optimizers
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.peft import lora
from fedjax_pfi.models import zoo
from tests import reference
from tests.algorithms.test_rounds import toy_dataset

SEED = 3
B = 4
LR = 0.2
CFG = lora.LoraConfig(rank=3, alpha=6.0, target=r'Dense_[01]$')


@pytest.fixture(scope='module')
def setup():
  ds = toy_dataset()
  base_model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                               hidden=(5,))
  model = lora.lora_model(base_model, CFG)
  params = model.init(jax.random.key(0))
  # Non-zero B, so rounds start from a non-trivial adapter.
  params['lora'] = jax.tree.map(
      lambda x: x + 0.3 * jax.random.normal(jax.random.key(7), x.shape),
      params['lora'])
  return ds, base_model, model, params


def test_b_starts_at_zero_so_the_adapted_model_is_the_base(setup):
  ds, base_model, model, _ = setup
  fresh = model.init(jax.random.key(1))
  for leaf in jax.tree.leaves(jax.tree.map(lambda n: n['b'], fresh['lora'],
                                           is_leaf=lambda n: 'b' in n)):
    assert not np.any(np.asarray(leaf))
  x = jnp.asarray(ds.columns['x'][:7])
  np.testing.assert_array_equal(model.apply(fresh, x),
                                base_model.apply(fresh['base'], x))


def test_activation_and_merge_agree_under_vmap(setup):
  """Per-client adapters over one shared base: intercepted x W + s (x A) B
  equals the merged W + s A B, client by client."""
  ds, base_model, model, params = setup
  merged_model = lora.lora_model(base_model, CFG._replace(mode='merge'))
  adapters = jax.vmap(lambda k: jax.tree.map(
      lambda a: a + jax.random.normal(k, a.shape), params['lora']))(
          jax.random.split(jax.random.key(2), 3))
  x = jnp.asarray(ds.columns['x'][:5])

  def run(m):
    return jax.vmap(lambda ad: m.apply({'base': params['base'], 'lora': ad},
                                       x))(adapters)

  np.testing.assert_allclose(run(model), run(merged_model), rtol=1e-5,
                             atol=1e-5)
  want = base_model.apply(lora.merge(
      params['base'], jax.tree.map(lambda a: a[1], adapters), CFG.scale), x)
  np.testing.assert_allclose(run(model)[1], want, rtol=1e-5, atol=1e-5)


def test_the_base_is_never_copied_per_client(setup):
  """In a FedIT round no intermediate has a client axis in front of a base
  kernel's shape; in merge mode the merged kernels do (model x cohort)."""
  ds, base_model, model, params = setup
  ids = cohort_lib.sample_cohort(ds.num_clients, 4, SEED, 0)
  cohort = cohort_lib.stack_cohort(ds, ids, batch_size=B, num_slots=7)
  kernel_shapes = {(7,) + s for s in lora.dense_kernels(
      params['base']).values()}

  def shapes_in(m):
    alg = partitioned.fed_partitioned(
        m, optax.sgd(LR), server_optimizers.server_optimizer('fedavg'),
        frozen=r'^base/')
    jaxpr = jax.make_jaxpr(alg.apply_unjitted)(
        alg.init(params), cohort, jax.random.key(0), alg.frozen_part(params))
    found = set()

    def visit(jp):
      for eqn in jp.eqns:
        for v in eqn.outvars:
          found.add(tuple(getattr(v.aval, 'shape', ())))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          visit(sub)

    visit(jaxpr.jaxpr)
    return found & kernel_shapes

  assert not shapes_in(model)
  assert shapes_in(lora.lora_model(base_model, CFG._replace(mode='merge')))


def test_dropout_only_in_training(setup):
  ds, base_model, _, params = setup
  model = lora.lora_model(base_model, CFG._replace(dropout=0.5))
  x = jnp.asarray(ds.columns['x'][:6])
  plain = lora.lora_model(base_model, CFG).apply(params, x)
  np.testing.assert_array_equal(model.apply(params, x), plain)
  a = model.apply(params, x, jax.random.key(0), True)
  b = model.apply(params, x, jax.random.key(1), True)
  assert not np.allclose(a, plain) and not np.allclose(a, b)
  np.testing.assert_array_equal(
      a, model.apply(params, x, jax.random.key(0), True))


@pytest.mark.parametrize('cfg,message', [
    (CFG._replace(target='attn/q'), "LoRA target 'attn/q' matches no kernel; "
     "the model's kernels are ['Dense_0', 'Dense_1']"),
    (CFG._replace(rank=5), "LoRA rank 5 exceeds the smaller dimension of "
     "kernel 'Dense_1' [5, 4]; choose rank <= 4"),
    (CFG._replace(rank=0), 'LoRA rank must be a positive integer, got 0'),
    (CFG._replace(target='('), "LoRA target '(' is not a regular expression"),
    (CFG._replace(mode='merge', dropout=0.1), "LoRA mode 'merge' cannot apply "
     'input dropout'),
    (CFG._replace(mode='fused'), "unknown LoRA mode 'fused'"),
])
def test_bad_lora_config(setup, cfg, message):
  _, base_model, _, _ = setup
  with pytest.raises(ValueError, match=__import__('re').escape(message)):
    lora.lora_model(base_model, cfg).init(jax.random.key(0))


def test_conv_kernels_are_rejected():
  model = zoo.build_model('cnn', np.zeros((1, 28, 28, 1)), {'num_classes': 3})
  with pytest.raises(ValueError, match="matches 'Conv_0', whose kernel has "
                     r'shape \[5, 5, 1, 32\]; LoRA adapts 2-D'):
    lora.lora_model(model, lora.LoraConfig(target='Conv_0')).init(
        jax.random.key(0))


def test_naive_averaging_differs_and_stacking_is_exact():
  """Averaging A and B separately is not the average of the products
  (mean(A) mean(B) != mean(A B)); FLoRA's stack reproduces the latter."""
  k = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(k[0], (3, 6, 2))
  b = jax.random.normal(k[1], (3, 2, 5))
  w = jnp.array([0.5, 0.3, 0.2])
  products = jnp.einsum('k,kir,kro->io', w, a, b)
  naive = jnp.einsum('k,kir->ir', w, a) @ jnp.einsum('k,kro->ro', w, b)
  assert float(jnp.max(jnp.abs(naive - products))) > 0.1
  a_stack, b_stack = lora.stack(a, b, w)
  assert a_stack.shape == (6, 6) and b_stack.shape == (6, 5)
  np.testing.assert_allclose(a_stack @ b_stack, products, rtol=1e-5,
                             atol=1e-6)
  # By hand for one client: the stack is its own product.
  a1, b1 = lora.stack(a[:1], b[:1], jnp.ones(1))
  np.testing.assert_allclose(a1 @ b1, a[0] @ b[0], rtol=1e-6)


def test_product_norm_without_forming_the_product(setup):
  _, _, _, params = setup
  want = sum(float(jnp.sum(jnp.square(2.0 * n['a'] @ n['b'])))
             for n in (params['lora']['Dense_0'], params['lora']['Dense_1']))
  np.testing.assert_allclose(float(lora.product_norm_sq(params['lora'], 2.0)),
                             want, rtol=1e-5)


PARTITIONS = {
    'fedit': (r'^base/', None),
    'ffa_lora': (r'^base/|^lora/.*/a$', None),
    'fedsa_lora': (r'^base/', r'^lora/.*/b$'),
    'local_lora': (r'^base/', r'^lora/'),
}


def cohort_for(ds, r, n=4):
  ids = cohort_lib.sample_cohort(ds.num_clients, n, SEED, r)
  return ids, cohort_lib.stack_cohort(ds, ids, batch_size=B, num_slots=6,
                                      step_buckets=(8,), seed=SEED,
                                      round_idx=r)


@pytest.mark.parametrize('name', sorted(PARTITIONS))
def test_partitioned_lora_matches_reference_loop(setup, name):
  ds, base_model, model, params = setup
  frozen_re, personal_re = PARTITIONS[name]
  alg = partitioned.fed_partitioned(
      model, optax.sgd(LR), server_optimizers.server_optimizer('fedavg'),
      frozen=frozen_re, personal=personal_re, num_clients=ds.num_clients,
      name=name)
  state = alg.init(params)
  frozen = alg.frozen_part(params)
  parts = param_groups.split(params, frozen_re, personal_re)
  ref_global, ref_store = parts.global_, {}
  loss = reference.lm_loss(reference.merged_apply(base_model, CFG.scale),
                           parts.frozen)
  root = jax.random.key(4)
  for r in range(3):
    ids, cohort = cohort_for(ds, r)
    key = jax.random.fold_in(root, r)
    state, metrics = alg.apply(state, cohort, key, frozen)
    deltas, ws = [], []
    for cid in ids:
      mine = ref_store.get(int(cid), parts.personal)
      start = param_groups.merge(ref_global, mine)
      batches = reference.client_batches(ds, cid, B, 1, SEED, r)
      end = reference.sgd_steps(loss, start, batches,
                                jax.random.fold_in(key, int(cid)), LR)
      ref_store[int(cid)] = param_groups.select(
          end, set(param_groups.leaf_paths(parts.personal)).__contains__)
      deltas.append(jax.tree.map(jnp.subtract, param_groups.select(
          end, set(param_groups.leaf_paths(ref_global)).__contains__),
                                 ref_global))
      ws.append(ds.client_sizes[cid])
    ref_global = jax.tree.map(
        lambda g, *d: g + sum(w * x for w, x in zip(ws, d)) / sum(ws),
        ref_global, *deltas)
    g_bytes = param_groups.num_bytes(parts.global_)
    assert float(metrics['comm/upload_bytes']) == 4 * g_bytes
  chex.assert_trees_all_close(state.params, ref_global, atol=2e-5, rtol=2e-5)
  for cid in range(ds.num_clients):
    if not jax.tree.leaves(parts.personal):
      break
    row = jax.tree.map(lambda s: s[cid], state.client_states)
    chex.assert_trees_all_close(row, ref_store.get(cid, parts.personal),
                                atol=2e-5, rtol=2e-5)


def test_communication_by_hand(setup):
  """Dense_0 [6, 5] and Dense_1 [5, 4] with rank 3: A holds 6*3 + 5*3 = 33
  floats, B 3*5 + 3*4 = 27; four clients send them in float32."""
  ds, _, model, params = setup
  _, cohort = cohort_for(ds, 0)
  want = {'fedit': 4 * 4 * (33 + 27), 'ffa_lora': 4 * 4 * 27,
          'fedsa_lora': 4 * 4 * 33, 'local_lora': 0}
  for name, (frozen_re, personal_re) in PARTITIONS.items():
    alg = partitioned.fed_partitioned(
        model, optax.sgd(LR), server_optimizers.server_optimizer('fedavg'),
        frozen=frozen_re, personal=personal_re, num_clients=ds.num_clients)
    _, m = alg.apply(alg.init(params), cohort, jax.random.key(0),
                     alg.frozen_part(params))
    assert float(m['comm/upload_bytes']) == want[name], name
    assert float(m['comm/download_bytes']) == want[name], name
    assert float(m['comm/upload_bytes_per_client']) == want[name] / 4, name
    np.testing.assert_array_equal(m['client_upload_bytes'],
                                  [want[name] / 4] * 4 + [0, 0])


def test_flora_matches_reference_loop(setup):
  ds, base_model, _, params = setup
  ranks = np.array([1, 3, 2, 3, 1, 2, 2, 3, 1])
  alg = hetero_lora.flora(base_model, CFG, optax.sgd(LR),
                          server_optimizers.server_optimizer('fedavg'), ranks)
  state = alg.init(params['base'])
  ref_base = params['base']
  root = jax.random.key(9)
  for r in range(2):
    ids, cohort = cohort_for(ds, r)
    key = jax.random.fold_in(root, r)
    state, metrics = alg.apply(state, cohort, key)
    ws = np.array([ds.client_sizes[c] for c in ids], np.float64)
    delta_w = jax.tree.map(jnp.zeros_like, ref_base)
    for j, cid in enumerate(ids):
      ck = jax.random.fold_in(key, int(cid))
      rk = int(ranks[cid])
      fresh = lora.init_adapters(
          ref_base, CFG, jax.random.fold_in(jax.random.split(key)[1],
                                            int(cid)), rank=3)
      fresh = jax.tree.map(lambda x: x, fresh)  # copy
      for node in fresh.values():  # keep the first r_k components only
        node['a'] = node['a'].at[:, rk:].set(0.0)
      s = CFG.alpha / rk
      loss = reference.lm_loss(reference.merged_apply(base_model, s),
                               {'base': ref_base})
      end = reference.sgd_steps(
          loss, {'lora': fresh},
          reference.client_batches(ds, cid, B, 1, SEED, r), ck, LR)
      for name, node in end['lora'].items():  # p_k s_k A_k B_k, by hand
        assert not np.any(np.asarray(node['a'][:, rk:]))
        delta_w[name]['kernel'] = delta_w[name]['kernel'] + (
            ws[j] / ws.sum()) * s * (node['a'] @ node['b'])
    ref_base = jax.tree.map(jnp.add, ref_base, delta_w)
    # A client uploads r_k components of (6 + 5) + (5 + 4) floats.
    assert float(metrics['comm/upload_bytes']) == 4 * 20 * ranks[ids].sum()
    if r == 0:  # everyone starts from the pretrained base
      assert float(metrics['comm/download_bytes']) == 0
  chex.assert_trees_all_close(state.params, ref_base, atol=2e-5, rtol=2e-5)
  # Round 1: each of the 4 clients fetches round 0's stack, or the adapted
  # kernels (6*5 + 5*4 floats) if those are smaller.
  ids0, _ = cohort_for(ds, 0)
  assert float(metrics['comm/download_bytes']) == 4 * min(
      4 * 20 * ranks[ids0].sum(), 4 * 50)


def test_hetlora_matches_reference_loop(setup):
  ds, base_model, _, params = setup
  ranks = np.array([1, 3, 2, 3, 1, 2, 2, 3, 1])
  gamma, lam = 0.5, 0.05
  model = lora.lora_model(base_model, CFG)
  alg = hetero_lora.hetlora(model, CFG, optax.sgd(LR),
                            server_optimizers.server_optimizer('fedavg'),
                            ranks, prune_gamma=gamma, prune_lambda=lam)
  state = alg.init(params)
  frozen = alg.frozen_part(params)
  g = params['lora']
  cur = {i: int(r) for i, r in enumerate(ranks)}
  loss = reference.lm_loss(reference.merged_apply(base_model, CFG.scale),
                           frozen)

  def tail(adapters, rank):
    lo = int(np.floor(gamma * rank))
    return sum(jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(n['a'][:, lo:rank])),
                                    1e-30)) *
               jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(n['b'][lo:rank])),
                                    1e-30))
               for n in adapters.values())

  root = jax.random.key(5)
  for r in range(3):
    ids, cohort = cohort_for(ds, r)
    key = jax.random.fold_in(root, r)
    state, _ = alg.apply(state, cohort, key, frozen)
    trained, norms = [], []
    for cid in ids:
      rk = cur[int(cid)]
      start = {k: {'a': n['a'].at[:, rk:].set(0.0),
                   'b': n['b'].at[rk:].set(0.0)} for k, n in g.items()}
      end = reference.sgd_steps(
          loss, {'lora': start},
          reference.client_batches(ds, cid, B, 1, SEED, r),
          jax.random.fold_in(key, int(cid)), LR,
          regularizer=lambda p, rk=rk: lam * tail(p['lora'], rk))['lora']
      if float(tail(end, rk)) < float(tail(start, rk)):
        cur[int(cid)] = max(1, int(np.floor(gamma * rk)))
      trained.append(end)
      norms.append(np.sqrt(sum(float(jnp.sum(jnp.square(
          CFG.scale * n['a'] @ n['b']))) for n in end.values())))
    w = np.array(norms) / np.sum(norms)
    g = jax.tree.map(lambda *t: sum(wi * ti for wi, ti in zip(w, t)),
                     *trained)
  chex.assert_trees_all_close(state.params['lora'], g, atol=3e-5, rtol=3e-5)
  np.testing.assert_array_equal(state.client_states['rank'],
                                [cur[i] for i in range(ds.num_clients)])
  assert any(cur[i] != ranks[i] for i in cur)  # pruning happened


def test_non_dense_kernels_are_rejected():
  """An LSTM cell's 2-D kernels are not nn.Dense calls: adapters there would
  change nothing, so building the model refuses them."""
  model = zoo.build_model('char_lstm', np.zeros((1, 5), np.int32),
                          {'vocab_size': 7, 'pad_id': 0}, hidden=4)
  with pytest.raises(ValueError, match=r"LoRA targets "
                     r"\['OptimizedLSTMCell_0/hi'\] are kernels of modules "
                     'that are not flax.linen.Dense'):
    lora.lora_model(model, lora.LoraConfig(
        rank=2, target='OptimizedLSTMCell_0/hi$')).init(jax.random.key(0))


def test_lora_on_the_transformer_blocks():
  """Nested module paths: adapters on every block's q and v and the MLP; the
  activation route equals the merged one, and A starts within 1/sqrt(in)."""
  meta = {'vocab_size': 11, 'pad_id': 0, 'seq_len': 6}
  base_model = zoo.build_model('transformer', np.ones((2, 6), np.int32), meta,
                               dim=16, num_layers=2, num_heads=2)
  cfg = lora.LoraConfig(rank=4, alpha=8.0, target=r'attn/(q|v)$|mlp/fc$')
  model = lora.lora_model(base_model, cfg)
  params = model.init(jax.random.key(0))
  assert lora.adapter_paths(params['lora']) == [
      f'block_{i}/{m}' for i in range(2)
      for m in ('attn/q', 'attn/v', 'mlp/fc')]
  for a, _ in lora.pairs(params['lora']):
    assert float(jnp.max(jnp.abs(a))) <= 1.0 / np.sqrt(a.shape[0])
  params['lora'] = jax.tree.map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape),
      params['lora'])
  x = jnp.asarray(np.random.default_rng(0).integers(1, 11, (3, 6)))
  merged = lora.lora_model(base_model, cfg._replace(mode='merge'))
  np.testing.assert_allclose(model.apply(params, x), merged.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(model.apply(params, x),
                         base_model.apply(params['base'], x))


def test_fedsa_with_stragglers_and_its_evaluation(setup):
  """A dropped straggler (weight 0, no steps) adds nothing and keeps its
  personal B; one with partial work is averaged after its own steps; the
  evaluation view gives each client the base, the global A and its own B."""
  from fedjax_pfi import evaluation  # pylint: disable=g-import-not-at-top
  ds, base_model, model, params = setup
  frozen_re, personal_re = PARTITIONS['fedsa_lora']
  alg = partitioned.fed_partitioned(
      model, optax.sgd(LR), server_optimizers.server_optimizer('fedavg'),
      frozen=frozen_re, personal=personal_re, num_clients=ds.num_clients)
  state, frozen = alg.init(params), alg.frozen_part(params)
  ids = cohort_lib.sample_cohort(ds.num_clients, 4, SEED, 0)
  steps = cohort_lib.client_steps(ds.client_sizes[ids], B, 1)
  steps[0], steps[1] = 0, max(1, steps[1] // 2)
  weights = ds.client_sizes[ids].astype(np.float32)
  weights[0] = 0.0
  cohort = cohort_lib.stack_cohort(
      ds, ids, batch_size=B, num_slots=6, steps_override=steps,
      weight_override=weights, seed=SEED, round_idx=0)
  key = jax.random.key(8)
  state, metrics = alg.apply(state, cohort, key, frozen)
  assert int(metrics['clients']) == 3
  assert float(metrics['comm/upload_bytes']) == 3 * 4 * 33  # A: 33 floats
  # Reference: per client, A global and B personal.
  a0 = {k: {'a': n['a']} for k, n in params['lora'].items()}
  b0 = {k: {'b': n['b']} for k, n in params['lora'].items()}
  loss = reference.lm_loss(reference.merged_apply(base_model, CFG.scale),
                           {'base': params['base']})
  deltas, bs = [], {}
  for j, cid in enumerate(ids):
    start = {'lora': param_groups.merge(a0, b0)}
    end = reference.sgd_steps(
        loss, start, reference.client_batches(ds, cid, B, 1, SEED, 0,
                                              steps[j]),
        jax.random.fold_in(key, int(cid)), LR)['lora']
    bs[int(cid)] = {k: n['b'] for k, n in end.items()}
    deltas.append({k: n['a'] - a0[k]['a'] for k, n in end.items()})
  new_a = {k: a0[k]['a'] + sum(w * d[k] for w, d in zip(weights, deltas)) /
           weights.sum() for k in a0}
  for k in new_a:
    np.testing.assert_allclose(state.params['lora'][k]['a'], new_a[k],
                               rtol=2e-5, atol=2e-6)
    for j, cid in enumerate(ids):
      np.testing.assert_allclose(state.client_states['lora'][k]['b'][cid],
                                 bs[int(cid)][k], rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(  # the dropped client's B never moved
      state.client_states['lora']['Dense_0']['b'][ids[0]],
      params['lora']['Dense_0']['b'])
  view = alg.eval_view(state, frozen)
  got = evaluation.Evaluator(model, 4, 3, combine=alg.combine).evaluate(
      view.shared, ds, personal_params=view.personal)
  for cid, acc in zip(got.client_ids, got.accuracy):
    mine = {'base': params['base'], 'lora': {
        k: {'a': new_a[k], 'b': state.client_states['lora'][k]['b'][cid]}
        for k in new_a}}
    c = ds.client(cid)
    want = np.mean(np.argmax(model.apply(mine, jnp.asarray(c['x'])), -1) ==
                   c['y'])
    np.testing.assert_allclose(acc, want, rtol=1e-6)
