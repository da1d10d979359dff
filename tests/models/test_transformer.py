"""Transformer: param tree, config checks, causality, RoPE, GQA, dropout.

The numerical check against hand-written numpy GPT-2 / Llama forward passes
lives in test_hf_io.py, where the weights come in Hugging Face layout.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fedjax_pfi.models.transformer import (Transformer, TransformerConfig,
                                           count_params, llama_mlp_dim, rope)

GPT2 = TransformerConfig.gpt2(vocab_size=11, dim=16, num_layers=2,
                              num_heads=4, max_len=8)
LLAMA = TransformerConfig.llama(vocab_size=11, dim=16, num_layers=2,
                                num_heads=4, num_kv_heads=2, max_len=8)


def _init(cfg, seed=0):
  """Random non-trivial params with the tree ``init`` would give.

  ``jax.eval_shape`` traces ``init`` without running it: eager random
  initializers cost seconds on CPU, far more than these tiny models do.
  """
  tokens = jax.ShapeDtypeStruct((1, cfg.max_len), jnp.int32)
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                          tokens)['params']
  rng = np.random.default_rng(seed)

  def fill(path, s):
    x = rng.standard_normal(s.shape).astype(np.float32)
    name = path[-1].key
    if name == 'scale':
      return 1.0 + 0.1 * x
    return (0.1 if name == 'bias' else 0.3) * x

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(cfg):
  # Eager on purpose: for models this small, op-by-op dispatch (each op
  # compiled once per shape, shared by every test) beats a jit per config.
  return Transformer(cfg).apply


def _shapes(params):
  return {'/'.join(k): v.shape
          for k, v in traverse_util.flatten_dict(params).items()}


def _expected_shapes(cfg):
  d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  ln_bias = cfg.norm == 'layernorm' and cfg.use_bias
  out = {'embed/embedding': (v, d)}
  if cfg.positions == 'learned':
    out['pos_embed'] = (cfg.max_len, d)

  def dense(path, d_in, d_out):
    out[f'{path}/kernel'] = (d_in, d_out)
    if cfg.use_bias:
      out[f'{path}/bias'] = (d_out,)

  def norm(path):
    out[f'{path}/scale'] = (d,)
    if ln_bias:
      out[f'{path}/bias'] = (d,)

  for i in range(cfg.num_layers):
    b = f'block_{i}'
    norm(f'{b}/ln_attn')
    dense(f'{b}/attn/q', d, q)
    dense(f'{b}/attn/k', d, kv)
    dense(f'{b}/attn/v', d, kv)
    dense(f'{b}/attn/o', q, d)
    norm(f'{b}/ln_mlp')
    if cfg.mlp == 'gelu':
      dense(f'{b}/mlp/fc', d, f)
      dense(f'{b}/mlp/proj', f, d)
    else:
      dense(f'{b}/mlp/gate', d, f)
      dense(f'{b}/mlp/up', d, f)
      dense(f'{b}/mlp/down', f, d)
  norm('ln_f')
  if not cfg.tie_embeddings:
    out['lm_head/kernel'] = (d, v)
  return out


@pytest.mark.parametrize('cfg', [
    GPT2, LLAMA,
    dataclasses.replace(LLAMA, use_bias=True, tie_embeddings=True),
    dataclasses.replace(GPT2, use_bias=False, tie_embeddings=False,
                        mlp='swiglu', mlp_dim=24),
], ids=['gpt2', 'llama', 'llama_bias_tied', 'mixed'])
def test_param_tree(cfg):
  params = _init(cfg)
  assert _shapes(params) == _expected_shapes(cfg)
  assert count_params(params) == sum(
      int(np.prod(s)) for s in _expected_shapes(cfg).values())


def test_init():
  # An 'rbg' key: threefry's bit generator takes seconds to compile on CPU.
  params = jax.jit(Transformer(GPT2).init)(
      jax.random.key(0, impl='rbg'), jnp.zeros((1, 8), jnp.int32))['params']
  assert _shapes(params) == _expected_shapes(GPT2)
  np.testing.assert_array_equal(params['ln_f']['scale'], np.ones(16))
  np.testing.assert_array_equal(params['block_0']['attn']['q']['bias'],
                                np.zeros(16))
  # GPT-2's N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 L)).
  assert 0.015 < float(params['block_0']['mlp']['fc']['kernel'].std()) < 0.025
  assert 0.007 < float(params['block_0']['mlp']['proj']['kernel'].std()) < 0.013


def test_count_params_gpt2_formula():
  v, d, p, n_layers, f = 11, 16, 8, 2, 64
  per_block = 2 * 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
  assert count_params(_init(GPT2)) == v * d + p * d + n_layers * per_block + 2 * d


def test_presets():
  assert (GPT2.norm, GPT2.positions, GPT2.mlp, GPT2.use_bias,
          GPT2.tie_embeddings, GPT2.norm_eps) == (
              'layernorm', 'learned', 'gelu', True, True, 1e-5)
  assert GPT2.ffn_dim == 64 and GPT2.kv_heads == 4 and GPT2.head_dim == 4
  assert (LLAMA.norm, LLAMA.positions, LLAMA.mlp, LLAMA.use_bias,
          LLAMA.tie_embeddings, LLAMA.norm_eps) == (
              'rmsnorm', 'rope', 'swiglu', False, False, 1e-6)
  assert LLAMA.mlp_dim == 48  # int(2 * 4 * 16 / 3) = 42 -> multiple of 8.
  assert TransformerConfig.llama(10, 4096, 1, 32).mlp_dim == 10928
  assert llama_mlp_dim(4096, multiple_of=256) == 11008  # Llama-7B.
  assert TransformerConfig.llama(10, 16, 1, 4, mlp_dim=20).mlp_dim == 20
  assert TransformerConfig.llama(10, 16, 1, 4, use_bias=True).use_bias


@pytest.mark.parametrize('kw,match', [
    (dict(norm='batchnorm'), "unknown norm 'batchnorm'; accepted: "
     "'layernorm', 'rmsnorm'"),
    (dict(positions='alibi'), "unknown positions 'alibi'; accepted: "
     "'learned', 'rope'"),
    (dict(mlp='relu'), "unknown mlp 'relu'; accepted: 'gelu', 'swiglu'"),
    (dict(dim=18), 'dim 18 is not divisible by num_heads 4'),
    (dict(num_kv_heads=3), 'num_heads 4 is not divisible by num_kv_heads 3'),
    (dict(dim=12, positions='rope'), 'rope needs an even head_dim, got '
     'head_dim 3'),
    (dict(vocab_size=0), 'vocab_size must be a positive int, got 0'),
    (dict(num_layers=-1), 'num_layers must be a positive int, got -1'),
    (dict(num_heads=2.0), 'num_heads must be a positive int, got 2.0'),
    (dict(mlp_dim=0), 'mlp_dim must be a positive int or None, got 0'),
    (dict(dropout=1.0), r'dropout must be in \[0, 1\), got 1.0'),
    (dict(norm_eps=0.0), 'norm_eps must be > 0, got 0.0'),
    (dict(rope_theta=-1.0), 'rope_theta must be > 0, got -1.0'),
])
def test_config_validation(kw, match):
  base = dict(vocab_size=11, dim=16, num_layers=2, num_heads=4)
  base.update(kw)
  with pytest.raises(ValueError, match=match):
    TransformerConfig(**base)
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(GPT2, **kw)


def test_input_errors():
  params = _init(GPT2)
  model = Transformer(GPT2)
  with pytest.raises(ValueError, match='sequence length 9 exceeds max_len 8'):
    model.apply({'params': params}, jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match=r'tokens must be \[batch, time\], got '
                     r'shape \(8,\)'):
    model.apply({'params': params}, jnp.zeros((8,), jnp.int32))
  with pytest.raises(ValueError, match='tokens must be integer ids, got dtype '
                     'float32'):
    model.apply({'params': params}, jnp.zeros((1, 8), jnp.float32))


@pytest.mark.parametrize('cfg', [GPT2, LLAMA], ids=['gpt2', 'llama'])
def test_causal(cfg):
  params = _init(cfg)
  def apply(x):
    return _apply(cfg)({'params': params}, x)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
  logits = apply(tokens)
  assert logits.shape == (2, 8, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  for t in (0, 3, 7):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    new = apply(changed)
    np.testing.assert_array_equal(new[:, :t], logits[:, :t])
    assert np.all(np.abs(new[:, t] - logits[:, t]).max(-1) > 1e-6)


def test_shorter_sequences_are_prefixes():
  # Causality again, through the shape: a length-5 call equals the first 5
  # positions of a length-8 call (learned and rotary positions both start
  # at 0).
  for cfg in (GPT2, LLAMA):
    params = _init(cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, cfg.vocab_size)
    full = _apply(cfg)({'params': params}, tokens)
    short = jax.jit(Transformer(cfg).apply)({'params': params}, tokens[:, :5])
    np.testing.assert_allclose(short, full[:, :5], rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  hd = 8
  q = jax.random.normal(jax.random.key(0), (1, 1, hd))  # [T, heads, hd]
  k = jax.random.normal(jax.random.key(1), (1, 1, hd))

  @jax.jit
  def _score(m, n):
    return jnp.sum(rope(q, m[None], 10000.0) * rope(k, n[None], 10000.0))

  def score(m, n):
    return float(_score(jnp.asarray(m), jnp.asarray(n)))

  for offset in (0, 1, 5):
    ref = score(offset, 0)
    for m in (7, 40, 300):
      np.testing.assert_allclose(score(m + offset, m), ref, rtol=1e-4,
                                 atol=1e-4)
  assert abs(score(3, 0) - score(0, 0)) > 1e-3  # It does rotate.
  # Position 0 is the identity; rotations keep norms.
  np.testing.assert_allclose(rope(q, jnp.array([0]), 1e4), q, atol=1e-7)
  np.testing.assert_allclose(jnp.linalg.norm(rope(q, jnp.array([9]), 1e4)),
                             jnp.linalg.norm(q), rtol=1e-6)


def test_rope_rotates_pairs_i_and_i_plus_half():
  # rotate_half pairs dimension i with i + hd/2, at frequency theta^(-2i/hd).
  hd, theta, pos = 4, 100.0, 3
  x = np.zeros((1, 1, hd), np.float32)
  x[..., 1] = 1.0  # Pair (1, 3), frequency theta^(-2/4) = 0.1.
  got = np.asarray(rope(jnp.asarray(x), jnp.array([pos]), theta))[0, 0]
  angle = pos * theta ** (-2 * 1 / hd)
  np.testing.assert_allclose(got, [0, np.cos(angle), 0, np.sin(angle)],
                             atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = dataclasses.replace(LLAMA, num_layers=1)
  mha = dataclasses.replace(gqa, num_kv_heads=None)
  params = _init(gqa)
  rep = gqa.num_heads // gqa.kv_heads
  attn = dict(params['block_0']['attn'])
  for n in ('k', 'v'):
    w = attn[n]['kernel'].reshape(gqa.dim, gqa.kv_heads, gqa.head_dim)
    attn[n] = {'kernel': jnp.repeat(w, rep, axis=1).reshape(gqa.dim, -1)}
  mha_params = dict(params, block_0=dict(params['block_0'], attn=attn))
  assert _shapes(mha_params) == _expected_shapes(mha)
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 11)
  np.testing.assert_allclose(
      _apply(gqa)({'params': params}, tokens),
      _apply(mha)({'params': mha_params}, tokens),
      rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
  no_dropout = dataclasses.replace(GPT2, num_layers=1)
  cfg = dataclasses.replace(no_dropout, dropout=0.5)
  params = _init(cfg)
  tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, 11)
  eval_logits = _apply(cfg)({'params': params}, tokens)
  np.testing.assert_array_equal(
      eval_logits, _apply(no_dropout)({'params': params}, tokens))

  def train(seed):
    # 'rbg' keys: threefry's bit generator takes seconds to compile on CPU.
    key = jax.random.key(seed, impl='rbg')
    return _apply(cfg)({'params': params}, tokens, train=True,
                       rngs={'dropout': key})

  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))
  assert not np.allclose(train(0), eval_logits)


def test_grad_is_finite_under_jit():
  cfg = dataclasses.replace(LLAMA, num_layers=1)
  params = _init(cfg)
  tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, 11)

  @jax.jit
  def loss(p):
    logits = Transformer(cfg).apply({'params': p}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  grads = jax.grad(loss)(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
