"""The trustworthiness report of a run: the failures an average hides.

`RunEvaluator` calls these on the per-client (and per-example) results of
an evaluation; each returns flat metrics named as the README's "What the
trust report measures" lists them:

- `compare`: against a reference model on the same test examples, who is
  hurt or helped *beyond noise* (a one-sided exact McNemar test per client
  on the discordant examples, `client_stats.significant`; a paired
  bootstrap of the per-example losses), the same for the smallest quartile
  of clients by training data, and how personalization changes the spread,
  the group gaps and the calibration;
- `describe`: one model's spread (`client_stats.spread`), group gaps
  (`client_stats.group_gap`) and expected calibration error;
- `base_task`: each personalized model's accuracy on a base task no client
  owns (alignment erosion);
- `canary_exposure`: the exposure of planted canaries (`canaries`);
- `who_gets_hurt`: rank correlations of the gains with client features;
- `private_estimates`: what a server sees of the gains through a DP
  histogram (`private_histogram`), charged to the run's accountant.

The inputs are `ClientMetrics`: per-client sums ``[clients]`` and
per-example rows (``rows``, one entry per test example, for the paired
tests); the outputs are flat ``{name: float}`` metrics (`compare`'s
`Comparison` also carries each client's ``gain``, ``hurt`` and ``helped``,
``[clients]``).

The unit of a paired test is the model's example: one prediction for a
classifier or a recommender's ranked list, a window of characters for a
language model (two models are compared by the number of a window's
characters each gets right). Characters of one window are not independent
draws, so testing them one by one would overstate significance; a window is
the honest unit, at the cost of power for clients with few windows.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from fedjax_pfi import client_stats
from fedjax_pfi import personalization
from fedjax_pfi import private_histogram
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.evaluation import ClientMetrics

SIZE_ATTRIBUTE = 'size'  # the built-in group: training-data quartile
#: The names of the ``'size'`` attribute's groups, training-data quartiles.
SIZE_BANDS = ('Q1 (smallest)', 'Q2', 'Q3', 'Q4 (largest)')


def attribute_names(ds: FederatedDataset) -> list[str]:
  """The client attributes ``evaluation.group_by`` can name for ``ds``."""
  return [SIZE_ATTRIBUTE] + sorted(ds.metadata.get('client_attributes', {}))


def client_attribute(ds: FederatedDataset, name: str,
                     train_sizes: np.ndarray) -> np.ndarray:
  """``[ds.num_clients]`` strings: each client's value of attribute
  ``name`` (``'size'``: its quartile of training examples, `SIZE_BANDS`)."""
  if name == SIZE_ATTRIBUTE:
    sizes = np.asarray(train_sizes, np.float64)
    ranks = np.argsort(np.argsort(sizes, kind='stable'), kind='stable')
    band = (4 * ranks) // max(sizes.size, 1)
    return np.asarray(SIZE_BANDS)[np.minimum(band, 3)]
  table = ds.metadata.get('client_attributes', {})
  if name not in table:
    raise ValueError(
        f'evaluation.group_by names {name!r}, which is not a client '
        f'attribute of this dataset; accepted: '
        f'{", ".join(attribute_names(ds))}.')
  values = table[name]
  missing = [n for n in ds.client_names if str(n) not in values]
  if missing:
    raise ValueError(f'client attribute {name!r} has no value for '
                     f'{len(missing)} client(s), e.g. {missing[0]!r}.')
  return np.asarray([values[str(n)] for n in ds.client_names])


def check_groups(ds: FederatedDataset, names: Sequence[str],
                 train_sizes: np.ndarray) -> dict[str, np.ndarray]:
  """Each named attribute per client, refusing one with a single value."""
  out = {}
  for name in names:
    values = client_attribute(ds, name, train_sizes)
    distinct = np.unique(values[ds.client_sizes > 0])
    if distinct.size < 2:
      raise ValueError(
          f'evaluation.group_by={name!r} has {distinct.size} value(s) '
          f'({", ".join(map(str, distinct))}) among the evaluated clients; '
          'a group gap needs at least 2.')
    out[name] = values
  return out


def _segments(m: ClientMetrics, ds: FederatedDataset, values: np.ndarray
              ) -> np.ndarray:
  """Per evaluated client, the sum of a per-row array over its rows."""
  return np.add.reduceat(values, ds.offsets[m.client_ids]) if values.size \
      else np.zeros(m.client_ids.size)


def discordant(mine: ClientMetrics, ref: ClientMetrics, ds: FederatedDataset
               ) -> tuple[np.ndarray, np.ndarray]:
  """Per client, ``(worse, better)``: its test examples on which ``mine``
  gets fewer (more) predictions right than ``ref``."""
  if mine.rows is None or ref.rows is None:
    raise ValueError('a paired test needs per-example results of both '
                     'evaluations.')
  diff = mine.rows.correct - ref.rows.correct
  return (_segments(mine, ds, (diff < 0).astype(np.float64)).astype(np.int64),
          _segments(mine, ds, (diff > 0).astype(np.float64)).astype(np.int64))


def loss_hurt_p(mine: ClientMetrics, ref: ClientMetrics, ds: FederatedDataset,
                num_resamples: int, seed: int) -> np.ndarray:
  """Per client, the paired-bootstrap p-value that its per-example mean
  loss is higher under ``mine`` (`client_stats.paired_bootstrap_p_segments`,
  every client in one pass)."""
  def per(r):
    return r.loss_sum / np.maximum(r.count, 1)

  # Clients without test rows have empty segments (p = 1), and every
  # client with rows is evaluated: index the population's p-values.
  return client_stats.paired_bootstrap_p_segments(
      per(mine.rows), per(ref.rows), ds.offsets,
      num_resamples=num_resamples, seed=seed)[mine.client_ids]


def client_ece(m: ClientMetrics) -> Optional[np.ndarray]:
  """Per-client expected calibration error (15 bins); None without
  calibration sums."""
  if m.confidence is None:
    return None
  c = np.asarray(m.confidence, np.float64)
  n = c[:, :, 0].sum(1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(n > 0, np.abs(c[:, :, 1] - c[:, :, 2]).sum(1) / n,
                    np.nan)


def describe(m: ClientMetrics, prefix: str,
             groups: Mapping[str, np.ndarray]) -> dict[str, float]:
  """One model's ``spread/…``, ``group_gap/…`` and ``calibration/…``."""
  acc = m.accuracy
  out = {f'{prefix}spread/{k}': v for k, v in client_stats.spread(acc).items()}
  for name, values in groups.items():
    g = client_stats.group_gap(acc, values[m.client_ids], name)
    out[f'{prefix}group_gap/{name}'] = g['gap']
    for k, v in g['means'].items():
      out[f'{prefix}group_gap/{name}/{k}'] = v
  ece = client_ece(m)
  if ece is not None:
    out[f'{prefix}calibration/ece_mean'] = float(np.nanmean(ece))
    out[f'{prefix}calibration/ece_p90'] = float(np.nanpercentile(ece, 90))
    out[f'{prefix}calibration/ece_pooled'] = client_stats.ece(
        *m.confidence.sum(0).T)
  return out


def small_clients(train_sizes: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Bool over ``ids``: in the smallest quartile by training examples."""
  sizes = np.asarray(train_sizes)[ids]
  return sizes <= np.percentile(sizes, 25) if sizes.size else sizes.astype(
      bool)


class Comparison(dict):
  """`compare`'s metrics; ``.gain``, ``.hurt``, ``.helped``: per client of
  ``mine.client_ids`` (every evaluated client; the metrics cover
  ``among``)."""
  gain: np.ndarray
  hurt: np.ndarray
  helped: np.ndarray


def compare(name: str, mine: ClientMetrics, ref: ClientMetrics,
            ds: FederatedDataset, *, alpha: float, margin: float,
            among: np.ndarray, train_sizes: np.ndarray,
            groups: Mapping[str, np.ndarray], num_resamples: int = 1000,
            seed: int = 0) -> Comparison:
  """``vs_{name}/…``: significant hurt and help, small clients, and the
  change of spread, group gaps and calibration from ``ref`` to ``mine``."""
  if not np.array_equal(mine.client_ids, ref.client_ids):
    raise ValueError(f'{name}: the two evaluations cover different clients.')
  among = np.asarray(among, bool)
  worse, better = discordant(mine, ref, ds)
  hurt, helped = client_stats.significant(worse, better, alpha)
  gain = mine.accuracy - ref.accuracy
  out = Comparison()
  out.gain, out.hurt, out.helped = gain, hurt, helped
  if not among.any():
    return out
  p = f'vs_{name}/'
  loss_p = loss_hurt_p(mine, ref, ds, num_resamples, seed)
  out.update({p + 'hurt_significant_fraction': float(hurt[among].mean()),
              p + 'helped_significant_fraction': float(helped[among].mean()),
              p + 'loss_hurt_significant_fraction': float(
                  (loss_p[among] < alpha).mean()),
              p + 'discordant_mean': float((worse + better)[among].mean())})
  small = small_clients(train_sizes, mine.client_ids) & among
  if small.any():
    q = p + 'small_clients/'
    out.update({q + 'hurt_fraction': float(np.mean(gain[small] < -margin)),
                q + 'hurt_significant_fraction': float(hurt[small].mean()),
                q + 'helped_significant_fraction': float(helped[small].mean()),
                q + 'gain_mean': float(gain[small].mean()),
                q + 'num_clients': int(small.sum())})
  a = client_stats.spread(mine.accuracy[among])
  b = client_stats.spread(ref.accuracy[among])
  for k in a:
    out[f'{p}spread_change/{k}'] = a[k] - b[k]
  for g, values in groups.items():
    v = values[mine.client_ids][among]
    if np.unique(v).size < 2:
      continue
    out[f'{p}group_gap_change/{g}'] = (
        client_stats.group_gap(mine.accuracy[among], v, g)['gap'] -
        client_stats.group_gap(ref.accuracy[among], v, g)['gap'])
  ea, eb = client_ece(mine), client_ece(ref)
  if ea is not None and eb is not None:
    out[p + 'calibration/ece_change_mean'] = float(
        np.nanmean(ea[among]) - np.nanmean(eb[among]))
    # growing confident while getting worse: ECE up and accuracy down
    out[p + 'calibration/worse_and_less_calibrated_fraction'] = float(
        np.mean(((ea > eb) & hurt)[among]))
  return out


def client_features(train: FederatedDataset, times_sampled: np.ndarray,
                    ranking: bool) -> dict[str, np.ndarray]:
  """Per training client: ``train_size``, the entropy (bits) of its
  targets (characters, labels; a recommender's positive items),
  ``divergence`` (Jensen-Shannon distance of its target distribution from
  the population's) and ``times_sampled``."""
  target = np.asarray(train.columns['x'][:, 0] if ranking else
                      train.columns['y'])
  owner = np.repeat(np.arange(train.num_clients), train.client_sizes)
  owner = np.broadcast_to(owner.reshape((-1,) + (1,) * (target.ndim - 1)),
                          target.shape).ravel()
  t = target.ravel().astype(np.int64)
  pad = train.metadata.get('pad_id')
  keep = t != pad if pad is not None and not ranking else np.ones_like(
      t, bool)
  t, owner = t[keep], owner[keep]
  k = int(t.max()) + 1 if t.size else 1
  counts = np.zeros((train.num_clients, k))
  np.add.at(counts, (owner, t), 1.0)
  pop = counts.sum(0) / max(counts.sum(), 1)
  probs = counts / np.maximum(counts.sum(1, keepdims=True), 1)

  def entropy(p):
    with np.errstate(divide='ignore', invalid='ignore'):
      return -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), -1)

  mid = (probs + pop) / 2
  js = entropy(mid) - (entropy(probs) + entropy(pop)) / 2
  return {'train_size': train.client_sizes.astype(np.float64),
          'entropy': entropy(probs),
          'divergence': np.sqrt(np.maximum(js, 0.0)),
          'times_sampled': np.asarray(times_sampled, np.float64)}


def who_gets_hurt(name: str, comparison: Comparison, ids: np.ndarray,
                  among: np.ndarray, features: Mapping[str, np.ndarray]
                  ) -> dict[str, float]:
  """``who_gets_hurt/vs_{name}/{feature}/rho_gain`` (Spearman's rho of the
  gain with the feature, and its p-value ``p_gain``) and ``rho_hurt``,
  ``p_hurt`` for the significant-hurt indicator."""
  among = np.asarray(among, bool)
  feats = {k: np.asarray(v)[ids][among] for k, v in features.items()}
  out = {}
  for outcome, y in (('gain', comparison.gain[among]),
                     ('hurt', comparison.hurt[among].astype(np.float64))):
    for k, r in client_stats.rank_correlations(y, feats).items():
      out[f'who_gets_hurt/vs_{name}/{k}/rho_{outcome}'] = r['rho']
      out[f'who_gets_hurt/vs_{name}/{k}/p_{outcome}'] = r['p']
  return out


def base_task(prefix: str, mine: ClientMetrics, start: ClientMetrics,
              global_model: Optional[ClientMetrics], *, margin: float,
              alpha: float) -> dict[str, float]:
  """``{prefix}base_task/…``: each personalized model's accuracy on the
  base task (``mine.probes['base_task']``, per client), its drop from the
  starting model's (``start``, one model), and from the global model's;
  ``eroded_fraction``: clients whose model lost more than ``margin``;
  ``eroded_significant_fraction``: worse than the start by the exact
  McNemar test on the base task's windows at ``alpha``."""
  def acc(r):
    return r.correct.sum(-1) / np.maximum(r.count.sum(-1), 1)

  p = prefix + 'base_task/'
  rows, s = mine.probes['base_task'], start.probes['base_task']
  a, a0 = acc(rows), float(acc(s)[0])
  drop = a0 - a
  diff = rows.correct - s.correct[:1]
  hurt, _ = client_stats.significant((diff < 0).sum(-1), (diff > 0).sum(-1),
                                     alpha)
  out = {p + 'start_accuracy': a0, p + 'accuracy_mean': float(a.mean()),
         p + 'drop_mean': float(drop.mean()),
         p + 'drop_median': float(np.median(drop)),
         p + 'drop_p90': float(np.percentile(drop, 90)),
         p + 'drop_max': float(drop.max()),
         p + 'eroded_fraction': float(np.mean(drop > margin)),
         p + 'eroded_significant_fraction': float(hurt.mean()),
         p + 'num_clients': int(a.size)}
  if global_model is not None:
    g = float(acc(global_model.probes['base_task'])[0])
    out[p + 'global_accuracy'] = g
    out[p + 'drop_vs_global_mean'] = float((g - a).mean())
    out[p + 'eroded_vs_global_fraction'] = float(np.mean(g - a > margin))
  return out


def canary_exposure(prefix: str, m: ClientMetrics, canaries,
                    holders: Optional[np.ndarray] = None) -> dict[str, float]:
  """``{prefix}canary/exposure_…`` from ``m.probes['canaries']``: per
  canary its exposure (`client_stats.exposure`) under the model of the
  client that holds it (``holders``: ``m.client_ids`` index per canary;
  None: ``m`` is one shared model), and the mean under the other clients'
  models (``exposure_others_mean``, the control)."""
  scores = m.probes['canaries'].loss_sum  # [clients, canaries * (1 + R)]
  r1 = canaries.candidates + 1
  out, own, others = {}, [], []
  for j in range(canaries.num):
    block = scores[:, j * r1:(j + 1) * r1]
    exp = np.array([client_stats.exposure(b[0], b[1:]) for b in block])
    if holders is None:
      own.append(exp[0])
    else:
      own.append(exp[holders[j]])
      others.extend(np.delete(exp, holders[j]).tolist())
    out[f'{prefix}canary/exposure_{j}'] = float(own[-1])
  out[f'{prefix}canary/exposure_mean'] = float(np.mean(own))
  out[f'{prefix}canary/exposure_max_possible'] = math.log2(r1)
  if others:
    out[f'{prefix}canary/exposure_others_mean'] = float(np.mean(others))
  return out


def parse_epsilons(text: str) -> list[float]:
  """``'1,4,inf'`` -> ``[1.0, 4.0, inf]``, each > 0."""
  out = []
  for part in str(text).split(','):
    part = part.strip()
    if not part:
      continue
    try:
      e = float(part)
    except ValueError as err:
      raise ValueError(f'evaluation.private_epsilons has {part!r}, not a '
                       "number; give e.g. '1,4,inf'.") from err
    if not e > 0:
      raise ValueError(f'evaluation.private_epsilons has {e}; each must be '
                       '> 0 (inf: no noise).')
    out.append(e)
  return out


def release_epsilon(z: float, delta: float, accounting=None,
                    rounds: int = 0) -> float:
  """The run's epsilon at ``delta`` once the gain histogram (one Gaussian
  of multiplier ``z`` on a one-hot sum, sensitivity 1 under
  add-or-remove-one) is charged after ``rounds`` rounds of the training's
  `privacy.Accounting` (None: training was not private, so the run's
  epsilon is inf unless there is no training to account). PLD for Poisson
  training, RDP for fixed-size (replace-one; the one-hot moves by
  sqrt(2))."""
  import dp_accounting  # pylint: disable=g-import-not-at-top
  from dp_accounting.pld import pld_privacy_accountant  # pylint: disable=g-import-not-at-top
  if accounting is None:
    return math.inf if rounds else private_histogram.gaussian_epsilon(
        z, delta)
  if z == 0:
    return math.inf
  if accounting.sampling == 'poisson':
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(accounting.event(rounds))
    acc.compose(dp_accounting.GaussianDpEvent(z))
    return float(acc.get_epsilon(delta))
  acc = accounting.rdp_accountant()
  acc.compose(accounting.event(rounds))
  acc.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(2)))
  return float(acc.get_epsilon(delta))


def private_estimates(name: str, gain: np.ndarray, among: np.ndarray, *,
                      epsilons: Sequence[float], mechanism: str, delta: float,
                      seed: int, groups: Mapping[str, np.ndarray],
                      ids: np.ndarray, accounting=None, rounds: int = 0
                      ) -> dict[str, float]:
  """``private/vs_{name}/…``: the hurt fraction and the gains' std that a
  server estimates from the DP gain histogram at each epsilon, beside the
  true values; per group, the mean gain from one histogram over
  (group, bin) cells (each client adds to one cell: sensitivity 1, the
  same epsilon); the run's epsilon with the release charged; and
  `private_histogram.clients_to_see` for a 20% hurt fraction."""
  among = np.asarray(among, bool)
  g = gain[among]
  if not g.size:
    return {}
  edges = private_histogram.GAIN_EDGES
  k = edges.size - 1
  bins = private_histogram.bin_of(g)
  centres = np.clip((edges[:-1] + edges[1:]) / 2, -1, 1)
  p = f'private/vs_{name}/'
  out = {p + 'true_hurt_fraction': float(np.mean(g < 0)),
         p + 'true_std': float(g.std()), p + 'clients': int(g.size)}
  for i, eps in enumerate(epsilons):
    rng = np.random.default_rng([seed, i, 0xF0A])
    rel = private_histogram.release(bins, k, mechanism, eps, delta, rng)
    q = f'{p}eps{eps:g}/'
    out[q + 'hurt_fraction'] = private_histogram.hurt_fraction(rel.counts)
    out[q + 'std'] = private_histogram.spread_std(rel.counts)
    if mechanism == 'gaussian':
      z = private_histogram.calibrate_gaussian(eps, delta)
      out[q + 'noise_multiplier'] = z
      out[q + 'run_epsilon'] = release_epsilon(z, delta, accounting, rounds)
    out[q + 'clients_to_see_20pct_hurt'] = private_histogram.clients_to_see(
        0.2, eps, mechanism, delta=delta)
    for attr, values in groups.items():
      v = values[ids][among]
      names = np.unique(v)
      if names.size < 2:
        continue
      cell = np.searchsorted(names, v) * k + bins
      grel = private_histogram.release(cell, names.size * k, mechanism, eps,
                                       delta, np.random.default_rng(
                                           [seed, i, 0x6A9]))
      est = np.maximum(grel.counts.reshape(names.size, k), 0.0)
      for j, n in enumerate(names):
        tot = est[j].sum()
        out[f'{q}group_gain/{attr}/{n}'] = float(
            est[j] @ centres / tot) if tot > 0 else float('nan')
        if i == 0:
          out[f'{p}true_group_gain/{attr}/{n}'] = float(g[v == n].mean())
  return out


CLIENTS_FILE = 'clients_trust.npz'


def plot_report(workdir: str, clients: Mapping[str, Mapping[str, np.ndarray]],
                mine: ClientMetrics, title: str = '') -> list[str]:
  """The trust report's PNGs in ``workdir``; returns their paths.

  - ``gain_histogram.png``: per reference, the per-client gains (clients
    that trained), stacked by the paired test's verdict: significantly
    hurt, significantly helped, neither;
  - ``group_gap.png``: per group attribute, each group's mean accuracy
    under the personalized model and under each reference.
  """
  paths = []
  refs = [k for k in clients if k.startswith('vs_')]
  if refs:
    fig, axes = personalization.subplots(1, len(refs), figsize=(5 * len(refs), 3.6),
                             squeeze=False)
    for ax, name in zip(axes[0], refs):
      c = clients[name]
      keep = c['sampled'].astype(bool)
      gain = c['gain'][keep]
      hurt = c['hurt_significant'][keep].astype(bool)
      helped = c['helped_significant'][keep].astype(bool)
      lo, hi = min(gain.min(), -0.05), max(gain.max(), 0.05)
      bins = np.linspace(lo, hi, 31)
      ax.hist([gain[hurt], gain[~hurt & ~helped], gain[helped]], bins=bins,
              stacked=True, color=['tab:red', 'lightgrey', 'tab:green'],
              label=[f'hurt (significant): {hurt.sum()}',
                     f'neither: {(~hurt & ~helped).sum()}',
                     f'helped (significant): {helped.sum()}'])
      ax.axvline(0.0, color='k', linewidth=0.8)
      ax.set_xlabel(f'accuracy gain over the {name[3:]} model')
      ax.set_ylabel('clients')
      ax.set_title(title, fontsize=9)
      ax.legend(fontsize=7)
    paths.append(personalization.save_figure(fig, workdir,
                                             'gain_histogram.png'))
  groups = clients.get('groups', {})
  if groups and refs:
    fig, axes = personalization.subplots(1, len(groups), figsize=(5 * len(groups), 3.6),
                             squeeze=False)
    for ax, (attr, values) in zip(axes[0], groups.items()):
      v = values[mine.client_ids]
      names = np.unique(v)
      models = [('personalized', mine.accuracy)] + [
          (n[3:], mine.accuracy - clients[n]['gain']) for n in refs]
      width = 0.8 / len(models)
      for i, (label, a) in enumerate(models):
        ax.bar(np.arange(names.size) + i * width,
               [a[v == n].mean() for n in names], width, label=label)
      ax.set_xticks(np.arange(names.size) + 0.4 - width / 2)
      ax.set_xticklabels(names, fontsize=7, rotation=20)
      ax.set_ylabel('mean client accuracy')
      ax.set_title(f'{title}: by {attr}', fontsize=9)
      ax.legend(fontsize=7)
    paths.append(personalization.save_figure(fig, workdir, 'group_gap.png'))
  return paths

