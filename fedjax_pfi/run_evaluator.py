"""A run's evaluation (`RunEvaluator`): each client's own model on its own
test data, against the global model and against training alone, and the
held-out clients, as per-client distributions; the final report's files."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from fedjax_pfi import evaluation
from fedjax_pfi import participation
from fedjax_pfi import personalization
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.metrics_io import read_metrics


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
  - ``trainset/`` with ``eval_train``;
  - ``val/``: the personalized models on each client's validation split,
    where the data has one (MovieLens' second-latest item;
    ``data.val_fraction``), for choosing hyperparameters without the test
    split.

  Each is the distribution of per-client accuracy (`evaluation.summarize`)
  over every client with test data; the gains and hurt fractions cover the
  clients sampled so far (``test/never_sampled_fraction`` says how many are
  left out: they still hold their initial personal state).
  ``last`` keeps the per-client results of the latest evaluation for the
  final report.
  """

  def __init__(self, exp, initial_params, frozen):
    c = exp.config
    self.exp = exp
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
    if self.local_epochs and exp.algorithm.clusters:  # one of the k models
      initial_params = jax.tree.map(lambda p: p[0], initial_params)
    self._initial = initial_params if self.local_epochs else None
    self._frozen = frozen
    self._local = None
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
    def take(f):
      return np.take_along_axis(
          np.stack([getattr(m, f) for m in on_test]), pick[None], 0)[0]

    return evaluation.ClientMetrics(ids, take('loss_sum'), take('correct'),
                                    take('count'), on_test[0].num_examples)

  def sampled(self, rounds_done: int) -> np.ndarray:
    """Bool per training client: sampled in one of the first rounds."""
    return participation.ever_sampled(
        self.exp.config, self.exp.splits.train.num_clients, rounds_done)

  def __call__(self, view, rounds_done: Optional[int] = None
               ) -> dict[str, float]:
    """The metrics of one evaluation; ``rounds_done`` (default: all of
    ``config.rounds``) says which clients have trained: the gains and
    hurt fractions cover those only."""
    exp, ev, alg = self.exp, self.evaluator, self.exp.algorithm
    splits = exp.splits
    rounds_done = exp.config.rounds if rounds_done is None else rounds_done
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
      out['test/random_baseline'] = float(splits.metadata['top_k']) / \
          splits.test.columns['x'].shape[-1]
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
        # What this algorithm's clients may train: FedBABU's frozen head
        # too, but never a foundation model's base.
        self._local = self._adapt(self._local_adapter, self._initial,
                                  alg.finetune or 'trainable', splits.train,
                                  splits.test)
      results['local'] = self._local
      out.update(evaluation.summarize(self._local, 'local/'))
      out.update(personalization.compare(mine, self._local, 'local',
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
    self.last = results
    return out

  def final_report(self, workdir: str, row: dict,
                   extra: Optional[dict] = None) -> None:
    """Per-client results, ``report.json`` (with ``extra``) and the plots,
    in ``workdir``."""
    personalization.save_clients(workdir, self.last,
                                 self.exp.splits.train.client_sizes,
                                 self.last_sampled)
    personalization.write_report(workdir, row, extra)
    personalization.plot_run(
        workdir, read_metrics(workdir),
        personalization.load_clients(workdir),
        title=f'{self.exp.config.algorithm} on {self.exp.config.data.name}')
