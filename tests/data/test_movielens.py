"""MovieLens-100k: finding the ratings, parsing them, the leave-one-out task.

The tests generate small ratings files in RecBole's atomic format; the real
file is checked only where the ``recbole`` wheel can be had (an installed
package, the cache, or PyPI).
"""

import hashlib
import os
import zipfile

import numpy as np
import pytest

from fedjax_pfi.data import movielens

HEADER = 'user_id:token\titem_id:token\trating:float\ttimestamp:float\n'


def generated_ratings(num_users=12, num_items=40, seed=0):
  """Rows ``(user, item, rating, timestamp)``: each user rates 3..15
  distinct items, raw ids not contiguous (as in real dumps)."""
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(num_users):
    for it in rng.choice(num_items, rng.integers(3, 16), replace=False):
      rows.append((10 * u + 7, 3 * it + 1, int(rng.integers(1, 6)),
                   int(rng.integers(8.8e8, 8.9e8))))
  order = rng.permutation(len(rows))
  return [rows[i] for i in order]


def inter_text(rows, header=HEADER):
  return header + ''.join(f'{u}\t{i}\t{r}\t{t}\n' for u, i, r, t in rows)


def write_inter(path, rows=None):
  """A RecBole ``.inter`` file of ``rows`` (default: `generated_ratings`)."""
  with open(path, 'w') as f:
    f.write(inter_text(generated_ratings() if rows is None else rows))
  return str(path)


def test_parse_inter_columns_and_bad_header():
  rows = generated_ratings()
  cols = movielens.parse_inter(inter_text(rows).encode())
  np.testing.assert_array_equal(cols['user_id'], [r[0] for r in rows])
  np.testing.assert_array_equal(cols['item_id'], [r[1] for r in rows])
  np.testing.assert_array_equal(cols['timestamp'], [r[3] for r in rows])
  assert cols['user_id'].dtype == np.int64
  bad = 'user_id:token\titem:token\trating:float\ttimestamp:float\n1\t2\t3\t4\n'
  with pytest.raises(ValueError, match=r"lacks the column\(s\) \['item_id'\]"):
    movielens.parse_inter(bad.encode())
  with pytest.raises(ValueError, match='no ratings'):
    movielens.parse_inter(HEADER.encode())


def test_leave_one_out_by_hand():
  rows = [  # user 5: items 10, 11, 12 at t=1, 3, 2; user 9: ties at t=4
      (5, 10, 4, 1), (5, 11, 3, 3), (5, 12, 5, 2),
      (9, 13, 1, 1), (9, 14, 2, 4), (9, 15, 3, 4), (9, 16, 3, 2),
      (7, 10, 5, 1), (7, 11, 5, 2)]  # user 7 has 2 ratings: dropped
  cols = movielens.parse_inter(inter_text(rows).encode())
  splits = movielens.leave_one_out(cols, num_negatives=2, eval_negatives=3,
                                   seed=0)
  items = {raw: i for i, raw in enumerate(range(10, 20))}  # 10..16 -> 0..6
  assert splits.train.client_names.tolist() == ['5', '9']
  assert splits.metadata['num_items'] == 7
  test, val = splits.test.columns['x'], splits.val.columns['x']
  # user 5: latest is item 11 (t=3), then 12 (t=2); trains on 10.
  assert test[0, 0] == items[11] and val[0, 0] == items[12]
  np.testing.assert_array_equal(splits.train.client(0)['x'][:, 0], [items[10]])
  # user 9: items 14 and 15 tie at t=4; the earlier row counts as later
  # (pandas rank(method='first', ascending=False)), so 14 is the test item.
  assert test[1, 0] == items[14] and val[1, 0] == items[15]
  np.testing.assert_array_equal(splits.train.client(1)['x'][:, 0],
                                [items[13], items[16]])
  for part in (splits.train, splits.val, splits.test):
    np.testing.assert_array_equal(part.columns['y'][:, 0], 1)
    np.testing.assert_array_equal(part.columns['y'][:, 1:], 0)


def test_negatives_are_never_rated_and_distinct():
  cols = movielens.parse_inter(inter_text(generated_ratings()).encode())
  splits = movielens.leave_one_out(cols, num_negatives=4, eval_negatives=20,
                                   seed=3, heldout_fraction=0.25)
  raw_items = np.unique(cols['item_id'])
  assert splits.train.columns['x'].shape[1] == 5
  assert splits.test.columns['x'].shape[1] == 21
  assert splits.heldout_train.num_clients == 3
  assert splits.train.num_clients == 9
  for part_train, part_test, part_val in (
      (splits.train, splits.test, splits.val),
      (splits.heldout_train, splits.heldout_test, None)):
    for c, name in enumerate(part_train.client_names):
      rated = set(np.searchsorted(raw_items,
                                  cols['item_id'][cols['user_id'] == int(name)]))
      lists = part_train.client(c)['x']
      assert len(lists) == len(rated) - 2
      for row in lists:
        assert len(set(row)) == 5 and not set(row[1:]) & rated
      t = part_test.client(c)['x'][0]
      assert len(set(t)) == 21 and not set(t[1:]) & rated
      if part_val is not None:  # validation ranks against the same negatives
        np.testing.assert_array_equal(part_val.client(c)['x'][0, 1:], t[1:])
  again = movielens.leave_one_out(cols, num_negatives=4, eval_negatives=20,
                                  seed=3, heldout_fraction=0.25)
  np.testing.assert_array_equal(again.train.columns['x'],
                                splits.train.columns['x'])
  other = movielens.leave_one_out(cols, num_negatives=4, eval_negatives=20,
                                  seed=4, heldout_fraction=0.25)
  assert not np.array_equal(other.test.columns['x'], splits.test.columns['x'])
  with pytest.raises(ValueError, match='never rated'):
    movielens.leave_one_out(cols, eval_negatives=40)


def test_read_inter_sources(tmp_path, monkeypatch):
  path = write_inter(tmp_path / 'ml-100k.inter')
  data = open(path, 'rb').read()
  assert movielens.read_inter(path) == data
  assert movielens.read_inter(str(tmp_path)) == data  # the directory
  with pytest.raises(FileNotFoundError, match='does not exist'):
    movielens.read_inter(str(tmp_path / 'nope.inter'))
  wheel = str(tmp_path / movielens.WHEEL_NAME)
  with zipfile.ZipFile(wheel, 'w') as z:
    z.writestr(movielens.INTER_IN_WHEEL, data)
  # A wheel's file must be the released one...
  with pytest.raises(ValueError, match='sha256'):
    movielens.read_inter(wheel)
  monkeypatch.setattr(movielens, 'INTER_SHA256',
                      hashlib.sha256(data).hexdigest())
  assert movielens.read_inter(wheel) == data
  # ...and is found in the cache directory when no path is given.
  monkeypatch.setenv('FEDJAX_PFI_CACHE', str(tmp_path))
  monkeypatch.setattr(movielens.importlib.util, 'find_spec', lambda n: None)
  assert movielens.read_inter() == data
  os.remove(wheel)
  with pytest.raises(FileNotFoundError, match='pip download'):
    movielens.read_inter(download=False)


def test_real_movielens_100k():
  """The released file: 100,000 ratings, 943 users, 1,682 items."""
  try:
    data = movielens.read_inter()
  except FileNotFoundError as e:  # no recbole, no cache and no PyPI
    pytest.skip(str(e))
  cols = movielens.parse_inter(data)
  assert cols['user_id'].size == 100_000
  assert np.unique(cols['user_id']).size == 943
  assert np.unique(cols['item_id']).size == 1682
  splits = movielens.leave_one_out(cols)
  assert splits.train.num_clients == 943
  assert splits.train.num_examples == 100_000 - 2 * 943
  assert splits.train.client_sizes.min() == 18  # 20 ratings at least
