"""Checkpoints of the server state, written atomically with orbax.

Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact and
the half-written one invisible. Beside the state we store a JSON record of the
round, the config fingerprint and the shape signature of every leaf, so that
restoring into a different model or algorithm fails with a message naming the
first mismatching leaf instead of silently loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored (corrupt or mismatched)."""


def shape_signature(tree: Any) -> dict[str, str]:
  """``{'params/Dense_0/kernel': 'float32[6,5]', ...}`` for every leaf."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf) if not hasattr(leaf, 'shape') else leaf
    out[jax.tree_util.keystr(path)] = (
        f'{np.dtype(a.dtype).name}{list(a.shape)}')
  return out


def fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True,
                                   default=str).encode()).hexdigest()[:16]


class Checkpointer:
  """Saves and restores ``ServerState`` pytrees under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True,
                                             enable_async_checkpointing=False))

  def latest_round(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, round_idx: int, state: Any, meta: dict) -> None:
    meta = dict(meta, round=round_idx, signature=shape_signature(state))
    self._manager.save(round_idx, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def read_meta(self, round_idx: int) -> dict:
    """The JSON record saved beside round ``round_idx``'s state: ``round``,
    ``fingerprint`` and ``signature`` (every leaf's dtype and shape)."""
    path = os.path.join(self.directory, str(round_idx))
    try:
      return self._manager.restore(
          round_idx, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(
          f'checkpoint {path} is unreadable ({type(e).__name__}: {e}). Delete '
          'that directory to resume from the previous checkpoint, or use a '
          'fresh --workdir.') from e

  def restore(self, round_idx: int, target: Any,
              expected_fingerprint: Optional[str] = None) -> tuple[Any, dict]:
    """Restores round ``round_idx`` into the structure of ``target``.

    Raises:
      CheckpointError: the files are unreadable, or the stored state does not
        match ``target`` (shapes, dtypes, structure) or the config.
    """
    path = os.path.join(self.directory, str(round_idx))
    meta = self.read_meta(round_idx)
    want = shape_signature(target)
    have = meta.get('signature', {})
    if have != want:
      missing = sorted(set(want) - set(have))
      extra = sorted(set(have) - set(want))
      # Report model params before optimizer state: that is what users know.
      differ = sorted((k for k in set(want) & set(have) if want[k] != have[k]),
                      key=lambda k: (not k.startswith('.params'), k))
      detail = []
      if differ:
        k = differ[0]
        detail.append(f'leaf {k} is {have[k]} in the checkpoint but the '
                      f'config builds {want[k]}')
      if missing:
        detail.append(f'the config has leaves the checkpoint lacks, e.g. '
                      f'{missing[0]}')
      if extra:
        detail.append(f'the checkpoint has leaves the config lacks, e.g. '
                      f'{extra[0]}')
      raise CheckpointError(
          f'checkpoint {path} does not match this config: '
          f'{"; ".join(detail)}. Use the config that wrote it, or a fresh '
          '--workdir.')
    if (expected_fingerprint is not None and
        meta.get('fingerprint') not in (None, expected_fingerprint)):
      raise CheckpointError(
          f'checkpoint {path} was written by a different config '
          f'(fingerprint {meta.get("fingerprint")} != {expected_fingerprint}).'
          ' Resuming would mix two experiments; use a fresh --workdir, or the '
          'same config (only `rounds` may grow).')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      state = self._manager.restore(
          round_idx,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:
      raise CheckpointError(
          f'checkpoint {path} is unreadable ({type(e).__name__}: {e}). Delete '
          'that directory to resume from the previous checkpoint, or use a '
          'fresh --workdir.') from e
    return state['state'], meta
