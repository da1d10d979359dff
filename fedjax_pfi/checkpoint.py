"""Checkpoints of the server state, written atomically with orbax.

Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact and
the half-written one invisible. Beside the state we store a JSON record of the
round, the config fingerprint and the shape signature of every leaf, so that
restoring into a different model or algorithm fails with a message naming the
first mismatching leaf instead of silently loading garbage.

The record also holds a sha256 digest of every saved array and one of the
record itself, checked on restore: a flipped bit on disk is refused, naming
the checkpoint and the leaf, instead of resuming from numbers nobody saved.
It keeps the config that wrote the state (so a refusal names each key that
differs) and the run's running totals.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_pfi import config as config_lib


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


def leaf_digests(tree: Any) -> dict[str, str]:
  """``{leaf path: sha256 of its dtype, shape and bytes}`` (PRNG keys by
  their key data), from host copies of the leaves."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f'{a.dtype.str}{list(a.shape)}'.encode())
    h.update(a.reshape(-1).view(np.uint8))  # the buffer itself, no copy
    out[jax.tree_util.keystr(path)] = h.hexdigest()[:32]
  return out


def _meta_digest(meta: dict) -> str:
  return fingerprint({k: v for k, v in meta.items() if k != 'meta_digest'})


def _cause(e: BaseException) -> str:
  """One line for an exception: the innermost cause's first sentence
  (orbax and TensorStore wrap it in messages that embed long JSON specs)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = ' '.join(str(e).split('See full TensorStore details')[0].split())
  if len(text) > 300:
    text = text[:300] + '...'
  return f'{type(e).__name__}: {text}'


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
    """Writes ``state`` and the JSON record ``meta`` (plus the round, the
    leaves' shape signature and digests) as round ``round_idx``."""
    meta = dict(meta, round=round_idx, signature=shape_signature(state),
                digests=leaf_digests(state))
    meta['meta_digest'] = _meta_digest(meta)
    self._manager.save(round_idx, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def _refuse(self, round_idx: int, why: str) -> CheckpointError:
    path = os.path.join(self.directory, str(round_idx))
    return CheckpointError(
        f'checkpoint {path} {why}. Delete that directory to resume from the '
        'previous checkpoint, or use a fresh --workdir.')

  def read_meta(self, round_idx: int) -> dict:
    """The JSON record saved beside round ``round_idx``'s state: ``round``,
    ``fingerprint``, ``signature`` (every leaf's dtype and shape),
    ``digests`` and, from runs of the training loop, ``config`` and
    ``totals``."""
    try:
      meta = self._manager.restore(
          round_idx, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # orbax raises many types for unreadable files
      raise self._refuse(round_idx, f'is unreadable ({_cause(e)})') from e
    if not isinstance(meta, dict):
      raise self._refuse(round_idx, 'is corrupt: its record is not a JSON '
                         'object')
    if 'meta_digest' in meta and meta['meta_digest'] != _meta_digest(meta):
      raise self._refuse(round_idx, 'is corrupt: its JSON record does not '
                         'match the digest saved with it')
    return meta

  def restore(self, round_idx: int, target: Any,
              expected_fingerprint: Optional[str] = None,
              config: Optional[dict] = None) -> tuple[Any, dict]:
    """Restores round ``round_idx`` into the structure of ``target``.

    Args:
      expected_fingerprint: the running config's fingerprint
        (`fedjax_pfi.training.config_fingerprint`); used where ``config``
        is not given.
      config: the running config (`fedjax_pfi.config.to_json`). The
        checkpoint is accepted when the config it records differs from it
        in no key but the resumable ones (an option added since counts as
        its default); a checkpoint that records none (written before
        records held it) when its fingerprint is that of ``config`` over the
        keys of the workdir's ``config.json``. A refusal names each key that
        differs.

    Raises:
      CheckpointError: the files are unreadable or corrupt (an array whose
        digest differs from the one saved with it), or the stored state does
        not match ``target`` (shapes, dtypes, structure) or the config.
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
          f'{"; ".join(detail)}.{self._differences(meta, config)} Use the '
          'config that wrote it, or a fresh --workdir.')
    if not self._same_experiment(meta, expected_fingerprint, config):
      raise CheckpointError(
          f'checkpoint {path} was written by a different config.'
          f'{self._differences(meta, config)} Resuming would mix two '
          'experiments: use a fresh --workdir, or the config that wrote it. '
          'Between a run and its resumption only '
          f'{", ".join(k + ".*" if k == "execution" else k for k in config_lib.RESUMABLE_KEYS)}'
          ' may change, and the trust report\'s evaluation.* options but '
          'evaluation.canaries, and retrieval.*.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      state = self._manager.restore(
          round_idx,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:
      raise self._refuse(round_idx, f'is unreadable ({_cause(e)})') from e
    state = state['state']
    saved = meta.get('digests')
    if saved is not None:
      bad = [k for k, d in leaf_digests(state).items() if saved.get(k) != d]
      if bad:
        raise self._refuse(
            round_idx, f'is corrupt: {len(bad)} of its {len(saved)} arrays '
            f'differ from what was saved (sha256 digests), e.g. {bad[0]}')
    return state, meta

  def _config_json(self) -> Optional[dict]:
    try:
      with open(os.path.join(os.path.dirname(self.directory),
                             'config.json')) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def _same_experiment(self, meta: dict, expected_fingerprint: Optional[str],
                       config: Optional[dict]) -> bool:
    if config is None:
      return expected_fingerprint is None or meta.get('fingerprint') in (
          None, expected_fingerprint)
    if meta.get('config') is not None:
      return not config_lib.diff(meta['config'], config)
    if meta.get('fingerprint') is None:
      return True
    legacy = config_lib.legacy_fingerprint_dict(config, self._config_json())
    return fingerprint(legacy) == meta['fingerprint']

  def _differences(self, meta: dict, config: Optional[dict]) -> str:
    """`` It differs in: key (A there, B here); ...`` or ``''``."""
    if config is None:
      return ''
    recorded = meta.get('config')
    source = 'the checkpoint'
    if recorded is None:  # checkpoints written before records held it
      recorded = self._config_json()
      source = os.path.join(os.path.dirname(self.directory), 'config.json')
      if recorded is None:
        return (' The checkpoint does not record its config, so the '
                'differing keys cannot be named.')
    rows = config_lib.diff(recorded, config)
    if not rows:
      return ''
    shown = '; '.join(f'{k}: {a!r} in {source}, {b!r} now'
                      for k, a, b in rows[:10])
    more = f' (and {len(rows) - 10} more)' if len(rows) > 10 else ''
    return f' The configs differ in {len(rows)} key(s): {shown}{more}.'

