"""Centralized pretraining of a foundation model, saved in the Hugging Face layout.

`pretrain` ``(config, workdir)`` is what ``experiments/pretrain.py`` runs: it
trains a `fedjax_pfi.models.transformer.Transformer` on a dataset's pooled
examples (`fedjax_pfi.algorithms.centralized`) and writes

- ``WORKDIR/metrics.jsonl``: training loss, validation loss and accuracy;
- ``WORKDIR/model/``: ``config.json`` + ``model.safetensors`` in the GPT-2 or
  Llama layout (`fedjax_pfi.models.hf_io`), loadable with
  ``--config.model.pretrained`` and by Hugging Face ``transformers``, and
  ``final.json`` (the last metrics row, the majority baseline, the size).

The model directory is written under a temporary name and renamed when
complete. Re-running with the same config finds it and returns its metrics;
a different config in the same workdir is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from fedjax_pfi import checkpoint as checkpoint_lib
from fedjax_pfi import evaluation
from fedjax_pfi.algorithms import centralized
from fedjax_pfi.data import registry
from fedjax_pfi.models import base
from fedjax_pfi.models import hf_io
from fedjax_pfi.models import recommender
from fedjax_pfi.models import transformer
from fedjax_pfi.models import zoo


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains and saves ``workdir/model``; returns the final metrics row.
  A ``model.name='sasrec'`` config goes to `pretrain_sasrec`."""
  if config.model.get('name', 'transformer') == 'sasrec':
    return pretrain_sasrec(config, workdir)
  done = _saved(config, workdir)
  if done is not None:
    return done
  splits = registry.load_splits(config.data)
  pooled, val = splits.train, splits.test
  kwargs = config.model.to_dict()
  style = kwargs.get('style', 'gpt2')
  meta = dict(pooled.metadata)
  module_cfg = zoo.transformer_config(meta, **kwargs)
  model = base.classifier(transformer.Transformer(module_cfg),
                          pooled.columns['x'][:2], 'transformer',
                          pad_id=meta['pad_id'])
  params, final = _train(config, workdir, model, pooled, val)
  final['val/majority_baseline'] = evaluation.majority_baseline(
      pooled, val, pooled.metadata.get('pad_id'))
  final['params'] = transformer.count_params(params)
  return _save(config, workdir, final, lambda tmp: hf_io.save_pretrained(
      tmp, module_cfg, params, style))


def pretrain_sasrec(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The recommendation foundation model (issue 19): a `recommender.SASRec`
  trained centrally on the HELD-OUT users' histories of
  ``movielens_sequential`` (``data.heldout_fraction`` > 0), so that no
  federated client's data is pretraining data, the way the embedded
  language model is pretrained on plays that are not clients. Validation:
  those users' test items. Writes ``workdir/model`` (`recommender.save_sasrec`,
  loadable with ``--config.model.pretrained``; the federated runs must use
  the same ``data`` settings, so that they exclude the same users) and
  ``workdir/metrics.jsonl``; returns the final metrics row. Re-running with
  the same config returns the saved row; another config is refused."""
  done = _saved(config, workdir)
  if done is not None:
    return done
  if config.data.name != 'movielens_sequential':
    raise ValueError(f"sasrec pretrains on data.name='movielens_sequential', "
                     f'got {config.data.name!r}.')
  if not float(config.data.get('heldout_fraction', 0.0)) > 0:
    raise ValueError('pretraining sasrec needs held-out users '
                     '(data.heldout_fraction > 0): they are its data, and no '
                     'federated client is.')
  splits = registry.load_splits(config.data)
  pooled, val = splits.heldout_train, splits.heldout_test
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != 'name'}
  meta = dict(pooled.metadata)
  module = recommender.SASRec(meta['num_items'], meta['history_len'],
                              **kwargs)
  model = recommender.ranking_model(module, pooled.columns['x'][:2], 'sasrec',
                                    top_k=int(meta['top_k']))
  params, final = _train(config, workdir, model, pooled, val)
  final['users'] = int(pooled.num_clients)
  final['examples'] = int(pooled.num_examples)
  final['params'] = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  return _save(config, workdir, final,
               lambda tmp: recommender.save_sasrec(tmp, module, params))


def _saved(config: ml_collections.ConfigDict, workdir: str):
  """The final row of a model this config already pretrained in
  ``workdir`` (None if there is none); another config's is refused."""
  os.makedirs(workdir, exist_ok=True)
  model_dir = os.path.join(workdir, 'model')
  if not os.path.exists(model_dir):
    return None
  with open(os.path.join(workdir, 'config_fingerprint.txt')) as f:
    if f.read().strip() != checkpoint_lib.fingerprint(config.to_dict()):
      raise ValueError(
          f'{model_dir} was pretrained with a different config; use a fresh '
          '--workdir.')
  with open(os.path.join(model_dir, 'final.json')) as f:
    return json.load(f)


def _train(config: ml_collections.ConfigDict, workdir: str,
           model: base.Model, pooled, val) -> tuple[object, dict]:
  """Centralized AdamW with a warmup-cosine schedule on ``pooled``'s
  examples, evaluated on ``val`` every ``config.eval_every`` steps; the
  rows go to ``workdir/metrics.jsonl``. Returns the params and the last
  row."""
  key = jax.random.key(config.seed)
  params = model.init(key)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, max(config.steps, 1))
  opt = optax.adamw(schedule, weight_decay=config.weight_decay)
  evaluator = evaluation.Evaluator(model, config.eval_batch_size)
  rows = []
  t0 = time.perf_counter()
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as log:

    def report(step, p, loss):
      row = {'step': step, 'train_loss': loss,
             'time/elapsed_s': time.perf_counter() - t0}
      if step % config.eval_every == 0 or step == config.steps:
        row.update(evaluation.summarize(evaluator.evaluate(p, val), 'val/'))
      rows.append(row)
      log.write(json.dumps(row) + '\n')
      log.flush()
      logging.info('%s', row)

    params = centralized.train(
        model, params, pooled, optimizer=opt, batch_size=config.batch_size,
        num_steps=config.steps, seed=config.seed, key=key, callback=report,
        callback_every=min(config.eval_every, 50))
  return params, dict(rows[-1])


def _save(config: ml_collections.ConfigDict, workdir: str, final: dict,
          write) -> dict:
  """``write(tmp)`` writes the model files into a temporary directory,
  which gains ``final.json`` and is renamed to ``workdir/model`` once
  whole, after the config's fingerprint is stamped. Returns ``final``."""
  model_dir = os.path.join(workdir, 'model')
  tmp = model_dir + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  write(tmp)
  with open(os.path.join(tmp, 'final.json'), 'w') as f:
    json.dump(final, f, indent=1)
  with open(os.path.join(workdir, 'config_fingerprint.txt'), 'w') as f:
    f.write(checkpoint_lib.fingerprint(config.to_dict()))
  os.replace(tmp, model_dir)
  return final
