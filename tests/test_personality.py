"""The personality measures (issue 19) on constructed users whose answers
are known, and ml-100k.item's genres."""

import numpy as np
import pytest

from fedjax_pfi import personality
from fedjax_pfi.data import files
from fedjax_pfi.data import movielens

# items 0-3 are Action, 4-7 Comedy, 8 is both, 9 has no genre
GENRES = [('Action',)] * 4 + [('Comedy',)] * 4 + [('Action', 'Comedy'), ()]
MATRIX, NAMES = personality.genre_matrix(GENRES)


def test_genre_matrix_splits_a_movie_over_its_genres():
  assert NAMES == ('Action', 'Comedy')
  np.testing.assert_allclose(MATRIX[8], [0.5, 0.5])
  np.testing.assert_allclose(MATRIX[9], [0.0, 0.0])
  np.testing.assert_allclose(personality.profile([0, 1, 4, 8], MATRIX),
                             [2.5 / 4, 1.5 / 4])
  with pytest.raises(ValueError, match='Drama'):
    personality.genre_matrix([('Drama',)], ['Action'])


def test_js_divergence_closed_forms():
  assert personality.js_divergence([1, 0], [1, 0]) == 0
  assert personality.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
  # JS([1, 0], [1/2, 1/2]) = 1/2 KL(p||m) + 1/2 KL(q||m), m = [3/4, 1/4]
  want = 0.5 * np.log2(4 / 3) + 0.5 * (0.5 * np.log2(2 / 3) + 0.5 * np.log2(2))
  assert personality.js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(want)


def test_divergence_zero_for_a_faithful_user_one_for_a_flipped_one():
  histories = [np.array([0, 1, 2]), np.array([4, 5, 6])]  # Action; Comedy
  faithful = np.array([[3, 0], [7, 4]])
  flipped = np.array([[4, 5], [0, 1]])
  np.testing.assert_allclose(
      personality.genre_divergence(faithful, histories, MATRIX), [0, 0])
  np.testing.assert_allclose(
      personality.genre_divergence(flipped, histories, MATRIX), [1, 1])


def test_top_k_excludes_the_users_own_items():
  scores = np.array([[5.0, 4, 3, 2], [1, 2, 3, 4]])
  exclude = np.array([[True, False, False, False], [False] * 4])
  np.testing.assert_array_equal(personality.top_k(scores, exclude, 2),
                                [[1, 2], [3, 2]])
  with pytest.raises(ValueError, match='k must'):
    personality.top_k(scores, exclude, 0)


def test_popularity_rank_of_the_most_and_least_popular():
  counts = np.array([50, 10, 10, 1])
  np.testing.assert_array_equal(personality.popularity_ranks(counts),
                                [1, 2, 2, 4])
  np.testing.assert_allclose(
      personality.popularity_rank(np.array([[0, 1], [2, 3]]), counts),
      [1.5, 3.0])


def test_closer_test_on_known_users():
  history = np.array([0, 1, 2, 3, 0, 1, 2, 3, 4])  # mostly Action
  action, comedy = np.array([0, 1, 2]), np.array([4, 5, 6])
  assert personality.closer_test(history, action, comedy, MATRIX,
                                 resamples=200) < 0.01
  assert personality.closer_test(history, comedy, action, MATRIX,
                                 resamples=200) == 1.0
  assert personality.closer_test(history, action, action, MATRIX,
                                 resamples=200) == 1.0  # equal: never closer
  with pytest.raises(ValueError, match='without history'):
    personality.closer_test(np.array([], int), action, comedy, MATRIX)


def test_report_counts_users_closer_and_farther_by_group():
  histories = [np.array([0, 1, 2, 3] * 3), np.array([4, 5, 6, 7] * 3),
               np.array([0, 4] * 6)]
  personal = np.array([[0, 1], [4, 5], [0, 4]])
  glob = np.array([[4, 5], [4, 5], [0, 4]])  # wrong for user 0 only
  out = personality.report(personal, glob, histories, MATRIX,
                           counts=np.arange(10)[::-1], resamples=200,
                           groups={'gender': np.array(['F', 'M', 'M'])})
  assert out['personality/closer_significant_fraction'] == pytest.approx(1 / 3)
  assert out['personality/farther_significant_fraction'] == 0
  assert out['personality/genre_divergence_mean'] == pytest.approx(0.0)
  assert out['personality/genre_divergence_ref_mean'] == pytest.approx(1 / 3)
  assert out['personality/by_gender/F/closer_significant_fraction'] == 1.0
  assert out['personality/by_gender/M/closer_significant_fraction'] == 0.0
  # counts descending by index: item 0 is the most popular (rank 1)
  assert out['personality/popularity_rank_mean'] == pytest.approx(
      np.mean([1.5, 5.5, 3.0]))


def test_parse_items_reads_genres_and_refuses_what_is_not_an_item_file():
  text = ('item_id:token\tmovie_title:token_seq\trelease_year:token\t'
          'class:token_seq\n1\tToy Story\t1995\tAnimation Children\'s Comedy\n'
          '267\tunknown\t\tunknown\n3\tNo genre\t1995\t\n')
  genres = movielens.parse_items(text.encode())
  assert genres == {'1': ('Animation', "Children's", 'Comedy'),
                    '267': ('unknown',), '3': ()}
  with pytest.raises(files.DataFileError, match='class'):
    movielens.parse_items(b'item_id:token\tmovie_title:token_seq\n1\tx\n')


@pytest.mark.parametrize('name', ['sasrec', 'additive_mf'])
def test_catalogue_scores_give_each_user_its_own_models_scores(name):
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.algorithms import core  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.models import zoo  # pylint: disable=g-import-not-at-top
  meta = dict(task='ranking', num_items=7, num_negatives=1, top_k=3)
  hist = 3 if name == 'sasrec' else 0
  if hist:
    meta.update(history_len=hist, pad_item=7)
  # three users' test lists: a history (padded with 7), then 4 candidates
  test_x = np.array([[1, 2, 7, 0, 3, 4, 5], [6, 7, 7, 1, 2, 3, 4],
                     [0, 1, 2, 6, 5, 4, 3]])[:, 3 - hist:]
  inputs = personality.catalogue_inputs(test_x, meta)
  assert inputs.shape == (3, hist + 7)
  np.testing.assert_array_equal(inputs[:, :hist], test_x[:, :hist])
  np.testing.assert_array_equal(inputs[1, hist:], np.arange(7))
  model = zoo.build_model(name, inputs[:1], meta, dim=4, **(
      dict(num_layers=1, num_heads=2) if hist else {}))
  params = [model.init(jax.random.key(u)) for u in range(3)]
  want = np.stack([np.asarray(model.apply(p, x[None]))[0]
                   for p, x in zip(params, inputs)])
  stacked = jax.tree.map(lambda *x: np.stack(x), *params)
  # two users per chunk: the second chunk is padded
  got = personality.catalogue_scores(
      model, core.EvalView(None, None, stacked), inputs, users_per_chunk=2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # a shared part joined to each user's own (as evaluation's combine)
  joined = personality.catalogue_scores(
      model, core.EvalView(None, params[0], stacked), inputs,
      combine=lambda shared, mine: jax.tree.map(
          lambda s, m: 0.5 * (s + m), shared, mine), users_per_chunk=2)
  np.testing.assert_allclose(
      joined[2], np.asarray(model.apply(jax.tree.map(
          lambda s, m: 0.5 * (s + m), params[0], params[2]),
          inputs[2:]))[0], rtol=1e-5, atol=1e-6)
  shared = personality.catalogue_scores(model, core.EvalView(params[1]),
                                        inputs, users_per_chunk=2)
  np.testing.assert_allclose(shared[0], np.asarray(
      model.apply(params[1], inputs[:1]))[0], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='clustered'):
    personality.catalogue_scores(
        model, core.EvalView(None, clusters=stacked), inputs)
