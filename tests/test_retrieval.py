"""Retrieval over each client's private store (`fedjax_pfi.retrieval`)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedjax_pfi import client_store
from fedjax_pfi import evaluation
from fedjax_pfi import retrieval
from fedjax_pfi import training
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.models import zoo
from fedjax_pfi.retrieval import in_context
from fedjax_pfi.retrieval import knn_lm
from fedjax_pfi.retrieval import search

faiss = pytest.importorskip('faiss')

PAD = 0
VOCAB = 64
T = 8


def _stores(seed=0, clients=5, n=300, d=16):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, n, clients)
  parts = [{'keys': rng.normal(size=(s, d)).astype(np.float32)}
           for s in sizes]
  columns, offsets = client_store.concat_ragged(parts)
  return client_store.RaggedStore(columns, offsets, min_rows=8), parts


@pytest.mark.parametrize('metric', ['ip', 'l2'])
def test_exact_topk_equals_faiss_flat_on_padded_stores(metric):
  store, parts = _stores()
  rng = np.random.default_rng(1)
  ids = np.arange(store.num_clients)
  got = store.gather(ids)  # padded to a power of two, with a mask
  assert got['keys'].shape[1] == 256 and not got['valid'].all()
  q = rng.normal(size=(ids.size, 37, 16)).astype(np.float32)
  k = 8
  s, idx = search.batched_topk(q, got['keys'], got['valid'], k=k,
                               metric=metric, query_block=16, key_block=64)
  s, idx = np.asarray(s), np.asarray(idx)
  for c, part in enumerate(parts):
    index = (faiss.IndexFlatIP if metric == 'ip' else faiss.IndexFlatL2)(16)
    index.add(part['keys'])
    dist, want = index.search(q[c], k)
    kk = min(k, len(part['keys']))
    recall = np.mean([len(set(a[:kk]) & set(b[:kk])) / kk
                      for a, b in zip(want, idx[c])])
    assert recall == 1.0
    faiss_scores = dist if metric == 'ip' else -dist
    np.testing.assert_allclose(s[c, :, :kk], faiss_scores[:, :kk], rtol=1e-5,
                               atol=1e-4)


def test_a_padded_row_is_never_retrieved():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(10, 4)).astype(np.float32)
  keys = np.concatenate([rng.normal(size=(3, 4)), 100 * np.tile(q[:1], (5, 1))
                         ]).astype(np.float32)  # padding nearest of all
  valid = np.arange(8) < 3
  for metric in ('ip', 'l2'):
    s, idx = search.exact_topk(jnp.asarray(q), jnp.asarray(keys),
                               jnp.asarray(valid), 5, metric, 4, 2)
    idx = np.asarray(idx)
    assert set(idx[:, :3].ravel()) <= {0, 1, 2}
    # fewer valid rows than k: the rest are -1 with score -inf
    assert (idx[:, 3:] == -1).all() and np.isneginf(np.asarray(s)[:, 3:]).all()


def test_blocking_changes_nothing():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(200, 8)), jnp.float32)
  valid = jnp.asarray(rng.random(200) < 0.8)
  a = search.exact_topk(q, keys, valid, 6, 'l2', 256, 4096)
  b = search.exact_topk(q, keys, valid, 6, 'l2', 7, 13)
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-6)


def test_neighbour_distribution_by_hand():
  scores = jnp.array([[0.0, -np.log(3.0)], [0.0, -jnp.inf]])
  values = jnp.array([[1, 2], [3, -1]])
  p = np.exp(np.asarray(knn_lm.neighbour_log_probs(scores, values, 4, 1.0)))
  np.testing.assert_allclose(p[0], [0, 0.75, 0.25, 0], atol=1e-6)
  np.testing.assert_allclose(p[1], [0, 0, 0, 1], atol=1e-6)
  # temperature 2 flattens: weights 1 and 3^-1/2
  p = np.exp(np.asarray(knn_lm.neighbour_log_probs(scores[:1], values[:1], 4,
                                                   2.0)))
  w = np.array([1.0, 3 ** -0.5])
  np.testing.assert_allclose(p[0, 1:3], w / w.sum(), atol=1e-6)
  # lambda mixes the two distributions
  lm = jnp.log(jnp.array([[0.25, 0.25, 0.25, 0.25]]))
  mixed = np.exp(np.asarray(knn_lm.interpolate(
      lm, jnp.log(jnp.array([[0.0, 0.75, 0.25, 0.0]])), 0.4)))
  np.testing.assert_allclose(mixed[0], [0.15, 0.45, 0.25, 0.15], atol=1e-6)


def _data(seed=0, clients=(20, 12, 7), unique_start=True):
  """Windows of random tokens; each window starts with its own token, so
  every context is unique."""
  rng = np.random.default_rng(seed)
  parts, start = [], 1
  for n in clients:
    x = rng.integers(1, VOCAB, (n, T + 1)).astype(np.int32)
    if unique_start:
      x[:, 0] = np.arange(start, start + n)
      start += n
    parts.append({'x': x[:, :-1], 'y': x[:, 1:].copy()})
  parts[-1]['y'][-1, -3:] = PAD  # a padded tail
  meta = {'vocab_size': VOCAB, 'pad_id': PAD, 'seq_len': T}
  return FederatedDataset.from_clients(
      parts, np.array([f'c{i}' for i in range(len(clients))]), meta)


def _model(ds):
  model = zoo.build_model('transformer', ds.columns['x'][:2], ds.metadata,
                          dim=16, num_layers=1, num_heads=2)
  return model, model.init(jax.random.key(0))


def _rc(mode='knn_lm', **kw):
  rc = ml_collections.ConfigDict(training.default_config().retrieval)
  rc.mode = mode
  for k, v in kw.items():
    rc[k] = v
  return rc


def test_knn_lm_with_lambda_zero_is_the_model():
  ds = _data()
  model, params = _model(ds)
  r = retrieval.Retrieval(_rc(k=4, **{'lambda': 0.0}), model, params, ds,
                          ds.metadata, batch_size=4)
  got = r.evaluate(model, params, ds)
  want = evaluation.Evaluator(model, 4).evaluate(params, ds)
  np.testing.assert_array_equal(got.correct, want.correct)
  np.testing.assert_array_equal(got.count, want.count)
  np.testing.assert_allclose(got.loss_sum, want.loss_sum, rtol=1e-5)


def test_a_store_that_holds_the_continuation_predicts_it():
  ds = _data()
  model, params = _model(ds)  # untrained: on its own, near chance
  r = retrieval.Retrieval(_rc(k=1, **{'lambda': 1.0}), model, params, ds,
                          ds.metadata)
  got = r.evaluate(model, params, ds)
  np.testing.assert_array_equal(got.correct, got.count)
  plain = evaluation.Evaluator(model).evaluate(params, ds)
  assert plain.accuracy.max() < 0.3


def test_knn_lm_matches_a_per_client_numpy_loop():
  ds = _data(1)
  model, params = _model(ds)
  lam, k = 0.3, 3
  r = retrieval.Retrieval(_rc(k=k, temperature=2.0, **{'lambda': lam}),
                          model, params, ds, ds.metadata)
  got = r.evaluate(model, params, ds)
  feats = np.asarray(model.features(params, ds.columns['x']))
  logits = np.asarray(model.apply(params, ds.columns['x']))
  for c in range(ds.num_clients):
    lo, hi = ds.offsets[c], ds.offsets[c + 1]
    y = ds.columns['y'][lo:hi]
    valid = y != PAD
    keys, values = feats[lo:hi][valid], y[valid]
    loss = correct = 0.0
    for i in range(hi - lo):
      for t in range(T):
        if not valid[i, t]:
          continue
        d2 = np.sum((keys - feats[lo + i, t]) ** 2, -1)
        near = np.argsort(d2, kind='stable')[:k]
        w = np.exp(-d2[near] / 2.0 - np.max(-d2[near] / 2.0))
        w /= w.sum()
        p_knn = np.bincount(values[near], w, VOCAB)
        z = logits[lo + i, t] - logits[lo + i, t].max()
        p_lm = np.exp(z) / np.exp(z).sum()
        p = lam * p_knn + (1 - lam) * p_lm
        loss -= np.log(p[y[i, t]])
        correct += float(np.argmax(p) == y[i, t])
    np.testing.assert_allclose(got.loss_sum[c], loss, rtol=1e-4)
    assert got.correct[c] == correct


def test_in_context_plan_and_inputs_by_hand():
  cfg = in_context.InContextConfig(k=1, chunk_len=2)
  p = in_context.plan(8, 8, cfg)  # own budget 6, stride 3
  assert (p.retrieved_tokens, p.own_budget, p.stride) == (2, 6, 3)
  assert p.blocks == (in_context.Block(0, 3, 0, 0, False),
                      in_context.Block(3, 6, 0, 1, True),
                      in_context.Block(6, 8, 2, 4, True))
  x = jnp.arange(10, 18)[None]
  chunk = jnp.array([[[90, 91]]])
  inp, at = in_context.block_inputs(x, None, p.blocks[0])
  assert inp.tolist() == [[10, 11, 12]] and at == 0
  inp, at = in_context.block_inputs(x, chunk, p.blocks[1])
  # [chunk | x0..x5]; position 5 holds x3 (13), which predicts x4
  assert inp.tolist() == [[90, 91, 10, 11, 12, 13, 14, 15]] and at == 5
  inp, at = in_context.block_inputs(x, chunk, p.blocks[2])
  assert inp.tolist() == [[90, 91, 12, 13, 14, 15, 16, 17]] and at == 6
  # two chunks: the nearest goes last, next to the window's own text
  two = in_context.InContextConfig(k=2, chunk_len=2, stride=2)
  blk = in_context.plan(8, 8, two).blocks[1]
  inp, _ = in_context.block_inputs(x, jnp.array([[[1, 2], [3, 4]]]), blk)
  assert inp.tolist() == [[3, 4, 1, 2, 10, 11, 12, 13]]


def test_in_context_matches_a_hand_loop():
  ds = _data(2, clients=(9, 6))
  model, params = _model(ds)
  r = retrieval.Retrieval(_rc('in_context', k=1, chunk_len=2, stride=3),
                          model, params, ds, ds.metadata)
  got = r.evaluate(model, params, ds)
  p = r.plan
  assert (p.retrieved_tokens, p.own_budget, p.stride) == (2, 6, 3)
  x_all, y_all = ds.columns['x'], ds.columns['y']
  for c in range(ds.num_clients):
    lo, hi = ds.offsets[c], ds.offsets[c + 1]
    chunks = x_all[lo:hi][:, :T // 2 * 2].reshape(-1, 2)
    keys = np.asarray(jnp.mean(model.features(params, chunks), 1))
    loss = 0.0
    for i in range(lo, hi):
      x, y = x_all[i], y_all[i]
      logp = np.zeros((T, VOCAB))
      for blk in p.blocks:
        own = list(x[blk.own_lo:blk.p1])
        if blk.retrieve:
          q = np.asarray(jnp.mean(model.features(
              params, x[None, blk.query_lo:blk.p0]), 1))[0]
          best = int(np.argmax(keys @ q))
          inp = list(chunks[best]) + own
          at = 2 + blk.p0 - blk.own_lo
        else:
          inp, at = own, blk.p0
        out = np.asarray(model.apply(params, np.array([inp])))[0]
        out = out - out.max(-1, keepdims=True)
        out = out - np.log(np.exp(out).sum(-1, keepdims=True))
        logp[blk.p0:blk.p1] = out[at:at + blk.p1 - blk.p0]
      valid = y != PAD
      loss -= logp[np.arange(T), y][valid].sum()
    np.testing.assert_allclose(got.loss_sum[c], loss, rtol=1e-4)


def test_host_and_device_stores_give_identical_results():
  ds = _data(3)
  model, params = _model(ds)
  out = {}
  for where in ('host', 'device'):
    for mode in ('knn_lm', 'in_context'):
      r = retrieval.Retrieval(_rc(mode, k=2, chunk_len=2, store=where), model,
                              params, ds, ds.metadata, clients_per_chunk=2)
      out[where, mode] = r.evaluate(model, params, ds)
  for mode in ('knn_lm', 'in_context'):
    a, b = out['host', mode], out['device', mode]
    for f in ('loss_sum', 'correct', 'count'):
      np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    np.testing.assert_array_equal(a.rows.loss_sum, b.rows.loss_sum)


def test_personal_readers_read_their_own_rows():
  """With personal rows, client i reads with combine(shared, personal[i])."""
  ds = _data(4)
  model, params = _model(ds)
  r = retrieval.Retrieval(_rc(k=2), model, params, ds, ds.metadata)
  other = model.init(jax.random.key(7))
  personal = jax.tree.map(lambda a, b: np.stack([a, b, a]), params, other)
  got = r.evaluate(model, params, ds, personal=personal,
                   combine=lambda shared, mine: mine)
  alone = r.evaluate(model, other, ds)
  shared = r.evaluate(model, params, ds)
  assert got.loss_sum[1] == pytest.approx(alone.loss_sum[1], rel=1e-6)
  assert got.loss_sum[0] == pytest.approx(shared.loss_sum[0], rel=1e-6)


def test_adding_text_to_a_store_helps_at_once():
  ds = _data(5)
  model, params = _model(ds)
  first = FederatedDataset.from_clients(
      [{k: v[ds.offsets[c]:ds.offsets[c + 1]][:3] for k, v in
        ds.columns.items()} for c in range(ds.num_clients)],
      ds.client_names, ds.metadata)
  r = retrieval.Retrieval(_rc(k=1, **{'lambda': 1.0}), model, params, first,
                          ds.metadata)
  before = r.evaluate(model, params, ds)
  fresh = retrieval.stores.knn_store(model, params, ds, PAD)
  for c in range(ds.num_clients):
    lo, hi = fresh.offsets[c], fresh.offsets[c + 1]
    r.store.add(c, {k: v[lo:hi] for k, v in fresh.columns.items()})
  after = r.evaluate(model, params, ds)
  assert before.accuracy.mean() < 0.7
  np.testing.assert_array_equal(after.correct, after.count)


def test_bad_input_is_refused_by_name():
  ds = _data()
  model, params = _model(ds)
  with pytest.raises(ValueError, match='query width 3 does not match.*4'):
    search.exact_topk(jnp.zeros((2, 3)), jnp.zeros((5, 4)), jnp.ones(5, bool),
                      1)
  with pytest.raises(ValueError, match='unknown retrieval.mode'):
    retrieval.check_config(_rc('bm25'))
  with pytest.raises(ValueError, match="unknown retrieval.store 'disk'"):
    retrieval.check_config(_rc(store='disk'))
  with pytest.raises(ValueError, match='lambda must be in'):
    retrieval.check_config(_rc(**{'lambda': 1.5}))
  with pytest.raises(ValueError, match='set data.val_fraction'):
    retrieval.check_config(_rc(tune='client'), val_examples=0)
  with pytest.raises(ValueError, match='overflows the model.s context window'):
    r = retrieval.Retrieval(_rc('in_context', k=2, chunk_len=4), model,
                            params, ds, ds.metadata)
    r.evaluate(model, params, ds)
  # k larger than a store: a warning, and the store's size is used
  r = retrieval.Retrieval(_rc(k=500), model, params, ds, ds.metadata)
  with pytest.warns(UserWarning, match='retrieval.k=500 exceeds'):
    r.evaluate(model, params, ds)
  # an empty store (a client without training windows)
  empty = FederatedDataset.from_clients(
      [{k: v[:0] for k, v in ds.columns.items()}] + [
          {k: v[ds.offsets[1]:ds.offsets[2]] for k, v in ds.columns.items()}],
      np.array(['a', 'b']), ds.metadata)
  both = FederatedDataset.from_clients(
      [{k: v[:2] for k, v in ds.columns.items()}] * 2, np.array(['a', 'b']),
      ds.metadata)
  r = retrieval.Retrieval(_rc(k=2), model, params, empty, ds.metadata)
  with pytest.raises(ValueError, match=r'client\(s\) \[0\] have an empty'):
    r.evaluate(model, params, both)


def test_ragged_store_saves_loads_and_appends(tmp_path):
  store, parts = _stores(clients=3, n=20)
  store.save(str(tmp_path / 's'), {'kind': 'test'})
  back, meta = client_store.RaggedStore.load(str(tmp_path / 's'))
  assert meta['kind'] == 'test'
  ids = np.array([2, -1, 0])
  a, b = store.gather(ids), back.gather(ids)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not a['valid'][1].any() and not a['keys'][1].any()
  new = np.ones((4, 16), np.float32)
  back.add(1, {'keys': new})
  got = back.gather(np.array([1]))
  n1 = len(parts[1]['keys'])
  np.testing.assert_array_equal(got['keys'][0, n1:n1 + 4], new)
  assert got['valid'][0].sum() == n1 + 4
  np.testing.assert_array_equal(back.gather(np.array([2]))['keys'],
                                store.gather(np.array([2]))['keys'])
  assert not os.path.exists(str(tmp_path / 's.tmp'))


def test_host_and_device_dense_stores_agree(tmp_path):
  rows = {'a': np.arange(12.0).reshape(4, 3), 'b': np.arange(4)}
  host = client_store.HostStore(rows, str(tmp_path), memmap_bytes=0)
  assert isinstance(host.rows['a'], np.memmap)
  dev = client_store.DeviceStore(jax.tree.map(jnp.asarray, rows))
  ids = np.array([3, -1, 1])
  for s in (host, dev):
    s.scatter(ids, {'a': -np.ones((3, 3)), 'b': np.array([9, 9, 9])},
              np.array([True, True, False]))
  for k in rows:
    np.testing.assert_array_equal(np.asarray(host.state()[k]),
                                  np.asarray(dev.state()[k]))
    np.testing.assert_array_equal(np.asarray(host.gather(ids)[k]),
                                  np.asarray(dev.gather(ids)[k]))
  assert host.state()['b'].tolist() == [0, 1, 2, 9]


def _tiny_run(mode):
  """A FedSA-LoRA config and its data: the smallest Macbeth roles."""
  from experiments.configs import shakespeare_lora
  from fedjax_pfi.data import registry
  c = shakespeare_lora.get_config('fedsa_lora,testing')
  c.data.plays = ('macbeth',)
  c.eval_batch_size = 32
  c.rounds = 1
  c.progress = False
  c.retrieval.mode = mode
  c.retrieval.k = 2
  c.retrieval.chunk_len = 4
  c.evaluation.private_epsilons = ''
  splits = registry.load_splits(c.data)
  keep = np.flatnonzero(splits.train.client_sizes < 300)
  splits = type(splits)(*(getattr(splits, p).select(keep)
                          for p in ('train', 'val', 'test')))
  return c, splits


def test_a_run_reports_retrieval_per_client(tmp_path):
  """The final evaluation reads each client's personal model (FedSA-LoRA's
  B) with its store: retrieval/ metrics beside test/, paired tests against
  the same models without retrieval, and no bytes communicated."""
  c, splits = _tiny_run('knn_lm')
  exp = training.build(c, splits=splits)
  out = training.run_experiment(exp, str(tmp_path / 'run'))
  n = out['test/num_clients']
  assert out['retrieval/test/num_clients'] == n
  assert out['retrieval/upload_bytes'] == out['retrieval/download_bytes'] == 0
  assert out['retrieval/store_bytes_per_client'] > 0
  assert out['retrieval/query_ms'] > 0 and out['retrieval/search_s'] > 0
  assert 0 <= out['vs_no_retrieval/helped_significant_fraction'] <= 1
  # the same numbers by hand: the run's personal models with the stores
  from fedjax_pfi import checkpoint as checkpoint_lib
  params0 = training.initial_params(exp)
  frozen = exp.algorithm.frozen_part(params0)
  state, _ = checkpoint_lib.Checkpointer(str(tmp_path / 'run')).restore(
      1, exp.algorithm.init(params0))
  view = exp.algorithm.eval_view(state, frozen)
  r = retrieval.Retrieval(c.retrieval, exp.base_model, params0['base'],
                          exp.splits.train, exp.splits.metadata)
  m = r.evaluate(exp.algorithm.eval_model or exp.model, view.shared,
                 exp.splits.test, personal=view.personal,
                 combine=exp.algorithm.combine)
  assert out['retrieval/test/client_accuracy_mean'] == pytest.approx(
      float(m.accuracy.mean()), abs=1e-6)


def test_tuning_picks_lambda_on_validation_and_keeps_rows_per_client():
  ds = _data(6)
  model, params = _model(ds)
  r = retrieval.Retrieval(_rc(k=1, tune='client', lambdas='0,1', ks='1'),
                          model, params, ds, ds.metadata)
  # validation = the stored text itself: lambda 1 predicts it exactly
  got, info = r.tuned(model, params, ds, ds)
  assert info['retrieval/tuned_lambda_mean'] == 1.0
  want = r.evaluate(model, params, ds, k=1, lam=1.0)
  np.testing.assert_array_equal(got.correct, want.correct)
  np.testing.assert_array_equal(got.rows.correct, want.rows.correct)
  # select: client j's sums and rows from results[pick[j]]
  zero = r.evaluate(model, params, ds, k=1, lam=0.0)
  mixed = evaluation.select([zero, want], np.array([0, 1, 0]), ds)
  assert mixed.correct.tolist() == [zero.correct[0], want.correct[1],
                                    zero.correct[2]]
  lo, hi = ds.offsets[1], ds.offsets[2]
  np.testing.assert_array_equal(mixed.rows.correct[lo:hi],
                                want.rows.correct[lo:hi])
  np.testing.assert_array_equal(mixed.rows.correct[:lo], zero.rows.correct[:lo])


def test_a_store_is_built_once_and_rebuilt_when_its_inputs_change(tmp_path):
  ds = _data(7)
  model, params = _model(ds)
  where = str(tmp_path / 'store')
  first = retrieval.Retrieval(_rc(k=2), model, params, ds, ds.metadata,
                              directory=where)
  again = retrieval.Retrieval(_rc(k=2), model, params, ds, ds.metadata,
                              directory=where)
  assert not first.loaded and again.loaded
  a, b = (r.evaluate(model, params, ds) for r in (first, again))
  np.testing.assert_array_equal(a.rows.loss_sum, b.rows.loss_sum)
  other = model.init(jax.random.key(1))  # another base: rebuilt
  assert not retrieval.Retrieval(_rc(k=2), model, other, ds, ds.metadata,
                                 directory=where).loaded
  assert not retrieval.Retrieval(_rc('in_context', k=1, chunk_len=2), model,
                                 other, ds, ds.metadata,
                                 directory=where).loaded


def test_tuning_without_a_validation_split_is_refused_before_training(
    tmp_path):
  c, splits = _tiny_run('knn_lm')
  c.retrieval.tune = 'global'
  exp = training.build(c, splits=splits)
  with pytest.raises(ValueError, match='set data.val_fraction > 0'):
    training.run_experiment(exp, str(tmp_path / 'run'))
  assert not os.path.exists(str(tmp_path / 'run' / 'metrics.jsonl'))


def test_extend_equals_one_add_per_client():
  store, _ = _stores(clients=4, n=30)
  rng = np.random.default_rng(9)
  new = {c: {'keys': rng.normal(size=(m, 16)).astype(np.float32)}
         for c, m in ((0, 3), (2, 0), (3, 5))}
  one = store.copy()
  for c, rows in new.items():
    one.add(c, rows)
  many = store.copy()
  many.extend(new)
  np.testing.assert_array_equal(one.offsets, many.offsets)
  np.testing.assert_array_equal(one.columns['keys'], many.columns['keys'])
  with pytest.raises(ValueError, match="column 'keys': new rows of shape"):
    many.add(1, {'keys': np.zeros((2, 3))})


def test_a_fine_tuning_run_reads_its_fine_tuned_models_with_retrieval(
    tmp_path):
  """FedAvg + FT: each client's test/ model is the global one fine-tuned on
  its data; retrieval reads the same fine-tuned models (Adapter.adapt)."""
  c, splits = _tiny_run('knn_lm')
  c.algorithm = 'fedavg_ft'
  c.retrieval['lambda'] = 0.0  # the store's weight 0: exactly test/
  exp = training.build(c, splits=splits)
  out = training.run_experiment(exp, str(tmp_path / 'run'))
  assert out['retrieval/test/client_accuracy_mean'] == pytest.approx(
      out['test/client_accuracy_mean'], abs=1e-6)
  assert out['vs_no_retrieval/discordant_mean'] == 0
