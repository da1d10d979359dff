"""Performance advice given at run time: `warn_scanned_convolutions`.

On XLA:CPU a convolution inside the local-step loop is a trap. Its backward
convolutions run about 5x slower inside a ``lax.scan`` or ``while_loop``, and
``vmap`` over per-client weights turns ``nn.Conv`` into a grouped convolution,
slower again. A FedAvg round of the FedAvg paper's CNN was 10x slower with
``nn.Conv`` than with `fedjax_pfi.models.conv.PatchConv` (BUILD_NOTES, "CNN
formulation on XLA:CPU"; docs/performance.md). Every round runs its local
steps in such a loop, so a model with convolutions gets one warning per
process and model name, naming `PatchConv`.
"""

from __future__ import annotations

import warnings
import weakref

import jax
from jax.extend import core as jex_core

# The primitives XLA:CPU runs slowly inside a loop and under vmap over
# weights. ``lax.conv_general_dilated_patches`` (PatchConv's 'patches'
# extractor) is itself one.
CONVOLUTIONS = frozenset({'conv_general_dilated'})


class PerformanceWarning(UserWarning):
  """A configuration that runs, correctly, but much slower than it could."""


_found = weakref.WeakKeyDictionary()  # model.apply -> its convolution count
_warned: set[str] = set()


def count_primitives(jaxpr, names) -> int:
  """How many equations of ``jaxpr`` (a ``ClosedJaxpr`` or ``Jaxpr``), its
  sub-jaxprs included (scans, conds, custom derivatives, nested jits), apply
  one of the primitives ``names``."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in names
    for sub in jex_core.jaxprs_in_params(eqn.params):
      n += count_primitives(sub, names)
  return n


def convolutions(model) -> int:
  """The convolution ops in one forward pass of ``model`` (a
  `fedjax_pfi.Model`) on ``model.sample_x``, found by an abstract trace: no
  parameters are allocated and nothing runs. 0 when the model has no
  ``sample_x`` to trace with."""
  if model.sample_x is None:
    return 0
  try:
    return _found[model.apply]
  except (KeyError, TypeError):
    pass
  try:
    params = jax.eval_shape(model.init, jax.random.key(0))
    jaxpr = jax.make_jaxpr(lambda p, x: model.apply(p, x, None, False))(
        params, model.sample_x)
  except Exception:  # pylint: disable=broad-except
    # Advice only: a model that cannot be traced this way (a wrapper whose
    # apply wants more than params and inputs) fails in its round instead,
    # with its own error.
    return 0
  n = count_primitives(jaxpr, CONVOLUTIONS)
  try:
    _found[model.apply] = n
  except TypeError:  # not weak-referenceable: traced again next time
    pass
  return n


def warn_scanned_convolutions(model, backend: str | None = None) -> bool:
  """Warns (`PerformanceWarning`, once per process and model name) when
  ``model``'s local steps would run convolutions on XLA:CPU. Returns whether
  it found any. ``backend``: the platform the round runs on (default JAX's
  default backend)."""
  if (backend or jax.default_backend()) != 'cpu':
    return False
  n = convolutions(model)
  if n and model.name not in _warned:
    _warned.add(model.name)
    warnings.warn(
        f'model {model.name!r} runs {n} convolution op(s) in each forward '
        'pass, and every federated round runs them inside its local-step '
        'loop, vmapped over per-client weights. On XLA:CPU that is about 10x '
        'slower than the same layer as a matmul: use '
        'fedjax_pfi.models.conv.PatchConv (same parameters as nn.Conv; for '
        "the zoo's CNN, --config.model.kwargs.conv=patches with PatchConv's "
        "default patch_method='slices'). See docs/performance.md.",
        PerformanceWarning, stacklevel=3)
  return bool(n)
