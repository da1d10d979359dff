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

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_pfi.models import base
from fedjax_pfi.models import transformer


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
  changes nothing. A history without any item is refused: its row has no
  last position (the task never builds one).
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
    del rng
    return module.apply({'params': params}, x, train=train)

  def example_stats(params, batch, rng=None, train=False):
    return list_stats(apply(params, batch['x'], rng, train), batch['y'],
                      top_k)

  return base.Model(init, apply, example_stats, name, sample_x)
