"""The list-ranking recommender: HR@k, NDCG@k and the BCE, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfi import evaluation
from fedjax_pfi.algorithms import personalized
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.models import recommender
from fedjax_pfi.models import zoo

Y = jnp.array([[1, 0, 0, 0]] * 3)


def test_ranks_hits_and_ndcg_by_hand():
  logits = jnp.array([[3.0, 1.0, 2.0, 0.0],    # positive first: rank 0
                      [1.0, 3.0, 2.0, 0.0],    # two negatives above: rank 2
                      [1.0, 1.0, 0.0, 1.0]])   # ties count as above: rank 2
  np.testing.assert_array_equal(recommender.ranks(logits, Y), [0, 2, 2])
  hit, ndcg = recommender.hit_and_ndcg(logits, Y, 2)
  np.testing.assert_array_equal(hit, [1, 0, 0])
  np.testing.assert_allclose(ndcg, [1.0, 0.0, 0.0])
  hit, ndcg = recommender.hit_and_ndcg(logits, Y, 3)
  np.testing.assert_array_equal(hit, [1, 1, 1])
  np.testing.assert_allclose(ndcg, [1.0, 0.5, 0.5])  # 1 / log2(2 + 2)
  # A constant model ranks nothing first, nor does a diverged one.
  assert float(recommender.hit_and_ndcg(jnp.zeros((1, 4)), Y[:1], 1)[0][0]) == 0
  nan = jnp.array([[jnp.nan, 0.0, 1.0, 2.0], [5.0, jnp.nan, 0.0, 0.0]])
  np.testing.assert_array_equal(recommender.ranks(nan, Y[:2]), [3, 1])


def test_list_stats_mean_bce():
  logits = jnp.array([[2.0, -1.0, 0.5, 0.0]])
  stats = recommender.list_stats(logits, Y[:1], 1)
  p = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5, 0.0])))
  want = -np.mean([np.log(p[0]), np.log(1 - p[1]), np.log(1 - p[2]),
                   np.log(1 - p[3])])
  np.testing.assert_allclose(stats.loss_sum, [want], rtol=1e-6)
  np.testing.assert_array_equal(stats.correct, [1.0])
  np.testing.assert_array_equal(stats.count, [1.0])


def test_additive_mf_scores_and_head():
  meta = {'task': 'ranking', 'num_items': 7, 'top_k': 2}
  x = np.array([[0, 3, 5], [6, 1, 2]], np.int32)
  model = zoo.build_model('additive_mf', x, meta, dim=4)
  params = model.init(jax.random.key(0))
  assert sorted(params) == ['global_items', 'personal_items', 'score']
  items = (params['personal_items']['embedding'] +
           params['global_items']['embedding'])
  want = items[x] @ params['score']['kernel'][:, 0] + params['score']['bias']
  np.testing.assert_allclose(model.apply(params, x), want, rtol=1e-5)
  # FedPer's head on this model is the user embedding.
  assert personalized.head_pattern(model, params) == '^score/'
  with pytest.raises(ValueError, match='ranking datasets'):
    zoo.build_model('mlp', x, meta)
  with pytest.raises(ValueError, match='ranking datasets'):
    zoo.build_model('additive_mf', x, {'num_classes': 3})


def _ndcg_by_hand(scores, y, k):
  """NDCG@k of one list with one positive: 1/log2(rank + 2) if the
  positive's rank (negatives scoring at least it) is below k, else 0."""
  rank = int(np.sum((y == 0) & ~(scores < scores[y == 1][0])))
  return 1.0 / np.log2(rank + 2) if rank < k else 0.0


def test_runs_report_ndcg_per_client_shared_and_personal():
  rng = np.random.default_rng(0)
  items, lists, length = 30, 11, 8
  x = rng.integers(0, items, (lists, length)).astype(np.int32)
  y = np.zeros((lists, length), np.int32)
  y[:, 0] = 1
  ds = FederatedDataset.from_clients(
      [{'x': x[:4], 'y': y[:4]}, {'x': x[4:5], 'y': y[4:5]},
       {'x': x[5:], 'y': y[5:]}])
  model = recommender.ranking_model(recommender.AdditiveMF(items, 4), x[:2],
                                    'mf', top_k=3)
  params = model.init(jax.random.key(1))
  scores = np.asarray(model.apply(params, x))
  by_hand = np.array([_ndcg_by_hand(s, t, 3) for s, t in zip(scores, y)])
  owner = np.repeat(np.arange(3), ds.client_sizes)
  want = np.bincount(owner, by_hand) / ds.client_sizes
  ev = evaluation.Evaluator(model, batch_size=4, clients_per_chunk=2)
  shared = ev.evaluate(params, ds)
  personal = ev.evaluate(None, ds, personal_params=jax.tree.map(
      lambda p: np.stack([p] * 3), params))
  for m in (shared, personal):
    np.testing.assert_allclose(m.ndcg / m.count, want, rtol=1e-6)
  out = evaluation.summarize(shared, 'test/')
  assert out['test/ndcg'] == pytest.approx(by_hand.mean(), rel=1e-6)
  assert out['test/client_ndcg_mean'] == pytest.approx(want.mean(), rel=1e-6)
  assert out['test/client_ndcg_worst'] == pytest.approx(want.min(), rel=1e-6)
  # HR@3 is still the accuracy, and NDCG@k <= HR@k list by list
  assert np.all(by_hand <= (by_hand > 0))
  picked = evaluation.select([shared, personal], np.array([0, 1, 0]), ds)
  np.testing.assert_allclose(picked.ndcg, shared.ndcg, rtol=1e-6)
  # models without ranked lists report no NDCG
  assert 'test/ndcg' not in evaluation.summarize(
      shared._replace(ndcg=None), 'test/')
