"""Pretraining writes a Hugging Face checkpoint that the federated configs
load; re-running is a no-op and another config is refused."""

import os

import jax
import numpy as np
import pytest

from experiments.configs import pretrain_shakespeare
from experiments.configs import shakespeare_lora
from fedjax_pfi import checkpoint as checkpoint_lib
from fedjax_pfi import pretraining
from fedjax_pfi import training
from fedjax_pfi.models import hf_io


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  config = pretrain_shakespeare.get_config('testing')
  config.data.seq_len = 16
  final = pretraining.pretrain(config, workdir)
  return workdir, config, final


def test_writes_a_loadable_checkpoint(pretrained):
  workdir, config, final = pretrained
  cfg, params = hf_io.load_pretrained(os.path.join(workdir, 'model'))
  assert (cfg.vocab_size, cfg.dim, cfg.num_layers) == (257, 16, 1)
  assert final['params'] == sum(p.size for p in jax.tree.leaves(params))
  assert final['step'] == config.steps
  assert 0.0 <= final['val/accuracy'] <= 1.0
  assert np.isfinite(final['train_loss'])


def test_rerun_is_a_no_op_and_other_config_refused(pretrained):
  workdir, config, final = pretrained
  before = os.path.getmtime(os.path.join(workdir, 'model', 'model.safetensors'))
  again = pretraining.pretrain(config, workdir)
  assert again == final
  assert os.path.getmtime(os.path.join(
      workdir, 'model', 'model.safetensors')) == before
  other = pretrain_shakespeare.get_config('testing')
  other.steps = 3
  with pytest.raises(ValueError, match='pretrained with a different config'):
    pretraining.pretrain(other, workdir)


@pytest.mark.parametrize('variant', ['fedsa_lora', 'hetlora'])
def test_personalise_the_pretrained_model_and_resume(pretrained, tmp_path,
                                                     variant):
  """A LoRA run on the pretrained base: the checkpoint holds adapters and
  personal state but not the base; kill-and-resume equals an uninterrupted
  run, communication totals included."""
  workdir, _, _ = pretrained
  config = shakespeare_lora.get_config(variant + ',testing')
  config.model.pretrained = os.path.join(workdir, 'model')
  config.model.kwargs = type(config.model.kwargs)()
  config.rounds = 3
  full_dir, part_dir = str(tmp_path / 'full'), str(tmp_path / 'part')
  training.run(config, full_dir)
  training.run(config, part_dir, stop_after=2)
  training.run(config, part_dir)
  def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith('time/')}
            for r in rows]
  full = training.read_metrics(full_dir)
  assert strip(training.read_metrics(part_dir)) == strip(full)
  assert full[-1]['comm/upload_bytes_cumulative'] == sum(
      r['comm/upload_bytes'] for r in full)
  sig = checkpoint_lib.Checkpointer(full_dir).read_meta(3)['signature']
  assert not any('embed' in k or "'base'" in k for k in sig), sig
  assert any("'lora'" in k for k in sig)
  assert any('client_states' in k for k in sig)
