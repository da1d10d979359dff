r"""Pretrain the recommendation foundation model: SASRec on held-out users.

  python -m experiments.pretrain --config=experiments/configs/pretrain_sasrec.py \
      --workdir=/tmp/fedjax_pfi/pretrained_sasrec

Issue 19's "foundation model" for recommendation: `SASRec` (Kang and
McAuley, ICDM 2018) trained centrally, next-item prediction, on the
histories of 20% of MovieLens-100k's users (``data.heldout_fraction``),
which are never federated clients; the federated runs use the same ``data``
settings with ``--config.model.pretrained=WORKDIR/model`` and personalize it
on the other 80% (`fedjax_pfi.pretraining.pretrain_sasrec`). Validation:
HR@10 and NDCG@10 of the held-out users' test items against the same 99
negatives as the FedRAP table. Variant ``testing`` (seconds): a tiny model,
20 steps. The ratings come from the ``recbole==1.2.1`` wheel (README,
"Federated recommendation").
"""

import ml_collections


def get_config(variant: str = ''):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name='movielens_sequential', path=None, seq_len=50, num_negatives=4,
      eval_negatives=99, top_k=10, heldout_fraction=0.2, seed=0))
  c.model = ml_collections.ConfigDict(dict(
      name='sasrec', dim=64, num_layers=2, num_heads=2, dropout=0.1))
  c.steps = 2000
  c.batch_size = 128
  c.learning_rate = 1e-3
  c.warmup_steps = 100
  c.weight_decay = 0.0
  c.eval_every = 500
  c.eval_batch_size = 256
  if variant == 'testing':
    c.model = ml_collections.ConfigDict(dict(
        name='sasrec', dim=8, num_layers=1, num_heads=2, dropout=0.0))
    c.data.seq_len = 8
    c.steps = 20
    c.batch_size = 16
    c.warmup_steps = 2
    c.eval_every = 10
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; accepted: '', 'testing'.")
  return c
