"""Convolution as im2col + matmul, a drop-in for ``flax.linen.Conv``.

`PatchConv` has exactly the parameters of ``nn.Conv`` (``kernel`` of shape
``[kh, kw, cin, cout]`` and ``bias`` of shape ``[cout]``, same initializers),
so the two are interchangeable on a params pytree. It computes the
convolution as patch extraction followed by a dense contraction over
``kh * kw * cin``. The point is what happens under ``jax.vmap`` over
per-client *weights*: ``nn.Conv`` becomes a grouped convolution
(``feature_group_count = num_clients``), which XLA:CPU runs slowly, while
`PatchConv` becomes an ordinary batched matmul (the patch extraction only
depends on the inputs, so it just gets a larger batch).

Two patch extractors:

- ``'slices'`` (default): pad, then stack ``kh * kw`` shifted strided slices
  (pure data movement, no convolution op at all); ordering ``[kh, kw, cin]``,
  matching the kernel's own layout.
- ``'patches'``: ``jax.lax.conv_general_dilated_patches``. Its feature
  ordering is channel-major, ``[cin, kh, kw]``, so the kernel is transposed
  to ``[cin, kh, kw, cout]`` before it is flattened. Beware: it is itself a
  convolution with a constant one-hot filter and ``feature_group_count =
  cin`` (plus its transpose in the backward pass), i.e. a grouped conv, and
  on XLA:CPU (jax 0.10.2) a FedAvg-CNN SGD step with it was ~10x slower than
  with ``nn.Conv`` (``'slices'``: ~1.5x). See
  experiments/benchmarks/cnn_formulation.py.

Only feature_group_count=1 and no dilation are supported.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

PaddingLike = Union[str, int, Sequence[Union[int, tuple[int, int]]]]


def _tuple(v, n: int) -> tuple[int, ...]:
  if isinstance(v, int):
    return (v,) * n
  v = tuple(v)
  if len(v) != n:
    raise ValueError(f'expected {n} values, got {v!r}.')
  return v


def _explicit_padding(padding: PaddingLike, in_shape: Sequence[int],
                      kernel_size: Sequence[int],
                      strides: Sequence[int]) -> list[tuple[int, int]]:
  """Resolves ``padding`` to explicit ``(lo, hi)`` pairs, as ``nn.Conv`` does."""
  n = len(kernel_size)
  if isinstance(padding, str):
    if padding.upper() == 'CIRCULAR':
      raise NotImplementedError('PatchConv does not support CIRCULAR padding.')
    if padding.upper() == 'CAUSAL':
      if n != 1:
        raise ValueError('CAUSAL padding is only defined for 1D convolutions.')
      return [(kernel_size[0] - 1, 0)]
    return list(lax.padtype_to_pads(in_shape, kernel_size, strides,
                                    padding.upper()))
  if isinstance(padding, int):
    return [(padding, padding)] * n
  pads = []
  for p in padding:
    pads.append((p, p) if isinstance(p, int) else tuple(p))
  if len(pads) != n:
    raise ValueError(f'padding {padding!r} does not match {n} spatial dims.')
  return pads


def extract_patches(x: jax.Array, kernel_size: Sequence[int],
                    strides: Sequence[int], pads: Sequence[tuple[int, int]],
                    method: str = 'slices') -> jax.Array:
  """``x`` ``[N, *spatial, C]`` -> patches ``[N, *out_spatial, K]``.

  ``K = prod(kernel_size) * C``; the ordering of ``K`` is ``[C, *kernel]``
  for ``'patches'`` and ``[*kernel, C]`` for ``'slices'``.
  """
  n = len(kernel_size)
  if method == 'patches':
    spec = {1: ('NWC', 'WIO', 'NWC'), 2: ('NHWC', 'HWIO', 'NHWC'),
            3: ('NDHWC', 'DHWIO', 'NDHWC')}[n]
    return lax.conv_general_dilated_patches(
        x, filter_shape=tuple(kernel_size), window_strides=tuple(strides),
        padding=tuple(pads), dimension_numbers=spec,
        precision=lax.Precision.HIGHEST)
  if method == 'slices':
    xp = jnp.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
    out_spatial = [
        (xp.shape[1 + i] - kernel_size[i]) // strides[i] + 1 for i in range(n)]
    cols = []
    for offset in _offsets(kernel_size):
      start = (0,) + tuple(offset) + (0,)
      limit = (xp.shape[0],) + tuple(
          offset[i] + (out_spatial[i] - 1) * strides[i] + 1
          for i in range(n)) + (xp.shape[-1],)
      cols.append(lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,)))
    p = jnp.stack(cols, axis=-2)  # [N, *out, prod(kernel), C]
    return p.reshape(p.shape[:-2] + (-1,))
  raise ValueError(f"method must be 'patches' or 'slices', got {method!r}.")


def _offsets(kernel_size: Sequence[int]):
  if not kernel_size:
    yield ()
    return
  for i in range(kernel_size[0]):
    for rest in _offsets(kernel_size[1:]):
      yield (i,) + rest


class PatchConv(nn.Module):
  """``nn.Conv`` computed as im2col + matmul (same params, same outputs).

  Attributes:
    features: number of output channels.
    kernel_size: spatial kernel shape (an int means 1D, like ``nn.Conv``).
    strides: window strides.
    padding: ``'SAME'``, ``'VALID'``, ``'CAUSAL'`` (1D), an int, or a
      sequence of ints / ``(lo, hi)`` pairs.
    use_bias: whether to add a bias.
    method: ``'slices'`` (explicit shifted slices) or ``'patches'``
      (``lax.conv_general_dilated_patches``).
  """
  features: int
  kernel_size: Union[int, Sequence[int]]
  strides: Union[None, int, Sequence[int]] = 1
  padding: PaddingLike = 'SAME'
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  method: str = 'slices'

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    ks = ((self.kernel_size,) if isinstance(self.kernel_size, int)
          else tuple(self.kernel_size))
    n = len(ks)
    strides = _tuple(1 if self.strides is None else self.strides, n)
    cin = inputs.shape[-1]
    kernel = self.param('kernel', self.kernel_init, ks + (cin, self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    inputs, kernel, bias = nn.dtypes.promote_dtype(
        inputs, kernel, bias, dtype=self.dtype)

    # Like nn.Conv: no batch dim -> add one; several batch dims -> flatten.
    batch_shape = inputs.shape[:-(n + 1)]
    x = inputs.reshape((-1,) + inputs.shape[-(n + 1):])
    pads = _explicit_padding(self.padding, x.shape[1:-1], ks, strides)
    patches = extract_patches(x, ks, strides, pads, self.method)
    if self.method == 'patches':
      # Patch features are channel-major [cin, *kernel].
      perm = (n,) + tuple(range(n)) + (n + 1,)
      w = jnp.transpose(kernel, perm).reshape(-1, self.features)
    else:
      w = kernel.reshape(-1, self.features)
    y = lax.dot_general(patches, w, (((patches.ndim - 1,), (0,)), ((), ())),
                        precision=self.precision)
    if bias is not None:
      y = y + bias
    return y.reshape(batch_shape + y.shape[1:])
