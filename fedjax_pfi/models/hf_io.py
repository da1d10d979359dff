"""Hugging Face safetensors checkpoints <-> `Transformer` params (GPT-2, Llama).

`load_pretrained` reads a directory laid out as ``transformers`` saves it:
``config.json`` plus ``model.safetensors``, or shards listed in
``model.safetensors.index.json`` (its ``weight_map``). `save_pretrained`
writes the same layout, loadable by ``transformers`` (the file metadata says
``format: pt``). Only numpy and ``safetensors`` are used (no torch, no JAX
tracing): every name, shape and dtype is checked against what
``config.json`` implies before any tensor is read, and each failure raises a
`CheckpointFormatError` naming the tensor or key and what was expected.

Tensor layouts:

- GPT-2 (``GPT2Model`` names, optionally prefixed ``transformer.``): the
  Conv1D weights are already ``[in, out]``; ``attn.c_attn`` ``[D, 3D]`` is
  ``[q | k | v]`` along its output axis. The buffers ``h.{i}.attn.bias`` /
  ``h.{i}.attn.masked_bias`` and the tied ``lm_head.weight`` are ignored.
- Llama (``LlamaForCausalLM`` names): ``torch.nn.Linear`` weights are
  ``[out, in]`` and are transposed; ``lm_head.weight`` is ``[V, D]``, absent
  (or ignored) when ``tie_word_embeddings``; ``rotary_emb.inv_freq`` buffers
  are ignored.

Floating tensors of any width (F64, F32, F16, BF16) load as numpy float32;
`save_pretrained` stores the params' own dtype, so a float32 round trip is
bit-exact.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fedjax_pfi.models.transformer import TransformerConfig

MODEL_TYPES = ('gpt2', 'llama')
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
_FLOAT_DTYPES = ('F64', 'F32', 'F16', 'BF16')
_GPT2_ACTIVATIONS = ('gelu_new', 'gelu_pytorch_tanh')


class CheckpointFormatError(ValueError):
  """A checkpoint directory does not hold what `load_pretrained` accepts."""


class CheckpointNotFoundError(CheckpointFormatError, FileNotFoundError):
  """The directory, ``config.json`` or the weights file is missing."""


class _Entry(NamedTuple):
  """One HF tensor: its shape, and the params it becomes.

  The tensor (transposed first when ``transpose``) is split into
  ``len(paths)`` equal pieces along its last axis, one per params path.
  """
  name: str
  shape: tuple[int, ...]
  paths: tuple[tuple[str, ...], ...]
  transpose: bool = False


def _dense(name: str, path: tuple[str, ...], d_in: int, d_out: int,
           bias: bool, transpose: bool) -> list[_Entry]:
  shape = (d_out, d_in) if transpose else (d_in, d_out)
  out = [_Entry(f'{name}.weight', shape, (path + ('kernel',),), transpose)]
  if bias:
    out.append(_Entry(f'{name}.bias', (d_out,), (path + ('bias',),)))
  return out


def _gpt2_layout(cfg: TransformerConfig) -> list[_Entry]:
  d, f = cfg.dim, cfg.ffn_dim
  out = [_Entry('wte.weight', (cfg.vocab_size, d), (('embed', 'embedding'),)),
         _Entry('wpe.weight', (cfg.max_len, d), (('pos_embed',),))]

  def ln(name, path):
    return [_Entry(f'{name}.weight', (d,), (path + ('scale',),)),
            _Entry(f'{name}.bias', (d,), (path + ('bias',),))]

  for i in range(cfg.num_layers):
    p, b = f'h.{i}', (f'block_{i}',)
    qkv = tuple(b + ('attn', n) for n in 'qkv')
    out += ln(f'{p}.ln_1', b + ('ln_attn',))
    out += [_Entry(f'{p}.attn.c_attn.weight', (d, 3 * d),
                   tuple(x + ('kernel',) for x in qkv)),
            _Entry(f'{p}.attn.c_attn.bias', (3 * d,),
                   tuple(x + ('bias',) for x in qkv))]
    out += _dense(f'{p}.attn.c_proj', b + ('attn', 'o'), d, d, True, False)
    out += ln(f'{p}.ln_2', b + ('ln_mlp',))
    out += _dense(f'{p}.mlp.c_fc', b + ('mlp', 'fc'), d, f, True, False)
    out += _dense(f'{p}.mlp.c_proj', b + ('mlp', 'proj'), f, d, True, False)
  return out + ln('ln_f', ('ln_f',))


def _llama_layout(cfg: TransformerConfig) -> list[_Entry]:
  d, f, bias = cfg.dim, cfg.ffn_dim, cfg.use_bias
  hd = cfg.head_dim
  out = [_Entry('model.embed_tokens.weight', (cfg.vocab_size, d),
                (('embed', 'embedding'),))]
  for i in range(cfg.num_layers):
    p, b = f'model.layers.{i}', (f'block_{i}',)
    out.append(_Entry(f'{p}.input_layernorm.weight', (d,),
                      (b + ('ln_attn', 'scale'),)))
    for n, d_out in (('q', cfg.num_heads * hd), ('k', cfg.kv_heads * hd),
                     ('v', cfg.kv_heads * hd)):
      out += _dense(f'{p}.self_attn.{n}_proj', b + ('attn', n), d, d_out, bias,
                    True)
    out += _dense(f'{p}.self_attn.o_proj', b + ('attn', 'o'),
                  cfg.num_heads * hd, d, bias, True)
    out.append(_Entry(f'{p}.post_attention_layernorm.weight', (d,),
                      (b + ('ln_mlp', 'scale'),)))
    out += _dense(f'{p}.mlp.gate_proj', b + ('mlp', 'gate'), d, f, bias, True)
    out += _dense(f'{p}.mlp.up_proj', b + ('mlp', 'up'), d, f, bias, True)
    out += _dense(f'{p}.mlp.down_proj', b + ('mlp', 'down'), f, d, bias, True)
  out.append(_Entry('model.norm.weight', (d,), (('ln_f', 'scale'),)))
  if not cfg.tie_embeddings:
    out.append(_Entry('lm_head.weight', (cfg.vocab_size, d),
                      (('lm_head', 'kernel'),), transpose=True))
  return out


_LAYOUTS = {'gpt2': _gpt2_layout, 'llama': _llama_layout}


def _ignored(model_type: str, cfg: TransformerConfig, name: str) -> bool:
  """Buffers and tied copies that checkpoints may carry and we drop."""
  if name == 'lm_head.weight' and cfg.tie_embeddings:
    return True
  if model_type == 'gpt2':
    return re.fullmatch(r'h\.\d+\.attn\.(bias|masked_bias)', name) is not None
  return name.endswith('rotary_emb.inv_freq')


# --- config.json ------------------------------------------------------------


def _get(hf: Mapping[str, Any], key: str, default: Any = ...) -> Any:
  if key in hf:
    return hf[key]
  if default is ...:
    raise CheckpointFormatError(
        f'{CONFIG_FILE} of model_type {hf.get("model_type")!r} lacks the '
        f'required key {key!r}.')
  return default


def _gpt2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  act = _get(hf, 'activation_function', 'gelu_new')
  if act not in _GPT2_ACTIVATIONS:
    raise CheckpointFormatError(
        f'GPT-2 activation_function {act!r} is not supported; accepted: '
        f'{", ".join(map(repr, _GPT2_ACTIVATIONS))} (the tanh-approximate '
        'GELU).')
  for key, want in (('scale_attn_weights', True),
                    ('scale_attn_by_inverse_layer_idx', False),
                    ('tie_word_embeddings', True)):
    if _get(hf, key, want) != want:
      raise CheckpointFormatError(
          f'GPT-2 {key}={hf[key]!r} is not supported; only {want!r} is.')
  return dict(
      vocab_size=_get(hf, 'vocab_size'), dim=_get(hf, 'n_embd'),
      num_layers=_get(hf, 'n_layer'), num_heads=_get(hf, 'n_head'),
      mlp_dim=_get(hf, 'n_inner', None), max_len=_get(hf, 'n_positions'),
      norm_eps=_get(hf, 'layer_norm_epsilon', 1e-5),
      # One rate for all three sites; HF's default is 0.1.
      dropout=_get(hf, 'resid_pdrop', 0.1))


def _llama_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  act = _get(hf, 'hidden_act', 'silu')
  if act != 'silu':
    raise CheckpointFormatError(
        f"Llama hidden_act {act!r} is not supported; accepted: 'silu'.")
  attn_bias = _get(hf, 'attention_bias', False)
  mlp_bias = _get(hf, 'mlp_bias', False)
  if attn_bias != mlp_bias:
    raise CheckpointFormatError(
        f'attention_bias={attn_bias!r} with mlp_bias={mlp_bias!r} is not '
        'supported; both must be equal (one use_bias for all projections).')
  scaling = _get(hf, 'rope_scaling', None)
  if scaling and (not isinstance(scaling, dict) or scaling.get(
      'rope_type', scaling.get('type')) != 'default'):
    raise CheckpointFormatError(
        f'rope_scaling {scaling!r} is not supported; accepted: null (plain '
        'RoPE).')
  dim, heads = _get(hf, 'hidden_size'), _get(hf, 'num_attention_heads')
  head_dim = _get(hf, 'head_dim', None)
  if head_dim is not None and head_dim * heads != dim:
    raise CheckpointFormatError(
        f'head_dim {head_dim} is not supported; accepted: hidden_size / '
        f'num_attention_heads = {dim} / {heads}.')
  kv = _get(hf, 'num_key_value_heads', None)
  return dict(
      vocab_size=_get(hf, 'vocab_size'), dim=dim,
      num_layers=_get(hf, 'num_hidden_layers'), num_heads=heads,
      num_kv_heads=None if kv == heads else kv,
      mlp_dim=_get(hf, 'intermediate_size'),
      max_len=_get(hf, 'max_position_embeddings'), norm='rmsnorm',
      positions='rope', mlp='swiglu', use_bias=bool(attn_bias),
      tie_embeddings=bool(_get(hf, 'tie_word_embeddings', False)),
      norm_eps=_get(hf, 'rms_norm_eps', 1e-6),
      rope_theta=_get(hf, 'rope_theta', 10000.0),
      dropout=_get(hf, 'attention_dropout', 0.0))


def _config_from_hf(hf: Mapping[str, Any]) -> tuple[str, TransformerConfig]:
  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    raise CheckpointFormatError(
        f'unsupported model_type {model_type!r} in {CONFIG_FILE}; accepted: '
        f'{", ".join(map(repr, MODEL_TYPES))}.')
  fields = (_gpt2_config if model_type == 'gpt2' else _llama_config)(hf)
  try:
    return model_type, TransformerConfig(**fields)
  except ValueError as e:
    raise CheckpointFormatError(
        f'{CONFIG_FILE} describes an invalid {model_type} model: {e}') from e


_GPT2_STYLE = dict(norm='layernorm', positions='learned', mlp='gelu',
                   use_bias=True, tie_embeddings=True)
_LLAMA_STYLE = dict(norm='rmsnorm', positions='rope', mlp='swiglu')


def _config_to_hf(cfg: TransformerConfig, model_type: str) -> dict[str, Any]:
  if model_type not in MODEL_TYPES:
    raise ValueError(f'unsupported model_type {model_type!r}; accepted: '
                     f'{", ".join(map(repr, MODEL_TYPES))}.')
  style = dict(_GPT2_STYLE if model_type == 'gpt2' else _LLAMA_STYLE)
  if model_type == 'gpt2':
    style['num_kv_heads'] = cfg.num_heads  # GPT-2 has no grouped-query attn.
  bad = {k: v for k, v in style.items()
         if (cfg.kv_heads if k == 'num_kv_heads' else getattr(cfg, k)) != v}
  if bad:
    got = ', '.join(f'{k}={getattr(cfg, k)!r}' for k in bad)
    want = ', '.join(f'{k}={v!r}' for k, v in bad.items())
    raise ValueError(f'model_type {model_type!r} needs {want}; the config '
                     f'has {got}.')
  if model_type == 'gpt2':
    return dict(
        architectures=['GPT2LMHeadModel'], model_type='gpt2',
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.dim,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
        activation_function='gelu_new', layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout, tie_word_embeddings=True)
  return dict(
      architectures=['LlamaForCausalLM'], model_type='llama',
      vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
      intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
      head_dim=cfg.head_dim, hidden_act='silu',
      max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, rope_scaling=None,
      attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias,
      attention_dropout=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings)


# --- files --------------------------------------------------------------------


def _names(names) -> str:
  names = sorted(names)
  shown = ', '.join(map(repr, names[:5]))
  return shown + (f' (and {len(names) - 5} more)' if len(names) > 5 else '')


def _weight_files(directory: Path) -> list[Path]:
  single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
  if single.is_file():
    return [single]
  if not index.is_file():
    raise CheckpointNotFoundError(
        f'no weights in {directory}: expected {WEIGHTS_FILE} or {INDEX_FILE} '
        '(only safetensors checkpoints are read).')
  try:
    weight_map = json.loads(index.read_text())['weight_map']
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointFormatError(
        f'{index} is not a safetensors index with a "weight_map": {e!r}.'
    ) from e
  if not isinstance(weight_map, dict):
    raise CheckpointFormatError(
        f'"weight_map" in {index} must map tensor names to shard files, got '
        f'{type(weight_map).__name__}.')
  shards = sorted(set(weight_map.values()))
  for shard in shards:
    if not (directory / shard).is_file():
      raise CheckpointNotFoundError(
          f'shard {shard!r} listed in {INDEX_FILE} is missing from '
          f'{directory}.')
  return [directory / s for s in shards]


class _Stored(NamedTuple):
  """Where a tensor is and what its header says."""
  file: Path
  name: str  # As stored (GPT-2's may carry a "transformer." prefix).
  shape: tuple[int, ...]
  dtype: str  # safetensors' spelling: 'F32', 'BF16', ...


def _open_safetensors(path: Path):
  """``safe_open`` with a message that names the file when it is not a
  safetensors file (the library's own says only, e.g., "header too
  large")."""
  try:
    return safe_open(path, framework='numpy')
  except Exception as e:  # SafetensorError, OSError
    raise CheckpointFormatError(
        f'{path} is not a safetensors file (8-byte header length, JSON '
        f'header, then the tensors): {type(e).__name__}: {e}.') from e


def _headers(files: list[Path], model_type: str) -> dict[str, _Stored]:
  """Canonical tensor name -> `_Stored`, reading the file headers only."""
  out = {}
  for path in files:
    with _open_safetensors(path) as f:
      for name in f.keys():
        key = name
        if model_type == 'gpt2':  # GPT2LMHeadModel prefixes the body.
          key = name.removeprefix('transformer.')
        if key in out:
          raise CheckpointFormatError(
              f'tensor {key!r} is stored twice: as {out[key].name!r} in '
              f'{out[key].file.name} and as {name!r} in {path.name}.')
        sl = f.get_slice(name)
        out[key] = _Stored(path, name, tuple(sl.get_shape()), sl.get_dtype())
  return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_pretrained(directory: str | os.PathLike) -> tuple[TransformerConfig,
                                                           dict]:
  """Reads a Hugging Face GPT-2 or Llama safetensors checkpoint.

  Args:
    directory: holds ``config.json`` and ``model.safetensors`` (or the shards
      of ``model.safetensors.index.json``).

  Returns:
    ``(config, params)``: a `TransformerConfig` and the ``params`` collection
    of ``Transformer(config)`` (nested dicts of numpy float32 arrays), so that
    ``Transformer(config).apply({'params': params}, tokens)`` gives the
    model's logits. GPT-2's ``dropout`` is its ``resid_pdrop``, Llama's its
    ``attention_dropout`` (both only act with ``train=True``).

  Raises:
    CheckpointNotFoundError: a missing directory, config or weights file.
    CheckpointFormatError: an unsupported model_type or setting, a missing,
      misshaped, non-float or unexpected tensor.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise CheckpointNotFoundError(f'checkpoint directory {directory} does not '
                                  'exist (or is not a directory).')
  config_path = directory / CONFIG_FILE
  if not config_path.is_file():
    raise CheckpointNotFoundError(f'no {CONFIG_FILE} in {directory}.')
  try:
    hf = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointFormatError(f'{config_path} is not valid JSON: {e}') from e
  if not isinstance(hf, dict):
    raise CheckpointFormatError(f'{config_path} must hold a JSON object.')
  model_type, cfg = _config_from_hf(hf)
  layout = _LAYOUTS[model_type](cfg)

  headers = _headers(_weight_files(directory), model_type)
  missing = [e.name for e in layout if e.name not in headers]
  if missing:
    raise CheckpointFormatError(
        f'{model_type} checkpoint in {directory} is missing tensor(s) '
        f'{_names(missing)}, which {CONFIG_FILE} implies.')
  for e in layout:
    stored = headers[e.name]
    if stored.shape != e.shape:
      raise CheckpointFormatError(
          f'tensor {e.name!r} has shape {stored.shape} in {stored.file.name}, '
          f'but {CONFIG_FILE} implies shape {e.shape}.')
    if stored.dtype not in _FLOAT_DTYPES:
      raise CheckpointFormatError(
          f'tensor {e.name!r} has dtype {stored.dtype} in {stored.file.name}; '
          f'accepted: {", ".join(_FLOAT_DTYPES)}.')
  known = {e.name for e in layout}
  extra = [n for n in headers
           if n not in known and not _ignored(model_type, cfg, n)]
  if extra:
    raise CheckpointFormatError(
        f'unexpected tensor(s) for a {model_type} model in {directory}: '
        f'{_names(extra)}.')

  by_file: dict[Path, list[_Entry]] = {}
  for e in layout:
    by_file.setdefault(headers[e.name].file, []).append(e)
  params: dict = {}
  for path, entries in by_file.items():
    with _open_safetensors(path) as f:
      for e in entries:
        x = np.asarray(f.get_tensor(headers[e.name].name), dtype=np.float32)
        if e.transpose:
          x = x.T
        for p, piece in zip(e.paths, np.split(x, len(e.paths), axis=-1)):
          _set(params, p, np.ascontiguousarray(piece))
  return cfg, params


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def save_pretrained(directory: str | os.PathLike, config: TransformerConfig,
                    params: Mapping, model_type: str) -> Path:
  """Writes ``config.json`` and ``model.safetensors`` in the HF layout.

  Args:
    directory: created if needed; existing files of those names are replaced.
    config: the model's config; ``'gpt2'`` needs the GPT-2 style (layernorm,
      learned positions, gelu, biases, tied head, no GQA), ``'llama'`` needs
      rmsnorm, rope and swiglu.
    params: ``Transformer(config)``'s params (``{'params': ...}`` is accepted
      too); numpy or JAX arrays, stored in their own dtype.
    model_type: ``'gpt2'`` or ``'llama'``.

  Returns:
    ``directory``, so ``load_pretrained(save_pretrained(...))`` round-trips.

  Raises:
    ValueError: an unknown model_type, a config not of that style, or params
      whose tree or shapes do not match the config.
  """
  hf_config = _config_to_hf(config, model_type)
  if set(params) == {'params'}:
    params = params['params']
  flat = _flatten(params)
  layout = _LAYOUTS[model_type](config)
  wanted = {}
  for e in layout:
    shape = e.shape[::-1] if e.transpose else e.shape
    piece = shape[:-1] + (shape[-1] // len(e.paths),)
    wanted.update({p: piece for p in e.paths})
  missing = ['/'.join(p) for p in wanted if p not in flat]
  extra = ['/'.join(p) for p in flat if p not in wanted]
  if missing or extra:
    raise ValueError(f'params do not match the config: missing '
                     f'{_names(missing) or "none"}; unexpected '
                     f'{_names(extra) or "none"}.')
  for p, shape in wanted.items():
    if tuple(np.shape(flat[p])) != shape:
      raise ValueError(f'param {"/".join(p)!r} has shape '
                       f'{tuple(np.shape(flat[p]))}, but the config implies '
                       f'{shape}.')
  tensors = {}
  for e in layout:
    x = np.concatenate([np.asarray(flat[p]) for p in e.paths], axis=-1)
    tensors[e.name] = np.ascontiguousarray(x.T if e.transpose else x)
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + '\n')
  save_file(tensors, directory / WEIGHTS_FILE, metadata={'format': 'pt'})
  return directory
