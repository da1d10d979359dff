"""LoRA adapters as a pytree beside a frozen base (Hu et al., ICLR 2022).

For a targeted ``nn.Dense`` with kernel ``W [in, out]`` the adapted layer
computes ``y = x W + b + s * dropout(x) A B`` with ``A [in, r]``,
``B [r, out]`` and ``s = alpha / r``. ``B`` starts at zero, so the adapted
model equals the base model until the first update; ``A`` starts uniform in
``+-1/sqrt(in)`` (PyTorch's ``kaiming_uniform(a=sqrt(5))``, which the
reference implementation ``microsoft/LoRA`` and Hugging Face PEFT use).

The adapters are their own nested dict mirroring the base's module paths:
``adapters['block_0']['attn']['q'] = {'a': ..., 'b': ...}``; the targeted
modules are those whose ``nn.Dense`` path (``'block_0/attn/q'``) matches the
``target`` regular expression (``re.search``).

Two equivalent ways to apply them, both pure functions called inside the loss:

- `adapted` (``mode='activation'``, the default) adds ``s (x A) B`` to the
  output of every targeted ``nn.Dense`` call, intercepting the calls with
  ``flax.linen.intercept_methods``. Under ``vmap`` over clients the frozen
  base stays unbatched: ``x W`` is one matmul over the whole cohort and only
  ``x A``, ``(x A) B`` and the adapters are per client, so a round's memory
  grows with adapter size x cohort.
- `merge` returns the base with ``W + s A B`` in place of each targeted
  kernel. Vmapped over clients this materialises a merged copy of every
  targeted kernel per client (and its gradient), memory model size x cohort;
  ``experiments/benchmarks/lora_memory.py`` measures both. Input dropout has
  no weight-space form, so ``mode='merge'`` needs ``dropout=0``.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi import tree_util
from fedjax_pfi.models import base

Params = Any
MODES = ('activation', 'merge')


class LoraConfig(NamedTuple):
  """Attributes: ``rank`` r, ``alpha`` (scale ``alpha / rank``), input
  ``dropout`` on the adapter path, ``target`` regex over ``nn.Dense`` module
  paths, ``mode`` (``'activation'`` or ``'merge'``)."""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  target: str = r'attn/(q|v)$'
  mode: str = 'activation'

  @property
  def scale(self) -> float:
    """LoRA's ``s = alpha / rank``."""
    return self.alpha / self.rank


def dense_kernels(base_params: Params) -> dict[str, tuple[int, ...]]:
  """``{module path: kernel shape}`` for every leaf named ``kernel``."""
  return {path[:-len('/kernel')]: tuple(leaf.shape)
          for path, leaf in tree_util.named_leaves(base_params)
          if path.endswith('/kernel')}


def targets(base_params: Params, cfg: LoraConfig,
            rank: Optional[int] = None) -> dict[str, tuple[int, int]]:
  """``{module path: (in, out)}`` of the kernels ``cfg.target`` selects.

  Raises:
    ValueError: bad config values, a target matching no 2-D kernel, or a rank
      larger than a targeted kernel's smaller dimension.
  """
  rank = cfg.rank if rank is None else rank
  if int(rank) != rank or rank < 1:
    raise ValueError(f'LoRA rank must be a positive integer, got {rank!r}.')
  if not cfg.alpha > 0:
    raise ValueError(f'LoRA alpha must be positive, got {cfg.alpha}.')
  if not 0.0 <= cfg.dropout < 1.0:
    raise ValueError(f'LoRA dropout must lie in [0, 1), got {cfg.dropout}.')
  if cfg.mode not in MODES:
    raise ValueError(f'unknown LoRA mode {cfg.mode!r}; accepted: '
                     f'{", ".join(MODES)}.')
  if cfg.mode == 'merge' and cfg.dropout:
    raise ValueError(f"LoRA mode 'merge' cannot apply input dropout "
                     f"(dropout={cfg.dropout}); use mode 'activation'.")
  try:
    rx = re.compile(cfg.target)
  except re.error as e:
    raise ValueError(f'LoRA target {cfg.target!r} is not a regular '
                     f'expression: {e}.') from e
  kernels = dense_kernels(base_params)
  chosen = {p: s for p, s in kernels.items() if rx.search(p)}
  if not chosen:
    raise ValueError(
        f'LoRA target {cfg.target!r} matches no kernel; the model\'s kernels '
        f'are {sorted(kernels)}.')
  for path, shape in chosen.items():
    if len(shape) != 2:
      raise ValueError(
          f'LoRA target {cfg.target!r} matches {path!r}, whose kernel has shape'
          f' {list(shape)}; LoRA adapts 2-D nn.Dense kernels only.')
    if rank > min(shape):
      raise ValueError(
          f'LoRA rank {rank} exceeds the smaller dimension of kernel {path!r} '
          f'{list(shape)}; choose rank <= {min(shape)}.')
  return dict(sorted(chosen.items()))


def _nest(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def init_adapters(base_params: Params, cfg: LoraConfig, key: jax.Array,
                  rank: Optional[int] = None) -> Params:
  """Fresh adapters: ``a`` uniform in ``+-1/sqrt(in)``, ``b`` zeros.

  Args:
    rank: the rank to allocate (default ``cfg.rank``); heterogeneous-rank
      algorithms allocate the largest rank and zero the unused components.
  """
  rank = cfg.rank if rank is None else rank
  flat = {}
  for i, (path, (d_in, d_out)) in enumerate(
      targets(base_params, cfg, rank).items()):
    bound = 1.0 / math.sqrt(d_in)
    flat[path] = {
        'a': jax.random.uniform(jax.random.fold_in(key, i), (d_in, rank),
                                jnp.float32, -bound, bound),
        'b': jnp.zeros((rank, d_out), jnp.float32)}
  return _nest(flat)


def adapter_paths(adapters: Params) -> list[str]:
  """Module paths of the adapted kernels, sorted (``'block_0/attn/q'``)."""
  return sorted(p[:-len('/a')] for p in tree_util.leaf_paths(adapters)
                if p.endswith('/a'))


def _lookup(adapters: Params, path: tuple[str, ...]):
  node = adapters
  for p in path:
    if not isinstance(node, dict) or p not in node:
      return None
    node = node[p]
  return node if isinstance(node, dict) and 'a' in node else None


@contextlib.contextmanager
def adapted(adapters: Params, scale, *, dropout: float = 0.0,
            rng: Optional[jax.Array] = None, train: bool = False,
            hits: Optional[set] = None):
  """Within this context every targeted ``nn.Dense`` call adds ``s (x A) B``.

  ``scale`` may be a traced scalar (heterogeneous ranks give each client its
  own). Dropout applies to the adapter's input in training when ``rng`` is
  given; adapter ``i`` (in `adapter_paths` order) uses ``fold_in(rng, i)``.
  ``hits``, if given, collects the paths of the adapters applied.
  """
  index = {tuple(p.split('/')): i for i, p in enumerate(adapter_paths(
      adapters))}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, nn.Dense):
      return out
    ab = _lookup(adapters, tuple(module.path))
    if ab is None:
      return out
    if hits is not None:
      hits.add('/'.join(module.path))
    x = args[0] if args else kwargs['inputs']
    if dropout and train and rng is not None:
      keep = jax.random.bernoulli(
          jax.random.fold_in(rng, index[tuple(module.path)]), 1.0 - dropout,
          x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), 0.0)
    delta = (x.astype(jnp.float32) @ ab['a']) @ ab['b']
    return out + (scale * delta).astype(out.dtype)

  with nn.intercept_methods(interceptor):
    yield


def merge(base_params: Params, adapters: Params, scale) -> Params:
  """The base with each adapted kernel replaced by ``W + s A B``."""

  def rec(node, ad):
    if ad is None:
      return node
    if 'a' in ad and 'b' in ad and not isinstance(ad['a'], dict):
      delta = scale * (ad['a'] @ ad['b'])
      return {**node, 'kernel': node['kernel'] + delta.astype(
          node['kernel'].dtype)}
    return {k: rec(v, ad.get(k)) if isinstance(v, dict) else v
            for k, v in node.items()}

  return rec(base_params, adapters)


def lora_model(model: base.Model, cfg: LoraConfig) -> base.Model:
  """A `Model` over params ``{'base': base params, 'lora': adapters}``.

  ``apply`` and ``example_stats`` are the base model's, run with the adapters
  applied (`adapted` or `merge` per ``cfg.mode``); ``init(key)`` initialises
  the base with ``key`` and the adapters with ``fold_in(key, 1)``. The scale
  is ``cfg.alpha / cfg.rank``; `lora_model_with_scale` gives a model whose
  scale is a per-client value instead.
  """
  return _wrap(model, cfg, None)


def _wrap(model: base.Model, cfg: LoraConfig, scale_key: Optional[str]):

  def scale_of(params):
    return params[scale_key] if scale_key else cfg.scale

  def run(fn, params, first, rng, train):
    adapters, s = params['lora'], scale_of(params)
    if cfg.mode == 'merge':
      return fn(merge(params['base'], adapters, s), first, rng, train)
    sub = None if rng is None else jax.random.fold_in(rng, 0x10A)
    with adapted(adapters, s, dropout=cfg.dropout, rng=sub, train=train):
      return fn(params['base'], first, rng, train)

  def init(key):
    b = model.init(key)
    params = {'base': b, 'lora': init_adapters(b, cfg, jax.random.fold_in(
        key, 1))}
    if model.sample_x is not None:
      check_applied(model, params)
    return params

  def apply(params, x, rng=None, train=False):
    return run(model.apply, params, x, rng, train)

  def example_stats(params, batch, rng=None, train=False):
    return run(model.example_stats, params, batch, rng, train)

  return base.Model(init, apply, example_stats, f'{model.name}+lora',
                    model.sample_x, context_len=model.context_len)


def lora_model_with_scale(model: base.Model, cfg: LoraConfig) -> base.Model:
  """As `lora_model`, but the scale is read from ``params['lora_scale']`` (a
  scalar, per client under vmap): HetLoRA and FLoRA give each client
  ``alpha / r_k``."""
  return _wrap(model, cfg, 'lora_scale')


def check_applied(model: base.Model, params: Params) -> None:
  """Raises unless every adapter is applied by a forward pass of ``model``
  on its ``sample_x`` (an abstract trace, nothing computed).

  Activation-level LoRA adapts ``nn.Dense`` calls; a 2-D kernel of another
  module (an LSTM cell's, an ``nn.Einsum``'s) would otherwise carry adapters
  that change nothing and train to nothing.
  """
  hits = set()

  def forward(p):
    with adapted(p['lora'], 1.0, hits=hits):
      return model.apply(p['base'], model.sample_x)

  jax.eval_shape(forward, params)
  missed = sorted(set(adapter_paths(params['lora'])) - hits)
  if missed:
    raise ValueError(
        f'LoRA targets {missed} are kernels of modules that are not '
        'flax.linen.Dense; activation-level LoRA adapts nn.Dense calls only. '
        'Narrow peft.target.')


# -- heterogeneous ranks -------------------------------------------------------


def assign_ranks(num_clients: int, ranks, seed: int) -> np.ndarray:
  """Each client's LoRA rank, drawn uniformly from ``ranks`` with
  ``default_rng([seed, 0x4A4C])``: a device's resource tier, fixed for the
  run (HetLoRA, FLoRA)."""
  ranks = [int(r) for r in ranks]
  if not ranks or min(ranks) < 1:
    raise ValueError(f'client ranks must be positive integers, got {ranks}.')
  rng = np.random.default_rng([seed, 0x4A4C])
  return np.asarray(ranks, np.int32)[rng.integers(0, len(ranks), num_clients)]


def rank_mask(rank: jax.Array, max_rank: int) -> jax.Array:
  """``[max_rank]`` float mask, 1 for the first ``rank`` components."""
  return (jnp.arange(max_rank) < rank).astype(jnp.float32)


def truncate(adapters: Params, rank: jax.Array) -> Params:
  """Adapters with components ``>= rank`` zeroed (HetLoRA's truncation).

  Zeroed components stay exactly zero under training: the gradient of
  ``A[:, j]`` is proportional to ``B[j, :]`` and vice versa.
  """

  def rec(node):
    if 'a' in node and not isinstance(node['a'], dict):
      m = rank_mask(rank, node['a'].shape[-1])
      return {**node, 'a': node['a'] * m, 'b': node['b'] * m[:, None]}
    return {k: rec(v) for k, v in node.items()}

  return rec(adapters)


def pairs(adapters: Params) -> list[tuple[jax.Array, jax.Array]]:
  """``[(a, b)]`` of every adapted kernel, in `adapter_paths` order."""
  out = []
  for path in adapter_paths(adapters):
    node = adapters
    for p in path.split('/'):
      node = node[p]
    out.append((node['a'], node['b']))
  return out


def product_norm_sq(adapters: Params, scale=1.0) -> jax.Array:
  """``sum_kernels ||s A B||_F^2``, via ``sum((A^T A) * (B B^T))`` so no
  ``[in, out]`` product is formed."""
  total = jnp.zeros([], jnp.float32)
  for a, b in pairs(adapters):
    total += jnp.sum((a.T @ a) * (b @ b.T))
  return total * jnp.square(scale)


def stack(a: jax.Array, b: jax.Array, weights: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
  """FLoRA's stacking (Wang et al., NeurIPS 2024), for one kernel.

  Args:
    a: clients' ``A`` ``[K, in, r]`` (zero-padded to a common ``r``).
    b: clients' ``B`` ``[K, r, out]``.
    weights: ``[K]`` aggregation weights (FLoRA's ``p_k``, scales folded in).
  Returns:
    ``(A_stack [in, K r], B_stack [K r, out])`` with
    ``A_stack @ B_stack == sum_k weights[k] A_k B_k`` exactly: the stacked
    modules' product is the weighted average of the clients' products, which
    averaging ``A`` and ``B`` separately is not.
  """
  k, d_in, r = a.shape
  a_stack = jnp.transpose(a * weights[:, None, None], (1, 0, 2)).reshape(
      d_in, k * r)
  return a_stack, b.reshape(k * r, b.shape[-1])
