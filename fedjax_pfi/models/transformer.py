"""A decoder-only transformer with GPT-2-style and Llama-style blocks.

One Flax module, `Transformer`, covers both published layouts; a frozen
`TransformerConfig` picks the parts:

- GPT-2 (Radford et al., 2019): LayerNorm with bias, learned absolute
  positions, a tanh-approximate GELU MLP of width ``4 * dim``, biases on every
  projection, the LM head tied to the token embedding.
- Llama (Touvron et al., 2023, "LLaMA: Open and Efficient Foundation Language
  Models"; Llama 2 adds grouped-query attention, Ainslie et al., 2023):
  RMSNorm (Zhang & Sennrich, 2019), rotary positions (Su et al., 2021,
  "RoFormer"), a SwiGLU MLP (Shazeer, 2020), no biases, an untied LM head.

Both are pre-norm: ``h = h + attn(ln_attn(h)); h = h + mlp(ln_mlp(h))``,
then a final ``ln_f``. Every projection is a plain ``flax.linen.Dense`` with a
fixed name, so LoRA (which intercepts ``nn.Dense`` by module path) and the
Hugging Face converter in `fedjax_pfi.models.hf_io` see one stable tree::

  embed/embedding                    [V, D]
  pos_embed                          [max_len, D]   (positions == 'learned')
  block_{i}/ln_attn/scale, bias      [D]            (bias: layernorm, use_bias)
  block_{i}/attn/q/kernel            [D, H*hd]      (+ bias [H*hd] if use_bias)
  block_{i}/attn/k/kernel            [D, KV*hd]
  block_{i}/attn/v/kernel            [D, KV*hd]
  block_{i}/attn/o/kernel            [H*hd, D]
  block_{i}/ln_mlp/scale, bias       [D]
  block_{i}/mlp/fc, proj             [D, F], [F, D]  (mlp == 'gelu')
  block_{i}/mlp/gate, up, down       [D, F], [D, F], [F, D]  (mlp == 'swiglu')
  ln_f/scale, bias                   [D]
  lm_head/kernel                     [D, V]         (not tie_embeddings)

Numerics follow Hugging Face ``transformers``: attention scores and softmax in
float32, RoPE in the "rotate_half" convention, GQA heads repeated as
``repeat_kv`` does, LayerNorm variance computed as ``E[(x - mean)^2]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ('layernorm', 'rmsnorm')
POSITIONS = ('learned', 'rope')
MLPS = ('gelu', 'swiglu')


def llama_mlp_dim(dim: int, multiple_of: int = 8) -> int:
  """The Llama SwiGLU width: ``int(2 * 4 * dim / 3)`` rounded up.

  Meta's reference code rounds up to a multiple of 256 (``dim=4096`` ->
  11008); the default here is 8, so that tiny test models stay tiny. Released
  checkpoints state their width (``intermediate_size``) explicitly anyway.
  """
  hidden = int(2 * 4 * dim / 3)
  return multiple_of * -(-hidden // multiple_of)


def _is_pos_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of `Transformer`; validated on construction.

  Attributes:
    vocab_size: number of token ids ``V``.
    dim: model width ``D``.
    num_layers: number of blocks.
    num_heads: query heads ``H``; ``head_dim = dim // num_heads``.
    num_kv_heads: key/value heads ``KV`` (None: ``num_heads``). Smaller than
      ``num_heads`` means grouped-query attention; it must divide it.
    mlp_dim: MLP hidden width ``F`` (None: ``4 * dim``). The `llama` preset
      fills it in with `llama_mlp_dim`.
    max_len: longest sequence accepted (rows of ``pos_embed`` when learned).
    norm: ``'layernorm'`` or ``'rmsnorm'``.
    positions: ``'learned'`` (absolute, added to the embedding) or ``'rope'``.
    mlp: ``'gelu'`` (tanh-approximate GELU, GPT-2) or ``'swiglu'``.
    use_bias: biases on every Dense (and on LayerNorm).
    tie_embeddings: logits are ``h @ embed.T``; otherwise a bias-free
      ``lm_head``.
    norm_eps: epsilon of the norms.
    rope_theta: RoPE base.
    dropout: rate on the embedding, attention probabilities and both residual
      branches (GPT-2's embd/attn/resid_pdrop), active when ``train=True``.
  """
  vocab_size: int
  dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None
  mlp_dim: int | None = None
  max_len: int = 1024
  norm: str = 'layernorm'
  positions: str = 'learned'
  mlp: str = 'gelu'
  use_bias: bool = True
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  dropout: float = 0.0

  def __post_init__(self):
    self.validate()

  @classmethod
  def gpt2(cls, vocab_size: int, dim: int, num_layers: int, num_heads: int,
           max_len: int = 1024, **kw) -> TransformerConfig:
    """GPT-2: LayerNorm, learned positions, GELU MLP, biases, tied head."""
    return cls(vocab_size=vocab_size, dim=dim, num_layers=num_layers,
               num_heads=num_heads, max_len=max_len, **kw)

  @classmethod
  def llama(cls, vocab_size: int, dim: int, num_layers: int, num_heads: int,
            num_kv_heads: int | None = None, mlp_dim: int | None = None,
            max_len: int = 2048, **kw) -> TransformerConfig:
    """Llama: RMSNorm (eps 1e-6), RoPE, SwiGLU, no biases, untied head.

    ``mlp_dim=None`` means `llama_mlp_dim` of ``dim`` (multiple of 8).
    """
    fields = dict(norm='rmsnorm', positions='rope', mlp='swiglu',
                  use_bias=False, tie_embeddings=False, norm_eps=1e-6)
    fields.update(kw)
    if mlp_dim is None and _is_pos_int(dim):
      mlp_dim = llama_mlp_dim(dim)
    return cls(vocab_size=vocab_size, dim=dim, num_layers=num_layers,
               num_heads=num_heads, num_kv_heads=num_kv_heads,
               mlp_dim=mlp_dim, max_len=max_len, **fields)

  @property
  def head_dim(self) -> int:
    """Each head's width ``hd = dim // num_heads``."""
    return self.dim // self.num_heads

  @property
  def kv_heads(self) -> int:
    """``num_kv_heads`` with None resolved."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def ffn_dim(self) -> int:
    """``mlp_dim`` with None resolved."""
    return 4 * self.dim if self.mlp_dim is None else self.mlp_dim

  def validate(self) -> None:
    """Raises ValueError naming the first bad field and what is accepted."""
    for name in ('vocab_size', 'dim', 'num_layers', 'num_heads', 'max_len'):
      v = getattr(self, name)
      if not _is_pos_int(v):
        raise ValueError(f'{name} must be a positive int, got {v!r}.')
    for name in ('num_kv_heads', 'mlp_dim'):
      v = getattr(self, name)
      if v is not None and not _is_pos_int(v):
        raise ValueError(f'{name} must be a positive int or None, got {v!r}.')
    for name, accepted in (('norm', NORMS), ('positions', POSITIONS),
                           ('mlp', MLPS)):
      v = getattr(self, name)
      if v not in accepted:
        raise ValueError(f'unknown {name} {v!r}; accepted: '
                         f'{", ".join(map(repr, accepted))}.')
    if self.dim % self.num_heads:
      raise ValueError(f'dim {self.dim} is not divisible by num_heads '
                       f'{self.num_heads}; dim must be a multiple of it.')
    if self.num_heads % self.kv_heads:
      raise ValueError(f'num_heads {self.num_heads} is not divisible by '
                       f'num_kv_heads {self.kv_heads}; num_kv_heads must '
                       f'divide num_heads.')
    if self.positions == 'rope' and self.head_dim % 2:
      raise ValueError(f'rope needs an even head_dim, got head_dim '
                       f'{self.head_dim} (dim {self.dim} / num_heads '
                       f'{self.num_heads}).')
    if not self.norm_eps > 0:
      raise ValueError(f'norm_eps must be > 0, got {self.norm_eps!r}.')
    if not self.rope_theta > 0:
      raise ValueError(f'rope_theta must be > 0, got {self.rope_theta!r}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {self.dropout!r}.')


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, Hugging Face Llama's "rotate_half" layout.

  ``inv_freq = 1 / theta ** (arange(0, hd, 2) / hd)``, ``emb = concat(freqs,
  freqs)``, ``out = x * cos(emb) + rotate_half(x) * sin(emb)`` with
  ``rotate_half(x) = concat(-x2, x1)`` (Su et al., 2021, as implemented in
  ``transformers``' ``apply_rotary_pos_emb``). Computed in float32.

  Args:
    x: ``[..., T, heads, hd]`` queries or keys, ``hd`` even.
    positions: ``[T]`` or ``[..., T]`` integer positions.
    theta: the base.

  Returns:
    ``x`` rotated, same shape and dtype.
  """
  hd = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  # [..., T, hd / 2]
  freqs = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..T, 1, hd]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :hd // 2], xf[..., hd // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


def _init(config: TransformerConfig, residual: bool = False):
  # GPT-2's init: N(0, 0.02), residual output projections scaled by
  # 1/sqrt(2 * num_layers) (Radford et al., 2019, Section 2.3).
  std = 0.02 / math.sqrt(2 * config.num_layers) if residual else 0.02
  return nn.initializers.normal(std)


def _norm(config: TransformerConfig, name: str) -> nn.Module:
  if config.norm == 'layernorm':
    # Two-pass variance, as torch's LayerNorm: GPT-2's residual stream has
    # large means, where E[x^2] - E[x]^2 loses float32 digits.
    return nn.LayerNorm(epsilon=config.norm_eps, use_bias=config.use_bias,
                        use_fast_variance=False, name=name)
  # Flax's RMSNorm is x * rsqrt(mean(x^2) + eps) * scale with the statistics
  # in (at least) float32: Llama's LlamaRMSNorm.
  return nn.RMSNorm(epsilon=config.norm_eps, name=name)


class Attention(nn.Module):
  """Causal multi-head / grouped-query self-attention.

  ``x`` ``[B, T, D]`` -> ``[B, T, D]``. Dense ``q``, ``k``, ``v``, ``o``;
  RoPE on q and k when ``positions == 'rope'``; each kv head serves
  ``num_heads // num_kv_heads`` consecutive query heads (HF ``repeat_kv``).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cfg = self.config
    b, t, _ = x.shape
    h, kv, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    dense = functools.partial(nn.Dense, use_bias=cfg.use_bias,
                              kernel_init=_init(cfg))
    q = dense(h * hd, name='q')(x).reshape(b, t, h, hd)
    k = dense(kv * hd, name='k')(x).reshape(b, t, kv, hd)
    v = dense(kv * hd, name='v')(x).reshape(b, t, kv, hd)
    if cfg.positions == 'rope':
      pos = jnp.arange(t)
      q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
    if kv != h:
      k = jnp.repeat(k, h // kv, axis=2)
      v = jnp.repeat(v, h // kv, axis=2)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32),
                        k.astype(jnp.float32)) / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.dropout, deterministic=not train)(probs)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
    out = dense(cfg.dim, name='o', kernel_init=_init(cfg, residual=True))(
        out.reshape(b, t, h * hd))
    return nn.Dropout(cfg.dropout, deterministic=not train)(out)


class Mlp(nn.Module):
  """``'gelu'``: ``proj(gelu_tanh(fc(x)))``; ``'swiglu'``:
  ``down(silu(gate(x)) * up(x))``. ``[B, T, D]`` -> ``[B, T, D]``."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cfg = self.config
    dense = functools.partial(nn.Dense, use_bias=cfg.use_bias,
                              kernel_init=_init(cfg))
    out_init = _init(cfg, residual=True)
    if cfg.mlp == 'gelu':
      y = nn.gelu(dense(cfg.ffn_dim, name='fc')(x), approximate=True)
      y = dense(cfg.dim, name='proj', kernel_init=out_init)(y)
    else:
      y = (nn.silu(dense(cfg.ffn_dim, name='gate')(x)) *
           dense(cfg.ffn_dim, name='up')(x))
      y = dense(cfg.dim, name='down', kernel_init=out_init)(y)
    return nn.Dropout(cfg.dropout, deterministic=not train)(y)


class Block(nn.Module):
  """Pre-norm block: ``h + attn(ln_attn(h))``, then ``+ mlp(ln_mlp(h))``."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
    cfg = self.config
    h = h + Attention(cfg, name='attn')(_norm(cfg, 'ln_attn')(h), train)
    return h + Mlp(cfg, name='mlp')(_norm(cfg, 'ln_mlp')(h), train)


class Transformer(nn.Module):
  """Decoder-only language model: tokens ``[B, T]`` -> logits ``[B, T, V]``.

  ``T`` may be anything up to ``config.max_len``; position ``t`` only sees
  tokens ``0..t``. With ``train=True`` and ``config.dropout > 0``, pass
  ``rngs={'dropout': key}`` to ``apply``.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    cfg = self.config
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be [batch, time], got shape '
                       f'{tuple(tokens.shape)}.')
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'tokens must be integer ids, got dtype {tokens.dtype}.')
    t = tokens.shape[1]
    if t > cfg.max_len:
      raise ValueError(f'sequence length {t} exceeds max_len {cfg.max_len}; '
                       f'pass at most {cfg.max_len} tokens per row.')
    embed = nn.Embed(cfg.vocab_size, cfg.dim,
                     embedding_init=nn.initializers.normal(0.02), name='embed')
    h = embed(tokens)
    if cfg.positions == 'learned':
      pos = self.param('pos_embed', nn.initializers.normal(0.02),
                       (cfg.max_len, cfg.dim))
      h = h + pos[:t]
    h = nn.Dropout(cfg.dropout, deterministic=not train)(h)
    for i in range(cfg.num_layers):
      h = Block(cfg, name=f'block_{i}')(h, train)
    h = _norm(cfg, 'ln_f')(h)
    if cfg.tie_embeddings:
      logits = embed.attend(h)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False,
                        kernel_init=_init(cfg), name='lm_head')(h)
    return logits.astype(jnp.float32)


def count_params(params: Any) -> int:
  """Total number of scalars in a params pytree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
