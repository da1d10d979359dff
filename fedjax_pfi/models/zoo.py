"""The model zoo: the federated-learning papers' standard models, in Flax.

- ``logreg``: multinomial logistic regression (FedProx's Synthetic/MNIST model).
- ``mlp``: the FedAvg paper's "2NN", 784-200-200-K with ReLU
  (McMahan et al., 2017, Section 3).
- ``cnn``: the FedAvg paper's CNN: 5x5x32 conv, 2x2 max-pool, 5x5x64 conv,
  2x2 max-pool, 512 dense, K softmax (McMahan et al., 2017; LEAF's FEMNIST
  model).
- ``char_lstm``: LEAF's Shakespeare model: 8-d character embedding, two LSTM
  layers of 256 units, a dense layer over the vocabulary at every position
  (Caldas et al., 2018).
- ``char_transformer``: a small pre-norm decoder-only transformer with learned
  positions (GPT-2 block layout), predicting the next character everywhere.
- ``transformer``: `fedjax_pfi.models.transformer` with GPT-2 or Llama blocks,
  optionally loaded from a Hugging Face safetensors directory (the foundation
  models that LoRA adapts).
- ``additive_mf``: FedRAP's recommender, ``sigmoid(u . (D_j + C_j) + b)``
  over candidate lists (`fedjax_pfi.models.recommender`; kwargs ``dim``,
  ``init_std``), for the ranking datasets (``movielens``).
- ``sasrec``: SASRec (Kang and McAuley, ICDM 2018), a causal transformer
  over the user's item history scoring the candidates
  (`fedjax_pfi.models.recommender.SASRec`; kwargs ``dim``, ``num_layers``,
  ``num_heads``, ``dropout``), for ``movielens_sequential``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi.models import base
from fedjax_pfi.models import conv as conv_lib
from fedjax_pfi.models import recommender


class LogReg(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  num_classes: int
  hidden: Sequence[int] = (200, 200)

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """FedAvg CNN. ``conv`` selects the convolution formulation (BUILD_NOTES.md,
  "CNN formulation"): ``'lax'`` is ``nn.Conv``; ``'patches'`` is
  `fedjax_pfi.models.conv.PatchConv` (im2col by shifted slices + matmul),
  which stays a batched matmul when vmapped over per-client weights. Both
  have the same parameter tree, so params move freely between them."""
  num_classes: int
  conv: str = 'lax'
  patch_method: str = 'slices'  # PatchConv's patch extractor

  @nn.compact
  def __call__(self, x, train=False):
    if self.conv == 'lax':
      conv_cls = nn.Conv
    elif self.conv == 'patches':
      conv_cls = functools.partial(conv_lib.PatchConv,
                                   method=self.patch_method)
    else:
      raise ValueError(f"cnn conv must be 'lax' or 'patches', got {self.conv!r}.")
    for i, features in enumerate((32, 64)):
      # Explicit names: the same param tree for every formulation.
      x = conv_cls(features, (5, 5), padding='SAME', name=f'Conv_{i}')(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(512)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


class CharLSTM(nn.Module):
  vocab_size: int
  embed_dim: int = 8
  hidden: int = 256
  num_layers: int = 2

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Embed(self.vocab_size, self.embed_dim)(x)
    for _ in range(self.num_layers):
      h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(h)
    return nn.Dense(self.vocab_size)(h)


class Block(nn.Module):
  """Pre-norm GPT-2 style block: causal self-attention, GELU MLP."""
  num_heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h, train=False):
    mask = nn.make_causal_mask(jnp.ones(h.shape[:-1]))
    a = nn.LayerNorm()(h)
    a = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout,
        deterministic=not train)(a, a, mask=mask)
    h = h + a
    m = nn.LayerNorm()(h)
    m = nn.Dense(4 * h.shape[-1])(m)
    m = nn.Dense(h.shape[-1])(nn.gelu(m))
    m = nn.Dropout(self.dropout, deterministic=not train)(m)
    return h + m


class CharTransformer(nn.Module):
  vocab_size: int
  max_len: int
  dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Embed(self.vocab_size, self.dim)(x)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02),
                     (self.max_len, self.dim))
    h = h + pos[:x.shape[-1]]
    for _ in range(self.num_layers):
      h = Block(self.num_heads, self.dropout)(h, train)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(h))


def transformer_config(meta, style: str = 'gpt2', dim: int = 128,
                       num_layers: int = 2, num_heads: int = 4, **kw):
  """The `TransformerConfig` of model ``'transformer'`` for a dataset's
  metadata: ``style`` ``'gpt2'`` or ``'llama'``, ``max_len`` defaulting to
  the dataset's ``seq_len``."""
  from fedjax_pfi.models import transformer  # pylint: disable=g-import-not-at-top
  presets = {'gpt2': transformer.TransformerConfig.gpt2,
             'llama': transformer.TransformerConfig.llama}
  if style not in presets:
    raise ValueError(f"unknown transformer style {style!r}; accepted: 'gpt2',"
                     " 'llama'.")
  kw.setdefault('max_len', meta['seq_len'])
  return presets[style](meta['vocab_size'], dim, num_layers, num_heads, **kw)


def _transformer(meta, **kw) -> nn.Module:
  from fedjax_pfi.models import transformer  # pylint: disable=g-import-not-at-top
  return transformer.Transformer(transformer_config(meta, **kw))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    'logreg': lambda meta, **kw: LogReg(meta['num_classes'], **kw),
    'mlp': lambda meta, **kw: MLP(meta['num_classes'], **kw),
    'cnn': lambda meta, **kw: CNN(meta['num_classes'], **kw),
    'char_lstm': lambda meta, **kw: CharLSTM(meta['vocab_size'], **kw),
    'char_transformer': lambda meta, **kw: CharTransformer(
        meta['vocab_size'], max_len=meta['seq_len'], **kw),
    'transformer': _transformer,
}
_SEQUENCE_MODELS = ('char_lstm', 'char_transformer', 'transformer')
_RANKING_MODELS = {
    'additive_mf': lambda meta, **kw: recommender.AdditiveMF(
        meta['num_items'], **kw),
    'sasrec': lambda meta, **kw: recommender.SASRec(
        meta['num_items'], _history_len(meta), **kw),
}


def _history_len(meta) -> int:
  if 'history_len' not in meta:
    raise ValueError("model 'sasrec' reads a history before the candidates: "
                     "use data.name='movielens_sequential' (this dataset's "
                     'lists have none).')
  return int(meta['history_len'])

#: The names `build_model` accepts.
MODEL_NAMES = tuple(sorted(set(_BUILDERS) | set(_RANKING_MODELS)))


def build_model(name: str, example_x: np.ndarray, metadata,
                pretrained: Optional[str] = None, **kwargs) -> base.Model:
  """Builds a registered model for data shaped like ``example_x``.

  Args:
    name: one of `MODEL_NAMES`.
    example_x: one batch ``[B, ...]`` of inputs (shapes only matter).
    metadata: the dataset's metadata (``num_classes`` or ``vocab_size``,
      ``seq_len``, ``pad_id``).
    pretrained: for ``'transformer'``, a directory in the Hugging Face layout
      (``config.json`` + safetensors, GPT-2 or Llama); the architecture comes
      from its ``config.json`` and ``init`` returns its weights.
    **kwargs: passed to the Flax module (e.g. ``conv='patches'``; for
      ``'transformer'``: ``style`` ('gpt2' or 'llama'), ``dim``,
      ``num_layers``, ``num_heads`` and any `TransformerConfig` field).

  Returns:
    A `Model` whose ``apply(params, x)`` maps a batch ``[B, ...]`` to
    logits ``[B, K]`` (classes, or a recommender's candidates; ``[B, T,
    V]`` for the sequence models, per position)
    and whose ``example_stats`` are per-example sums ``[B]``; the papers
    each model follows are in the module docstring.
  """
  if name not in MODEL_NAMES:
    raise ValueError(
        f'unknown model {name!r}; accepted: {", ".join(MODEL_NAMES)}.')
  ranking = metadata.get('task') == 'ranking'
  if ranking != (name in _RANKING_MODELS):
    raise ValueError(
        f'model {name!r} does not fit this dataset: ranking datasets (candidate'
        f' lists) take {", ".join(_RANKING_MODELS)}, the others take '
        f'{", ".join(sorted(_BUILDERS))}.')
  if ranking:
    if pretrained:
      if name != 'sasrec':
        raise ValueError(f'model {name!r} has no pretrained checkpoints.')
      if kwargs:
        raise ValueError(
            f'model.kwargs {sorted(kwargs)} conflict with model.pretrained='
            f'{pretrained!r}: the architecture comes from its config.json.')
      module, params = recommender.load_sasrec(
          pretrained, int(metadata['num_items']), _history_len(metadata))
      return recommender.ranking_model(
          module, jnp.asarray(example_x), name,
          top_k=int(metadata.get('top_k', 10)))._replace(
              init=lambda key: params)
    return recommender.ranking_model(
        _RANKING_MODELS[name](metadata, **kwargs), jnp.asarray(example_x),
        name, top_k=int(metadata.get('top_k', 10)))
  sequence = name in _SEQUENCE_MODELS
  needed = ('vocab_size',) if sequence else ('num_classes',)
  for key in needed:
    if key not in metadata:
      raise ValueError(
          f'model {name!r} needs dataset metadata {key!r}, which this dataset '
          f'lacks (it has {sorted(metadata)}); is it a '
          f'{"sequence" if sequence else "classification"} dataset?')
  meta = dict(metadata)
  if sequence:
    meta.setdefault('seq_len', int(np.asarray(example_x).shape[-1]))
  if pretrained:
    return _pretrained(name, example_x, meta, pretrained, kwargs)
  module = _BUILDERS[name](meta, **kwargs)
  return base.classifier(module, jnp.asarray(example_x), name,
                         pad_id=metadata.get('pad_id'))


def _pretrained(name, example_x, meta, directory, kwargs) -> base.Model:
  from fedjax_pfi.models import hf_io  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.models import transformer  # pylint: disable=g-import-not-at-top
  if name != 'transformer':
    raise ValueError(f"model.pretrained loads a 'transformer'; model {name!r} "
                     'has no pretrained checkpoints.')
  if kwargs:
    raise ValueError(
        f'model.kwargs {sorted(kwargs)} conflict with model.pretrained='
        f'{directory!r}: the architecture comes from its config.json.')
  try:
    cfg, params = hf_io.load_pretrained(directory)
  except hf_io.CheckpointNotFoundError as e:
    raise hf_io.CheckpointNotFoundError(
        f'{e} Pretrain the embedded foundation model with `python -m '
        'experiments.pretrain --config=experiments/configs/'
        'pretrain_shakespeare.py --workdir=/tmp/fedjax_pfi/pretrained`, or '
        'set --config.model.pretrained to a Hugging Face GPT-2/Llama '
        'safetensors directory.') from e
  if cfg.vocab_size != meta['vocab_size']:
    raise ValueError(
        f'the pretrained model in {directory!r} has a vocabulary of '
        f'{cfg.vocab_size} tokens but the dataset\'s tokenizer '
        f'({meta.get("tokenizer", "?")!r}) has {meta["vocab_size"]}; use the '
        'tokenizer the model was trained with (data.tokenizer).')
  if meta['seq_len'] > cfg.max_len:
    raise ValueError(
        f'data.seq_len={meta["seq_len"]} exceeds the pretrained model\'s '
        f'{cfg.max_len} positions.')
  params = jax.tree.map(jnp.asarray, params)
  model = base.classifier(transformer.Transformer(cfg),
                          jnp.asarray(example_x), name,
                          pad_id=meta.get('pad_id'))
  return model._replace(init=lambda key: params)
