"""Canaries planted in clients' training data (Carlini et al., USENIX
Security 2019, "The Secret Sharer"), and the probe that measures them.

A canary is ``prefix + secret``, the secret ``digits`` random digits. Each of
``num`` training clients (drawn with the canaries' ``seed``) gets one canary,
``repeats`` times, as extra training windows. Its exposure under a model
compares the log-perplexity of its secret given the prefix with that of
``candidates`` other random secrets of the same format
(`client_stats.exposure`): ``log2(candidates + 1)`` when the model ranks the
planted secret first, about 1 when it is unremarkable. Exposure by rank among
sampled candidates (Carlini et al., Sec. 4.2) caps it at
``log2(candidates + 1)``; the extrapolation of their Sec. 4.3 is not used.

Text datasets only (windows ``x``, ``y`` ``[n, T]`` of one tokenizer); a
canary must fit one window (``T + 1`` tokens).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from fedjax_pfi.data import tokenizer as tokenizer_lib
from fedjax_pfi.data.federated import FederatedDataset, FederatedSplits


class Canaries(NamedTuple):
  """What was planted and the probe rows that score it.

  Attributes:
    num, candidates: canaries; other secrets per canary.
    holders: ``[num]`` training-client index of each canary.
    texts: the canaries, as planted.
    probe: columns ``x``, ``y`` ``[num * (1 + candidates), T]``: for canary
      ``j`` its own row, then its candidates; ``y`` is the pad id except at
      the secret's tokens, so a row's summed loss is the secret's
      log-perplexity given the prefix.
  """
  num: int
  candidates: int
  holders: np.ndarray
  texts: tuple
  probe: dict


def _window(ids: np.ndarray, secret_from: int, seq_len: int, pad: int):
  x = np.full(seq_len, pad, np.int32)
  y = np.full(seq_len, pad, np.int32)
  full_y = np.full(seq_len, pad, np.int32)
  x[:ids.size - 1] = ids[:-1]
  full_y[:ids.size - 1] = ids[1:]
  y[secret_from - 1:ids.size - 1] = ids[secret_from:]
  return x, full_y, y


def plant(splits: FederatedSplits, cfg, tokenizer: str) -> tuple[
    FederatedSplits, Canaries]:
  """``splits`` with the canaries of ``cfg`` (``evaluation.canaries``) in
  their holders' training data, and the `Canaries`."""
  train = splits.train
  x = np.asarray(train.columns['x'])
  if set(train.columns) != {'x', 'y'} or x.ndim != 2 or \
      train.metadata.get('pad_id') is None:
    raise ValueError(
        'evaluation.canaries needs a text dataset (windows x, y [n, T] with '
        f"a pad id), not this one (columns {sorted(train.columns)}, x of "
        f'shape {x.shape}).')
  num, repeats = int(cfg.num), int(cfg.repeats)
  digits, candidates = int(cfg.digits), int(cfg.candidates)
  for name, v, low in (('num', num, 1), ('repeats', repeats, 1),
                       ('digits', digits, 1), ('candidates', candidates, 1)):
    if v < low:
      raise ValueError(f'evaluation.canaries.{name} must be >= {low}, got '
                       f'{v}.')
  if candidates + 1 > 10 ** digits:
    raise ValueError(f'evaluation.canaries.candidates={candidates} needs '
                     f'more than the {10 ** digits} secrets of {digits} '
                     'digits.')
  eligible = np.flatnonzero(train.client_sizes > 0)
  if num > eligible.size:
    raise ValueError(f'evaluation.canaries.num={num} is more than the '
                     f'{eligible.size} training clients.')
  tok = tokenizer_lib.load_tokenizer(tokenizer)
  seq_len, pad = x.shape[1], int(train.metadata['pad_id'])
  prefix = tok.encode(str(cfg.prefix))
  rng = np.random.default_rng([int(cfg.seed), 0xCA7])
  holders = np.sort(rng.choice(eligible, num, replace=False))
  texts, planted, probe_x, probe_y = [], {}, [], []
  for j, holder in enumerate(holders):
    secrets = rng.choice(10 ** digits, candidates + 1, replace=False)
    for i, s in enumerate(secrets):
      text = str(cfg.prefix) + str(int(s)).zfill(digits)
      ids = np.asarray(tok.encode(text), np.int64)
      if ids.size > seq_len + 1:
        raise ValueError(
            f'evaluation.canaries: the canary {text!r} is {ids.size} tokens, '
            f"longer than the model's context of {seq_len + 1} (one window "
            'of data.seq_len + 1); shorten evaluation.canaries.prefix or '
            'digits.')
      if ids[:len(prefix)].tolist() != np.asarray(prefix).tolist():
        raise ValueError(f'the tokenizer does not split {text!r} after its '
                         'prefix; end evaluation.canaries.prefix with a '
                         'space.')
      wx, wy_full, wy = _window(ids, len(prefix), seq_len, pad)
      probe_x.append(wx)
      probe_y.append(wy)
      if i == 0:
        texts.append(text)
        planted[int(holder)] = (wx, wy_full)
  clients = []
  for c in range(train.num_clients):
    cols = {k: np.asarray(v[train.offsets[c]:train.offsets[c + 1]])
            for k, v in train.columns.items()}
    if c in planted:
      wx, wy = planted[c]
      cols = {'x': np.concatenate([cols['x'], np.repeat(wx[None], repeats,
                                                        0)]),
              'y': np.concatenate([cols['y'], np.repeat(wy[None], repeats,
                                                        0)])}
    clients.append(cols)
  new_train = FederatedDataset.from_clients(clients, train.client_names,
                                            train.metadata)
  canaries = Canaries(num, candidates, holders, tuple(texts),
                      {'x': np.stack(probe_x), 'y': np.stack(probe_y)})
  return dataclasses.replace(splits, train=new_train), canaries


def base_task(cfg, splits: FederatedSplits, num_examples: int, seed: int
              ) -> dict:
  """The base task of ``evaluation.base_task`` (a data config): up to
  ``num_examples`` windows (a fixed draw) of its pooled test split, refused
  where its vocabulary or window length differs from the run's data or
  where one of its windows is also in a client's data."""
  from fedjax_pfi.data import registry  # pylint: disable=g-import-not-at-top
  base = registry.load_splits(cfg).test
  x = np.asarray(base.columns['x'])
  if not x.shape[0]:
    raise ValueError('evaluation.base_task has no test examples; raise its '
                     'test_fraction.')
  run_x = np.asarray(splits.train.columns['x'])
  for key in ('vocab_size', 'pad_id'):
    if base.metadata.get(key) != splits.metadata.get(key):
      raise ValueError(
          f'evaluation.base_task has {key}={base.metadata.get(key)} but the '
          f"run's data has {splits.metadata.get(key)}: give it the run's "
          'tokenizer.')
  if x.shape[1:] != run_x.shape[1:]:
    raise ValueError(
        f'evaluation.base_task has windows of shape {x.shape[1:]}, the '
        f"run's data {run_x.shape[1:]}: give it the same seq_len.")
  keep = np.random.default_rng([seed, 0xBA5E]).permutation(x.shape[0])[
      :num_examples]
  keep.sort()
  cols = {k: np.asarray(v)[keep] for k, v in base.columns.items()}
  mine = {r.tobytes() for r in cols['x']}
  parts = [(n, getattr(splits, n)) for n in FederatedSplits.PARTS]
  for part, ds in parts:
    if ds is None:
      continue
    xs = np.asarray(ds.columns['x'])
    hit = [i for i in range(xs.shape[0]) if xs[i].tobytes() in mine]
    if hit:
      owner = int(np.searchsorted(ds.offsets, hit[0], side='right') - 1)
      raise ValueError(
          f'evaluation.base_task overlaps the clients\' data: {len(hit)} of '
          f'the {part} split\'s windows are base-task windows (e.g. of client '
          f'{ds.client_names[owner]!r}). The base task must be text no client '
          'owns: exclude its plays from data (data.exclude_plays).')
  return cols
