"""hf_io: HF checkpoints load into `Transformer` and give the published models.

Each test writes a tiny random checkpoint in Hugging Face layout with
``safetensors.numpy.save_file``. The Flax logits are checked against plain
numpy forward passes written from the GPT-2 and Llama architectures directly
on the HF-named tensors (float64), so a naming, transposition or convention
slip in either the loader or the module shows up as a mismatch.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedjax_pfi.models.hf_io import (CheckpointFormatError,
                                     CheckpointNotFoundError, load_pretrained,
                                     save_pretrained)
from fedjax_pfi.models.transformer import Transformer, TransformerConfig

V, D, L, H, KV, P, T = 11, 16, 2, 4, 2, 8, 8
F_GPT2, F_LLAMA = 24, 20

# --- numpy references ---------------------------------------------------------


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _causal_attention(q, k, v):
  """q, k, v: [B, H, T, hd] -> [B, T, H * hd]."""
  b, h, t, hd = q.shape
  scores = q @ k.swapaxes(-1, -2) / np.sqrt(hd)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  out = _softmax(scores) @ v
  return out.transpose(0, 2, 1, 3).reshape(b, t, h * hd)


def _heads(x, n):
  """[B, T, n * hd] -> [B, n, T, hd]."""
  b, t, _ = x.shape
  return x.reshape(b, t, n, -1).transpose(0, 2, 1, 3)


def gpt2_reference(w, tokens, n_head, eps):
  """GPT-2 (Radford et al., 2019) on HF ``GPT2Model`` tensors, float64."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}

  def ln(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[f'{name}.weight'] + w[
        f'{name}.bias']

  def conv1d(x, name):  # HF Conv1D: weight is [in, out].
    return x @ w[f'{name}.weight'] + w[f'{name}.bias']

  def gelu_new(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) *
                                  (x + 0.044715 * x ** 3)))

  t = tokens.shape[1]
  h = w['wte.weight'][tokens] + w['wpe.weight'][:t]
  i = 0
  while f'h.{i}.ln_1.weight' in w:
    p = f'h.{i}'
    q, k, v = np.split(conv1d(ln(h, f'{p}.ln_1'), f'{p}.attn.c_attn'), 3, -1)
    a = _causal_attention(_heads(q, n_head), _heads(k, n_head),
                          _heads(v, n_head))
    h = h + conv1d(a, f'{p}.attn.c_proj')
    m = gelu_new(conv1d(ln(h, f'{p}.ln_2'), f'{p}.mlp.c_fc'))
    h = h + conv1d(m, f'{p}.mlp.c_proj')
    i += 1
  return ln(h, 'ln_f') @ w['wte.weight'].T  # Tied head.


def llama_reference(w, tokens, n_head, n_kv, eps, theta):
  """Llama (Touvron et al., 2023) on HF ``LlamaForCausalLM`` tensors."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}

  def rms(x, name):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w[name]

  def linear(x, name):  # torch Linear: weight is [out, in].
    y = x @ w[f'{name}.weight'].T
    return y + w[f'{name}.bias'] if f'{name}.bias' in w else y

  def rotate_half(x):
    x1, x2 = np.split(x, 2, -1)
    return np.concatenate([-x2, x1], -1)

  def silu(x):
    return x / (1 + np.exp(-x))

  t = tokens.shape[1]
  hd = w['model.embed_tokens.weight'].shape[1] // n_head
  inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  emb = np.concatenate([np.outer(np.arange(t), inv_freq)] * 2, -1)  # [T, hd]
  cos, sin = np.cos(emb), np.sin(emb)
  h = w['model.embed_tokens.weight'][tokens]
  i = 0
  while f'model.layers.{i}.input_layernorm.weight' in w:
    p = f'model.layers.{i}'
    x = rms(h, f'{p}.input_layernorm.weight')
    q = _heads(linear(x, f'{p}.self_attn.q_proj'), n_head)
    k = _heads(linear(x, f'{p}.self_attn.k_proj'), n_kv)
    v = _heads(linear(x, f'{p}.self_attn.v_proj'), n_kv)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def repeat_kv(x):  # [B, KV, T, hd] -> [B, KV * rep, T, hd], HF's order.
      b, kv, tt, d = x.shape
      x = np.broadcast_to(x[:, :, None], (b, kv, n_head // kv, tt, d))
      return x.reshape(b, n_head, tt, d)

    a = _causal_attention(q, repeat_kv(k), repeat_kv(v))
    h = h + linear(a, f'{p}.self_attn.o_proj')
    x = rms(h, f'{p}.post_attention_layernorm.weight')
    m = silu(linear(x, f'{p}.mlp.gate_proj')) * linear(x, f'{p}.mlp.up_proj')
    h = h + linear(m, f'{p}.mlp.down_proj')
    i += 1
  h = rms(h, 'model.norm.weight')
  head = w.get('lm_head.weight', w['model.embed_tokens.weight'])
  return h @ head.T


# --- random checkpoints -------------------------------------------------------


def _normal(rng, shape, std=0.3):
  return (std * rng.standard_normal(shape)).astype(np.float32)


def gpt2_checkpoint(seed=0, n_inner=F_GPT2):
  """``(config.json dict, HF tensors)`` of a random GPT-2."""
  rng = np.random.default_rng(seed)
  w = {'wte.weight': _normal(rng, (V, D), 1.0),
       'wpe.weight': _normal(rng, (P, D), 1.0)}

  def ln(name):
    w[f'{name}.weight'] = 1 + _normal(rng, (D,), 0.2)
    w[f'{name}.bias'] = _normal(rng, (D,), 0.2)

  def conv1d(name, d_in, d_out):
    w[f'{name}.weight'] = _normal(rng, (d_in, d_out), 1 / np.sqrt(d_in))
    w[f'{name}.bias'] = _normal(rng, (d_out,), 0.2)

  for i in range(L):
    ln(f'h.{i}.ln_1')
    conv1d(f'h.{i}.attn.c_attn', D, 3 * D)
    conv1d(f'h.{i}.attn.c_proj', D, D)
    ln(f'h.{i}.ln_2')
    conv1d(f'h.{i}.mlp.c_fc', D, n_inner)
    conv1d(f'h.{i}.mlp.c_proj', n_inner, D)
  ln('ln_f')
  config = dict(model_type='gpt2', architectures=['GPT2LMHeadModel'],
                vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=P,
                n_inner=n_inner, activation_function='gelu_new',
                layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0)
  return config, w


def llama_checkpoint(seed=0, n_kv=KV, bias=False, tied=False):
  """``(config.json dict, HF tensors)`` of a random Llama."""
  rng = np.random.default_rng(seed)
  hd = D // H
  w = {'model.embed_tokens.weight': _normal(rng, (V, D), 1.0)}

  def linear(name, d_in, d_out):
    w[f'{name}.weight'] = _normal(rng, (d_out, d_in), 1 / np.sqrt(d_in))
    if bias:
      w[f'{name}.bias'] = _normal(rng, (d_out,), 0.2)

  for i in range(L):
    p = f'model.layers.{i}'
    w[f'{p}.input_layernorm.weight'] = 1 + _normal(rng, (D,), 0.2)
    linear(f'{p}.self_attn.q_proj', D, H * hd)
    linear(f'{p}.self_attn.k_proj', D, n_kv * hd)
    linear(f'{p}.self_attn.v_proj', D, n_kv * hd)
    linear(f'{p}.self_attn.o_proj', H * hd, D)
    w[f'{p}.post_attention_layernorm.weight'] = 1 + _normal(rng, (D,), 0.2)
    linear(f'{p}.mlp.gate_proj', D, F_LLAMA)
    linear(f'{p}.mlp.up_proj', D, F_LLAMA)
    linear(f'{p}.mlp.down_proj', F_LLAMA, D)
  w['model.norm.weight'] = 1 + _normal(rng, (D,), 0.2)
  if not tied:
    w['lm_head.weight'] = _normal(rng, (V, D), 0.5)
  config = dict(model_type='llama', architectures=['LlamaForCausalLM'],
                vocab_size=V, hidden_size=D, intermediate_size=F_LLAMA,
                num_hidden_layers=L, num_attention_heads=H,
                num_key_value_heads=n_kv, hidden_act='silu',
                max_position_embeddings=P, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=tied,
                attention_bias=bias, mlp_bias=bias)
  return config, w


def write(directory, config, tensors):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'config.json').write_text(json.dumps(config))
  save_file(tensors, str(directory / 'model.safetensors'),
            metadata={'format': 'pt'})
  return directory


def logits(cfg, params, tokens):
  return np.asarray(Transformer(cfg).apply({'params': params},
                                           jnp.asarray(tokens)))


TOKENS = np.random.default_rng(42).integers(0, V, (2, T))

# --- against the references ---------------------------------------------------


@pytest.mark.parametrize('prefix', ['', 'transformer.'])
def test_gpt2_matches_numpy_reference(tmp_path, prefix):
  config, w = gpt2_checkpoint()
  stored = {prefix + k: v for k, v in w.items()}
  if prefix:  # GPT2LMHeadModel: tied head copy and attention-mask buffers.
    stored['lm_head.weight'] = w['wte.weight']
    for i in range(L):
      stored[f'{prefix}h.{i}.attn.bias'] = np.tril(
          np.ones((1, 1, P, P), np.uint8))
      stored[f'{prefix}h.{i}.attn.masked_bias'] = np.array(-1e4, np.float32)
  cfg, params = load_pretrained(write(tmp_path, config, stored))
  assert cfg == TransformerConfig.gpt2(V, D, L, H, max_len=P, mlp_dim=F_GPT2)
  assert all(isinstance(x, np.ndarray) and x.dtype == np.float32
             for x in jax.tree.leaves(params))
  want = gpt2_reference(w, TOKENS, H, 1e-5)
  np.testing.assert_allclose(logits(cfg, params, TOKENS), want, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('n_kv,bias,tied', [(KV, False, False),
                                            (H, True, True), (1, False, True)])
def test_llama_matches_numpy_reference(tmp_path, n_kv, bias, tied):
  config, w = llama_checkpoint(n_kv=n_kv, bias=bias, tied=tied)
  stored = dict(w)
  stored['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.ones(
      D // H // 2, np.float32)
  cfg, params = load_pretrained(write(tmp_path, config, stored))
  assert cfg == TransformerConfig.llama(
      V, D, L, H, num_kv_heads=None if n_kv == H else n_kv, mlp_dim=F_LLAMA,
      max_len=P, use_bias=bias, tie_embeddings=tied)
  want = llama_reference(w, TOKENS, H, n_kv, 1e-6, 10000.0)
  np.testing.assert_allclose(logits(cfg, params, TOKENS), want, rtol=1e-5,
                             atol=1e-5)


def test_half_precision_tensors_load_as_float32(tmp_path):
  config, w = llama_checkpoint()
  half = {k: v.astype(ml_dtypes.bfloat16 if i % 2 else np.float16)
          for i, (k, v) in enumerate(w.items())}
  _, params = load_pretrained(write(tmp_path, config, half))
  got = params['block_1']['mlp']['down']['kernel']
  assert got.dtype == np.float32
  np.testing.assert_array_equal(
      got, half['model.layers.1.mlp.down_proj.weight'].astype(np.float32).T)


# --- round trips and shards ---------------------------------------------------


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('model_type', ['gpt2', 'llama'])
def test_round_trip(tmp_path, model_type):
  config, w = (gpt2_checkpoint if model_type == 'gpt2'
               else llama_checkpoint)(seed=3)
  cfg, params = load_pretrained(write(tmp_path / 'hf', config, w))
  out = save_pretrained(tmp_path / 'ours', cfg, params, model_type)
  # Same tensor names and bits as the original HF files.
  saved = load_file(str(out / 'model.safetensors'))
  assert sorted(saved) == sorted(w)
  for k in w:
    np.testing.assert_array_equal(saved[k], w[k])
  cfg2, params2 = load_pretrained(out)
  assert cfg2 == cfg
  _assert_same_params(params2, params)
  hf = json.loads((out / 'config.json').read_text())
  assert hf['model_type'] == model_type


@pytest.mark.parametrize('cfg,model_type', [
    (TransformerConfig.gpt2(V, D, L, H, max_len=P, dropout=0.1), 'gpt2'),
    (TransformerConfig.llama(V, D, L, H, KV, max_len=P, rope_theta=500.0,
                             norm_eps=1e-5), 'llama'),
    (TransformerConfig.llama(V, D, 1, H, use_bias=True, tie_embeddings=True,
                             max_len=P), 'llama'),
])
def test_save_then_load_is_exact(tmp_path, cfg, model_type):
  # Params straight from the module's tree (not from an HF file), saved as
  # jax arrays, wrapped in {'params': ...}.
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, P), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(_normal(rng, s.shape)), shapes)
  loaded_cfg, loaded = load_pretrained(
      save_pretrained(tmp_path, cfg, params, model_type))
  assert loaded_cfg == cfg
  _assert_same_params(loaded, jax.tree.map(np.asarray, params['params']))


def test_sharded_index(tmp_path):
  config, w = llama_checkpoint(seed=5)
  names = sorted(w)
  shards = {'model-00001-of-00002.safetensors': names[:len(names) // 2],
            'model-00002-of-00002.safetensors': names[len(names) // 2:]}
  sharded = tmp_path / 'sharded'
  sharded.mkdir()
  (sharded / 'config.json').write_text(json.dumps(config))
  for file, keys in shards.items():
    save_file({k: w[k] for k in keys}, str(sharded / file))
  index = {'metadata': {'total_size': 0},
           'weight_map': {k: f for f, ks in shards.items() for k in ks}}
  (sharded / 'model.safetensors.index.json').write_text(json.dumps(index))
  cfg, params = load_pretrained(sharded)
  cfg1, params1 = load_pretrained(write(tmp_path / 'single', config, w))
  assert cfg == cfg1
  _assert_same_params(params, params1)
  # A shard named in the index but absent from the directory.
  (sharded / 'model-00002-of-00002.safetensors').unlink()
  with pytest.raises(CheckpointNotFoundError,
                     match="shard 'model-00002-of-00002.safetensors' listed"):
    load_pretrained(sharded)


# --- errors -------------------------------------------------------------------


def test_missing_files(tmp_path):
  with pytest.raises(CheckpointNotFoundError, match='does not exist'):
    load_pretrained(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError):  # Also a FileNotFoundError ...
    load_pretrained(tmp_path / 'nope')
  with pytest.raises(ValueError):  # ... and a ValueError.
    load_pretrained(tmp_path / 'nope')
  with pytest.raises(CheckpointNotFoundError, match='no config.json in'):
    load_pretrained(tmp_path)
  config, _ = gpt2_checkpoint()
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(CheckpointNotFoundError,
                     match='expected model.safetensors or '
                     'model.safetensors.index.json'):
    load_pretrained(tmp_path)


def _mutated(tmp_path, which='gpt2', config_update=None, drop=(), add=None,
             reshape=None):
  config, w = gpt2_checkpoint() if which == 'gpt2' else llama_checkpoint()
  config.update(config_update or {})
  for k in drop:
    del w[k]
  w.update(add or {})
  for k, shape in (reshape or {}).items():
    w[k] = np.zeros(shape, np.float32)
  return write(tmp_path, config, w)


@pytest.mark.parametrize('mutation,match', [
    (dict(config_update={'model_type': 'bert'}),
     r"unsupported model_type 'bert' in config.json; accepted: 'gpt2', "
     r"'llama'"),
    (dict(config_update={'activation_function': 'relu'}),
     r"GPT-2 activation_function 'relu' is not supported; accepted: "
     r"'gelu_new', 'gelu_pytorch_tanh'"),
    (dict(config_update={'scale_attn_by_inverse_layer_idx': True}),
     'scale_attn_by_inverse_layer_idx=True is not supported'),
    (dict(config_update={'n_head': 5}),
     'describes an invalid gpt2 model: dim 16 is not divisible by num_heads 5'),
    (dict(drop=['h.1.mlp.c_fc.bias', 'ln_f.weight']),
     r"missing tensor\(s\) 'h.1.mlp.c_fc.bias', 'ln_f.weight'"),
    (dict(reshape={'wte.weight': (12, D)}),
     r"tensor 'wte.weight' has shape \(12, 16\) in model.safetensors, but "
     r"config.json implies shape \(11, 16\)"),
    (dict(config_update={'n_positions': 16}),
     r"tensor 'wpe.weight' has shape \(8, 16\) in model.safetensors, but "
     r"config.json implies shape \(16, 16\)"),
    (dict(add={'foo.weight': np.zeros(3, np.float32),
               'h.0.attn.c_attn.extra': np.zeros(3, np.float32)}),
     r"unexpected tensor\(s\) for a gpt2 model in .*: "
     r"'foo.weight', 'h.0.attn.c_attn.extra'"),
    (dict(add={'transformer.wte.weight': np.zeros((V, D), np.float32)}),
     r"tensor 'wte.weight' is stored twice: as '(transformer\.)?wte.weight' "
     r"in model.safetensors and as '(transformer\.)?wte.weight'"),
    (dict(add={'ln_f.weight': np.ones(D, np.int32)}),
     r"tensor 'ln_f.weight' has dtype I32 .*; accepted: F64, F32, F16, BF16"),
])
def test_gpt2_checkpoint_errors(tmp_path, mutation, match):
  with pytest.raises(CheckpointFormatError, match=match):
    load_pretrained(_mutated(tmp_path, 'gpt2', **mutation))


@pytest.mark.parametrize('mutation,match', [
    (dict(config_update={'hidden_act': 'gelu'}),
     r"Llama hidden_act 'gelu' is not supported; accepted: 'silu'"),
    (dict(config_update={'rope_scaling': {'rope_type': 'llama3',
                                          'factor': 8.0}}),
     r"rope_scaling .*'llama3'.* is not supported"),
    (dict(config_update={'attention_bias': True}),
     'attention_bias=True with mlp_bias=False is not supported'),
    (dict(config_update={'num_key_value_heads': 3}),
     'invalid llama model: num_heads 4 is not divisible by num_kv_heads 3'),
    (dict(config_update={'head_dim': 8}),
     'head_dim 8 is not supported; accepted: hidden_size / '
     'num_attention_heads = 16 / 4'),
    (dict(config_update={'hidden_size': None}),
     "invalid llama model: dim must be a positive int, got None"),
    (dict(config_update={'intermediate_size': 32}),
     r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(20, 16\) "
     r"in model.safetensors, but config.json implies shape \(32, 16\)"),
    (dict(drop=['lm_head.weight']),
     r"missing tensor\(s\) 'lm_head.weight'"),
    (dict(add={'model.layers.0.self_attn.q_proj.bias': np.zeros(D,
                                                                np.float32)}),
     r"unexpected tensor\(s\) for a llama model in .*: "
     r"'model.layers.0.self_attn.q_proj.bias'"),
])
def test_llama_checkpoint_errors(tmp_path, mutation, match):
  with pytest.raises(CheckpointFormatError, match=match):
    load_pretrained(_mutated(tmp_path, 'llama', **mutation))


def test_tied_llama_ignores_a_stored_lm_head(tmp_path):
  config, w = llama_checkpoint(tied=True)
  w['lm_head.weight'] = w['model.embed_tokens.weight']
  cfg, params = load_pretrained(write(tmp_path, config, w))
  assert cfg.tie_embeddings and 'lm_head' not in params


def test_missing_config_key(tmp_path):
  config, w = gpt2_checkpoint()
  del config['n_embd']
  with pytest.raises(CheckpointFormatError,
                     match="config.json of model_type 'gpt2' lacks the "
                     "required key 'n_embd'"):
    load_pretrained(write(tmp_path, config, w))


def test_errors_come_before_tracing(tmp_path, monkeypatch):
  # Loading is numpy only: nothing is traced or compiled, even on failure.
  def no_jit(*a, **k):
    raise AssertionError('load_pretrained traced JAX code')

  monkeypatch.setattr(jax, 'jit', no_jit)
  monkeypatch.setattr(jax, 'eval_shape', no_jit)
  path = _mutated(tmp_path, 'gpt2', reshape={'wte.weight': (12, D)})
  with pytest.raises(CheckpointFormatError, match='wte.weight'):
    load_pretrained(path)


def test_save_errors(tmp_path):
  gpt2 = TransformerConfig.gpt2(V, D, 1, H, max_len=P)
  llama = TransformerConfig.llama(V, D, 1, H, KV, max_len=P)
  with pytest.raises(ValueError, match=r"unsupported model_type 'bert'; "
                     r"accepted: 'gpt2', 'llama'"):
    save_pretrained(tmp_path, gpt2, {}, 'bert')
  with pytest.raises(ValueError, match=r"model_type 'gpt2' needs "
                     r"norm='layernorm', positions='learned', mlp='gelu', "
                     r"use_bias=True, tie_embeddings=True, num_kv_heads=4; "
                     r"the config has norm='rmsnorm', positions='rope', "
                     r"mlp='swiglu', use_bias=False, tie_embeddings=False, "
                     r"num_kv_heads=2"):
    save_pretrained(tmp_path, llama, {}, 'gpt2')
  with pytest.raises(ValueError, match=r"model_type 'llama' needs "
                     r"norm='rmsnorm', positions='rope', mlp='swiglu'; the "
                     r"config has norm='layernorm', positions='learned', "
                     r"mlp='gelu'"):
    save_pretrained(tmp_path, gpt2, {}, 'llama')
  config, w = gpt2_checkpoint()
  config['n_layer'] = 1
  w = {k: v for k, v in w.items() if not k.startswith('h.1.')}
  w['h.0.mlp.c_fc.weight'] = w['h.0.mlp.c_fc.weight'][:, :-4]
  w['h.0.mlp.c_fc.bias'] = w['h.0.mlp.c_fc.bias'][:-4]
  w['h.0.mlp.c_proj.weight'] = w['h.0.mlp.c_proj.weight'][:-4]
  config['n_inner'] = F_GPT2 - 4
  cfg, params = load_pretrained(write(tmp_path / 'in', config, w))
  with pytest.raises(ValueError, match=r"param 'block_0/mlp/fc/kernel' has "
                     r"shape \(16, 20\), but the config implies \(16, 64\)"):
    save_pretrained(tmp_path / 'out', gpt2, params, 'gpt2')
  del params['ln_f']
  params['extra'] = {'kernel': np.zeros(3)}
  with pytest.raises(ValueError, match=r"params do not match the config: "
                     r"missing 'ln_f/bias', 'ln_f/scale'; unexpected "
                     r"'extra/kernel'"):
    save_pretrained(tmp_path / 'out', cfg, params, 'gpt2')
  assert not (tmp_path / 'out').exists()  # Nothing written on failure.
