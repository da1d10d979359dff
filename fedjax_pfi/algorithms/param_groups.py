"""Partitions of a params pytree into frozen, global and personal parts.

Federated PEFT and partial personalization differ mostly in *which* leaves a
client trains and what happens to them afterwards (DESIGN.md):

- ``frozen``: shared by every client, not trained by clients (a foundation
  model's base weights; FFA-LoRA's ``A``). Passed to the round unbatched
  (``in_axes=None``), never copied per client, never sent or aggregated.
- ``global``: broadcast from the server, trained locally, deltas aggregated
  (FedIT's adapters, FedSA-LoRA's ``A``, every leaf in FedAvg).
- ``personal``: one copy per client in the per-client store, trained
  locally, never aggregated (FedSA-LoRA's ``B``, local-only adapters).

Params are nested dicts (Flax's layout). A leaf is named by its path joined
with ``'/'`` (``'lora/block_0/attn/q/a'``) and assigned by regular
expressions (``re.search``): ``frozen`` first, then ``personal``, the rest
``global``. The parts are nested dicts holding only their own leaves, so they
are ordinary pytrees (jit, vmap and orbax take them as they are) and `merge`
puts them back together.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Optional

import jax

from fedjax_pfi.tree_util import leaf_paths

Params = Any


def select(tree: Params, keep) -> Params:
  """The nested dict of the leaves whose path ``keep(path)`` accepts."""

  def rec(node, prefix):
    if isinstance(node, dict):
      out = {}
      for k, v in node.items():
        sub = rec(v, f'{prefix}/{k}' if prefix else str(k))
        if sub is not None:
          out[k] = sub
      return out if out or not node else None
    return node if keep(prefix) else None

  out = rec(tree, '')
  return {} if out is None else out


def merge(*trees: Params) -> Params:
  """The union of nested dicts with disjoint leaves (`select`'s inverse)."""
  out: dict = {}
  for t in trees:
    if t is None:
      continue
    _merge_into(out, t, '')
  return out


def _merge_into(dst: dict, src, prefix: str) -> None:
  if not isinstance(src, dict):
    raise TypeError(f'param partitions must be nested dicts; {prefix!r} is '
                    f'{type(src).__name__}.')
  for k, v in src.items():
    path = f'{prefix}/{k}' if prefix else str(k)
    if isinstance(v, dict):
      node = dst.setdefault(k, {})
      if not isinstance(node, dict):
        raise ValueError(f'leaf {path!r} is in two partitions.')
      _merge_into(node, v, path)
    elif k in dst:
      raise ValueError(f'leaf {path!r} is in two partitions.')
    else:
      dst[k] = v


class Parts(NamedTuple):
  frozen: Params
  global_: Params
  personal: Params


def _compile(pattern: Optional[str], what: str):
  if pattern is None or pattern == '':
    return None
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f'{what} pattern {pattern!r} is not a regular expression:'
                     f' {e}.') from e


def split(params: Params, frozen: Optional[str] = None,
          personal: Optional[str] = None) -> Parts:
  """Splits ``params`` by the ``frozen`` and ``personal`` regexes.

  Raises:
    ValueError: a pattern is invalid, matches no leaf, or leaves nothing to
      train.
  """
  fz, ps = _compile(frozen, 'frozen'), _compile(personal, 'personal')
  paths = leaf_paths(params)
  for pattern, rx in ((frozen, fz), (personal, ps)):
    if rx is not None and not any(rx.search(p) for p in paths):
      raise ValueError(f'pattern {pattern!r} matches no parameter; the '
                       f'parameters are e.g. {paths[:6]}.')
  def is_frozen(p):
    return fz is not None and bool(fz.search(p))
  def is_personal(p):
    return not is_frozen(p) and ps is not None and bool(ps.search(p))
  parts = Parts(select(params, is_frozen), select(
      params, lambda p: not is_frozen(p) and not is_personal(p)),
                select(params, is_personal))
  if not jax.tree.leaves(parts.global_) and not jax.tree.leaves(
      parts.personal):
    raise ValueError(f'frozen pattern {frozen!r} freezes every parameter; '
                     'nothing is left to train.')
  return parts


def num_bytes(tree: Params) -> int:
  """Bytes of all leaves (what sending ``tree`` costs, uncompressed)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
