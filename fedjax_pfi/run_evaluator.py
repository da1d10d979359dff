"""A run's evaluation (`RunEvaluator`): each client's own model on its own
test data, against the global model and against training alone, and the
held-out clients, as per-client distributions; the final report's files."""

from __future__ import annotations

import math
import os
import time
from typing import Optional

from absl import logging
import jax
import numpy as np

from fedjax_pfi import attacks
from fedjax_pfi import evaluation
from fedjax_pfi import participation
from fedjax_pfi import personalization
from fedjax_pfi import reference_cache
from fedjax_pfi import trust
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.metrics_io import read_metrics

# Each evaluated model's metric prefix.
RESULT_PREFIX = {'personalized': 'test/', 'global': 'global/',
                 'local': 'local/', 'start': 'start/'}


class RunEvaluator:
  """A run's evaluation: who personalization helps and whom it hurts.

  Every evaluation reports, on each training client's own test data:

  - ``test/``: the personalized model of each client (its personal state,
    or the global model fine-tuned on its training data for algorithms with
    ``finetune``; the global model for plain FedAvg);
  - ``global/``: the global model, where the algorithm has one and
    personalizes it, with ``vs_global/`` per-client gains and the fraction
    of clients it hurts (`personalization.compare`);
  - ``local/``: with ``personalization.local_epochs`` > 0, each client's
    model trained on its own data alone from the initial params (computed
    once, a pure function of the config), with ``vs_local/`` gains;
  - ``heldout/``: clients never seen in training, with the model a new
    client starts from, and ``heldout_adapted/`` after
    ``personalization.finetune_epochs`` epochs on their own adaptation data;
  - ``start/``: with ``evaluation.vs_start``, the model the run started
    from (the pretrained one: no fine-tuning), with ``vs_start/`` gains;
  - ``trainset/`` with ``eval_train``;
  - ``val/``: the personalized models on each client's validation split,
    where the data has one (MovieLens' second-latest item;
    ``data.val_fraction``), for choosing hyperparameters without the test
    split.

  With each, the trust report (`fedjax_pfi.trust`): per-client paired
  tests against each reference (``vs_*/hurt_significant_fraction``, …,
  ``vs_*/small_clients/…``), each model's ``spread/…``, ``group_gap/…``
  and ``calibration/…``; at the final evaluation also ``base_task/…``,
  ``canary/…``, ``who_gets_hurt/…`` and the DP estimates ``private/…``
  (``evaluation.*`` options). A metric that is undefined (a constant
  feature's correlation) is left out rather than written as NaN.

  Each is the distribution of per-client accuracy (`evaluation.summarize`)
  over every client with test data; the gains and hurt fractions cover the
  clients sampled so far (``test/never_sampled_fraction`` says how many are
  left out: they still hold their initial personal state).
  ``last`` keeps the per-client results of the latest evaluation for the
  final report.
  """

  def __init__(self, exp, initial_params, frozen,
               workdir: Optional[str] = None):
    c = exp.config
    self.exp = exp
    self.workdir = workdir  # where the retrieval stores are kept
    model = exp.algorithm.eval_model or exp.model
    self.evaluator = evaluation.Evaluator(
        model, c.eval_batch_size, c.eval_clients_per_chunk,
        combine=exp.algorithm.combine)
    pc = c.personalization
    opt = client_updates.client_optimizer(
        c.client.optimizer, c.client.learning_rate, momentum=c.client.momentum,
        lr_scales=c.client.lr_scales)
    def adapter(epochs, opt=opt):
      return personalization.Adapter(
          model, opt, epochs=epochs, batch_size=c.client.batch_size,
          clients_per_chunk=c.eval_clients_per_chunk,
          eval_batch_size=c.eval_batch_size, seed=c.seed)

    ft_opt = opt if not exp.algorithm.finetune_lr else \
        client_updates.client_optimizer(
            c.client.optimizer, exp.algorithm.finetune_lr,
            momentum=c.client.momentum, lr_scales=c.client.lr_scales)
    self.finetuner = adapter(int(pc.finetune_epochs), ft_opt)
    self.local_epochs = int(pc.local_epochs)
    self.margin = float(pc.hurt_margin)
    self._local_adapter = adapter(self.local_epochs) if self.local_epochs \
        else None
    if exp.algorithm.clusters:  # one of the k models
      initial_params = jax.tree.map(lambda p: p[0], initial_params)
    self._initial = initial_params if self.local_epochs else None
    self._frozen = frozen
    ec = c.evaluation
    self._cache_dir = str(ec.get('reference_cache', '') or '')
    self.alpha = float(ec.alpha)
    names = [g.strip() for g in str(ec.group_by).split(',') if g.strip()]
    self.groups = trust.check_groups(exp.splits.test, names,
                                     exp.splits.train.client_sizes)
    self.epsilons = trust.parse_epsilons(ec.private_epsilons)
    self.probes = {}
    if getattr(exp, 'base_task', None) is not None:
      self.probes['base_task'] = evaluation.make_probe(exp.base_task)
    self.attack = getattr(exp, 'attack', None)
    if self.attack is not None and self.attack.name == 'backdoor':
      self.probes['backdoor'] = evaluation.make_probe(attacks.backdoor_probe(
          exp.splits.test, self.attack, int(c.attack.probe_examples), c.seed,
          c.data.get('tokenizer', None) or 'char'))
    self.canaries = getattr(exp, 'canaries', None)
    if self.canaries is not None:
      self.probes['canaries'] = evaluation.make_probe(self.canaries.probe)
    # The model a run starts from (the pretrained one): the base task's
    # reference, and with evaluation.vs_start the "no fine-tuning" one.
    self.vs_start = bool(ec.vs_start)
    keep = bool(self.probes) or self.vs_start
    self._start = initial_params if keep else None
    self._start_evaluator = evaluation.Evaluator(
        exp.model, c.eval_batch_size, c.eval_clients_per_chunk) \
        if keep else None
    self._start_metrics = None
    self._local = None
    self.retrieval = None  # built at the first final evaluation
    if c.retrieval.mode != 'none':
      from fedjax_pfi import retrieval  # pylint: disable=g-import-not-at-top
      # before the first round: tuning needs a validation split
      retrieval.check_config(c.retrieval,
                             val_examples=exp.splits.val.num_examples)
      if exp.algorithm.clusters:
        raise ValueError(
            f'retrieval.mode={c.retrieval.mode!r} with the clustered '
            f'algorithm {c.algorithm!r}: each client reads with the cluster '
            'model it picks, which retrieval does not support yet; use '
            "retrieval.mode='none'.")
      # The retriever: the frozen foundation model the run starts from.
      self._retriever_params = (initial_params['base'] if isinstance(
          initial_params, dict) and 'base' in initial_params else
                                initial_params)
    self.last: dict = {}
    self.last_sampled = np.zeros(exp.splits.train.num_clients, bool)

  def _trainable(self, full, mode: str):
    """``(start, frozen)``: what adaptation trains, and the rest."""
    if mode == 'all' or self._frozen is None or not jax.tree.leaves(
        self._frozen):
      return full, None
    paths = set(param_groups.leaf_paths(self._frozen))
    return (param_groups.select(full, lambda p: p not in paths),
            self._frozen)

  def _adapt(self, adapter, full, mode, train, test):
    start, frozen = self._trainable(full, mode)
    if not jax.tree.leaves(start):  # nothing a client could adapt
      return self.evaluator.evaluate(full, test)
    return adapter.evaluate(start, train, test, frozen)

  def _best_cluster(self, clusters, train, test):
    """Each client with the cluster model of lowest loss on ``train``."""
    k = jax.tree.leaves(clusters)[0].shape[0]
    models = [jax.tree.map(lambda p, j=j: p[j], clusters) for j in range(k)]
    on_train = [self.evaluator.evaluate(m, train) for m in models]
    on_test = [self.evaluator.evaluate(m, test) for m in models]
    ids = on_test[0].client_ids
    loss = np.stack([np.full(train.num_clients, np.inf)] * k)
    for j, m in enumerate(on_train):
      loss[j, m.client_ids] = m.loss
    pick = np.argmin(loss[:, ids], axis=0)
    if test is self.exp.splits.test:  # for the probes of the final report
      self._cluster_pick = np.zeros(test.num_clients, np.int64)
      self._cluster_pick[ids] = pick
    return evaluation.select(on_test, pick, test)

  def sampled(self, rounds_done: int) -> np.ndarray:
    """Bool per training client: sampled in one of the first rounds."""
    return participation.ever_sampled(
        self.exp.config, self.exp.splits.train.num_clients, rounds_done,
        getattr(self.exp, 'devices', None))

  def __call__(self, view, rounds_done: Optional[int] = None
               ) -> dict[str, float]:
    """The metrics of one evaluation; ``rounds_done`` (default: all of
    ``config.rounds``) says which clients have trained: the gains and
    hurt fractions cover those only. The last round's evaluation adds the
    final report's diagnostics (base task, canaries, who gets hurt, the
    private estimates)."""
    t0 = time.perf_counter()
    exp, ev, alg = self.exp, self.evaluator, self.exp.algorithm
    splits = exp.splits
    rounds_done = exp.config.rounds if rounds_done is None else rounds_done
    final = rounds_done >= exp.config.rounds
    self.last_sampled = self.sampled(rounds_done)
    personalizes = view.personal is not None or bool(alg.finetune)

    def own(ds, train=splits.train):  # each client with its own params
      if view.clusters is not None:
        return self._best_cluster(view.clusters, train, ds)
      if alg.finetune:
        return self._adapt(self.finetuner, view.params, alg.finetune,
                           splits.train, ds)
      if view.personal is None:
        return ev.evaluate(view.params, ds)
      return ev.evaluate(view.shared, ds, personal_params=view.personal)

    mine = own(splits.test)
    results = {'personalized': mine}
    if splits.val.num_examples:  # each client's own validation data: tune here
      out_val = evaluation.summarize(own(splits.val), 'val/')
    else:
      out_val = {}
    among = self.last_sampled[mine.client_ids]
    out = evaluation.summarize(mine, 'test/')
    out.update(out_val)
    out['test/never_sampled_fraction'] = float(1.0 - among.mean())
    if splits.metadata.get('task') == 'ranking':  # HR@k of a random order
      # (``y``: the candidates; ``x`` may hold a history before them)
      out['test/random_baseline'] = float(splits.metadata['top_k']) / \
          splits.test.columns['y'].shape[-1]
    else:
      out['test/majority_baseline'] = evaluation.majority_baseline(
          splits.train, splits.test, splits.metadata.get('pad_id'))
    if personalizes and alg.has_global_model:
      results['global'] = ev.evaluate(view.params, splits.test)
      out.update(evaluation.summarize(results['global'], 'global/'))
      out.update(personalization.compare(mine, results['global'], 'global',
                                         self.margin, among)[0])
    if self.local_epochs:
      if self._local is None:  # depends on the config only: computed once
        self._local = self._local_reference()
      results['local'] = self._local
      out.update(evaluation.summarize(self._local, 'local/'))
      out.update(personalization.compare(mine, self._local, 'local',
                                         self.margin, among)[0])
    if self.vs_start:  # the starting (pretrained) model: no fine-tuning
      if self._start_metrics is None:
        self._start_metrics = self._start_evaluator.evaluate(self._start,
                                                             splits.test)
      results['start'] = self._start_metrics
      out.update(evaluation.summarize(self._start_metrics, 'start/'))
      out.update(personalization.compare(mine, self._start_metrics, 'start',
                                         self.margin, among)[0])
    if exp.config.eval_train:  # the FedProx paper's "training loss"
      out.update(evaluation.summarize(own(splits.train), 'trainset/'))
    if splits.heldout_test is not None and view.clusters is not None:
      if splits.heldout_train is not None:  # choose a cluster by own data
        out.update(evaluation.summarize(
            own(splits.heldout_test, splits.heldout_train), 'heldout/'))
    elif splits.heldout_test is not None:
      out.update(evaluation.summarize(
          ev.evaluate(view.params, splits.heldout_test), 'heldout/'))
      if self.finetuner.epochs and splits.heldout_train is not None:
        adapted = self._adapt(self.finetuner, view.params,
                              alg.finetune or 'trainable',
                              splits.heldout_train, splits.heldout_test)
        out.update(evaluation.summarize(adapted, 'heldout_adapted/'))
    if self.attack is not None:
      out.update(attack_metrics(results, self.attack.malicious))
    if final and exp.config.retrieval.mode != 'none':
      out.update(self._retrieval(view, mine, among))
    t1 = time.perf_counter()
    comparisons = self._report(results, among, out)
    t2 = time.perf_counter()
    if final:
      out.update(self._final_report(view, results, comparisons, among,
                                    rounds_done))
    t3 = time.perf_counter()
    self.last = results
    self.comparisons = comparisons
    out = {k: v for k, v in out.items()
           if not (isinstance(v, float) and math.isnan(v))}
    out['time/eval_s'] = t1 - t0
    out['time/report_s'] = t2 - t1  # the statistics of the trust report
    if final:
      out['time/final_report_s'] = t3 - t2  # base task, canaries, DP, ...
    return out

  def _retrieval(self, view, mine, among) -> dict:
    """``retrieval/…``: each client's own model (as ``test/``) reading
    from its private store, on its test data, against the same model
    without retrieval (``vs_no_retrieval/…``, the trust report's paired
    tests), and the stores' cost (`fedjax_pfi.retrieval`)."""
    from fedjax_pfi import retrieval  # pylint: disable=g-import-not-at-top
    exp, c = self.exp, self.exp.config
    splits, alg = exp.splits, exp.algorithm
    if self.retrieval is None:
      self.retrieval = retrieval.Retrieval(
          c.retrieval, exp.base_model, self._retriever_params, splits.train,
          splits.metadata, batch_size=c.eval_batch_size,
          clients_per_chunk=min(8, c.eval_clients_per_chunk),
          directory=None if self.workdir is None else os.path.join(
              self.workdir, 'retrieval_store'))
    r = self.retrieval
    reader = alg.eval_model or exp.model
    if alg.finetune:  # each client's fine-tuned model, as ``test/``
      start, frozen = self._trainable(view.params, alg.finetune)
      adapted = self.finetuner.adapt(start, splits.train, frozen)
      kw = dict(personal=adapted, combine=(
          param_groups.merge if frozen is not None else None))
      params = frozen
    elif view.personal is not None:
      kw = dict(personal=view.personal, combine=alg.combine)
      params = view.shared
    else:
      kw, params = {}, view.params
    t0 = time.perf_counter()
    if c.retrieval.tune != 'none':
      got, out = r.tuned(reader, params, splits.val, splits.test, **kw)
    else:
      got, out = r.evaluate(reader, params, splits.test, **kw), {}
    out['retrieval/eval_s'] = time.perf_counter() - t0  # compiles included
    out.update(evaluation.summarize(got, 'retrieval/test/'))
    out.update(r.metrics())
    t0 = time.perf_counter()  # warm: one evaluation at retrieval.k, lambda
    r.evaluate(reader, params, splits.test, **kw)
    out['retrieval/query_ms'] = 1e3 * (time.perf_counter() - t0) / max(
        float(got.count.sum()), 1.0)
    out['retrieval/search_s'] = r.search_seconds(splits.test)
    out.update(trust.compare(
        'no_retrieval', got, mine, splits.test, alpha=self.alpha,
        margin=self.margin, among=among,
        train_sizes=splits.train.client_sizes, groups=self.groups,
        num_resamples=int(c.evaluation.bootstrap_resamples), seed=c.seed))
    return out

  def _local_reference(self):
    """Each client's model trained on its own data alone from the initial
    params, on its test data; read from ``evaluation.reference_cache``
    when a run with the same inputs wrote it there (`reference_cache`)."""
    exp, c = self.exp, self.exp.config
    splits, alg = exp.splits, exp.algorithm
    # What this algorithm's clients may train: FedBABU's frozen head too,
    # but never a foundation model's base.
    mode = alg.finetune or 'trainable'
    def compute():
      return self._adapt(self._local_adapter, self._initial, mode,
                         splits.train, splits.test)
    if not self._cache_dir:
      return compute()
    cl = c.client
    settings = {
        'reference': 'local', 'mode': mode, 'epochs': self.local_epochs,
        'client': {k: cl[k] for k in ('optimizer', 'learning_rate',
                                      'momentum', 'lr_scales',
                                      'batch_size')},
        'eval_batch_size': c.eval_batch_size,
        'eval_clients_per_chunk': c.eval_clients_per_chunk, 'seed': c.seed,
        'model': c.model.to_dict(), 'peft': c.peft.to_dict(),
        # an algorithm's own evaluation model (FLoRA's, HetLoRA's)
        'eval_model': alg.name if alg.eval_model is not None else None,
        'frozen': (None if self._frozen is None else
                   sorted(param_groups.leaf_paths(self._frozen)))}
    file = reference_cache.path(
        self._cache_dir, 'local_reference', reference_cache.key(
            settings, {'initial': self._initial, 'frozen': self._frozen},
            splits.train, splits.test))
    cached = reference_cache.load(file)
    if cached is not None:
      logging.info('local-only reference read from %s', file)
      return cached
    m = compute()
    reference_cache.save(file, m)
    logging.info('local-only reference written to %s', file)
    return m

  def _report(self, results, among, out) -> dict:
    """Every evaluation's trust report (`trust.describe`, `trust.compare`)
    into ``out``; returns the `trust.Comparison` per reference."""
    splits, c = self.exp.splits, self.exp.config
    for name, m in results.items():
      out.update(trust.describe(m, RESULT_PREFIX[name], self.groups))
    comparisons = {}
    for ref in ('global', 'local', 'start'):
      if ref in results:
        comparisons[ref] = trust.compare(
            ref, results['personalized'], results[ref], splits.test,
            alpha=self.alpha, margin=self.margin, among=among,
            train_sizes=splits.train.client_sizes, groups=self.groups,
            num_resamples=int(c.evaluation.bootstrap_resamples), seed=c.seed)
        out.update(comparisons[ref])
    return comparisons

  def _probe_clients(self) -> np.ndarray:
    """The clients whose personalized models run the probes: the canary
    holders and ``evaluation.probe_clients`` others (a fixed draw)."""
    test = self.exp.splits.test
    ids = np.flatnonzero(test.client_sizes > 0)
    k = min(int(self.exp.config.evaluation.probe_clients), ids.size)
    pick = np.random.default_rng([self.exp.config.seed, 0x9B0]).choice(
        ids, k, replace=False)
    if self.canaries is not None:
      holders = self.canaries.holders[test.client_sizes[
          self.canaries.holders] > 0]
      pick = np.concatenate([pick, holders])
    return np.unique(pick)

  def _own_probes(self, view, only):
    """Each client of ``only``'s personalized model on the probes."""
    exp, ev, alg = self.exp, self.evaluator, self.exp.algorithm
    splits = exp.splits
    if view.clusters is not None:
      k = jax.tree.leaves(view.clusters)[0].shape[0]
      # each cluster model on the probes alone (not the whole test split)
      per = [ev.probe_rows(jax.tree.map(lambda p, j=j: p[j], view.clusters),
                           self.probes) for j in range(k)]
      pick = self._cluster_pick[only]
      probes = {name: evaluation.RowStats(*(
          np.stack([getattr(per[pick[i]][name], f)[0] for i in
                    range(only.size)]) for f in ('loss_sum', 'correct',
                                                 'count')))
                for name in self.probes}
      return only, probes
    start, frozen = self._trainable(view.params, alg.finetune or 'all')
    if alg.finetune and jax.tree.leaves(start):
      m = self.finetuner.evaluate(start, splits.train, splits.test, frozen,
                                  probes=self.probes, only=only)
    elif view.personal is None:  # one model for everyone
      return only, {k: evaluation.RowStats(*(
          np.broadcast_to(a, (only.size, a.shape[1])) for a in r))
                    for k, r in ev.probe_rows(view.params,
                                              self.probes).items()}
    else:
      m = ev.evaluate(view.shared, splits.test, personal_params=view.personal,
                      probes=self.probes, only=only)
    keep = np.isin(m.client_ids, only)
    return m.client_ids[keep], {
        k: evaluation.RowStats(*(a[keep] for a in r))
        for k, r in m.probes.items()}

  def _final_report(self, view, results, comparisons, among, rounds_done
                    ) -> dict:
    """The final evaluation's diagnostics beyond `_report`."""
    exp, c = self.exp, self.exp.config
    splits, alg = exp.splits, exp.algorithm
    out = {}
    mine = results['personalized']
    timeline = getattr(exp, 'devices', None)
    if timeline is not None:  # the rounds that aggregated each client
      times = timeline.totals(rounds_done)['completed']
    else:
      times = np.zeros(splits.train.num_clients)
      for r in range(rounds_done):
        times[participation.sample_ids(c, times.size, r)] += 1
    features = trust.client_features(
        splits.train, times, splits.metadata.get('task') == 'ranking')
    accounting = (exp.privacy.accountant.accounting
                  if getattr(exp, 'privacy', None) is not None else None)
    delta = float(c.privacy.delta)
    for name, comp in comparisons.items():
      out.update(trust.who_gets_hurt(name, comp, mine.client_ids, among,
                                     features))
      if self.epsilons:
        out.update(trust.private_estimates(
            name, comp.gain, among, epsilons=self.epsilons,
            mechanism=str(c.evaluation.private_mechanism), delta=delta,
            seed=c.seed, groups=self.groups, ids=mine.client_ids,
            accounting=accounting, rounds=rounds_done))
    if not self.probes:
      return out
    only = self._probe_clients()
    ids, probes = self._own_probes(view, only)
    personal = evaluation.ClientMetrics(
        ids, *(np.zeros(ids.size),) * 3, splits.test.client_sizes[ids],
        probes=probes)
    def one(evaluator, params):  # a single model on the probes
      m = evaluator.probe_rows(params, self.probes)
      return evaluation.ClientMetrics(np.zeros(1, np.int64),
                                      *(np.zeros(1),) * 4, probes=m)

    start = one(self._start_evaluator, self._start)
    glob = None
    if alg.has_global_model and view.clusters is None:
      glob = one(self.evaluator, view.params)
    if 'backdoor' in self.probes:
      out.update(backdoor_success(personal, start, glob,
                                  self.attack.malicious))
    if 'base_task' in self.probes:
      out.update(trust.base_task('test/', personal, start, glob,
                                 margin=float(c.evaluation.erosion_margin),
                                 alpha=self.alpha))
    if self.canaries is not None:
      holder_idx = np.searchsorted(ids, self.canaries.holders)
      if np.all(ids[np.minimum(holder_idx, ids.size - 1)] ==
                self.canaries.holders):
        out.update(trust.canary_exposure('test/', personal, self.canaries,
                                         holder_idx))
      if glob is not None:
        out.update(trust.canary_exposure('global/', glob, self.canaries))
      out.update(trust.canary_exposure('start/', start, self.canaries))
    return out

  def final_report(self, workdir: str, row: dict,
                   extra: Optional[dict] = None) -> None:
    """Per-client results, ``report.json`` (with ``extra``) and the plots,
    in ``workdir``."""
    ids = self.last['personalized'].client_ids
    compared = {f'vs_{name}': {
        'client_ids': ids, 'gain': comp.gain,
        'hurt_significant': comp.hurt, 'helped_significant': comp.helped,
        'sampled': self.last_sampled[ids]}
                for name, comp in getattr(self, 'comparisons', {}).items()}
    for name, values in self.groups.items():
      compared.setdefault('groups', {})[name] = values
    personalization.save_clients(workdir, self.last,
                                 self.exp.splits.train.client_sizes,
                                 self.last_sampled,
                                 offsets=self.exp.splits.test.offsets)
    personalization.save_arrays(
        os.path.join(workdir, trust.CLIENTS_FILE),
        {f'{name}/{k}': np.asarray(v) for name, fields in compared.items()
         for k, v in fields.items()})
    personalization.write_report(workdir, row, extra)
    title = f'{self.exp.config.algorithm} on {self.exp.config.data.name}'
    personalization.plot_run(
        workdir, read_metrics(workdir),
        personalization.load_clients(workdir), title=title)
    trust.plot_report(workdir, personalization.load_clients(
        workdir, trust.CLIENTS_FILE), self.last['personalized'], title)



def attack_metrics(results, malicious: np.ndarray) -> dict:
  """``attack/honest/{model}/…``: each evaluated model's accuracy over the
  honest clients only (the malicious clients' own models are not what an
  attack is judged by): mean, p10 and the number of honest clients."""
  out = {}
  for name, m in results.items():
    keep = ~np.asarray(malicious)[m.client_ids] & (m.count > 0)
    if not keep.any():
      continue
    acc = m.accuracy[keep]
    p = f'attack/honest/{RESULT_PREFIX[name]}'
    out.update({p + 'accuracy_mean': float(acc.mean()),
                p + 'accuracy_p10': float(np.percentile(acc, 10)),
                p + 'num_clients': int(keep.sum())})
  return out


def backdoor_success(personal, start, glob, malicious: np.ndarray) -> dict:
  """``attack/backdoor_success/…``: the fraction of the backdoor probe
  (honest test examples with the trigger) on which a model predicts the
  target: the global model, the starting one, and the mean over the
  honest probe clients' personalized models."""
  def rate(rows):
    return rows.correct.sum(1) / np.maximum(rows.count.sum(1), 1)

  p = 'attack/backdoor_success/'
  out = {p + 'start': float(rate(start.probes['backdoor'])[0])}
  if glob is not None:
    out[p + 'global'] = float(rate(glob.probes['backdoor'])[0])
  honest = ~np.asarray(malicious)[personal.client_ids]
  if honest.any():
    out[p + 'personalized_mean'] = float(
        rate(personal.probes['backdoor'])[honest].mean())
  return out
