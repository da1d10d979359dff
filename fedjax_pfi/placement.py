"""Where a round's arrays live: the mesh of ``config.execution``, the
cohort's shardings (the client or lane axis split over the mesh), each
host's share of the cohort in a multi-host run, and replicated copies of
the state and keys."""

from __future__ import annotations

import jax
import numpy as np

from fedjax_pfi.algorithms import core
from fedjax_pfi.data import cohort as cohort_lib


def make_execution(config) -> core.Execution:
  """The `core.Execution` of ``config.execution``: a one-axis mesh over
  ``devices`` devices (all processes' devices in a multi-host run)."""
  ex = config.execution
  n = int(ex.devices) or jax.device_count()
  mesh = None
  if n > 1:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ('clients',))
  chunk = None if ex.chunk_size is None else int(ex.chunk_size)
  return core.Execution(chunk_size=chunk, mesh=mesh)


def cohort_sharding(exp, cohort):
  """Shardings for ``cohort``: the client (lane) axis split over the mesh,
  cohort-level arrays of a packed cohort replicated."""
  mesh = exp.execution.mesh
  if mesh is None:
    return None
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('clients'))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if isinstance(cohort, cohort_lib.PackedCohort):
    return cohort._replace(
        client_ids=whole, weight=whole,
        secagg=jax.tree.map(lambda _: whole, cohort.secagg),
        batches={k: split for k in cohort.batches},
        **{k: split for k in ('mask', 'slot', 'local_step', 'first', 'last')})
  return jax.tree.map(lambda _: split, cohort)


def local_part(exp) -> tuple[int, int, int]:
  """``(lo, hi, n)``: this process feeds client slots (packed: lanes)
  ``lo:hi`` of ``n`` (all of them in a one-process run)."""
  c = exp.config
  n = (exp.execution.slots(int(c.execution.pack_lanes))
       if int(c.execution.pack_lanes) else
       exp.execution.slots(c.clients_per_round))
  if jax.process_count() == 1:
    return 0, n, n
  split = jax.sharding.NamedSharding(exp.execution.mesh,
                                     jax.sharding.PartitionSpec('clients'))
  idx = [i[0] for i in split.addressable_devices_indices_map((n,)).values()]
  lo, hi = min(i.start or 0 for i in idx), max(i.stop or n for i in idx)
  if sum((i.stop or n) - (i.start or 0) for i in idx) != hi - lo:
    raise ValueError('this process\'s devices do not hold one contiguous '
                     'block of the client axis; order the mesh by process.')
  return lo, hi, n


def to_global(cohort, shardings, full_rows: int):
  """A process's share of a cohort -> global arrays over every host's
  devices (``jax.make_array_from_process_local_data``); replicated
  (cohort-level) arrays are whole on every process."""
  def put(x, sharding):
    x = np.asarray(x)
    if sharding.spec == jax.sharding.PartitionSpec():
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(
        sharding, x, (full_rows,) + x.shape[1:])
  return jax.tree.map(put, cohort, shardings)


def replicator(mesh):
  """``put(tree)``: on every device of ``mesh`` from host copies (what a
  multi-host run accepts; PRNG keys by their key data), or on the default
  device without a mesh."""
  if mesh is None:
    return jax.device_put
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), replicated)

  return lambda tree: jax.tree.map(put, tree)
