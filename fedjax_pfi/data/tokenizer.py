"""Tokenizers: text -> int32 ids, with one id reserved for padding.

- ``'byte'`` (`ByteTokenizer`): UTF-8 bytes, ``id = byte + 1`` and ``0`` is
  padding, so ``vocab_size = 257``. No vocabulary file, nothing to download,
  every string encodes losslessly. The embedded default foundation model uses
  it.
- ``'char'``: the 98-symbol LEAF Shakespeare vocabulary (``VOCAB``;
  padding 0, out-of-vocabulary 1), which `fedjax_pfi.data.shakespeare`
  re-exports.
- a directory holding a Hugging Face ``tokenizer.json`` (`HFTokenizer`), read
  with the ``tokenizers`` package when it is installed, e.g. the tokenizer
  that ships beside a pretrained checkpoint.

A tokenizer has ``encode(text) -> np.ndarray``, ``decode(ids) -> str``,
``vocab_size`` and ``pad_id``; a padded target (``pad_id``) is ignored by the
loss.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes shifted by one: ``id = byte + 1``; ``0`` is padding."""
  name = 'byte'
  pad_id = 0
  vocab_size = 257

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + 1

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(list(ids) if not hasattr(ids, 'shape') else ids)
    ids = ids.reshape(-1)
    return (ids[ids != self.pad_id] - 1).astype(np.uint8).tobytes().decode(
        'utf-8', errors='replace')


# -- the LEAF Shakespeare character vocabulary ---------------------------------

PAD_ID = 0
OOV_ID = 1
VOCAB = ('<pad>', '<oov>', '\n') + tuple(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(VOCAB)
NORMALIZE = {'\u2014': '--', '\u2013': '-', '\u2018': "'", '\u2019': "'",
             '\u201c': '"', '\u201d': '"'}

_TABLE = np.full(128, OOV_ID, np.int32)
_TABLE[ord('\n')] = 2
_TABLE[32:127] = np.arange(3, VOCAB_SIZE)
_NORMALIZE_RE = re.compile('|'.join(NORMALIZE))


def encode_chars(text: str) -> np.ndarray:
  """Character ids int32 ``[len]`` of ``text`` (after ``NORMALIZE``)."""
  text = _NORMALIZE_RE.sub(lambda m: NORMALIZE[m.group(0)], text)
  cp = np.frombuffer(text.encode('utf-32-le'), np.uint32)
  return np.where(cp < 128, _TABLE[np.minimum(cp, 127)], OOV_ID).astype(
      np.int32)


def decode_chars(ids: Iterable[int]) -> str:
  """Text of ids; pads are dropped and OOV shows as U+FFFD."""
  return ''.join('\ufffd' if i == OOV_ID else VOCAB[i]
                 for i in np.asarray(ids).reshape(-1) if i != PAD_ID)


class CharTokenizer:
  """The LEAF Shakespeare character vocabulary (``VOCAB`` above)."""
  name = 'char'
  pad_id = PAD_ID
  vocab_size = VOCAB_SIZE

  def encode(self, text: str) -> np.ndarray:
    return encode_chars(text)

  def decode(self, ids: Iterable[int]) -> str:
    return decode_chars(ids)


_PAD_NAMES = ('<pad>', '[PAD]', '<|pad|>', '<|endoftext|>', '</s>')


class HFTokenizer:
  """A Hugging Face ``tokenizer.json`` (needs ``pip install tokenizers``).

  Args:
    directory: holds ``tokenizer.json``.
    pad_token: the token used for padding; default the first of
      ``<pad>``, ``[PAD]``, ``<|pad|>``, ``<|endoftext|>``, ``</s>`` that the
      vocabulary has.
  """

  def __init__(self, directory: str, pad_token: Optional[str] = None):
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'no tokenizer.json in {directory!r}; a tokenizer is "byte", '
          '"char" or a directory holding a Hugging Face tokenizer.json.')
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f'reading {path} needs the tokenizers package: pip install '
          'tokenizers') from e
    self.name = directory
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception
      raise ValueError(f'{path} is not a Hugging Face tokenizer.json: '
                       f'{e}.') from e
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    names = (pad_token,) if pad_token else _PAD_NAMES
    ids = [self._tok.token_to_id(t) for t in names]
    found = [i for i in ids if i is not None]
    if not found:
      raise ValueError(
          f'the tokenizer in {directory!r} has none of the padding tokens '
          f'{list(names)}; pass pad_token= one of its tokens.')
    self.pad_id = int(found[0])

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids,
                      np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in np.asarray(list(ids) if not hasattr(ids, 'shape')
                                      else ids).reshape(-1)
           if int(i) != self.pad_id]
    return self._tok.decode(ids)


def load_tokenizer(spec: str, pad_token: Optional[str] = None):
  """A tokenizer by name: ``'byte'`` (`ByteTokenizer`), ``'char'``
  (`CharTokenizer`, LEAF's Shakespeare symbols) or a directory with a
  Hugging Face ``tokenizer.json`` (`HFTokenizer`, whose ``pad_token`` this
  passes on).

  Returns:
    An object with ``encode(text) -> int32 [n]``, ``decode(ids) -> str``
    (padding dropped), ``vocab_size`` and ``pad_id``.
  """
  if spec == 'byte':
    return ByteTokenizer()
  if spec == 'char':
    return CharTokenizer()
  if spec and os.path.isdir(spec):
    return HFTokenizer(spec, pad_token)
  raise ValueError(
      f'unknown tokenizer {spec!r}; accepted: "byte", "char", or a directory '
      'holding a Hugging Face tokenizer.json.')
