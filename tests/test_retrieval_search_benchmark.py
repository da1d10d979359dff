"""The retrieval search benchmark runs at tiny sizes: JAX finds faiss's
neighbours and the table has every row (no timing is asserted)."""

import math

import numpy as np
import pytest

pytest.importorskip('faiss')

from experiments.benchmarks import retrieval_search  # noqa: E402


def test_recall_at_k_counts_missing_neighbours():
  want = np.array([[[0, 1, -1]]])
  assert retrieval_search.recall_at_k(np.array([[[1, 0, -1]]]), want) == 1.0
  assert retrieval_search.recall_at_k(np.array([[[1, 2, -1]]]), want) == 0.5


def test_benchmark_matches_faiss_at_tiny_sizes():
  sizes = dict(retrieval_search.TESTING_SIZES)
  result = retrieval_search.run(**sizes)
  # stores smaller than k exist at these sizes: the -1 slots are compared too
  assert (retrieval_search.make_stores(
      sizes['clients'], sizes['rows'], sizes['dim'],
      sizes['queries'])['sizes'] < sizes['k']).any()
  threads = sorted({result['faiss_threads'], 1}, reverse=True)
  assert set(result['recall']) == {(m, t) for m in ('ip', 'l2')
                                   for t in threads}
  assert all(r == 1.0 for r in result['recall'].values()), result['recall']
  assert result['padded_returned'] == {'ip': 0, 'l2': 0}
  keys = [(r['metric'], r['method'], r['faiss_threads'])
          for r in result['rows']]
  expected = []
  for m in ('ip', 'l2'):
    expected += [(m, 'jax_batched', None), (m, 'jax_per_client_loop', None)]
    for t in threads:
      expected += [(m, 'faiss_search', t), (m, 'faiss_build_search', t)]
  assert keys == expected
  for r in result['rows']:
    assert r['seconds'] > 0 and math.isfinite(r['seconds']), r
    assert r['vs_jax'] > 0 and math.isfinite(r['vs_jax']), r
  assert [r['vs_jax'] for r in result['rows']
          if r['method'] == 'jax_batched'] == [1.0, 1.0]
  lines = retrieval_search.table(result).splitlines()
  assert len(lines) == 2 + len(expected)
  assert lines[2].startswith('| ip | jax_batched | - |')
