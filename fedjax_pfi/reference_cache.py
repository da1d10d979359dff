"""A per-client evaluation kept on disk under a key of everything it is a
function of, so that several runs can share it.

The trust report compares every method of a dataset with the same
local-only reference: each client's model trained on its own data alone
from the initial params (`RunEvaluator`). That reference depends on the
data, the initial params, the model and the adapter's settings, never on
the federated algorithm, yet each run computed it again; on Shakespeare
roles it was the larger part of a run's final evaluation. With
``evaluation.reference_cache`` set to a directory, the first run writes it
there and the runs after it read it back.

The key hashes the inputs themselves, not the config that made them: the
bytes of every training and test column and of every initial parameter,
and the settings of the adaptation. So a run whose data differ (canaries
planted, a poisoned client, another partition) or whose model starts
elsewhere gets a key of its own, and a cached reference is the one the run
would have computed (tested: equal arrays, cold and warm).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional
import warnings

import jax
import numpy as np

from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.evaluation import ClientMetrics
from fedjax_pfi.evaluation import RowStats

_FIELDS = ('client_ids', 'loss_sum', 'correct', 'count', 'num_examples')
_VERSION = 2  # of the file's layout and of what the key covers (2: ndcg)


def _update_array(h, a) -> None:
  a = np.ascontiguousarray(np.asarray(a))
  h.update(f'{a.dtype.str}{list(a.shape)}'.encode())
  h.update(a.reshape(-1).view(np.uint8))


def key(settings: dict[str, Any], params: Any,
        *datasets: FederatedDataset) -> str:
  """sha256 (32 hex digits) of ``settings`` (JSON), every leaf of
  ``params`` (with its path) and every column and offset of
  ``datasets``."""
  h = hashlib.sha256(json.dumps({'version': _VERSION, **settings},
                                sort_keys=True, default=str).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    _update_array(h, leaf)
  for ds in datasets:
    _update_array(h, ds.offsets)
    for name in sorted(ds.columns):
      h.update(name.encode())
      _update_array(h, ds.columns[name])
  return h.hexdigest()[:32]


def path(directory: str, name: str, cache_key: str) -> str:
  return os.path.join(directory, f'{name}_{cache_key}.npz')


def load(file: str) -> Optional[ClientMetrics]:
  """The `ClientMetrics` saved at ``file``; None when there is none. A file
  that cannot be read is reported (a warning naming it) and ignored: the
  caller computes the reference again and overwrites it."""
  if not os.path.exists(file):
    return None
  try:
    with np.load(file, allow_pickle=False) as f:
      fields = {k: f[k] for k in f.files}
    rows = None
    if 'rows/loss_sum' in fields:
      rows = RowStats(*(fields[f'rows/{k}'] for k in RowStats._fields))
    return ClientMetrics(*(fields[k] for k in _FIELDS), rows=rows,
                         confidence=fields.get('confidence'),
                         ndcg=fields.get('ndcg'))
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f'reference cache {file} is unreadable ({e}); computing '
                  'the reference again.')
    return None


def save(file: str, m: ClientMetrics) -> str:
  """Writes ``m`` (without probes) to ``file`` atomically: a temporary file
  of this process, renamed, so that two runs writing the same key at once
  leave one whole file."""
  arrays = {k: np.asarray(getattr(m, k)) for k in _FIELDS}
  if m.rows is not None:
    arrays.update({f'rows/{k}': np.asarray(v)
                   for k, v in m.rows._asdict().items()})
  if m.confidence is not None:
    arrays['confidence'] = np.asarray(m.confidence)
  if m.ndcg is not None:
    arrays['ndcg'] = np.asarray(m.ndcg)
  os.makedirs(os.path.dirname(file) or '.', exist_ok=True)
  tmp = f'{file}.{os.getpid()}.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, file)
  return file
