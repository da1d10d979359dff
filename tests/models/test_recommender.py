"""The list-ranking recommender: HR@k, NDCG@k and the BCE, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfi.algorithms import personalized
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
