r"""Exact top-k over every client's store: one jitted JAX call against faiss.

  python -m experiments.benchmarks.retrieval_search
  python -m experiments.benchmarks.retrieval_search --testing   # tiny, seconds

Builds ``--clients`` random stores (``[N, d]`` Gaussian keys; each client's
size drawn uniformly from ``[max(1, N // 8), N]``, padded to ``N =
--rows`` with a ``valid`` mask) and ``--queries`` Gaussian queries per
client, and searches them for the ``--k`` nearest, by inner product and by
L2, with, on the same stores in one process:

- ``jax_batched``: `fedjax_pfi.retrieval.search.batched_topk`, one jitted
  call over all clients (compiled and run once before timing;
  ``block_until_ready``);
- ``jax_per_client_loop``: a Python loop of the jitted single-client
  `exact_topk` (one compile: every store has the padded shape);
- ``faiss_search``: a Python loop of ``IndexFlatIP`` / ``IndexFlatL2``
  searches, one index per client over its valid rows only, the indices
  built before the timer starts;
- ``faiss_build_search``: the same loop building each index as well.

The faiss rows are timed with faiss at its default OpenMP threads
(``faiss.omp_get_max_threads()``, printed) and with one thread; XLA:CPU
uses its own thread pool over all the process's cores either way. On a
machine whose cores another job keeps busy, faiss's OpenMP threads can
wait out a scheduler slice at every search (milliseconds, not
microseconds) unless ``OMP_WAIT_POLICY=PASSIVE``; the header prints the
setting. Methods
are timed interleaved, ``--repeats`` rounds, and the median is printed.
Prints a markdown table (seconds, ms per client, and each method's time /
``jax_batched``'s, so above 1 means JAX is faster), the ratios faiss /
JAX, and recall@k of JAX's neighbours against faiss's over all clients and
queries (1.0: the same neighbours), for each faiss thread setting, with
the count of padded rows JAX returned (0).
"""

from __future__ import annotations

import os
import platform
import time

from absl import app
from absl import flags
import faiss
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi.retrieval import search


TESTING_SIZES = dict(clients=8, rows=16, dim=8, queries=3, k=4, repeats=1)


def make_stores(clients: int, rows: int, dim: int, queries: int,
                seed: int = 0) -> dict[str, np.ndarray]:
  """``queries [C, Q, d]``, ``keys [C, N, d]``, ``valid [C, N]`` (a store's
  valid rows first) and ``sizes [C]``, float32 Gaussian."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(max(1, rows // 8), rows + 1, size=clients)
  keys = rng.standard_normal((clients, rows, dim), dtype=np.float32)
  valid = np.arange(rows)[None, :] < sizes[:, None]
  keys[~valid] = 0.0
  q = rng.standard_normal((clients, queries, dim), dtype=np.float32)
  return {'queries': q, 'keys': keys, 'valid': valid, 'sizes': sizes}


def recall_at_k(got: np.ndarray, want: np.ndarray) -> float:
  """The fraction of ``want``'s neighbours (rows, ``-1`` for none) that
  ``got`` returns for the same query, over all ``[..., k]``."""
  hit = np.any((got[..., :, None] == want[..., None, :])
               & (want[..., None, :] >= 0), axis=-2)
  return float(hit.sum() / max(1, (want >= 0).sum()))


def _faiss_index(metric: str, keys: np.ndarray):
  index = (faiss.IndexFlatIP if metric == 'ip' else faiss.IndexFlatL2)(
      keys.shape[1])
  index.add(keys)
  return index


def run(clients: int, rows: int, dim: int, queries: int, k: int,
        repeats: int, metrics=search.METRICS, seed: int = 0) -> dict:
  """Times every method for each metric; returns ``rows`` (a dict per
  table row: metric, method, faiss_threads, seconds, ms_per_client,
  vs_jax), ``recall`` and ``padded_returned`` (per ``(metric, faiss
  threads)``), ``faiss_threads`` (the default) and the sizes."""
  data = make_stores(clients, rows, dim, queries, seed)
  sizes = data['sizes']
  qs_j, keys_j, valid_j = (jnp.asarray(data[n])
                           for n in ('queries', 'keys', 'valid'))
  per_client = [(jnp.asarray(data['queries'][c]), jnp.asarray(data['keys'][c]),
                 jnp.asarray(data['valid'][c])) for c in range(clients)]
  # faiss gets each store's valid rows only (contiguous float32)
  faiss_keys = [np.ascontiguousarray(data['keys'][c, :sizes[c]])
                for c in range(clients)]
  faiss_queries = [np.ascontiguousarray(data['queries'][c])
                   for c in range(clients)]
  default_threads = faiss.omp_get_max_threads()
  thread_settings = sorted({default_threads, 1}, reverse=True)
  single = jax.jit(search.exact_topk, static_argnames=('k', 'metric'))
  out_rows, recall, padded = [], {}, {}

  try:
    for metric in metrics:
      search.check_metric(metric)

      def jax_batched(metric=metric):
        return jax.block_until_ready(
            search.batched_topk(qs_j, keys_j, valid_j, k=k, metric=metric))

      def jax_loop(metric=metric):
        return jax.block_until_ready(
            [single(q, kk, v, k=k, metric=metric) for q, kk, v in per_client])

      indexes = [_faiss_index(metric, x) for x in faiss_keys]

      def faiss_search(indexes=indexes):
        return [ix.search(q, k) for ix, q in zip(indexes, faiss_queries)]

      def faiss_build_search(metric=metric):
        return [_faiss_index(metric, x).search(q, k)
                for x, q in zip(faiss_keys, faiss_queries)]

      methods = [('jax_batched', None, jax_batched),
                 ('jax_per_client_loop', None, jax_loop)]
      for t in thread_settings:
        methods += [('faiss_search', t, faiss_search),
                    ('faiss_build_search', t, faiss_build_search)]

      # warm-up (compiles), and the results compared
      results = {}
      for name, t, fn in methods:
        if t is not None:
          faiss.omp_set_num_threads(t)
        results[(name, t)] = fn()
      _, jax_idx = (np.asarray(x) for x in results[('jax_batched', None)])
      loop_idx = np.stack([np.asarray(i) for _, i in
                           results[('jax_per_client_loop', None)]])
      if not np.array_equal(loop_idx, jax_idx):
        raise AssertionError('batched_topk and the exact_topk loop differ.')
      padded[metric] = int((jax_idx >= sizes[:, None, None]).sum())
      for t in thread_settings:
        want = np.stack([i for _, i in results[('faiss_search', t)]])
        recall[(metric, t)] = recall_at_k(jax_idx, want)

      times = {(name, t): [] for name, t, _ in methods}
      for _ in range(repeats):
        for name, t, fn in methods:
          if t is not None:
            faiss.omp_set_num_threads(t)
          start = time.perf_counter()
          fn()
          times[(name, t)].append(time.perf_counter() - start)
      med = {key: float(np.median(v)) for key, v in times.items()}
      base = med[('jax_batched', None)]
      for (name, t), s in med.items():
        out_rows.append({'metric': metric, 'method': name,
                         'faiss_threads': t, 'seconds': s,
                         'ms_per_client': 1e3 * s / clients,
                         'vs_jax': s / base})
  finally:
    faiss.omp_set_num_threads(default_threads)
  return {'rows': out_rows, 'recall': recall, 'padded_returned': padded,
          'faiss_threads': default_threads, 'clients': clients,
          'mean_valid_rows': float(sizes.mean())}


def table(result: dict) -> str:
  """The markdown table of `run`'s rows."""
  lines = ['| metric | method | faiss threads | median s | ms / client | '
           'time / jax_batched |', '| --- | --- | --- | --- | --- | --- |']
  for r in result['rows']:
    t = '-' if r['faiss_threads'] is None else str(r['faiss_threads'])
    lines.append(f"| {r['metric']} | {r['method']} | {t} | "
                 f"{r['seconds']:.4f} | {r['ms_per_client']:.4f} | "
                 f"{r['vs_jax']:.2f} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  if flags.FLAGS.testing:
    sizes = dict(TESTING_SIZES)
  else:
    sizes = dict(clients=flags.FLAGS.clients, rows=flags.FLAGS.rows, dim=flags.FLAGS.dim,
                 queries=flags.FLAGS.queries, k=flags.FLAGS.k, repeats=flags.FLAGS.repeats)
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}); faiss '
        f'{faiss.__version__}, default OpenMP threads '
        f'{faiss.omp_get_max_threads()} (OMP_WAIT_POLICY '
        f'{os.environ.get("OMP_WAIT_POLICY", "unset")}); cores available '
        f'{len(os.sched_getaffinity(0))}; {platform.processor() or "cpu"}')
  result = run(metrics=tuple(flags.FLAGS.metrics), seed=flags.FLAGS.seed, **sizes)
  print(f"{sizes['clients']} clients, N = {sizes['rows']} padded rows "
        f"(mean valid {result['mean_valid_rows']:.1f}), d = {sizes['dim']}, "
        f"Q = {sizes['queries']}, k = {sizes['k']}; medians of "
        f"{sizes['repeats']} interleaved repeats, compile excluded")
  print(table(result))
  by = {(r['metric'], r['method'], r['faiss_threads']): r['seconds']
        for r in result['rows']}
  for (metric, t), rec in result['recall'].items():
    jax_s = by[(metric, 'jax_batched', None)]
    print(f'{metric}, faiss {t} thread(s): faiss_search / jax_batched '
          f'{by[(metric, "faiss_search", t)] / jax_s:.2f}, '
          f'faiss_build_search / jax_batched '
          f'{by[(metric, "faiss_build_search", t)] / jax_s:.2f}; '
          f'recall@{sizes["k"]} of JAX against faiss {rec:.6f}')
  for metric, n in result['padded_returned'].items():
    print(f'{metric}: padded rows returned by JAX: {n}')


def _define_flags():
  """Flags exist only when this module is the program (tests import it
  beside other benchmarks that define the same names)."""
  flags.DEFINE_integer('clients', 1000, 'Clients (stores).')
  flags.DEFINE_integer('rows', 512, 'Padded rows a store (N).')
  flags.DEFINE_integer('dim', 128, 'Key / query width (d).')
  flags.DEFINE_integer('queries', 32, 'Queries a client (Q).')
  flags.DEFINE_integer('k', 8, 'Neighbours a query.')
  flags.DEFINE_integer('repeats', 5, 'Timed rounds (median).')
  flags.DEFINE_list('metrics', list(search.METRICS), 'ip, l2.')
  flags.DEFINE_integer('seed', 0, 'Stores and queries.')
  flags.DEFINE_bool(
      'testing', False, 'Tiny sizes (8 clients, 16 rows, d 8, 3 queries, '
      'k 4, 1 repeat): checks the script, measures nothing.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
