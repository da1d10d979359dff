"""Issue 19's comparison end to end on generated ratings: pretraining, a
personal-state SASRec method and FedRAP, the per-user personality measures
against the frozen model, and the tables."""

import json
import os

from scipy import stats


from experiments import recommendation_compare
from fedjax_pfi import personalization
from tests.data.test_movielens import generated_ratings
from tests.data.test_movielens import inter_text

GENRES = ('Action', 'Comedy', 'Drama')


def write_movielens(directory):
  """``ml-100k.inter`` (users with the 4 interactions the sequential task
  needs), ``ml-100k.item`` and ``ml-100k.user`` beside it."""
  rows = generated_ratings(num_users=12, num_items=40)
  per_user = {u: sum(1 for r in rows if r[0] == u) for u, *_ in rows}
  rows = [r for r in rows if per_user[r[0]] >= 4]
  with open(os.path.join(directory, 'ml-100k.inter'), 'w') as f:
    f.write(inter_text(rows))
  with open(os.path.join(directory, 'ml-100k.item'), 'w') as f:
    f.write('item_id:token\tmovie_title:token_seq\trelease_year:token\t'
            'class:token_seq\n' + ''.join(
                f'{3 * i + 1}\tm{i}\t1990\t{GENRES[i % 3]}\n'
                for i in range(40)))
  with open(os.path.join(directory, 'ml-100k.user'), 'w') as f:
    f.write('user_id:token\tage:token\tgender:token\toccupation:token\t'
            'zip_code:token\n' + ''.join(
                f'{10 * u + 7}\t{20 + 3 * u}\t{"MF"[u % 2]}\tx\t0\n'
                for u in range(12)))
  return str(directory)


def test_table_on_generated_ratings(tmp_path):
  data = write_movielens(tmp_path)

  def configure(c):
    c.data.path = data
    c.data.eval_negatives = 9
    c.data.top_k = 3

  wd = str(tmp_path / 'rec')
  rows = recommendation_compare.run_all(
      wd, ['fedsa_lora'], ['fedrap'], testing=True, configure=configure,
      resamples=50)
  by = {r['method']: r for r in rows}
  assert list(by) == ['frozen', 'popular', 'fedsa_lora', 'mf_fedrap']
  frozen = by['frozen']
  # the frozen model against itself: nothing changes
  assert frozen['helped'] == frozen['hurt'] == 0 and frozen['mcnemar_p'] == 1
  assert frozen['closer'] == frozen['farther'] == 0
  assert frozen['closer_vs_farther_p'] == 1 and frozen['popularity_p'] == 1
  assert recommendation_compare.sign_p(0.3, 0.1, 100) == stats.binomtest(
      30, 40).pvalue
  assert frozen['genre_divergence'] == frozen['genre_divergence_frozen']
  assert frozen['mb'] == 0 and frozen['round_s'] is None
  start = personalization.load_clients(os.path.join(wd, 'fedsa_lora'))
  mine = start['personalized']
  fedrap = personalization.load_clients(os.path.join(wd, 'mf_fedrap'))
  s = mine['sampled'] & fedrap['personalized']['sampled']
  assert {r['users'] for r in rows} == {s.sum()}  # the same users in each
  assert by['fedsa_lora']['hr'] == mine['accuracy'][s].mean()
  # the run's own evaluation of the starting model is the frozen row
  assert start['start']['accuracy'][s].mean() == frozen['hr']
  for r in rows:
    assert 0 <= r['genre_divergence'] <= 1 and 1 <= r['popularity_rank']
    assert 0 <= r['helped'] + r['hurt'] <= 1
  assert by['mf_fedrap']['mb'] > 0
  with open(os.path.join(wd, 'groups.json')) as f:
    groups = json.load(f)
  genders = {(g['method'], g['group']): g for g in groups
             if g['attribute'] == 'gender'}
  assert {g for _, g in genders} == {'F', 'M'}
  assert genders['frozen', 'F']['users'] + genders['frozen', 'M'][
      'users'] == s.sum()
  assert os.path.exists(os.path.join(wd, 'table.md'))
