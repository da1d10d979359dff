r"""Federated PEFT on Shakespeare roles: every algorithm, one table.

  python -m experiments.peft_compare --workdir=/tmp/fedjax_pfi/peft_compare

1. Pretrains the byte-level GPT-2 on the history plays into
   ``WORKDIR/pretrained`` (``experiments/configs/pretrain_shakespeare.py``),
   unless it is there already.
2. Runs ``experiments/configs/shakespeare_lora.py`` with every variant
   (FedIT, FFA-LoRA, FedSA-LoRA, local-only LoRA, FLoRA, HetLoRA, full
   fine-tuning) into ``WORKDIR/<variant>``; each run resumes from its workdir.
3. Trains the centralized LoRA baseline: FedIT's adapters, from FedIT's
   starting point, on every training client's windows pooled, with as many
   SGD steps of the same batch size as FedIT's clients took in all, and
   evaluates it per client.
4. Evaluates the pretrained model untouched, per client.
5. Writes ``WORKDIR/table.md``: per-client next-byte accuracy on each role's
   own held-out windows (mean, 10th percentile, worst), held-out roles'
   accuracy, the parameters each client trains, and total bytes communicated
   (centralized: the raw text uploaded).

``--testing`` shrinks everything to seconds (tiny pretraining, 2 rounds).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
import optax

from experiments import tables
from experiments.configs import pretrain_shakespeare
from experiments.configs import shakespeare_lora
from fedjax_pfi import evaluation
from fedjax_pfi import pretraining
from fedjax_pfi import training
from fedjax_pfi.algorithms import centralized
from fedjax_pfi.algorithms import param_groups
from fedjax_pfi.algorithms import registry as algorithms
from fedjax_pfi.peft import lora

NAMES = {'fedit': 'FedIT (LoRA, A and B averaged)',
         'ffa_lora': 'FFA-LoRA (A frozen, B averaged)',
         'fedsa_lora': 'FedSA-LoRA (A averaged, B personal)',
         'local_lora': 'local-only LoRA',
         'flora': 'FLoRA (stacked, heterogeneous ranks)',
         'hetlora': 'HetLoRA (zero-padded, heterogeneous ranks)',
         'full': 'full fine-tuning (FedAvg)',
         'centralized': 'centralized LoRA (pooled data)',
         'pretrained': 'pretrained model, no fine-tuning'}


def variant_config(variant: str, pretrained: str, testing: bool, rounds):
  config = shakespeare_lora.get_config(
      variant + (',testing' if testing else ''))
  config.model.pretrained = pretrained
  if testing:  # the tiny pretrained model reads the same plays' bytes
    config.model.kwargs = type(config.model.kwargs)()
    config.data.seq_len = 16
  if rounds is not None:
    config.rounds = rounds
  config.progress = False
  return config


def row_of(metrics: dict, prefix: str = 'test/') -> dict:
  return {k: metrics.get(prefix + k) for k in (
      'client_accuracy_mean', 'client_accuracy_p10', 'client_accuracy_worst',
      'accuracy')}


def trainable_params(exp, params) -> int:
  """Parameters a client trains: everything it does not hold frozen (for
  FLoRA and HetLoRA, the adapters of the largest rank)."""
  def count(t):
    return int(sum(x.size for x in jax.tree.leaves(t)))
  if exp.config.algorithm == 'flora':  # params are the base; adapters fresh
    r_max = int(algorithms.client_ranks(
        exp.config.peft, exp.splits.train.num_clients, exp.config.seed).max())
    return count(lora.init_adapters(
        params, algorithms.lora_config(exp.config.peft), jax.random.key(0),
        r_max))
  return count(params) - count(exp.algorithm.frozen_part(params))


def evaluate_params(exp, model, params) -> dict:
  ev = evaluation.Evaluator(model, exp.config.eval_batch_size)
  out = evaluation.summarize(ev.evaluate(params, exp.splits.test), 'test/')
  if exp.splits.heldout_test is not None:
    out.update(evaluation.summarize(
        ev.evaluate(params, exp.splits.heldout_test), 'heldout/'))
  return out


def pretrain(workdir: str, testing: bool = False) -> str:
  """Pretrains the foundation model into ``WORKDIR/pretrained`` (or finds
  it there); returns the model's directory."""
  os.makedirs(workdir, exist_ok=True)
  pt_config = pretrain_shakespeare.get_config('testing' if testing else '')
  if testing:
    pt_config.data.plays = ('macbeth', 'the-tempest')
    pt_config.data.seq_len = 16
  pretraining.pretrain(pt_config, os.path.join(workdir, 'pretrained'))
  return os.path.join(workdir, 'pretrained', 'model')


def compare(workdir: str, variants, testing: bool = False, rounds=None
            ) -> list[dict]:
  pretrained = pretrain(workdir, testing)
  rows = []
  for v in variants:
    config = variant_config(v, pretrained, testing, rounds)
    final = training.run(config, os.path.join(workdir, v))
    history = training.read_metrics(os.path.join(workdir, v))
    exp = training.build(config)
    rows.append(dict(
        method=v, **row_of(final),
        heldout=final.get('heldout/accuracy'),
        trainable=trainable_params(exp, training.initial_params(exp)),
        bytes=final['comm/download_bytes_cumulative'] +
        final['comm/upload_bytes_cumulative'],
        examples=sum(r['train_examples'] for r in history)))
  # Centralized LoRA and the untouched pretrained model.
  config = variant_config('fedit', pretrained, testing, rounds)
  exp = training.build(config)
  params = training.initial_params(exp)  # FedIT's starting adapters
  base_model = exp.base_model
  base_eval = evaluate_params(exp, base_model, params['base'])
  rows.append(dict(method='pretrained', **row_of(base_eval),
                   heldout=base_eval.get('heldout/accuracy'), trainable=0,
                   bytes=0, examples=0))
  fedit = next((r for r in rows if r['method'] == 'fedit'), None)
  budget = fedit['examples'] if fedit else (
      config.rounds * config.clients_per_round * config.client.batch_size *
      config.client.max_steps)
  steps = int(np.ceil(budget / config.client.batch_size))
  trained = centralized.train(
      exp.model, params, exp.splits.train,
      optimizer=optax.sgd(config.client.learning_rate),
      batch_size=config.client.batch_size, num_steps=steps, seed=config.seed,
      frozen=algorithms.LORA_PARTITIONS['fedit'][0])
  cent = evaluate_params(exp, exp.model, trained)
  x = exp.splits.train.columns['x']
  pad = exp.splits.metadata['pad_id']
  rows.append(dict(method='centralized', **row_of(cent),
                   heldout=cent.get('heldout/accuracy'),
                   trainable=param_groups.num_bytes(params['lora']) // 4,
                   bytes=int(np.sum(x != pad)), examples=steps *
                   config.client.batch_size))
  ranks = variant_config('flora', pretrained, testing, rounds).peft.client_ranks
  write_table(workdir, rows, config, ranks)
  return rows


def write_table(workdir: str, rows: list[dict], config, ranks: str) -> None:
  full = next((r['bytes'] for r in rows if r['method'] == 'full'), None)
  lines = [
      f'Shakespeare roles, {config.rounds} rounds of '
      f'{config.clients_per_round} clients; per-client next-byte accuracy on '
      "each role's own held-out windows; FLoRA and HetLoRA clients have "
      f'ranks drawn from {{{ranks}}} (their trainable count is at the '
      'largest).', '',
      '| method | client mean | client p10 | worst client | held-out roles |'
      ' trainable params / client | MB communicated | vs full FT |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    share = (f'{r["bytes"] / full:.3f}' if full and r['method'] not in (
        'pretrained', 'centralized') else '-')
    def fmt(v):
      return '-' if v is None else f'{v:.3f}'
    lines.append(
        f'| {NAMES.get(r["method"], r["method"])} | '
        f'{fmt(r["client_accuracy_mean"])} | {fmt(r["client_accuracy_p10"])} '
        f'| {fmt(r["client_accuracy_worst"])} | {fmt(r["heldout"])} | '
        f'{r["trainable"]:,} | {r["bytes"] / 1e6:.3f} | {share} |')
  tables.write(workdir, lines, rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  compare(f.workdir, f.variants, f.testing, f.rounds)


def _define_flags():
  """Flags exist only when this module is the program (tests import it
  beside other experiment scripts that define ``--workdir`` too)."""
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_list('variants', list(shakespeare_lora.VARIANTS),
                    'Which algorithms to run.')
  flags.DEFINE_integer('rounds', None, 'Override config.rounds.')
  flags.DEFINE_bool('testing', False, 'Tiny sizes (seconds).')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  _define_flags()
  app.run(main)
