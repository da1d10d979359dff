"""Reading data files so that a bad one is named, with what was expected.

Every loader reads its files through these: a file that is not what it
should be raises `DataFileError` naming the file, what it should hold and
what was wrong. Nothing here unpickles: NumPy files are read with
``allow_pickle=False``, and a file that is neither ``.npy`` nor ``.npz`` is
refused before NumPy would suggest unpickling it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

_NPY_MAGIC = b'\x93NUMPY'
_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')  # an .npz is a zip archive


class DataFileError(ValueError):
  """A data file that is not what its loader reads."""


def refuse(path, expected: str, problem: str) -> DataFileError:
  return DataFileError(f'{os.fspath(path)} is not {expected}: {problem}.')


def _cause(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:200]}'


def read_text(path, expected: str, data: Optional[bytes] = None) -> str:
  """The UTF-8 text of ``path`` (or of its bytes ``data``)."""
  if data is None:
    with open(path, 'rb') as f:
      data = f.read()
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise refuse(path, expected, f'its bytes are not UTF-8 text (byte '
                 f'{e.start} is {data[e.start:e.start + 1]!r})') from e


def parse_json(text: str, path, expected: str, line: Optional[int] = None):
  """``json.loads(text)``; ``line``: where in ``path`` the text is."""
  try:
    return json.loads(text)
  except ValueError as e:
    where = f'line {line}: ' if line is not None else ''
    raise refuse(path, expected, f'{where}invalid JSON ({e})') from e


def read_json(path, expected: str) -> Any:
  return parse_json(read_text(path, expected), path, expected)


def _magic(path, expected: str, accepted: tuple[bytes, ...]) -> None:
  with open(path, 'rb') as f:
    head = f.read(8)
  if not any(head.startswith(m) for m in accepted):
    raise refuse(path, expected, f'it does not begin as a NumPy file does '
                 f'(first bytes {head[:6]!r})')


def _unreadable(e: BaseException) -> str:
  if 'allow_pickle' in str(e):  # numpy's advice is to unpickle: never
    return ('it holds Python objects (an object array), which are never '
            'loaded: save numeric or string arrays')
  return f'it cannot be read ({_cause(e)})'


def load_npz(path, expected: str, keys: tuple[str, ...]) -> dict:
  """The arrays ``keys`` of the ``.npz`` archive ``path``, read whole."""
  _magic(path, expected, _ZIP_MAGIC)
  try:
    with np.load(path, allow_pickle=False) as d:
      missing = [k for k in keys if k not in d.files]
      if missing:
        raise refuse(path, expected, f'it lacks the array(s) {missing} '
                     f'(it holds {sorted(d.files)[:10]})')
      return {k: d[k] for k in keys}
  except DataFileError:
    raise
  except Exception as e:  # zipfile, zlib and numpy raise many types
    raise refuse(path, expected, _unreadable(e)) from e


def load_npy(path, expected: str, mmap_mode: Optional[str] = None
             ) -> np.ndarray:
  """The array of the ``.npy`` file ``path`` (memory-mapped with
  ``mmap_mode``)."""
  _magic(path, expected, (_NPY_MAGIC,))
  try:
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
  except Exception as e:
    raise refuse(path, expected, _unreadable(e)) from e
