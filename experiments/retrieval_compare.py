r"""Retrieval over each role's private store against PEFT, per client.

  python -m experiments.retrieval_compare --workdir=/tmp/fedjax_pfi/retrieval_compare \
      --peft_workdir=/tmp/fedjax_pfi/peft_compare

1. Trains (or resumes) the PEFT comparison's runs in ``PEFT_WORKDIR``
   (`experiments.peft_compare`: the pretrained byte-level GPT-2, then FedIT,
   FedSA-LoRA and local-only LoRA on Shakespeare roles).
2. Evaluates, on each role's own held-out windows: the pretrained model;
   FedIT, FedIT + one epoch of local fine-tuning, FedSA-LoRA, local-only LoRA;
   nearest-neighbour LM (Khandelwal et al., 2020) and in-context retrieval
   (Ram et al., 2023) over each role's store of its training windows, over
   the base and over the best PEFT model. kNN-LM's lambda is chosen globally
   on a validation tenth of each role's training windows (the store then
   holds the other nine tenths). Writes ``WORKDIR/table.md``: accuracy (mean,
   p10, worst), the share of roles significantly hurt and helped against the
   pretrained model (one-sided exact McNemar on their windows, alpha 0.05),
   bytes communicated and stored per role, and milliseconds per predicted
   token; ``gain.png``: each role's gain from retrieval against its gain from
   PEFT.
3. Adaptive refinement (``refinement.md``): each role receives half of its
   held-out windows as new text; added to its store, kNN-LM's accuracy on the
   other half against the same store without them, against the PEFT model
   that has not trained on them, and against it after one epoch on them.
4. Leakage (``leakage.md``): canaries planted in 8 roles' training data
   (`fedjax_pfi.canaries`); their exposure through kNN-LM and in-context
   retrieval over the holder's store, against local-only LoRA trained on them
   and FedIT with DP.

``--testing`` shrinks everything to seconds.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from experiments import peft_compare
from experiments import tables
from fedjax_pfi import client_stats
from fedjax_pfi import evaluation
from fedjax_pfi import personalization
from fedjax_pfi import retrieval
from fedjax_pfi import training
from fedjax_pfi import trust
from fedjax_pfi.algorithms import client_updates
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.data.federated import FederatedDataset

PEFT = ('fedit', 'fedsa_lora', 'local_lora')
NAMES = {'base': 'pretrained model', 'fedit': 'FedIT',
         'fedit_ft': 'FedIT + local fine-tuning',
         'fedsa_lora': 'FedSA-LoRA', 'local_lora': 'local-only LoRA'}
LAMBDAS = (0.1, 0.25, 0.5, 0.75)


def retrieval_config(mode: str, testing: bool, lam: float = 0.25):
  rc = ml_collections.ConfigDict(training.default_config().retrieval)
  rc.mode = mode
  if mode == 'in_context':  # one passage, as Ram et al.; half the context
    rc.k, rc.chunk_len = (1, 4) if testing else (1, 32)
  rc['lambda'] = lam
  return rc


def timed(fn, repeats: int = 2):
  """``fn()``'s result and the wall time of its last call (the first
  compiles)."""
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
  return out, dt


class Trained:
  """One PEFT run's final state: the reader and each role's params."""

  def __init__(self, variant, peft_workdir, testing, rounds, config=None):
    self.config = config or peft_compare.variant_config(
        variant, os.path.join(peft_workdir, 'pretrained', 'model'), testing,
        rounds)
    workdir = os.path.join(peft_workdir, variant)
    self.final = training.run(self.config, workdir)
    self.exp = exp = training.build(self.config)
    params0 = training.initial_params(exp)
    self.base = params0['base']
    self.frozen = exp.algorithm.frozen_part(params0)
    state = training.load_state(exp, workdir, self.config.rounds)
    self.view = exp.algorithm.eval_view(state, self.frozen)
    self.reader = exp.algorithm.eval_model or exp.model
    population = exp.splits.train.num_clients
    self.bytes_per_client = (self.final['comm/download_bytes_cumulative'] +
                             self.final['comm/upload_bytes_cumulative']) / \
        population
    self.personal_bytes = 0 if self.view.personal is None else \
        param_groups.num_bytes(self.view.personal) / population

  def reader_args(self):
    """``(params, personal, combine)`` of each role's own model."""
    if self.view.personal is None:
      return self.view.params, None, None
    return self.view.shared, self.view.personal, self.exp.algorithm.combine

  def finetuned(self, train: FederatedDataset, epochs: int = 1):
    """Each role's FedIT adapters after ``epochs`` on ``train`` (its own)."""
    c = self.config
    opt = client_updates.client_optimizer(
        c.client.optimizer, c.client.learning_rate,
        momentum=c.client.momentum, lr_scales=c.client.lr_scales)
    adapter = personalization.Adapter(
        self.reader, opt, epochs=epochs, batch_size=c.client.batch_size,
        clients_per_chunk=c.eval_clients_per_chunk,
        eval_batch_size=c.eval_batch_size, seed=c.seed)
    frozen_paths = set(param_groups.leaf_paths(self.frozen))
    start = param_groups.select(self.view.params,
                                lambda p: p not in frozen_paths)
    return self.frozen, adapter.adapt(start, train, self.frozen), \
        param_groups.merge


def evaluate_reader(model, params, ds, personal=None, combine=None,
                    batch_size=256):
  ev = evaluation.Evaluator(model, batch_size, 32, combine=combine)
  return timed(lambda: ev.evaluate(params, ds, personal_params=personal))


def row(name, m, ref, test, train_sizes, seconds, bytes_, store):
  comp = trust.compare('base', m, ref, test, alpha=0.05, margin=0.0,
                       among=np.ones(m.client_ids.size, bool),
                       train_sizes=train_sizes, groups={})
  s = evaluation.summarize(m)
  return dict(method=name, mean=s['client_accuracy_mean'],
              p10=s['client_accuracy_p10'], worst=s['client_accuracy_worst'],
              hurt=comp.get('vs_base/hurt_significant_fraction', 0.0),
              helped=comp.get('vs_base/helped_significant_fraction', 0.0),
              bytes=bytes_, store=store,
              ms=1e3 * seconds / max(float(m.count.sum()), 1.0),
              gain=(m.accuracy - ref.accuracy).tolist())


def choose_lambda(trained: Trained, reader, reader_args, testing: bool
                  ) -> dict:
  """kNN-LM's lambda, chosen globally on a tenth of each role's training
  windows held out of the store."""
  exp = trained.exp
  train = exp.splits.train
  rest, val = train.split_examples([0.9, 0.1], exp.config.seed + 7)
  r = retrieval.Retrieval(retrieval_config('knn_lm', testing), exp.base_model,
                          trained.base, rest, exp.splits.metadata)
  params, personal, combine = reader_args
  losses = {}
  for lam in LAMBDAS:
    m = r.evaluate(reader, params, val, personal=personal,
                   combine=combine, lam=lam)
    losses[lam] = float(m.loss_sum.sum() / m.count.sum())
  return losses


def main_table(workdir, peft_workdir, testing, rounds) -> dict:
  runs = {v: Trained(v, peft_workdir, testing, rounds) for v in PEFT}
  fedit = runs['fedit']
  exp = fedit.exp
  train, test = exp.splits.train, exp.splits.test
  sizes = train.client_sizes
  base_m, base_s = evaluate_reader(exp.base_model, fedit.base, test)
  results = {'base': (base_m, base_s, 0.0, 0.0)}
  readers = {}
  for v, t in runs.items():
    params, personal, combine = t.reader_args()
    m, s = evaluate_reader(t.reader, params, test, personal, combine)
    results[v] = (m, s, t.bytes_per_client, t.personal_bytes)
    readers[v] = (t.reader, params, personal, combine)
  frozen, adapted, merge = fedit.finetuned(train)
  m, s = evaluate_reader(fedit.reader, frozen, test, adapted, merge)
  results['fedit_ft'] = (m, s, fedit.bytes_per_client,
                         param_groups.num_bytes(adapted) / sizes.size)
  readers['fedit_ft'] = (fedit.reader, frozen, adapted, merge)
  best = max(readers, key=lambda v: results[v][0].accuracy.mean())
  # kNN-LM's lambda on validation windows, once over the base
  losses = choose_lambda(fedit, exp.base_model, (fedit.base, None, None),
                         testing)
  lam = min(losses, key=losses.get)
  cost = {'lambda_val_loss': losses, 'lambda': lam, 'best_peft': best}
  for mode in retrieval.stores.KINDS:
    r = retrieval.Retrieval(retrieval_config(mode, testing, lam),
                            exp.base_model, fedit.base, train,
                            exp.splits.metadata)
    store = float(r.store.bytes_per_client().mean())
    for on in ('base', best):
      if on == 'base':
        reader, params, personal, combine = (exp.base_model, fedit.base,
                                             None, None)
        bytes_ = 0.0
      else:
        reader, params, personal, combine = readers[best]
        bytes_ = results[best][2]
      m, s = timed(lambda: r.evaluate(reader, params, test, personal=personal,
                                      combine=combine))
      results[f'{mode}@{on}'] = (m, s, bytes_, store + (
          0.0 if on == 'base' else results[best][3]))
    search_s = r.search_seconds(test)
    cost[mode] = dict(r.metrics(''), search_s=search_s,
                      eval_s=results[f'{mode}@base'][1],
                      search_share=search_s / results[f'{mode}@base'][1],
                      store_bytes_total=float(r.store.bytes_per_client().sum()))
  rows = []
  for name, (m, s, b, st) in results.items():
    label = NAMES.get(name) or '{} over {}'.format(
        'kNN-LM' if name.startswith('knn') else 'in-context retrieval',
        NAMES[name.split('@')[1]])
    rows.append(dict(row(label, m, base_m, test, sizes, s, b, st), key=name))
  write_main(workdir, rows, cost, exp.config)
  plot_gain(workdir, results, base_m, best)
  return dict(rows=rows, cost=cost, runs=runs, results=results,
              readers=readers, lam=lam, best=best)


def write_main(workdir, rows, cost, config):
  lines = [
      f'Shakespeare roles ({rows and len(rows[0]["gain"])} with held-out '
      f'windows), {config.rounds} rounds of {config.clients_per_round}; '
      "per-role next-byte accuracy on each role's own held-out windows; hurt "
      'and helped: share of roles significantly worse / better than the '
      'pretrained model (one-sided exact McNemar, alpha 0.05); kNN-LM lambda '
      f'{cost["lambda"]} (chosen on validation windows), k 8, L2; in-context: '
      f'{cost["in_context"]["retrieved_tokens"]:.0f} retrieved tokens, '
      f'{cost["in_context"]["own_context_tokens"]:.0f} own, stride '
      f'{cost["in_context"]["stride"]:.0f}.', '',
      '| method | mean | p10 | worst | hurt | helped | KB communicated / role '
      '| KB stored / role | ms / token |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(
        f'| {r["method"]} | {r["mean"]:.3f} | {r["p10"]:.3f} | '
        f'{r["worst"]:.3f} | {r["hurt"]:.3f} | {r["helped"]:.3f} | '
        f'{r["bytes"] / 1e3:,.1f} | {r["store"] / 1e3:,.1f} | '
        f'{r["ms"]:.3f} |')
  lines += ['', 'Cost: ' + json.dumps(
      {k: v for k, v in cost.items()}, default=float)]
  tables.write(workdir, lines, [dict(r, gain=None) for r in rows])


def plot_gain(workdir, results, base_m, best):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  peft = results[best][0].accuracy - base_m.accuracy
  fig, ax = plt.subplots(figsize=(5, 4.5))
  for mode, style in (('knn_lm', 'o'), ('in_context', 'x')):
    gain = results[f'{mode}@base'][0].accuracy - base_m.accuracy
    ax.scatter(peft, gain, s=12, marker=style, label=mode.replace('_', '-'))
  ax.axhline(0, color='grey', lw=0.5)
  ax.axvline(0, color='grey', lw=0.5)
  ax.set_xlabel(f'gain from PEFT ({NAMES[best]}) over the base')
  ax.set_ylabel('gain from retrieval over the base')
  ax.set_title('Per-role accuracy gain')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'gain.png'), dpi=120)
  plt.close(fig)


def halves(test: FederatedDataset):
  """Each role's held-out windows split in two, in order: the new text
  (first half) and the text to predict (second half)."""
  new, later = [], []
  for c in range(test.num_clients):
    cols = {k: np.asarray(v[test.offsets[c]:test.offsets[c + 1]])
            for k, v in test.columns.items()}
    h = len(cols['x']) // 2
    new.append({k: v[:h] for k, v in cols.items()})
    later.append({k: v[h:] for k, v in cols.items()})
  return (FederatedDataset.from_clients(new, test.client_names, test.metadata),
          FederatedDataset.from_clients(later, test.client_names,
                                        test.metadata))


def refinement(workdir, main, testing) -> list[dict]:
  fedit = main['runs']['fedit']
  exp = fedit.exp
  best = main['best']
  reader, params, personal, combine = main['readers'][best]
  new, later = halves(exp.splits.test)
  r = retrieval.Retrieval(retrieval_config('knn_lm', testing, main['lam']),
                          exp.base_model, fedit.base, exp.splits.train,
                          exp.splits.metadata)
  plain = evaluation.Evaluator(reader, 256, 32, combine=combine).evaluate(
      params, later, personal_params=personal)
  before = r.evaluate(reader, params, later, personal=personal,
                      combine=combine)
  added = stores_with(r, exp, fedit.base, new)
  t0 = time.perf_counter()
  after = r.evaluate(reader, params, later, personal=personal,
                     combine=combine)
  eval_s = time.perf_counter() - t0
  # The training alternative: FedIT's adapters one epoch on the new text.
  frozen, adapted, merge = fedit.finetuned(new)
  t0 = time.perf_counter()
  trained = evaluation.Evaluator(fedit.reader, 256, 32, combine=merge
                                 ).evaluate(frozen, later,
                                            personal_params=adapted)
  train_s = time.perf_counter() - t0
  rows = []
  for name, m in ((f'{NAMES[best]}, not trained on the new text', plain),
                  ('kNN-LM over it, store without the new text', before),
                  ('kNN-LM over it, new text added to the store', after),
                  ('FedIT, one local epoch on the new text', trained)):
    comp = trust.compare('x', m, before, later, alpha=0.05, margin=0.0,
                         among=np.ones(m.client_ids.size, bool),
                         train_sizes=exp.splits.train.client_sizes, groups={})
    rows.append(dict(method=name, mean=float(m.accuracy.mean()),
                     hurt=comp.get('vs_x/hurt_significant_fraction', 0.0),
                     helped=comp.get('vs_x/helped_significant_fraction', 0.0)))
  lines = ['Each role receives the first half of its held-out windows as new '
           'text; accuracy on the second half; hurt / helped: share of roles '
           'significantly worse / better than kNN-LM without the new text. '
           f'Adding the new text to every store took {added:.2f} s (no '
           f'training); evaluating after it {eval_s:.1f} s; the fine-tuning '
           f'alternative {train_s:.1f} s.', '',
           '| model | mean accuracy | hurt | helped |', '| --- | --- | --- | --- |']
  lines += [f'| {x["method"]} | {x["mean"]:.4f} | {x["hurt"]:.3f} | '
            f'{x["helped"]:.3f} |' for x in rows]
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(workdir, 'refinement.md'), 'w') as f:
    f.write(text)
  print(text)
  return rows


def stores_with(r, exp, base_params, new: FederatedDataset) -> float:
  """Adds each role's new windows to its kNN-LM store; returns seconds."""
  t0 = time.perf_counter()
  fresh = retrieval.stores.knn_store(exp.base_model, base_params, new,
                                     exp.splits.metadata.get('pad_id'))
  r.store.extend({c: {k: v[fresh.offsets[c]:fresh.offsets[c + 1]]
                       for k, v in fresh.columns.items()}
                   for c in range(new.num_clients)})
  return time.perf_counter() - t0


def canary_config(variant, peft_workdir, testing, rounds, dp: bool):
  c = peft_compare.variant_config(
      variant, os.path.join(peft_workdir, 'pretrained', 'model'), testing,
      rounds)
  c.evaluation.canaries.num = 2 if testing else 8
  if dp:
    c.privacy.mechanism = 'gaussian'
    c.privacy.clip_norm = 0.5
    c.privacy.noise_multiplier = 0.5
  return c


def leakage(workdir, peft_workdir, testing, rounds, lam) -> list[dict]:
  rows = leakage_training(workdir, peft_workdir, testing, rounds)
  rows += leakage_retrieval(peft_workdir, testing, rounds, lam)
  return write_leakage(workdir, rows, canary_config(
      'fedit', peft_workdir, testing, rounds, False))


def leakage_training(workdir, peft_workdir, testing, rounds) -> list[dict]:
  """The canaries in LoRA adapters trained on them: local-only LoRA (the
  holder's own adapters), and FedIT with DP."""
  rows = []
  for name, variant, dp in (('local-only LoRA', 'local_lora', False),
                            ('FedIT with DP', 'fedit', True)):
    c = canary_config(variant, peft_workdir, testing, rounds, dp)
    out = training.run(c, os.path.join(workdir, f'canary_{variant}'))
    rows.append(dict(model=name + (f' (epsilon {out["privacy/epsilon_pld"]:.1f})'
                                   if dp and 'privacy/epsilon_pld' in out else ''),
                     exposure=out.get('test/canary/exposure_mean'),
                     accuracy=out.get('test/client_accuracy_mean')))
  return rows


def leakage_retrieval(peft_workdir, testing, rounds, lam) -> list[dict]:
  """The canaries through retrieval over their holders' stores (the
  pretrained reader), and the pretrained model alone (the floor)."""
  rows = []
  c = canary_config('fedit', peft_workdir, testing, rounds, False)
  exp = training.build(c)
  base = training.initial_params(exp)['base']
  can = exp.canaries
  r1 = can.candidates + 1
  probe_clients = []
  for c_ in range(exp.splits.train.num_clients):
    hit = np.flatnonzero(can.holders == c_)
    rows_ = (np.arange(hit[0] * r1, (hit[0] + 1) * r1) if hit.size else
             np.arange(0))
    probe_clients.append({k: v[rows_] for k, v in can.probe.items()})
  probe = FederatedDataset.from_clients(
      probe_clients, exp.splits.train.client_names, exp.splits.metadata)
  for mode in retrieval.stores.KINDS:
    r = retrieval.Retrieval(retrieval_config(mode, testing, lam),
                            exp.base_model, base, exp.splits.train,
                            exp.splits.metadata)
    m = r.evaluate(exp.base_model, base, probe)
    exp_ = []
    for j, holder in enumerate(can.holders):
      lo = probe.offsets[holder]
      scores = m.rows.loss_sum[lo:lo + r1]
      exp_.append(client_stats.exposure(scores[0], scores[1:]))
    rows.append(dict(model=f'{mode} over the pretrained model, holder\'s store',
                     exposure=float(np.mean(exp_)), accuracy=None))
  base_m = evaluation.Evaluator(exp.base_model, 256).evaluate(base, probe)
  exp_ = [client_stats.exposure(
      base_m.rows.loss_sum[probe.offsets[h]],
      base_m.rows.loss_sum[probe.offsets[h] + 1:probe.offsets[h] + r1])
          for h in can.holders]
  rows.append(dict(model='pretrained model (never saw the canaries)',
                   exposure=float(np.mean(exp_)), accuracy=None))
  return rows


def write_leakage(workdir, rows, c) -> list[dict]:
  can_cfg = c.evaluation.canaries
  r1 = int(can_cfg.candidates) + 1
  lines = [f'{can_cfg.num} canaries "{can_cfg.prefix}" + {can_cfg.digits} '
           f'digits, each {can_cfg.repeats} times in one role\'s training '
           f'windows; exposure among {can_cfg.candidates} other secrets (max '
           f'{np.log2(r1):.1f} bits; about 1 when unremarkable).', '',
           '| model | mean exposure (bits) | per-role accuracy |',
           '| --- | --- | --- |']
  for x in rows:
    acc = '-' if x['accuracy'] is None else f'{x["accuracy"]:.3f}'
    lines.append(f'| {x["model"]} | {x["exposure"]:.2f} | {acc} |')
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(workdir, 'leakage.md'), 'w') as f:
    f.write(text)
  print(text)
  return rows


def compare(workdir, peft_workdir, testing=False, rounds=None,
            parts=('table', 'refinement', 'leakage')) -> dict:
  os.makedirs(workdir, exist_ok=True)
  peft_compare.pretrain(peft_workdir, testing)
  main = main_table(workdir, peft_workdir, testing, rounds)
  out = {'table': main['rows'], 'cost': main['cost']}
  if 'refinement' in parts:
    out['refinement'] = refinement(workdir, main, testing)
  if 'leakage' in parts:
    out['leakage'] = leakage(workdir, peft_workdir, testing, rounds,
                             main['lam'])
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  compare(f.workdir, f.peft_workdir or os.path.join(f.workdir, 'peft'),
          f.testing, f.rounds, tuple(f.parts))


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_string('peft_workdir', None, 'The PEFT runs (default '
                      'WORKDIR/peft; experiments.peft_compare\'s workdir '
                      'is reused as is).')
  flags.DEFINE_integer('rounds', None, 'Override config.rounds.')
  flags.DEFINE_list('parts', ['table', 'refinement', 'leakage'],
                    'Which parts to run (the table always runs).')
  flags.DEFINE_bool('testing', False, 'Tiny sizes (seconds).')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  _define_flags()
  app.run(main)
