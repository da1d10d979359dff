"""The zoo's models have the papers' architectures (parameter counts by hand)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfi.models import zoo


def count(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_fedavg_mlp_784_200_200_62():
  m = zoo.build_model('mlp', np.zeros((1, 28, 28, 1)), {'num_classes': 62})
  p = m.init(jax.random.key(0))
  assert count(p) == (784 * 200 + 200) + (200 * 200 + 200) + (200 * 62 + 62)
  assert m.apply(p, jnp.zeros((3, 28, 28, 1))).shape == (3, 62)


@pytest.mark.parametrize('conv', ['lax', 'patches'])
def test_fedavg_cnn(conv):
  m = zoo.build_model('cnn', np.zeros((1, 28, 28, 1)), {'num_classes': 62},
                      conv=conv)
  p = m.init(jax.random.key(0))
  conv1 = 5 * 5 * 1 * 32 + 32
  conv2 = 5 * 5 * 32 * 64 + 64
  dense = 7 * 7 * 64 * 512 + 512
  out = 512 * 62 + 62
  assert count(p) == conv1 + conv2 + dense + out == 1_690_046
  assert m.apply(p, jnp.zeros((2, 28, 28, 1))).shape == (2, 62)


def test_cnn_formulations_share_params_and_outputs():
  x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
  lax_m, patch_m = (zoo.build_model('cnn', x, {'num_classes': 62}, conv=c)
                    for c in ('lax', 'patches'))
  p = lax_m.init(jax.random.key(0))
  assert jax.tree.structure(p) == jax.tree.structure(
      patch_m.init(jax.random.key(0)))
  np.testing.assert_allclose(patch_m.apply(p, x), lax_m.apply(p, x),
                             rtol=1e-4, atol=1e-5)


def test_leaf_char_lstm():
  meta = {'vocab_size': 98, 'pad_id': 0}
  m = zoo.build_model('char_lstm', np.zeros((1, 80), np.int32), meta)
  p = m.init(jax.random.key(0))
  embed = 98 * 8
  lstm1 = 4 * (8 * 256 + 256 * 256 + 256)
  lstm2 = 4 * (256 * 256 + 256 * 256 + 256)
  assert count(p) == embed + lstm1 + lstm2 + 256 * 98 + 98
  assert m.apply(p, jnp.zeros((2, 80), jnp.int32)).shape == (2, 80, 98)


def test_char_transformer_is_causal():
  meta = {'vocab_size': 20, 'pad_id': 0}
  m = zoo.build_model('char_transformer', np.zeros((1, 12), np.int32), meta,
                      dim=16, num_layers=2, num_heads=2)
  p = m.init(jax.random.key(0))
  x = jnp.arange(12)[None] % 20
  y = x.at[0, 8].set(3)  # changing position 8 must not change outputs 0..7
  a, b = m.apply(p, x), m.apply(p, y)
  np.testing.assert_allclose(a[0, :8], b[0, :8], atol=1e-6)
  assert not np.allclose(a[0, 8:], b[0, 8:])


def test_sequence_loss_ignores_padding():
  meta = {'vocab_size': 20, 'pad_id': 0}
  m = zoo.build_model('char_transformer', np.zeros((1, 6), np.int32), meta,
                      dim=8, num_layers=1, num_heads=1)
  p = m.init(jax.random.key(0))
  x = jnp.array([[4, 5, 6, 7, 0, 0]])
  y = jnp.array([[5, 6, 7, 8, 0, 0]])
  stats = m.example_stats(p, {'x': x, 'y': y})
  assert float(stats.count[0]) == 4.0
  y2 = y.at[0, 5].set(0)
  assert float(m.example_stats(p, {'x': x, 'y': y2}).loss_sum[0]) == float(
      stats.loss_sum[0])


def test_unknown_model_and_wrong_dataset():
  with pytest.raises(ValueError, match="unknown model 'vit'; accepted: "
                     'additive_mf, char_lstm, char_transformer, cnn, logreg, '
                     'mlp'):
    zoo.build_model('vit', np.zeros((1, 3)), {'num_classes': 2})
  with pytest.raises(ValueError, match="needs dataset metadata 'num_classes'"):
    zoo.build_model('cnn', np.zeros((1, 80), np.int32), {'vocab_size': 98})


def _tiny_pretrained(tmp_path, vocab=257, max_len=16):
  from fedjax_pfi.models import hf_io  # pylint: disable=g-import-not-at-top
  from fedjax_pfi.models import transformer  # pylint: disable=g-import-not-at-top
  cfg = transformer.TransformerConfig.gpt2(vocab, 16, 1, 2, max_len=max_len)
  params = transformer.Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  return hf_io.save_pretrained(tmp_path / 'model', cfg, params, 'gpt2'), params


def test_transformer_from_pretrained_directory(tmp_path):
  directory, params = _tiny_pretrained(tmp_path)
  meta = {'vocab_size': 257, 'pad_id': 0, 'tokenizer': 'byte'}
  m = zoo.build_model('transformer', np.zeros((1, 8), np.int32), meta,
                      pretrained=str(directory))
  loaded = m.init(jax.random.key(5))  # the checkpoint, whatever the key
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert m.apply(loaded, jnp.ones((2, 8), jnp.int32)).shape == (2, 8, 257)


def test_pretrained_errors(tmp_path):
  directory, _ = _tiny_pretrained(tmp_path)
  x = np.zeros((1, 8), np.int32)
  char = {'vocab_size': 98, 'pad_id': 0, 'tokenizer': 'char'}
  with pytest.raises(ValueError, match="has a vocabulary of 257 tokens but "
                     "the dataset's tokenizer \\('char'\\) has 98"):
    zoo.build_model('transformer', x, char, pretrained=str(directory))
  byte = {'vocab_size': 257, 'pad_id': 0}
  with pytest.raises(ValueError, match=r"model.kwargs \['dim'\] conflict with"):
    zoo.build_model('transformer', x, byte, pretrained=str(directory), dim=8)
  with pytest.raises(ValueError, match='exceeds the pretrained model'):
    zoo.build_model('transformer', np.zeros((1, 32), np.int32), byte,
                    pretrained=str(directory))
  with pytest.raises(ValueError, match="model.pretrained loads a 'transformer'"):
    zoo.build_model('char_lstm', x, byte, pretrained=str(directory))
  with pytest.raises(FileNotFoundError, match='experiments.pretrain'):
    zoo.build_model('transformer', x, byte, pretrained=str(tmp_path / 'none'))
  with pytest.raises(ValueError, match="unknown transformer style 'bert'"):
    zoo.build_model('transformer', x, byte, style='bert')
