"""Who personalization helps, and whom it silently hurts: per-client reports.

An average over clients can rise while a tenth of them get worse, and in
federated learning nobody sees those clients' data to notice. This module
compares each client's personalized test accuracy with what the same client
gets from a baseline (the global model, or a model trained on its data alone)
and reports the distribution of the gains and the fraction of clients hurt.

- `Adapter`: each client trains a copy of a model on its own training data
  (vmapped over chunks of clients) and is evaluated on its own test data:
  fine-tuning the global model (FedAvg + FT, FedBABU), adapting held-out
  clients, and the local-only baseline (training from the initial params).
- `compare`: per-client gains over a baseline and the silent-failure
  fractions.
- `save_clients` / `load_clients`: per-client results kept in the workdir,
  so runs can be compared client by client afterwards.
- `plot_run`: accuracy curves, the per-client accuracy distribution and the
  gain against client data size, as PNGs in the workdir.

Per-client results are arrays over the evaluated clients (`ClientMetrics`,
``[clients]``); a gain is a client's personalized accuracy minus its
baseline accuracy, ``[clients]``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import optax

from fedjax_pfi import evaluation
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import store
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.evaluation import ClientMetrics, client_sums
from fedjax_pfi.models import base


class Adapter:
  """Each client adapts ``start`` on its own training data, then is tested.

  Client ``i`` runs ``epochs`` epochs of ``optimizer`` (batches of
  ``batch_size``, shuffled by ``(seed, client id)``) from ``start`` on
  ``train_ds`` client ``i``, and is evaluated on ``test_ds`` client ``i``
  (the same user). Clients are sorted by size and run in chunks of
  ``clients_per_chunk``, stacked with power-of-two step buckets, so a few
  shapes compile. ``frozen`` params (a foundation model's base) are shared
  unbatched and not adapted. With ``epochs=0`` this is plain evaluation of
  ``start``.

  Memory: one chunk of adapted models at a time, never the population's.
  """

  def __init__(self, model: base.Model, optimizer: optax.GradientTransformation,
               *, epochs: int, batch_size: int, clients_per_chunk: int = 32,
               eval_batch_size: int = 64, seed: int = 0):
    if epochs < 0:
      raise ValueError(f'adaptation epochs must be >= 0, got {epochs}.')
    self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
    self.clients_per_chunk, self.eval_batch_size = (clients_per_chunk,
                                                    eval_batch_size)
    train = client_updates.local_training(model, optimizer)
    sums = client_sums(model)

    def adapt(start, batches, mask, keys, frozen):
      init = store.broadcast(start, keys.shape[0])
      out = train(init, batches, mask, keys, frozen=frozen)
      return jax.tree.map(lambda p, d: p + d, init, out.delta)

    def adapt_and_test(start, batches, mask, keys, test_batches, test_mask,
                       frozen, probes):
      mine = adapt(start, batches, mask, keys, frozen)
      full = jax.vmap(lambda p: param_groups.merge(frozen, p))(mine) \
          if frozen is not None else mine
      return jax.vmap(sums, in_axes=(0, 0, 0, None))(full, test_batches,
                                                     test_mask, probes)

    self._run = jax.jit(adapt_and_test)
    self._adapt = jax.jit(adapt)

  def evaluate(self, start, train_ds: FederatedDataset,
               test_ds: FederatedDataset, frozen=None,
               probes: Optional[Mapping[str, evaluation.Probe]] = None,
               only: Optional[np.ndarray] = None) -> ClientMetrics:
    """Per-client test sums of the adapted models (clients with test data;
    of ``only``, if given), and each adapted model's sums on ``probes``
    (`evaluation.Probe`). A client adapts the same way with or without
    ``only`` (its shuffle and key follow its index in ``train_ds``)."""
    if train_ds.num_clients != test_ds.num_clients:
      raise ValueError(
          f'train ({train_ds.num_clients} clients) and test '
          f'({test_ds.num_clients}) must hold the same clients in order.')
    ids = np.flatnonzero(test_ds.client_sizes > 0)
    if only is not None:
      ids = np.intersect1d(ids, only)
    if not ids.size:
      raise ValueError('no client of this dataset has test examples.')
    results = evaluation.ChunkResults(test_ds, probes)
    on_device = evaluation.device_probes(probes)
    k = self.clients_per_chunk
    for chunk, batches, mask, keys in self._chunks(train_ds, ids):
      largest = int(test_ds.client_sizes[chunk].max())
      b = min(self.eval_batch_size, 1 << max(0, (largest - 1).bit_length()))
      te = cohort_lib.stack_eval(
          test_ds, chunk, batch_size=b, num_slots=k,
          step_buckets=cohort_lib.power_of_two_buckets(-(-largest // b)))
      results.add(chunk, self._run(start, batches, mask, keys, te.batches,
                                   te.mask, frozen, on_device), te.mask)
    return results.result()

  def _chunks(self, train_ds: FederatedDataset, ids: np.ndarray):
    """``(chunk, batches, mask, keys)`` per chunk of ``ids``, sorted by
    their training steps; a chunk's clients without training examples come
    last and are not adapted."""
    steps = cohort_lib.client_steps(train_ds.client_sizes[ids],
                                    self.batch_size, max(self.epochs, 1))
    ids = ids[np.argsort(steps, kind='stable')]
    k = self.clients_per_chunk
    for lo in range(0, ids.size, k):
      chunk = ids[lo:lo + k]
      trains = train_ds.client_sizes[chunk] > 0
      if self.epochs and np.any(trains):
        tr = cohort_lib.stack_cohort(
            train_ds, chunk[trains], batch_size=self.batch_size,
            num_epochs=self.epochs, num_slots=k, seed=self.seed,
            round_idx=0, step_buckets=cohort_lib.power_of_two_buckets(
                int(cohort_lib.client_steps(train_ds.client_sizes[chunk],
                                            self.batch_size,
                                            self.epochs).max())))
        order = np.concatenate([np.flatnonzero(trains),
                                np.flatnonzero(~trains)])
        chunk = chunk[order]
        batches, mask = tr.batches, tr.mask
      else:
        batches = {n: np.zeros((k, 1, self.batch_size) + c.shape[1:], c.dtype)
                   for n, c in train_ds.columns.items()}
        mask = np.zeros((k, 1, self.batch_size), bool)
      slots = np.zeros(k, np.int64)
      slots[:chunk.size] = chunk
      keys = jax.vmap(lambda c: jax.random.fold_in(
          jax.random.key(self.seed), c))(slots)
      yield chunk, batches, mask, keys

  def adapt(self, start, train_ds: FederatedDataset, frozen=None,
            only: Optional[np.ndarray] = None):
    """Every client's adapted params, ``[train_ds.num_clients, ...]`` host
    arrays (of ``start``'s trainable part: adapters, not the frozen base):
    the same models `evaluate` tests, for evaluating them another way
    (with retrieval, `fedjax_pfi.retrieval`). Clients outside ``only`` or
    without training data keep ``start``."""
    n = train_ds.num_clients
    out = jax.tree.map(lambda p: np.broadcast_to(
        np.asarray(p), (n,) + np.shape(p)).copy(), start)
    ids = np.arange(n) if only is None else np.asarray(only)
    if not self.epochs:
      return out
    for chunk, batches, mask, keys in self._chunks(train_ds, ids):
      mine = jax.device_get(self._adapt(start, batches, mask, keys, frozen))
      trains = train_ds.client_sizes[chunk] > 0
      rows = chunk[trains]
      for o, m in zip(jax.tree.leaves(out), jax.tree.leaves(mine)):
        o[rows] = m[:chunk.size][trains]
    return out


def compare(personal: ClientMetrics, baseline: ClientMetrics,
            name: str, margin: float = 0.0,
            among: Optional[np.ndarray] = None) -> tuple[dict, np.ndarray]:
  """Per-client accuracy gains over ``baseline`` and who is hurt.

  A client is *hurt* when its personalized accuracy is below the baseline's
  by more than ``margin``. ``among``: an optional bool mask over
  ``personal.client_ids``; the metrics cover those clients only (the ones
  that took part in training: a client never sampled still holds its
  initial personal state, which says nothing about personalization).
  Returns ``(metrics, gain)``: ``gain`` per client of
  ``personal.client_ids``, and metrics ``vs_{name}/gain_mean``,
  ``.../gain_median``, ``.../gain_p10``, ``.../gain_worst``,
  ``.../hurt_fraction`` (the silent-failure rate) and ``.../helped_fraction``.
  """
  if not np.array_equal(personal.client_ids, baseline.client_ids):
    raise ValueError(f'{name}: the two evaluations cover different clients.')
  all_gains = personal.accuracy - baseline.accuracy
  gain = all_gains if among is None else all_gains[np.asarray(among, bool)]
  if not gain.size:
    return {}, all_gains
  p = f'vs_{name}/'
  return {p + 'gain_mean': float(gain.mean()),
          p + 'gain_median': float(np.median(gain)),
          p + 'gain_p10': float(np.percentile(gain, 10)),
          p + 'gain_worst': float(gain.min()),
          p + 'hurt_fraction': float(np.mean(gain < -margin)),
          p + 'helped_fraction': float(np.mean(gain > margin))}, all_gains


CLIENTS_FILE = 'clients_final.npz'


def save_clients(workdir: str, results: Mapping[str, ClientMetrics],
                 train_sizes: np.ndarray, sampled: np.ndarray,
                 offsets: Optional[np.ndarray] = None) -> str:
  """Writes each evaluation's per-client accuracy and loss (and NDCG@k for
  ranking models) atomically,
  with each client's training-set size and whether it was ever sampled
  (``sampled``: bool per client of the training population). With
  ``offsets`` (the evaluated dataset's), also each example's correct
  predictions and count (``example_correct``, ``example_count``,
  ``example_offsets``), so that two runs can be compared client by client
  with a paired test (`client_stats.significant`)."""
  arrays: dict[str, Any] = {}
  for name, m in results.items():
    if offsets is not None and m.rows is not None:
      arrays[f'{name}/example_correct'] = np.asarray(m.rows.correct,
                                                     np.float32)
      arrays[f'{name}/example_count'] = np.asarray(m.rows.count, np.float32)
      arrays[f'{name}/example_offsets'] = np.asarray(offsets, np.int64)
    arrays[f'{name}/sampled'] = np.asarray(sampled, bool)[m.client_ids]
    arrays[f'{name}/client_ids'] = m.client_ids
    arrays[f'{name}/accuracy'] = m.accuracy
    arrays[f'{name}/loss'] = m.loss
    if m.ndcg is not None:  # ranking models: accuracy is HR@k
      arrays[f'{name}/ndcg'] = m.ndcg / np.maximum(m.count, 1)
    arrays[f'{name}/count'] = m.count
    arrays[f'{name}/train_size'] = np.asarray(train_sizes)[m.client_ids]
  return save_arrays(os.path.join(workdir, CLIENTS_FILE), arrays)


def save_arrays(path: str, arrays: Mapping[str, Any]) -> str:
  """``np.savez`` of ``arrays``, atomically (a temporary file renamed)."""
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


def load_clients(workdir: str, file: str = CLIENTS_FILE
                 ) -> dict[str, dict[str, np.ndarray]]:
  """`save_clients`'s file: evaluation name -> field -> per-client array
  (``file``: another file of that layout, as the trust report's)."""
  path = os.path.join(workdir, file)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; a run writes it after '
                            'its final evaluation.')
  out: dict[str, dict[str, np.ndarray]] = {}
  with np.load(path, allow_pickle=False) as f:
    for key in f.files:
      name, field = key.rsplit('/', 1)
      out.setdefault(name, {})[field] = f[key]
  return out


def plot_run(workdir: str, rows: list, clients: Mapping[str, Mapping[str,
                                                                       Any]],
             title: str = '') -> list[str]:
  """PNG plots in ``workdir``; returns their paths.

  - ``accuracy_curves.png``: per-client mean and 10th-percentile test
    accuracy against the round (and the global model's, where evaluated);
  - ``client_accuracy.png``: the distribution of per-client accuracy at the
    end, for every evaluation in ``clients``;
  - ``gain_vs_size.png``: each client's gain over each baseline against its
    number of training examples (hurt clients below the zero line); its
    accuracy against its size where the run has no baseline. Where every
    accuracy is 0 or 1 (one test item per client) the mean over bins of
    clients of similar size instead.
  """
  paths = []
  evals = [r for r in rows if 'test/client_accuracy_mean' in r]
  fig, ax = subplots(figsize=(6, 4))
  for prefix, label in (('test/', 'personalized'), ('global/', 'global model'),
                        ('heldout/', 'held-out clients')):
    pts = [(r['round'], r[prefix + 'client_accuracy_mean'],
            r[prefix + 'client_accuracy_p10']) for r in evals
           if prefix + 'client_accuracy_mean' in r]
    if pts:
      x, mean, p10 = map(np.array, zip(*pts))
      line, = ax.plot(x, mean, label=f'{label}: mean')
      ax.plot(x, p10, '--', color=line.get_color(), label=f'{label}: p10')
  ax.set_xlabel('round')
  ax.set_ylabel('per-client test accuracy')
  ax.set_title(title or 'accuracy')
  ax.legend(fontsize=7)
  paths.append(save_figure(fig, workdir, 'accuracy_curves.png'))

  fig, ax = subplots(figsize=(6, 4))
  for name, c in clients.items():
    ax.hist(c['accuracy'], bins=20, range=(0, 1), histtype='step',
            label=f'{name} (n={len(c["accuracy"])})')
  ax.set_xlabel('client test accuracy')
  ax.set_ylabel('clients')
  ax.set_title(title or 'per-client accuracy')
  ax.legend(fontsize=7)
  paths.append(save_figure(fig, workdir, 'client_accuracy.png'))

  fig, ax = subplots(figsize=(6, 4))
  mine = clients.get('personalized')
  binary = is_binary(*(c['accuracy'] for c in clients.values()))
  binned = ' (mean of size bins)' if binary else ''
  for name, c in clients.items():
    if mine is None or name == 'personalized' or not np.array_equal(
        c['client_ids'], mine['client_ids']):
      continue
    plot_gain(ax, mine['train_size'], mine['accuracy'] - c['accuracy'],
              binary, s=8, label=f'over {name}')
  if ax.collections or ax.lines:
    ax.axhline(0.0, color='k', linewidth=0.8)
    ax.set_ylabel('accuracy gain of personalization' + binned)
    ax.legend(fontsize=7)
  elif mine is not None:  # no baseline in this run: accuracy against size
    plot_gain(ax, mine['train_size'], mine['accuracy'], binary, s=8)
    ax.set_ylabel('personalized accuracy' + binned + ' (no baseline in this '
                  'run; set personalization.local_epochs)', fontsize=7)
  ax.set_xscale('log')
  ax.set_xlabel('client training examples')
  ax.set_title(title or 'gain vs data size')
  paths.append(save_figure(fig, workdir, 'gain_vs_size.png'))
  return paths


def is_binary(*accuracies) -> bool:
  """Every client's accuracy is 0 or 1 (one test example per client, as
  leave-one-out recommendation): scatter plots of it say nothing."""
  return all(np.all((np.asarray(a) == 0) | (np.asarray(a) == 1))
             for a in accuracies)


def size_bins(sizes, values, num_bins: int = 8):
  """``(median size, mean value, clients)`` of each of ``num_bins`` bins of
  clients with about equal counts, by training-set size."""
  sizes, values = np.asarray(sizes), np.asarray(values, np.float64)
  order = np.argsort(sizes, kind='stable')
  parts = [p for p in np.array_split(order, min(num_bins, sizes.size))
           if p.size]
  return (np.array([np.median(sizes[p]) for p in parts]),
          np.array([values[p].mean() for p in parts]),
          np.array([p.size for p in parts]))


def plot_gain(ax, sizes, gain, binary: bool, **style):
  """Per-client gain against size: points, or for 0/1 accuracies the mean
  gain of equal-count size bins (a line)."""
  if binary:
    x, mean, _ = size_bins(sizes, gain)
    ax.plot(x, mean, marker=style.pop('marker', 'o'), markersize=4,
            **{k: v for k, v in style.items() if k != 's'})
  else:
    ax.scatter(sizes, gain, **style)


def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
  """``(figure, axes)`` as ``plt.subplots`` returns them, but on a bare
  ``matplotlib.figure.Figure``: no pyplot state, and the caller's backend is
  left alone (a notebook keeps showing its own plots inline)."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  squeeze = kwargs.pop('squeeze', True)
  fig = figure.Figure(**kwargs)
  return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig, workdir, name):
  """Writes ``fig`` to ``workdir/name`` (a PNG, 110 dpi) and returns the
  path."""
  path = os.path.join(workdir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def write_report(workdir: str, final: Mapping[str, float],
                 extra: Optional[Mapping] = None) -> str:
  """``report.json``: the final distribution, gains and silent failures,
  the privacy spent, and ``extra`` (the accountant's inputs)."""
  keep = {k: v for k, v in final.items()
          if k.startswith(('test/', 'val/', 'global/', 'local/', 'heldout/',
                           'heldout_adapted/', 'vs_', 'fedrap/', 'privacy/',
                           'private/', 'who_gets_hurt/', 'start/'))}
  keep.update(extra or {})
  path = os.path.join(workdir, 'report.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(keep, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)
  return path
