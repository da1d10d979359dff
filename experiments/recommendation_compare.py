r"""Federated recommendation that preserves personality (issue 19): one table.

  python -m experiments.recommendation_compare --workdir=/tmp/fedjax_pfi/rec

1. Pretrains the foundation model, `SASRec` on the 20% held-out users
   (``experiments/configs/pretrain_sasrec.py``), into ``WORKDIR/pretrained``
   unless it is there already.
2. Personalizes it on the other users with every method of
   ``experiments/configs/recommendation.py`` (FedAvg full fine-tuning,
   FedIT, FFA-LoRA, FedSA-LoRA, local-only LoRA, FedPer with the item table
   personal) into ``WORKDIR/<method>``, and runs the matrix-factorization
   rows of the FedRAP table (``personalization.py:movielens,<algorithm>``:
   FedAvg, FedPer, FedRAP) on the same users (the same held-out fraction and
   seed) into ``WORKDIR/mf_<algorithm>``. Each run resumes from its workdir.
3. For every method, the frozen pretrained model and the most-popular
   list (every user the same unseen popular items): per user, HR@10 and
   NDCG@10 on the test item (against ``leave_one_out``'s 99 negatives), and
   the top-10 over the whole catalogue (the user's history excluded, each
   user with its own personalized model: `personality.catalogue_scores`),
   scored by `personality.report` (and a Wilcoxon signed-rank test of the
   users' popularity-rank changes) against the frozen pretrained model's
   top-10 (every row over the same users: those sampled in every run): the genre divergence from the user's history, the mean
   popularity rank, and the share of users significantly closer (farther)
   to their own profile (with a sign test over users of the two shares).
4. Writes ``WORKDIR/table.md`` (and ``table.json``): a row per method with
   the users helped and hurt against the frozen model (a test item turned
   into a hit or a miss; one item per user cannot make one user's change
   significant, so the exact McNemar test over users says whether the two
   directions differ beyond noise), the personality measures, megabytes
   communicated and the median round time; and ``WORKDIR/groups.md`` with
   the same measures by gender and age band (``ml-100k.user``).

``--testing`` shrinks everything to seconds; tests also point ``data.path``
at generated ratings (with ``ml-100k.item`` and ``ml-100k.user`` beside).
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np
from scipy import stats

from experiments import tables
from experiments.configs import personalization as pfl_config
from experiments.configs import pretrain_sasrec
from experiments.configs import recommendation
from fedjax_pfi import evaluation
from fedjax_pfi import personality
from fedjax_pfi import personalization
from fedjax_pfi import pretraining
from fedjax_pfi import training
from fedjax_pfi.algorithms import core
from fedjax_pfi.data import movielens
from fedjax_pfi.models import recommender

NAMES = {'frozen': 'frozen pretrained SASRec',
         'popular': 'most popular items (no model)',
         'fedavg': 'SASRec, FedAvg full fine-tuning',
         'fedit': 'SASRec, FedIT (LoRA A, B averaged)',
         'ffa_lora': 'SASRec, FFA-LoRA (A frozen, B averaged)',
         'fedsa_lora': 'SASRec, FedSA-LoRA (A averaged, B personal)',
         'local_lora': 'SASRec, local-only LoRA',
         'fedper': 'SASRec, FedPer (item table personal)',
         'mf_fedavg': 'MF, FedAvg', 'mf_fedper': 'MF, FedPer',
         'mf_fedrap': 'MF, FedRAP'}
MF_ALGORITHMS = ('fedavg', 'fedper', 'fedrap')
#: The ``data`` settings every run copies from the pretraining config, so
#: that every table row covers the same users, items and candidates.
SHARED_DATA = ('path', 'num_negatives', 'eval_negatives', 'top_k',
               'heldout_fraction', 'seed')


def pretrain(workdir: str, testing: bool, configure=None):
  """The pretraining config and the foundation model's directory
  (pretrained into ``WORKDIR/pretrained`` unless it is there)."""
  pt = pretrain_sasrec.get_config('testing' if testing else '')
  if configure is not None:
    configure(pt)
  pretraining.pretrain(pt, os.path.join(workdir, 'pretrained'))
  return pt, os.path.join(workdir, 'pretrained', 'model')


def method_config(method: str, pt, pretrained: str, testing: bool):
  """A SASRec method's config (``recommendation.py``) or, for
  ``mf_<algorithm>``, the FedRAP table's (``personalization.py``), with
  the pretraining's data settings."""
  suffix = ',testing' if testing else ''
  if method.startswith('mf_'):
    c = pfl_config.get_config(f'movielens,{method[3:]}{suffix}')
    c.data.max_clients = None  # the same users as the SASRec rows
  else:
    c = recommendation.get_config(method + suffix)
    c.model.pretrained = pretrained
    c.model.kwargs = type(c.model.kwargs)()  # the checkpoint's
    c.data.seq_len = pt.data.seq_len
  for key in SHARED_DATA:
    c.data[key] = pt.data[key]
  c.progress = False
  return c


def histories_of(config, names):
  """Each client's items before its test item (in order), the raw item
  ids of the item indices, and every item's training interactions."""
  ratings = movielens.parse_inter(movielens.read_inter(config.data.path))
  by_user, raw_items = movielens.user_items(ratings)
  everyone = [s[:-1] for s in by_user.values()]
  counts = np.bincount(np.concatenate(everyone), minlength=raw_items.size)
  return [by_user[str(n)][:-1] for n in names], raw_items, counts


def genres_of(config, raw_items):
  data = movielens.read_items(config.data.path)
  if data is None:
    raise FileNotFoundError(
        'ml-100k.item (the movies\' genres) was not found beside the '
        f'ratings ({config.data.path or "the recbole wheel"}).')
  genres = movielens.parse_items(data)
  return personality.genre_matrix([genres.get(str(i), ()) for i in
                                   raw_items])[0]


def scores_of(exp, state, params) -> np.ndarray:
  """``[users, items]``: each test client's scores of the whole catalogue
  with its personalized model (``state`` None: ``params`` for everyone;
  else ``params`` are the run's initial ones, whose frozen part joins
  the state's)."""
  alg = exp.algorithm
  if alg.finetune:
    raise ValueError(f'{exp.config.algorithm} personalizes by fine-tuning '
                     'at evaluation; its per-user models are not stored.')
  model = alg.eval_model or exp.model
  if state is None:
    view, combine = core.EvalView(params), None
  else:
    view = alg.eval_view(state, alg.frozen_part(params))
    combine = alg.combine
  test = exp.splits.test
  if not np.all(test.client_sizes == 1):
    raise ValueError('expected one test list per user.')
  inputs = personality.catalogue_inputs(test.columns['x'],
                                        exp.splits.metadata)
  return personality.catalogue_scores(model, view, inputs, combine)


def evaluate_frozen(exp, params):
  ev = evaluation.Evaluator(exp.base_model, exp.config.eval_batch_size)
  return ev.evaluate(params, exp.splits.test)


def sign_p(closer: float, farther: float, users: int) -> float:
  """Two-sided sign test over users: are the users significantly closer
  as many as those significantly farther (1 where there are none)?"""
  a, b = round(closer * users), round(farther * users)
  return float(stats.binomtest(a, a + b).pvalue) if a + b else 1.0


def run_all(workdir: str, methods, mf_algorithms=MF_ALGORITHMS,
            testing: bool = False, configure=None, resamples: int = 1000,
            alpha: float = 0.05) -> list[dict]:
  """Runs (or resumes) everything and writes the tables; returns the
  rows. ``configure(config)`` adjusts the pretraining config (tests point
  ``data.path`` at generated ratings), whose data settings every run
  copies."""
  os.makedirs(workdir, exist_ok=True)
  pt, pretrained = pretrain(workdir, testing, configure)
  methods = list(methods) + [f'mf_{a}' for a in mf_algorithms]
  configs = {m: method_config(m, pt, pretrained, testing) for m in methods}
  # The frozen model, from any SASRec config (its initial params' base).
  base_config = method_config('fedavg', pt, pretrained, testing)
  base = training.build(base_config)
  base_params = training.initial_params(base)
  test = base.splits.test
  names = test.client_names
  histories, raw_items, counts = histories_of(base_config, names)
  matrix = genres_of(base_config, raw_items)
  k = int(base.splits.metadata['top_k'])
  exclude = np.zeros((len(names), raw_items.size), bool)
  for u, h in enumerate(histories):
    exclude[u, h] = True
  attrs = base.splits.metadata.get('client_attributes') or {}
  groups = {a: np.array([attrs[a].get(str(n), '') for n in names])
            for a in ('gender', 'age_band') if a in attrs}
  frozen_metrics = evaluate_frozen(base, base_params)
  ref_top = personality.top_k(scores_of(base, None, base_params),
                              exclude, k)
  ref_hit = frozen_metrics.accuracy
  per_user = {'frozen': dict(hit=ref_hit,
                             ndcg=frozen_metrics.ndcg / frozen_metrics.count,
                             top=ref_top, sampled=np.ones(len(names), bool),
                             final={}, times=[])}
  # Most popular first, the same list for everyone: what "pushing everyone
  # toward popular items" looks like (ties rank against the test item).
  cands = test.columns['x'][:, int(base.splits.metadata.get('history_len',
                                                            0)):]
  pop_hit, pop_ndcg = (np.asarray(a, np.float64) for a in
                       recommender.hit_and_ndcg(
                           counts[cands].astype(np.float32),
                           test.columns['y'], k))
  per_user['popular'] = dict(
      hit=pop_hit, ndcg=pop_ndcg,
      top=personality.top_k(np.broadcast_to(counts, exclude.shape), exclude,
                            k),
      sampled=np.ones(len(names), bool), final={}, times=[])
  for m in methods:
    wd = os.path.join(workdir, m)
    exp = training.build(configs[m])  # `training.run`'s steps, built once
    training.prepare_workdir(wd)
    final = training.run_experiment(exp, wd)
    if list(exp.splits.test.client_names) != list(names):
      raise ValueError(f'{m} evaluated other users than the frozen model.')
    mine = personalization.load_clients(wd)['personalized']
    state = training.load_state(exp, wd)
    top = personality.top_k(
        scores_of(exp, state, training.initial_params(exp)), exclude, k)
    per_user[m] = dict(hit=mine['accuracy'], ndcg=mine['ndcg'], top=top,
                       sampled=mine['sampled'], final=final,
                       times=[r['time/round_s'] for r in
                              training.read_metrics(wd)])
  # Every row covers the same users: those every run sampled (a user never
  # sampled still holds its initial personal state).
  s = np.logical_and.reduce([u['sampled'] for u in per_user.values()])
  rows, group_rows = [], []
  for m, u in per_user.items():
    rep = personality.report(
        u['top'][s], ref_top[s], [h for h, keep in zip(histories, s) if keep],
        matrix, counts, alpha=alpha, resamples=resamples,
        groups={a: g[s] for a, g in groups.items()}, prefix='')
    # per user: the change of the mean popularity rank against the frozen
    # model's, and the Wilcoxon signed-rank test that it is centred on 0
    pop_change = (personality.popularity_rank(u['top'][s], counts) -
                  personality.popularity_rank(ref_top[s], counts))
    helped = int(np.sum((u['hit'] > ref_hit)[s]))
    hurt = int(np.sum((u['hit'] < ref_hit)[s]))
    f = u['final']
    rows.append(dict(
        method=m, users=int(s.sum()), hr=float(u['hit'][s].mean()),
        ndcg=float(u['ndcg'][s].mean()), helped=helped / s.sum(),
        hurt=hurt / s.sum(),
        mcnemar_p=(float(stats.binomtest(helped, helped + hurt).pvalue)
                   if helped + hurt else 1.0),
        genre_divergence=rep['genre_divergence_mean'],
        genre_divergence_frozen=rep['genre_divergence_ref_mean'],
        popularity_rank=rep['popularity_rank_mean'],
        popularity_p=(float(stats.wilcoxon(pop_change).pvalue)
                      if np.any(pop_change) else 1.0),
        closer=rep['closer_significant_fraction'],
        farther=rep['farther_significant_fraction'],
        closer_vs_farther_p=sign_p(rep['closer_significant_fraction'],
                                   rep['farther_significant_fraction'],
                                   int(s.sum())),
        mb=(f.get('comm/download_bytes_cumulative', 0.0) +
            f.get('comm/upload_bytes_cumulative', 0.0)) / 1e6,
        round_s=float(np.median(u['times'])) if u['times'] else None))
    for a, labels in groups.items():
      for g in np.unique(labels[s]):
        sel = s & (labels == g)
        q = f'by_{a}/{g}/'
        group_rows.append(dict(
            method=m, attribute=a, group=str(g), users=int(sel.sum()),
            hr=float(u['hit'][sel].mean()), ndcg=float(u['ndcg'][sel].mean()),
            genre_divergence=rep[q + 'genre_divergence_mean'],
            popularity_rank=rep[q + 'popularity_rank_mean'],
            closer=rep[q + 'closer_significant_fraction']))
  write_tables(workdir, rows, group_rows)
  return rows


def write_tables(workdir: str, rows, group_rows) -> None:
  def fmt(v, spec='.3f'):
    return '-' if v is None else format(v, spec)
  lines = ['| method | users | HR@10 | NDCG@10 | helped | hurt | McNemar p '
           '| genre JS (frozen) | popularity rank (p) | closer | farther | sign '
           'p | MB | s/round |', '|' + ' --- |' * 14]
  for r in rows:
    lines.append(
        f'| {NAMES.get(r["method"], r["method"])} | {r["users"]} | '
        f'{fmt(r["hr"])} | {fmt(r["ndcg"])} | {fmt(r["helped"])} | '
        f'{fmt(r["hurt"])} | {fmt(r["mcnemar_p"], ".2g")} | '
        f'{fmt(r["genre_divergence"])} ({fmt(r["genre_divergence_frozen"])}) '
        f'| {fmt(r["popularity_rank"], ".0f")} '
        f'({fmt(r["popularity_p"], ".2g")}) | {fmt(r["closer"])} | '
        f'{fmt(r["farther"])} | {fmt(r["closer_vs_farther_p"], ".2g")} | '
        f'{fmt(r["mb"], ".2f")} | '
        f'{fmt(r["round_s"], ".1f")} |')
  tables.write(workdir, lines, rows)
  glines = ['| method | attribute | group | users | HR@10 | NDCG@10 | genre '
            'JS | popularity rank | closer |', '|' + ' --- |' * 9]
  for r in group_rows:
    glines.append(
        f'| {NAMES.get(r["method"], r["method"])} | {r["attribute"]} | '
        f'{r["group"]} | {r["users"]} | {fmt(r["hr"])} | {fmt(r["ndcg"])} | '
        f'{fmt(r["genre_divergence"])} | {fmt(r["popularity_rank"], ".0f")} '
        f'| {fmt(r["closer"])} |')
  with open(os.path.join(workdir, 'groups.md'), 'w') as f:
    f.write('\n'.join(glines) + '\n')
  with open(os.path.join(workdir, 'groups.json'), 'w') as f:
    json.dump(group_rows, f, indent=1)


def _define_flags():
  """Flags exist only when this module is the program."""
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_list('methods', list(recommendation.VARIANTS),
                    'SASRec methods (experiments/configs/recommendation.py).')
  flags.DEFINE_list('mf_algorithms', list(MF_ALGORITHMS),
                    'Matrix-factorization rows (personalization.py).')
  flags.DEFINE_integer('resamples', 1000, 'Bootstrap resamples per user.')
  flags.DEFINE_bool('testing', False, 'Tiny sizes (seconds).')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  run_all(f.workdir, f.methods, f.mf_algorithms, f.testing,
          resamples=f.resamples)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
