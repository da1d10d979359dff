"""`FederatedAlgorithm` (``init``, ``apply``) and the server state it threads.

``apply(state, cohort, key, frozen=None)`` is one jitted program with the
state donated: broadcast the server params, train every client of the cohort
(a ``lax.scan`` over local steps of the step ``vmap``ped over clients),
aggregate the deltas, apply the server optimizer. ``key`` is the round's key;
client ``i`` uses ``fold_in(key, client_id)`` and its step ``s``
``fold_in(that, s)``, so a client's randomness does not depend on its slot, on
padding or on chunking. ``frozen`` holds params every client uses but nobody
trains (a foundation model's base); it is an argument, not part of the state,
so it is shared unbatched, never donated and never checkpointed.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fedjax_pfi.data.cohort import Cohort

Params = Any


class ServerState(NamedTuple):
  """Everything a round reads and writes; checkpointed as one pytree.

  Attributes:
    params: the global model.
    opt_state: the server optimizer's state.
    agg_state: the aggregator's state.
    round: int32 scalar, rounds completed.
    extra: algorithm-specific server state (SCAFFOLD's control variate).
    client_states: per-client store with a leading ``[num_clients]`` axis
      (SCAFFOLD's client control variates), or ``()``.
  """
  params: Params
  opt_state: Any
  agg_state: Any
  round: jax.Array
  extra: Any = ()
  client_states: Any = ()


class EvalView(NamedTuple):
  """What evaluation needs from a `ServerState`.

  Attributes:
    params: complete params for a client without personal state (the test
      split's global model, held-out clients).
    shared: the part every client shares, joined to each client's row of
      ``personal`` by the algorithm's ``combine`` (None without personal
      state).
    personal: the per-client store ``[num_clients, ...]``, or None.
    clusters: clustered FL's models ``[k, ...]``: each client is evaluated
      with the one of lowest loss on its training data (None otherwise).
  """
  params: Params
  shared: Params = None
  personal: Params = None
  clusters: Params = None


def _no_frozen(params):
  del params
  return None


def _global_view(state, frozen):
  del frozen
  return EvalView(state.params)


class Evaluation(NamedTuple):
  """What evaluation needs from an algorithm, beside its round.

  ``view(state, frozen)`` and ``combine(shared, personal_row)`` say what to
  evaluate (`EvalView`), and ``model`` with which model when it is not the
  one trained (FLoRA merges its adapters into the base and evaluates the
  plain base model).

  ``finetune``: how evaluation personalizes the global model for the
  training population: ``''`` not at all (FedAvg, or algorithms whose
  personal state already is the personalization), ``'trainable'`` each
  client fine-tunes the leaves it trains (FedAvg + FT), ``'all'`` every leaf
  including the frozen ones (FedBABU fine-tunes its fixed head).
  ``has_global_model``: ``view(...).params`` is a model worth comparing each
  client with (False where it holds untrained personal initialisations:
  FedPer's head, LG-FedAvg's body, local-only). ``finetune_lr``: the
  fine-tuning step (Per-FedAvg's inner ``alpha``; 0: the client learning
  rate). ``clusters``: clustered FL's number of models (params ``[k, ...]``).
  """
  view: Callable[[ServerState, Params], EvalView] = _global_view
  combine: Optional[Callable[[Params, Params], Params]] = None
  model: Any = None
  finetune: str = ''
  has_global_model: bool = True
  finetune_lr: float = 0.0
  clusters: int = 0


class Capabilities(NamedTuple):
  """What an algorithm's round can run under and what it keeps, declared by
  the algorithm and checked in one place (`registry.check`), before
  tracing.

  Attributes:
    chunked, sharded, packed: its round runs with ``execution.chunk_size``,
      on several devices, on packed lanes (rounds that sum the clients'
      messages; a round that needs every client's update at once runs on one
      device, unchunked and unpacked).
    personal_state: it keeps state per client in the store.
    private: a DP aggregator applies to what it aggregates (a federated part
      whose deltas the aggregator sees).
    plain_sgd: ``''`` for any client optimizer, or why it needs plain SGD
      (the sentence after its name in the refusal).
    lr_scales: it accepts per-leaf step sizes (``client.lr_scales``).
    transforms: its round passes each client's message through a
      `rounds.ClientTransform` (``registry.build(transform=...)``).
    secure_aggregation: its round masks each message when the aggregator
      is secure (`secure_aggregation.wrap`): every message it sends goes
      through the aggregator, and the cohort's plan reaches it.
    robust_aggregation: its round fills the buffer of every message for an
      aggregator that needs them all (``needs='all'``, `robust`), in every
      layout it runs under.
    compression_state: it keeps a compressing aggregator's error-feedback
      residual per client and compresses its broadcast
      (`compression.Spec`'s ``error_feedback`` and ``download``).
    host_store: its per-client store may live on the host
      (``execution.client_store='host'``): its round reads and writes the
      store's rows through ``Cohort.store_rows``.
  """
  chunked: bool = False
  sharded: bool = False
  packed: bool = False
  personal_state: bool = False
  private: bool = False
  plain_sgd: str = ''
  lr_scales: bool = True
  transforms: bool = False
  secure_aggregation: bool = False
  robust_aggregation: bool = False
  compression_state: bool = False
  host_store: bool = False


class FederatedAlgorithm(NamedTuple):
  """``init(params) -> ServerState``; ``apply(state, cohort, key, frozen=None)
  -> (state, metrics)``.

  ``apply`` is jitted with ``state`` donated; ``apply_unjitted`` is the same
  function without ``jax.jit`` (for composing into larger programs).
  ``frozen_part(params)`` is the part of the full params passed as
  ``frozen`` (None for algorithms that train everything). What evaluation
  needs travels beside the round in ``evaluation`` (`Evaluation`; its fields
  are also read as ``eval_view``, ``combine``, ``eval_model``, ``finetune``,
  ``has_global_model``, ``finetune_lr``, ``clusters``), and what the round
  can run under in ``capabilities`` (`Capabilities`).

  The jitted ``apply`` is the program the training loop runs: its metrics
  also hold ``'state_finite'`` (`finite_flags` of the new state, which the
  loop checks before saving it), and each trace appends to ``traces`` (one
  entry per compilation).

  Attributes:
    init: ``init(params) -> ServerState``, from the model's full params.
    apply: ``apply(state, cohort, key, frozen=None) -> (state, metrics)``:
      one round over a `Cohort` ``[C, S, B, ...]`` (or a `PackedCohort`),
      jitted, ``state`` donated; ``metrics`` are scalars.
    apply_unjitted: ``apply`` without ``jax.jit``.
    name: the algorithm's name, for metrics and checkpoints.
    frozen_part: ``frozen_part(params)``: the part of the full params passed
      to ``apply`` as ``frozen`` (None: nothing frozen).
    evaluation: what evaluation needs (`Evaluation`).
    capabilities: what the round can run under (`Capabilities`).
    traces: one entry (the cohort mask's shape) appended per trace of
      ``apply``: its length counts compilations.
  """
  init: Callable[[Params], ServerState]
  apply: Callable[..., tuple[ServerState, dict]]
  apply_unjitted: Callable[..., tuple[ServerState, dict]]
  name: str
  frozen_part: Callable[[Params], Params] = _no_frozen
  evaluation: Evaluation = Evaluation()
  capabilities: Capabilities = Capabilities()
  traces: list = []

  @property
  def eval_view(self):
    """``evaluation.view``, ``(state, frozen) -> EvalView``."""
    return self.evaluation.view

  @property
  def combine(self):
    """``evaluation.combine``, ``(shared, personal_i) -> params`` or None."""
    return self.evaluation.combine

  @property
  def eval_model(self):
    """``evaluation.model``, the model evaluated when it is not the one
    trained (None: the trained one)."""
    return self.evaluation.model

  @property
  def finetune(self) -> str:
    """``evaluation.finetune``, ``''``, ``'trainable'`` or ``'all'``."""
    return self.evaluation.finetune

  @property
  def has_global_model(self) -> bool:
    """``evaluation.has_global_model``."""
    return self.evaluation.has_global_model

  @property
  def finetune_lr(self) -> float:
    """``evaluation.finetune_lr``."""
    return self.evaluation.finetune_lr

  @property
  def clusters(self) -> int:
    """``evaluation.clusters``, clustered FL's number of models, or 0."""
    return self.evaluation.clusters


class Execution(NamedTuple):
  """How a round's clients are laid out on the hardware; never what it
  computes (results agree to float tolerance whatever these are).

  Attributes:
    chunk_size: clients (or packed lanes) per chunk *per device*: the round
      runs its clients in a ``lax.scan`` over chunks that adds up their
      weighted deltas, so device memory is O(chunk) and not O(cohort).
      None: one chunk.
    mesh: a `jax.sharding.Mesh` whose axis ``axis`` the client (lane) axis
      is sharded over (``jax.shard_map``); each device runs its share and
      the sums are ``psum``-reduced across devices inside the same program.
      None: one device.
    axis: the mesh axis name.
  """
  chunk_size: Optional[int] = None
  mesh: Any = None
  axis: str = 'clients'

  @property
  def num_shards(self) -> int:
    return 1 if self.mesh is None else int(self.mesh.shape[self.axis])

  def slots(self, num_clients: int) -> int:
    """The padded size of a client (lane) axis of ``num_clients``: a
    multiple of ``num_shards * chunk_size``."""
    per = self.num_shards * (self.chunk_size or 1)
    return -(-num_clients // per) * per


def take(x: jax.Array, lo, k: int) -> jax.Array:
  """Rows ``lo:lo + k`` of ``x`` (``x`` itself when that is all of it)."""
  if isinstance(lo, int) and lo == 0 and k == x.shape[0]:
    return x
  return jax.lax.dynamic_slice_in_dim(x, lo, k)


def window_at_step(x: jax.Array, s, window=None) -> jax.Array:
  """``x[lo:lo + k, s]`` of a ``[rows, steps, ...]`` array, or ``x[:, s]``
  with ``window=None``: one step of a chunk, read in place (slicing the
  chunk first would copy all its steps, O(chunk x steps) memory)."""
  if window is None:
    return jax.lax.dynamic_index_in_dim(x, s, 1, keepdims=False)
  lo, k = window
  starts = (lo, s) + (0,) * (x.ndim - 2)
  out = jax.lax.dynamic_slice(x, starts, (k, 1) + x.shape[2:])
  return out.reshape((k,) + x.shape[2:])


def sum_over_clients(fn: Callable, lanes: Any, shared: Any,
                     execution: Execution = Execution()) -> Any:
  """``fn(lanes, shared, lo, k)`` summed over chunks of ``lanes`` (and devices).

  ``lanes`` leaves share a leading client (or lane) axis of ``n`` rows (per
  device); ``fn`` computes the pytree of sums (per-client results as
  ``[C]``-indexed sums) of rows ``lo:lo + k`` (``k`` static; read them with
  `take` or, step by step, `window_at_step`) given the unsliced ``shared``.
  The rows are the chunks of ``execution.chunk_size`` of each device's
  shard; chunks run in a ``lax.scan`` and devices under ``jax.shard_map``,
  their sums added.
  """
  def local(lanes, shared):
    n = jax.tree.leaves(lanes)[0].shape[0]
    k = execution.chunk_size
    if k is None or k >= n:
      out = fn(lanes, shared, 0, n)
    else:
      if n % k:
        raise ValueError(f'{n} clients (lanes) per device do not split into '
                         f'chunks of {k}; pad them to a multiple '
                         '(Execution.slots).')
      zero = jax.tree.map(
          lambda a: jnp.zeros(a.shape, a.dtype),
          jax.eval_shape(lambda lanes_, s: fn(lanes_, s, jnp.int32(0), k), lanes,
                         shared))

      def body(acc, i):
        return jax.tree.map(jnp.add, acc, fn(lanes, shared, i * k, k)), None

      out, _ = jax.lax.scan(body, zero, jnp.arange(n // k, dtype=jnp.int32))
    if execution.mesh is not None:
      out = jax.lax.psum(out, execution.axis)
    return out

  if execution.mesh is None:
    return local(lanes, shared)
  n = jax.tree.leaves(lanes)[0].shape[0]
  if n % execution.num_shards:
    raise ValueError(f'{n} clients (lanes) do not split over '
                     f'{execution.num_shards} devices; pad them to a '
                     'multiple (Execution.slots).')
  return jax.shard_map(local, mesh=execution.mesh,
                       in_specs=(P(execution.axis), P()), out_specs=P(),
                       check_vma=False)(lanes, shared)


def client_keys(key: jax.Array, client_ids: jax.Array) -> jax.Array:
  """Per-client keys ``fold_in(key, id)``; padded clients (id -1) get id 0's."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(
      jnp.maximum(client_ids, 0))


def round_metrics(cohort: Cohort, loss_sum: jax.Array, count: jax.Array,
                  num_steps: jax.Array, mean_delta: Params,
                  examples: Optional[jax.Array] = None) -> dict:
  """Scalar and per-client metrics of a round (all on device).

  ``examples``: each client's training examples seen ``[C]`` (default: read
  from the ``[C, S, B]`` mask).
  """
  real = cohort.weight > 0  # not padded, not a dropped straggler
  if examples is None:
    examples = jnp.sum(cohort.mask, (1, 2))
  client_loss = loss_sum / jnp.maximum(count, 1.0)
  total = jnp.sum(jnp.where(real, count, 0.0))
  return {
      'train_loss': jnp.sum(jnp.where(real, loss_sum, 0.0)) /
                    jnp.maximum(total, 1.0),
      'train_examples': jnp.sum(jnp.where(real, examples, 0)).astype(
          jnp.int32),
      'clients': jnp.sum(real.astype(jnp.int32)),
      'delta_norm': jnp.sqrt(sum(jnp.sum(jnp.square(x))
                                 for x in jax.tree.leaves(mean_delta))),
      'client_loss': client_loss,
      'client_steps': num_steps,
  }


def comm_metrics(cohort: Cohort, download, upload) -> dict:
  """Bytes each client of the round receives and sends, and their totals.

  Args:
    download: bytes per client, a scalar or ``[C]``; counted for every
      sampled client (id >= 0).
    upload: bytes per client, a scalar or ``[C]``; counted for clients whose
      update is aggregated (weight > 0; a dropped straggler sends nothing).
  """
  sampled = cohort.client_ids >= 0
  real = cohort.weight > 0
  down = jnp.where(sampled, jnp.asarray(download, jnp.float32), 0.0)
  up = jnp.where(real, jnp.asarray(upload, jnp.float32), 0.0)
  return {
      'comm/download_bytes': jnp.sum(down),
      'comm/upload_bytes': jnp.sum(up),
      'comm/download_bytes_per_client': jnp.sum(down) / jnp.maximum(
          jnp.sum(sampled), 1),
      'comm/upload_bytes_per_client': jnp.sum(up) / jnp.maximum(
          jnp.sum(real), 1),
      'client_download_bytes': down,
      'client_upload_bytes': up,
  }


def make_algorithm(init, apply, name, *, frozen_part=_no_frozen,
                   capabilities: Capabilities = Capabilities(),
                   execution: Execution = Execution(),
                   eval_view=_global_view, eval_model=None,
                   **evaluation) -> FederatedAlgorithm:
  """Jits ``apply`` with the state donated (`FederatedAlgorithm`).

  ``init``'s state is copied: the state owns its buffers, so donating it
  never invalidates the caller's arrays (only the state is copied, not a
  frozen base the params may hold). With a mesh in ``execution`` the state
  and metrics come back replicated on it, so every process of a multi-host
  run reads them whole. ``eval_view``, ``eval_model`` and ``evaluation``
  are the `Evaluation` fields (``combine``, ``finetune``,
  ``has_global_model``, ``finetune_lr``, ``clusters``).
  """
  traces = []

  def owning_init(params):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), init(params))

  def checked(state, cohort, key, frozen=None):
    traces.append(jax.tree.map(jnp.shape, cohort.mask))
    state, metrics = apply(state, cohort, key, frozen)
    return state, {**metrics, 'state_finite': finite_flags(state)}

  replicated = None
  if execution.mesh is not None:
    replicated = jax.sharding.NamedSharding(execution.mesh, P())
  jitted = jax.jit(checked, donate_argnums=0, out_shardings=replicated)
  return FederatedAlgorithm(
      owning_init, jitted, apply, name, frozen_part,
      Evaluation(view=eval_view, model=eval_model, **evaluation), capabilities,
      traces)


def finite_flags(tree):
  """One bool per floating leaf of ``tree``: all its values finite. Inside
  the round, so checking the new state costs one reduction, no copy."""
  leaves = [x for x in jax.tree.leaves(tree) if _floating(x)]
  if not leaves:
    return jnp.ones((0,), bool)
  return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def _floating(x) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.inexact)


def floating_paths(tree) -> list[str]:
  """The paths of `finite_flags`'s leaves, in its order."""
  return [jax.tree_util.keystr(p) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0] if _floating(x)]
