"""Names of pytree leaves: ``'base/block_0/attn/q/kernel'``."""

from __future__ import annotations

from typing import Any

import jax


def path_str(path) -> str:
  """A `jax.tree_util` key path joined with ``'/'``."""
  return '/'.join(
      str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
      for k in path)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` in the tree's flattening order."""
  return [(path_str(p), leaf)
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def leaf_paths(tree: Any) -> list[str]:
  return [p for p, _ in named_leaves(tree)]
