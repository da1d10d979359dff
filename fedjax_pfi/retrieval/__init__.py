"""Retrieval over each client's private store, beside and combined with PEFT.

The PFI survey's third stage: each client keeps an index over its own
training text, and the shared foundation model reads from it at inference
time, so what it holds never leaves the client and never enters the global
model. `Retrieval` builds every client's store once with the frozen base
(`stores`), and evaluates any reader (the base, a global or a personalized
LoRA model) augmented with it, client by client:

- ``retrieval.mode='knn_lm'``: nearest-neighbour LM (`knn_lm`; Khandelwal
  et al., "Generalization through Memorization: Nearest Neighbor Language
  Models", ICLR 2020): a client's store is ``keys [N, d]`` (the frozen
  base's hidden states over its training text) and ``values [N]`` (the
  next tokens), and ``p = lambda p_kNN + (1 - lambda) p_LM``;
- ``retrieval.mode='in_context'``: retrieved chunks in the context
  (`in_context`; Ram et al., "In-Context Retrieval-Augmented Language
  Models", TACL 2023): a client's store is ``chunk_len``-token chunks of
  its training text, keyed by mean-pooled hidden states ``[N, d]``.

A store is a `client_store.RaggedStore` (clients with different numbers of
rows), gathered per evaluation chunk to ``[clients, rows, ...]`` with a
``valid`` mask; search is exact (`search.exact_topk`).

Config (``config.retrieval``): ``mode`` (``none``, ``knn_lm``,
``in_context``), ``k``, ``lambda`` and ``temperature`` (kNN-LM),
``chunk_len`` and ``stride`` (in-context), ``metric`` (``l2``, ``ip``; empty:
L2 for kNN-LM as Khandelwal et al., inner product for in-context),
``store`` (``host``: numpy, memory-mapped when large, gathered per
evaluation chunk; ``device``: the padded stores on the accelerator), and
``tune`` (``none``; ``global`` or ``client``: ``lambda`` and ``k`` chosen
from ``lambdas`` x ``ks`` on the validation split, by the lowest loss over
all clients or per client).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from typing import Any, Callable, Mapping, Optional
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi import client_store
from fedjax_pfi import evaluation
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.evaluation import ClientMetrics
from fedjax_pfi.models import base
from fedjax_pfi.retrieval import in_context as in_context_lib
from fedjax_pfi.retrieval import knn_lm as knn_lm_lib
from fedjax_pfi.retrieval import search
from fedjax_pfi.retrieval import stores

MODES = ('none',) + stores.KINDS
STORES = ('host', 'device')
TUNES = ('none', 'global', 'client')


def _floats(text, name) -> list[float]:
  try:
    return [float(p) for p in str(text).split(',') if p.strip()]
  except ValueError:
    raise ValueError(f'retrieval.{name}={text!r} must be comma-separated '
                     'numbers.') from None


def check_config(rc, *, val_examples: Optional[int] = None) -> None:
  """Raises on a bad ``config.retrieval``, naming the value and what is
  accepted (before any store is built)."""
  if rc.mode not in MODES:
    raise ValueError(f'unknown retrieval.mode {rc.mode!r}; accepted: '
                     f'{", ".join(MODES)}.')
  if rc.store not in STORES:
    raise ValueError(f'unknown retrieval.store {rc.store!r}; accepted: '
                     f'{", ".join(STORES)}.')
  if rc.tune not in TUNES:
    raise ValueError(f'unknown retrieval.tune {rc.tune!r}; accepted: '
                     f'{", ".join(TUNES)}.')
  if rc.metric:
    search.check_metric(rc.metric)
  if int(rc.k) < 1:
    raise ValueError(f'retrieval.k must be >= 1, got {rc.k}.')
  for lam in [rc['lambda']] + _floats(rc.lambdas, 'lambdas'):
    if not 0.0 <= float(lam) <= 1.0:
      raise ValueError(f'retrieval.lambda must be in [0, 1], got {lam}.')
  if float(rc.temperature) <= 0:
    raise ValueError(f'retrieval.temperature must be > 0, got '
                     f'{rc.temperature}.')
  if int(rc.chunk_len) < 1 or int(rc.stride) < 0:
    raise ValueError(f'retrieval.chunk_len ({rc.chunk_len}) must be >= 1 and '
                     f'retrieval.stride ({rc.stride}) >= 0.')
  if any(k < 1 or k != int(k) for k in _floats(rc.ks, 'ks')):
    raise ValueError(f'retrieval.ks={rc.ks!r} must be integers >= 1.')
  if rc.tune != 'none' and val_examples == 0:
    raise ValueError(
        f'retrieval.tune={rc.tune!r} chooses lambda and k on the validation '
        'split, which is empty; set data.val_fraction > 0.')


def fingerprint(rc, retriever_params, train: FederatedDataset) -> str:
  """What a store is a function of: its mode (and chunk length), the
  retriever's params and every client's training windows."""
  h = hashlib.sha256(f'{rc.mode}:{int(rc.chunk_len)}'.encode())
  for leaf in jax.tree.leaves(retriever_params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).view(np.uint8))
  h.update(np.asarray(train.offsets, np.int64).tobytes())
  for k in sorted(train.columns):
    h.update(np.ascontiguousarray(train.columns[k]).view(np.uint8))
  return h.hexdigest()[:32]


class _Rows:
  """Per-client evaluation inputs for `evaluation.Evaluator`: the reader's
  personal rows (or none) and the client's store rows, gathered per chunk."""

  def __init__(self, personal, store):
    self.personal, self.store = personal, store

  def gather(self, ids):
    ids = np.asarray(ids)
    mine = None if self.personal is None else jax.tree.map(
        lambda p: p[ids], self.personal)
    store = self.store.gather(ids)
    return {'reader': mine, 'store': store}


class Retrieval:
  """Every client's store over its training split, and retrieval-augmented
  evaluation of any reader.

  Args:
    rc: ``config.retrieval`` (`check_config`).
    retriever: the frozen foundation model (its `base.Model.features` key
      the stores and the queries); ``retriever_params`` its params.
    train: the clients' training split (the stores' only source).
    metadata: the dataset's (``pad_id``, ``vocab_size``, ``seq_len``).
    directory: where the stores are kept: built once and saved there, then
      loaded (memory-mapped) by a later evaluation or a resumed run while
      the training split, the base and the store's settings are the same
      (`fingerprint`); None: built in memory each time.
  """

  def __init__(self, rc, retriever: base.Model, retriever_params,
               train: FederatedDataset, metadata: Mapping[str, Any], *,
               directory: Optional[str] = None, batch_size: int = 64,
               clients_per_chunk: int = 8):
    check_config(rc)
    if rc.mode == 'none':
      raise ValueError("retrieval.mode='none' builds no store.")
    if retriever.features is None:
      raise ValueError(f'model {retriever.name!r} exposes no hidden states; '
                       "retrieval needs model.name='transformer'.")
    self.rc, self.mode = rc, rc.mode
    self.retriever, self.retriever_params = retriever, retriever_params
    self.pad_id = metadata.get('pad_id')
    self.vocab_size = int(metadata['vocab_size'])
    self.seq_len = int(train.columns['x'].shape[1])
    self.batch_size, self.clients_per_chunk = batch_size, clients_per_chunk
    self.metric = rc.metric or ('l2' if self.mode == 'knn_lm' else 'ip')
    on_device = rc.store == 'device'
    t0 = time.perf_counter()
    key = None if directory is None else fingerprint(
        rc, retriever_params, train)
    self.loaded = False
    if directory is not None and os.path.exists(
        os.path.join(directory, 'store.json')):
      store, meta = client_store.RaggedStore.load(directory,
                                                  on_device=on_device)
      if meta.get('fingerprint') == key:
        self.store, self.loaded = store, True
    if not self.loaded:
      scratch = None if directory is None else directory + '.build'
      if self.mode == 'knn_lm':
        self.store = stores.knn_store(retriever, retriever_params, train,
                                      self.pad_id, directory=scratch,
                                      on_device=on_device)
      else:
        self.store = stores.chunk_store(retriever, retriever_params, train,
                                        self.pad_id, int(rc.chunk_len),
                                        directory=scratch,
                                        on_device=on_device)
      if directory is not None:
        self.store.save(directory, {'fingerprint': key, 'mode': self.mode})
        if scratch is not None:
          shutil.rmtree(scratch, ignore_errors=True)
    self.build_s = time.perf_counter() - t0
    self.store.min_rows = int(rc.k)
    self.plan = None
    self._evaluators = {}  # one compiled evaluator per reader and setting

  def _k(self, k: int, ids: np.ndarray) -> int:
    """``k``, or the smallest store among ``ids`` where that is smaller
    (a warning); an empty store is an error."""
    sizes = self.store.sizes[ids]
    if np.any(sizes == 0):
      bad = ids[sizes == 0]
      raise ValueError(
          f'client(s) {bad[:5].tolist()} have an empty retrieval store (no '
          f'{"position" if self.mode == "knn_lm" else "whole chunk"} in '
          'their training split); retrieval needs at least one row.')
    small = int(sizes.min())
    if k > small and self.mode == 'in_context':
      warnings.warn(f'retrieval.k={k} exceeds the smallest store '
                    f'({small} chunks, client {ids[np.argmin(sizes)]}); '
                    f'retrieving {small}.', stacklevel=3)
      return small
    if k > small:  # kNN-LM: each client's own size bounds its neighbours
      warnings.warn(f'retrieval.k={k} exceeds {int(np.sum(sizes < k))} '
                    f'clients\' stores (smallest: {small} rows, client '
                    f'{ids[np.argmin(sizes)]}); those use their store\'s '
                    'size.', stacklevel=3)
    return k

  def model(self, reader: base.Model, *, k: Optional[int] = None,
            lam: Optional[float] = None) -> base.Model:
    """``reader`` augmented with a client's store (`knn_lm.knn_lm` or
    `in_context.in_context`)."""
    rc = self.rc
    k = int(rc.k if k is None else k)
    if self.mode == 'knn_lm':
      return knn_lm_lib.knn_lm(
          reader, self.retriever, knn_lm_lib.KnnConfig(
              k=k, lam=float(rc['lambda'] if lam is None else lam),
              temperature=float(rc.temperature), metric=self.metric),
          self.vocab_size, self.pad_id)
    model, self.plan = in_context_lib.in_context(
        reader, self.retriever, in_context_lib.InContextConfig(
            k=k, chunk_len=int(rc.chunk_len), stride=int(rc.stride),
            metric=self.metric), self.seq_len, self.pad_id)
    return model

  def evaluate(self, reader: base.Model, params, ds: FederatedDataset, *,
               personal=None, combine: Optional[Callable] = None,
               k: Optional[int] = None, lam: Optional[float] = None
               ) -> ClientMetrics:
    """Per-client metrics of ``reader`` augmented with each client's store
    on ``ds`` (the clients of the training split, in its order).

    ``params``: the reader's shared params; with ``personal`` (a pytree
    ``[num_clients, ...]``), client ``i`` reads with ``combine(params,
    personal[i])``."""
    if ds.num_clients != self.store.num_clients:
      raise ValueError(f'the stores hold {self.store.num_clients} clients; '
                       f'the evaluated data has {ds.num_clients}.')
    ids = np.flatnonzero(ds.client_sizes > 0)
    k = self._k(int(self.rc.k if k is None else k), ids)
    # by the reader's identity (kept alive in the cache, so never reused)
    key = (id(reader), k, lam, combine, personal is None)
    if key not in self._evaluators:
      augmented = self.model(reader, k=k, lam=lam)
      inner = combine or (lambda shared, mine: mine)
      def joined(shared, mine):
        r = shared['reader'] if mine['reader'] is None else inner(
            shared['reader'], mine['reader'])
        return {'reader': r, 'retriever': shared['retriever'],
                'store': mine['store']}
      self._evaluators[key] = (reader, evaluation.Evaluator(
          augmented, self.batch_size, self.clients_per_chunk, combine=joined))
    ev = self._evaluators[key][1]
    shared = {'reader': params, 'retriever': self.retriever_params}
    return ev.evaluate(shared, ds, personal_params=_Rows(personal, self.store))

  def search_seconds(self, ds: FederatedDataset) -> float:
    """Wall time of the search alone (queries embedded and every client's
    top-k) over ``ds``'s evaluation chunks, after a warm-up pass."""
    ids = np.flatnonzero(ds.client_sizes > 0)
    k = self._k(int(self.rc.k), ids)
    retriever, metric = self.retriever, self.metric
    if self.mode == 'knn_lm':
      def queries(params, x):
        q = retriever.features(params, x)
        return q.reshape(-1, q.shape[-1])
    else:
      blocks = [b for b in in_context_lib.plan(
          self.seq_len, int(retriever.context_len), in_context_lib.InContextConfig(
              k=k, chunk_len=int(self.rc.chunk_len),
              stride=int(self.rc.stride))).blocks if b.retrieve]
      def queries(params, x):
        return jnp.concatenate([in_context_lib.pooled(
            retriever, params, x[:, b.query_lo:b.p0]) for b in blocks])

    def stats(params, batch, rng=None, train=False):
      q = queries(params['retriever'], batch['x'])
      s, _ = search.exact_topk(q, params['store']['keys'],
                               params['store']['valid'], k, metric)
      z = jnp.sum(jnp.where(jnp.isfinite(s), s, 0.0)) * 0.0
      n = batch['x'].shape[0]
      return base.ExampleStats(jnp.full((n,), z), jnp.zeros(n), jnp.ones(n))
    probe = base.Model(lambda key: None, None, stats, 'search')
    ev = evaluation.Evaluator(
        probe, self.batch_size, self.clients_per_chunk,
        combine=lambda shared, mine: {'retriever': shared['retriever'],
                                      'store': mine['store']})
    rows = _Rows(None, self.store)
    shared = {'retriever': self.retriever_params}
    ev.evaluate(shared, ds, personal_params=rows)
    t0 = time.perf_counter()
    ev.evaluate(shared, ds, personal_params=rows)
    return time.perf_counter() - t0

  def tuned(self, reader: base.Model, params, val: FederatedDataset,
            test: FederatedDataset, *, personal=None, combine=None
            ) -> tuple[ClientMetrics, dict]:
    """``retrieval.tune``: the test metrics with ``lambda`` and ``k`` chosen
    on ``val`` from ``lambdas`` x ``ks`` (globally, or per client), and the
    choices' summary."""
    rc = self.rc
    lams = _floats(rc.lambdas, 'lambdas') or [float(rc['lambda'])]
    ks = [int(k) for k in _floats(rc.ks, 'ks')] or [int(rc.k)]
    if self.mode == 'in_context':
      lams = [0.0]
    grid = [(k, lam) for k in ks for lam in lams]
    kw = dict(personal=personal, combine=combine)
    on_val = [self.evaluate(reader, params, val, k=k, lam=lam, **kw)
              for k, lam in grid]
    on_test = [self.evaluate(reader, params, test, k=k, lam=lam, **kw)
               for k, lam in grid]
    loss = np.full((len(grid), test.num_clients), np.inf)
    for j, m in enumerate(on_val):
      loss[j, m.client_ids] = m.loss
    ids = on_test[0].client_ids
    if rc.tune == 'global':
      total = np.array([m.loss_sum.sum() / max(m.count.sum(), 1)
                        for m in on_val])
      pick = np.full(ids.size, int(np.argmin(total)))
    else:  # per client; a client without validation data takes the first
      pick = np.argmin(loss[:, ids], 0)
    chosen = np.array(grid, np.float64)[pick]
    return evaluation.select(on_test, pick, test), {
        'retrieval/tuned_k_mean': float(chosen[:, 0].mean()),
        'retrieval/tuned_lambda_mean': float(chosen[:, 1].mean())}

  def metrics(self, prefix: str = 'retrieval/') -> dict[str, float]:
    """The stores' cost: bytes per client (mean, max), rows, build time;
    0 bytes communicated."""
    b = self.store.bytes_per_client()
    out = {prefix + 'store_bytes_per_client': float(b.mean()),
           prefix + 'store_bytes_max_client': float(b.max()),
           prefix + 'store_rows_per_client': float(self.store.sizes.mean()),
           prefix + 'store_build_s': float(self.build_s),
           prefix + 'upload_bytes': 0.0, prefix + 'download_bytes': 0.0}
    if self.plan is not None:
      out.update({prefix + 'retrieved_tokens': float(self.plan.retrieved_tokens),
                  prefix + 'own_context_tokens': float(self.plan.own_budget),
                  prefix + 'stride': float(self.plan.stride),
                  prefix + 'passes_per_window': float(len(self.plan.blocks))})
    return out
