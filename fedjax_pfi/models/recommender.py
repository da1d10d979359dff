"""Recommenders over candidate lists (`fedjax_pfi.data.movielens`).

``AdditiveMF`` is FedRAP's scorer (Li et al., "Federated Recommendation with
Additive Personalization", ICLR 2024): user ``i`` scores item ``j`` as
``sigmoid(u_i . (D_ij + C_j) + b_i)`` with ``D`` a personal view of the item
embeddings (``personal_items``), ``C`` the global view (``global_items``) and
``u_i, b_i`` the user's embedding (``score``, a dense layer to one logit).
Under FedRAP only ``C`` is federated. Under FedAvg the whole model is shared
and ``D + C`` is one item table; under FedPer the user embedding (the head)
is personal and the item tables shared (federated matrix factorization with
private user embeddings, as FCF and FedMF have it).

`SASRec` is a sequential recommender over the same candidate lists, with
the user's history in front of them. `ranking_model` makes either a
`base.Model` over lists ``x`` int ``[B, L]``,
``y`` int ``[B, L]`` (1 for the positive, 0 for negatives): the loss of a
list is the mean binary cross-entropy of its ``L`` candidates (so a batch's
loss is the mean over its candidates, as with pointwise batches of equal
lists); its ``count`` is 1 and its ``correct`` is 1 when the positive ranks
in the top ``top_k`` of the list (HR@k: with one positive and 99 negatives,
the accuracy a run reports is HR@10); its ``ndcg`` is NDCG@k of the list,
which runs report beside it (`evaluation.summarize`). A negative scoring
equal to the positive counts as ranked above it, so a constant model has
HR 0, not 1 (and a NaN score, so a diverged model has HR 0 too).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from fedjax_pfi.models import base
from fedjax_pfi.models import transformer
from fedjax_pfi.tree_util import path_str


class AdditiveMF(nn.Module):
  """Logits ``[..., L]`` of items ``x`` (int ``[..., L]``); see the module
  docstring. Embeddings start N(0, ``init_std``^2) (torch's ``nn.Embedding``
  default, as FedRAP's code)."""
  num_items: int
  dim: int = 32
  init_std: float = 1.0

  @nn.compact
  def __call__(self, x, train=False):
    init = nn.initializers.normal(self.init_std)
    d = nn.Embed(self.num_items, self.dim, embedding_init=init,
                 name='personal_items')(x)
    c = nn.Embed(self.num_items, self.dim, embedding_init=init,
                 name='global_items')(x)
    return nn.Dense(1, name='score')(d + c)[..., 0]


class SASRec(nn.Module):
  """Next-item scores of a causal transformer over the user's history
  (Kang and McAuley, "Self-Attentive Sequential Recommendation", ICDM
  2018), built from the GPT-2 blocks of `fedjax_pfi.models.transformer`
  (so its LoRA targets are ``block_i/attn/q`` etc.).

  ``x`` int ``[B, history_len + L]``: the history (right-padded with
  ``num_items``) then ``L`` candidate items (`movielens.sequential`).
  Item embeddings (``items``, shared by the history and the candidates, as
  SASRec's) plus learned positions, ``num_layers`` pre-norm blocks, a final
  norm; the hidden state at the last real history position scores each
  candidate by a dot product with its embedding: logits ``[B, L]``. The
  blocks are causal and the padding comes after the history, so padding
  changes nothing. A history without any item has no last position and
  would read position 0 (padding); `movielens.sequential` never builds
  one, since every target has at least one item before it.
  """
  num_items: int
  history_len: int
  dim: int = 32
  num_layers: int = 2
  num_heads: int = 2
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    cfg = transformer.TransformerConfig.gpt2(
        self.num_items + 1, self.dim, self.num_layers, self.num_heads,
        max_len=self.history_len, dropout=self.dropout)
    hist, cand = x[..., :self.history_len], x[..., self.history_len:]
    items = nn.Embed(self.num_items + 1, self.dim,
                     embedding_init=nn.initializers.normal(0.02),
                     name='items')
    pos = self.param('pos_embed', nn.initializers.normal(0.02),
                     (self.history_len, self.dim))
    h = items(hist) + pos
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    for i in range(self.num_layers):
      h = transformer.Block(cfg, name=f'block_{i}')(h, train)
    h = nn.LayerNorm(epsilon=cfg.norm_eps, use_fast_variance=False,
                     name='ln_f')(h)
    last = jnp.sum(hist != self.num_items, -1) - 1  # [B]
    h_last = jnp.take_along_axis(h, jnp.maximum(last, 0)[:, None, None],
                                 1)[:, 0]
    return jnp.einsum('bd,bld->bl', h_last, items(cand))


#: The fields of `SASRec` a pretrained checkpoint's ``config.json`` records.
SASREC_FIELDS = ('num_items', 'history_len', 'dim', 'num_layers',
                 'num_heads', 'dropout')


def save_sasrec(directory: str, module: SASRec, params) -> str:
  """Writes a pretrained `SASRec`: ``config.json`` (its fields, `SASREC_FIELDS`)
  and ``model.safetensors`` (each param under its ``/``-joined path),
  into a temporary directory renamed to ``directory`` when complete (an
  existing one is replaced). Returns ``directory``."""
  flat = {path_str(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix='.sasrec_')
  with open(os.path.join(tmp, 'config.json'), 'w') as f:
    json.dump({'model': 'sasrec', **{k: getattr(module, k)
                                     for k in SASREC_FIELDS}}, f, indent=1)
  save_file(flat, os.path.join(tmp, 'model.safetensors'))
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.replace(tmp, directory)
  return directory


def load_sasrec(directory: str, num_items: int, history_len: int):
  """``(SASRec, params)`` of a checkpoint `save_sasrec` wrote, for a dataset
  of ``num_items`` items and histories of ``history_len``; a checkpoint for
  another item vocabulary or history length, or whose tensors do not fit
  its config, is refused naming both values."""
  config = os.path.join(directory, 'config.json')
  if not os.path.exists(config):
    raise FileNotFoundError(
        f'model.pretrained={directory!r} holds no config.json of a pretrained '
        'sasrec (experiments.pretrain_sasrec writes one).')
  with open(config) as f:
    cfg = json.load(f)
  if cfg.get('model') != 'sasrec' or set(SASREC_FIELDS) - set(cfg):
    raise ValueError(f'{config} is not a sasrec config (it needs "model": '
                     f'"sasrec" and {", ".join(SASREC_FIELDS)}).')
  if cfg['num_items'] != num_items:
    raise ValueError(
        f'the pretrained sasrec in {directory!r} has an item vocabulary of '
        f'{cfg["num_items"]} items, but the dataset has {num_items}: it was '
        'pretrained on other data; pretrain it on this dataset\'s items.')
  if cfg['history_len'] != history_len:
    raise ValueError(
        f'the pretrained sasrec in {directory!r} reads histories of '
        f'{cfg["history_len"]} items, but data.seq_len is {history_len}; set '
        f'--config.data.seq_len={cfg["history_len"]}.')
  module = SASRec(**{k: cfg[k] for k in SASREC_FIELDS})
  flat = load_file(os.path.join(directory, 'model.safetensors'))
  x = jnp.zeros((1, history_len + 1), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x)['params'])
  want = {path_str(p): v.shape for p, v in
          jax.tree_util.tree_flatten_with_path(shapes)[0]}
  got = {k: v.shape for k, v in flat.items()}
  if want != got:
    wrong = sorted(set(want) ^ set(got)) or sorted(
        k for k in want if want[k] != got[k])
    raise ValueError(f'{directory}/model.safetensors does not fit its '
                     f'config.json: {", ".join(wrong[:5])} differ.')
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  params = jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(flat[path_str(p)]) for p, _ in leaves])
  return module, params


def ranks(logits: jax.Array, y: jax.Array) -> jax.Array:
  """``[...]``: how many negatives of each list score at least its
  positive (0 = ranked first); a NaN score on either side counts as
  ranked above, so a diverged model hits nothing."""
  pos = jnp.sum(jnp.where(y == 1, logits, 0.0), -1, keepdims=True)
  return jnp.sum((y == 0) & ~(logits < pos), -1)


def hit_and_ndcg(logits: jax.Array, y: jax.Array, top_k: int):
  """HR@k and NDCG@k of each list (one positive per list)."""
  r = ranks(logits, y)
  hit = r < top_k
  ndcg = jnp.where(hit, 1.0 / jnp.log2(r.astype(jnp.float32) + 2.0), 0.0)
  return hit.astype(jnp.float32), ndcg


def list_stats(logits: jax.Array, y: jax.Array, top_k: int
               ) -> base.ExampleStats:
  """`base.ExampleStats` of lists: mean BCE of the candidates, HR@k, 1,
  and NDCG@k."""
  logits = logits.astype(jnp.float32)
  bce = optax.sigmoid_binary_cross_entropy(logits, y.astype(jnp.float32))
  hit, ndcg = hit_and_ndcg(logits, y, top_k)
  return base.ExampleStats(jnp.mean(bce, -1), hit, jnp.ones_like(hit),
                           ndcg=ndcg)


def ranking_model(module: nn.Module, sample_x: jax.Array, name: str,
                  top_k: int = 10) -> base.Model:
  """A `base.Model` scoring candidate lists with ``module`` (module
  docstring)."""

  def init(key):
    return module.init({'params': key}, sample_x, train=False)['params']

  def apply(params, x, rng=None, train=False):
    rngs = {'dropout': rng} if train and rng is not None else {}
    return module.apply({'params': params}, x, train=train, rngs=rngs)

  def example_stats(params, batch, rng=None, train=False):
    return list_stats(apply(params, batch['x'], rng, train), batch['y'],
                      top_k)

  return base.Model(init, apply, example_stats, name, sample_x)
