"""MovieLens as next-item prediction (issue 19): the sequential split by
timestamp, and SASRec against a hand-built reference."""

import jax
import numpy as np
import pytest

from experiments.configs import pretrain_sasrec
from fedjax_pfi import pretraining
from fedjax_pfi.data import movielens
from fedjax_pfi.data import registry
from fedjax_pfi.models import recommender
from fedjax_pfi.models import zoo
from tests.data.test_movielens import generated_ratings
from tests.data.test_movielens import inter_text

# user 9: items 13 (t=1), 16 (t=2), 14 and 15 tie at t=4 (14 on the earlier
# row, so it counts as later: the test item), 17 (t=0).
ROWS = [(9, 13, 1, 1), (9, 14, 2, 4), (9, 15, 3, 4), (9, 16, 3, 2),
        (9, 17, 5, 0), (5, 10, 4, 1), (5, 11, 3, 3), (5, 12, 5, 2),
        (5, 18, 1, 5)]


def ratings(rows=ROWS):
  return movielens.parse_inter(inter_text(rows).encode())


def test_sequential_split_by_timestamp_with_leave_one_outs_ties():
  splits = movielens.sequential(ratings(), max_len=3, num_negatives=2,
                                eval_negatives=3, seed=0)
  item = {raw: i for i, raw in enumerate(range(10, 19))}
  pad = splits.metadata['pad_item']
  assert pad == 9 and splits.metadata['history_len'] == 3
  assert splits.train.client_names.tolist() == ['5', '9']
  # user 9 in time order: 17, 13, 16, 15, 14 -> trains on 17, 13, 16
  x9 = splits.train.client(1)['x']
  np.testing.assert_array_equal(x9[:, :4], [
      [item[17], pad, pad, item[13]],
      [item[17], item[13], pad, item[16]]])
  np.testing.assert_array_equal(  # the 3 items before the validation item
      splits.val.client(1)['x'][0, :4],
      [item[17], item[13], item[16], item[15]])
  np.testing.assert_array_equal(  # the last 3 items before the test item
      splits.test.client(1)['x'][0, :4],
      [item[13], item[16], item[15], item[14]])
  # the same targets and negatives as the candidate-list task
  lists = movielens.leave_one_out(ratings(), num_negatives=2,
                                  eval_negatives=3, seed=0)
  for part in ('val', 'test'):
    np.testing.assert_array_equal(
        getattr(splits, part).columns['x'][:, 3:],
        getattr(lists, part).columns['x'])
  for part in (splits.train, splits.val, splits.test):
    np.testing.assert_array_equal(part.columns['y'][:, 0], 1)
    np.testing.assert_array_equal(part.columns['y'][:, 1:], 0)
  negatives = x9[:, 4:]  # never rated by the user, distinct per row
  assert not set(negatives.ravel()) & {item[i] for i in (13, 14, 15, 16, 17)}
  assert all(len(set(r)) == r.size for r in negatives)
  # the histories the personality measures read: the same order, by name
  histories, raw_items = movielens.user_items(ratings())
  np.testing.assert_array_equal(raw_items, np.arange(10, 19))
  np.testing.assert_array_equal(
      histories['9'], [item[i] for i in (17, 13, 16, 15, 14)])
  np.testing.assert_array_equal(histories['5'], [item[i] for i in
                                                 (10, 12, 11, 18)])


def test_bad_input_is_refused_by_name():
  with pytest.raises(ValueError, match='user 7 has 3 interactions'):
    movielens.sequential(ratings(ROWS + [(7, 10, 5, 1), (7, 11, 5, 2),
                                         (7, 12, 5, 3)]), eval_negatives=3)
  with pytest.raises(ValueError, match=r'history length \(data.seq_len\) must '
                     r'be >= 1, got 0'):
    movielens.sequential(ratings(), max_len=0)
  lists = movielens.leave_one_out(ratings(), eval_negatives=3)
  with pytest.raises(ValueError, match="movielens_sequential"):
    zoo.build_model('sasrec', lists.train.columns['x'][:2], lists.metadata)
  with pytest.raises(ValueError, match="unknown MovieLens task 'seq'"):
    movielens.load('/nonexistent', task='seq')


def _layernorm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p['scale'] + p['bias']


def _gelu(x):  # tanh approximation, as GPT-2 and nn.gelu(approximate=True)
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _dense(x, p):
  return x @ p['kernel'] + p['bias']


def sasrec_by_hand(params, history, candidates, heads):
  """SASRec's scores for one user, numpy, over the real history only."""
  p = jax.tree.map(np.asarray, params)
  emb = p['items']['embedding']
  h = emb[history] + p['pos_embed'][:len(history)]
  for i in range(sum(k.startswith('block_') for k in p)):
    b = p[f'block_{i}']
    a = _layernorm(h, b['ln_attn'])
    t, d = a.shape
    q, k, v = (_dense(a, b['attn'][n]).reshape(t, heads, d // heads)
               for n in 'qkv')
    s = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(d // heads)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    h = h + _dense(np.einsum('hqk,khd->qhd', w, v).reshape(t, d),
                   b['attn']['o'])
    m = _layernorm(h, b['ln_mlp'])
    h = h + _dense(_gelu(_dense(m, b['mlp']['fc'])), b['mlp']['proj'])
  last = _layernorm(h, p['ln_f'])[-1]
  return emb[candidates] @ last


def test_sasrec_matches_a_hand_built_reference_and_ignores_padding():
  """The reference sees only each user's real history; the model sees it
  right-padded to ``history_len``: equal scores mean padding changes
  nothing."""
  num_items, history_len = 20, 6
  module = recommender.SASRec(num_items, history_len, dim=8, num_layers=2,
                              num_heads=2)
  histories = [[3, 7, 1], [5], [2, 4, 6, 8, 10, 12]]
  candidates = np.array([[9, 0, 11, 3], [5, 1, 2, 19], [13, 14, 15, 2]])
  x = np.array([h + [num_items] * (history_len - len(h)) + list(c)
                for h, c in zip(histories, candidates)], np.int32)
  model = recommender.ranking_model(module, x[:1], 'sasrec', top_k=2)
  params = model.init(jax.random.key(0))
  got = np.asarray(model.apply(params, x))
  for i, (h, c) in enumerate(zip(histories, candidates)):
    np.testing.assert_allclose(got[i], sasrec_by_hand(params, h, c, 2),
                               rtol=2e-4, atol=2e-5)


def test_sasrec_scores_the_sequential_task_from_the_zoo():
  rows = generated_ratings(num_users=6, num_items=30)
  per_user = {u: sum(1 for r in rows if r[0] == u) for u, *_ in rows}
  cols = movielens.parse_inter(inter_text(
      [r for r in rows if per_user[r[0]] >= 4]).encode())
  splits = movielens.sequential(cols, max_len=5, num_negatives=2,
                                eval_negatives=10)
  assert 'movielens_sequential' in registry.DATASETS
  model = zoo.build_model('sasrec', splits.train.columns['x'][:2],
                          splits.metadata, dim=8, num_layers=1, num_heads=2)
  params = model.init(jax.random.key(0))
  stats = model.example_stats(params, {k: v[:4] for k, v in
                                       splits.test.columns.items()})
  assert stats.ndcg.shape == (4,) and np.all(stats.ndcg <= stats.correct)


def test_pretrained_sasrec_round_trips_and_refuses_another_vocabulary(
    tmp_path):
  splits = movielens.sequential(ratings(), max_len=3, num_negatives=2,
                                eval_negatives=3)
  x = splits.train.columns['x'][:2]
  model = zoo.build_model('sasrec', x, splits.metadata, dim=8, num_layers=1,
                          num_heads=2)
  params = model.init(jax.random.key(3))
  module = recommender.SASRec(splits.metadata['num_items'], 3, dim=8,
                              num_layers=1, num_heads=2)
  d = recommender.save_sasrec(str(tmp_path / 'model'), module, params)
  loaded = zoo.build_model('sasrec', x, splits.metadata, pretrained=d)
  got = loaded.init(jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, got, params)
  test = splits.test.columns['x']
  np.testing.assert_array_equal(loaded.apply(got, test),
                                model.apply(params, test))
  other = dict(splits.metadata, num_items=splits.metadata['num_items'] + 5)
  with pytest.raises(ValueError, match=r'item vocabulary of 9 items, but the '
                     r'dataset has 14'):
    zoo.build_model('sasrec', x, other, pretrained=d)
  with pytest.raises(ValueError, match=r'histories of 3 items, but '
                     r'data.seq_len is 4'):
    zoo.build_model('sasrec', x, dict(splits.metadata, history_len=4),
                    pretrained=d)
  with pytest.raises(ValueError, match='conflict with model.pretrained'):
    zoo.build_model('sasrec', x, splits.metadata, pretrained=d, dim=16)
  with pytest.raises(FileNotFoundError, match='no config.json'):
    zoo.build_model('sasrec', x, splits.metadata,
                    pretrained=str(tmp_path / 'none'))


def test_pretraining_uses_only_held_out_users(tmp_path):
  rows = generated_ratings(num_users=10, num_items=40)
  per_user = {u: sum(1 for r in rows if r[0] == u) for u, *_ in rows}
  path = tmp_path / 'ratings.inter'
  with open(path, 'w') as f:
    f.write(inter_text([r for r in rows if per_user[r[0]] >= 4]))
  c = pretrain_sasrec.get_config('testing')
  c.data.path = str(path)
  c.data.eval_negatives = 10
  c.data.heldout_fraction = 0.3
  c.steps, c.eval_every = 4, 2
  final = pretraining.pretrain(c, str(tmp_path / 'pre'))
  splits = registry.load_splits(c.data)
  assert final['users'] == splits.heldout_train.num_clients == 3
  assert final['examples'] == splits.heldout_train.num_examples
  assert not set(splits.heldout_train.client_names) & set(
      splits.train.client_names)  # no federated client was pretraining data
  assert 0 <= final['val/ndcg'] <= final['val/accuracy'] <= 1
  model = zoo.build_model('sasrec', splits.train.columns['x'][:2],
                          splits.metadata,
                          pretrained=str(tmp_path / 'pre' / 'model'))
  assert model.init(jax.random.key(0))['items']['embedding'].shape == (
      splits.metadata['num_items'] + 1, 8)
  c.data.heldout_fraction = 0.0
  with pytest.raises(ValueError, match='needs held-out users'):
    pretraining.pretrain(c, str(tmp_path / 'other'))
