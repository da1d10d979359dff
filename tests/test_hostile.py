"""Hostile inputs and faults: each gets a message naming the bad value or
file, and none loses or silently changes a run.

Every case is a tiny run (`tests.test_training.small_config`, 12 synthetic
clients) or a loader called on a small file made here. The cases come from
trying the simulator as a new user would (issue 12) plus our own; together
with the bad-config cases of `test_training.py` they are the suite that keeps
these from coming back.
"""

import glob
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import warnings

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest

from experiments.configs import synthetic_fedprox
from fedjax_pfi import checkpoint as checkpoint_lib
from fedjax_pfi import config as config_lib
from fedjax_pfi import training
from fedjax_pfi.data import federated
from fedjax_pfi.data import femnist
from fedjax_pfi.data import files
from fedjax_pfi.data import movielens
from fedjax_pfi.data import registry
from fedjax_pfi.data import shakespeare
from fedjax_pfi.models import hf_io
from tests.models.test_hf_io import gpt2_checkpoint
from tests.test_training import small_config
from tests.test_training import uninterrupted  # noqa: F401  (a fixture)
from tests.test_training import without_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def no_data_loading(monkeypatch):
  """Makes loading any dataset fail the test: the check must come first."""
  def load(cfg):
    raise AssertionError(f'data {cfg["name"]!r} was loaded before the check')
  monkeypatch.setattr(training.registry, 'load_splits', load)


# -- 1. every field can be set on the command line --------------------------------


def parse_command_line(config_arg: str, *overrides: str):
  """What `experiments/main.py`'s ``--config`` flag makes of the arguments."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv,
                                  **config_lib.COMMAND_LINE)
  argv = config_lib.command_line(['main', f'--config={config_arg}',
                                  *overrides])
  old, sys.argv = sys.argv, argv  # config_flags reads overrides from argv
  try:
    fv(argv)
  finally:
    sys.argv = old
  return fv.config


def all_fields(node, prefix=''):
  for key in node:
    if node.get_type(key) is type(node) or hasattr(node[key], 'items'):
      yield from all_fields(node[key], f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', node.get_type(key)


# An override and what the field then holds, by the field's type.
SAMPLES = {int: ('7', 7), float: ('0.5', 0.5), str: ('some/dir', 'some/dir'),
           bool: ('false', False), tuple: ("('a','b')", ('a', 'b')),
           object: ("{'alpha': 0.5}", {'alpha': 0.5})}
FIELDS = list(all_fields(config_lib.default_config()))


def test_default_config_fields_include_the_optional_ones():
  names = dict(FIELDS)
  for key in ('data.leaf_dir', 'data.path', 'data.plays', 'data.exclude_plays',
              'data.max_clients', 'data.tfds_name', 'client.max_steps',
              'data.partitioner_kwargs', 'model.pretrained'):
    assert names[key] is not type(None), key
  assert len(FIELDS) > 80


@pytest.mark.parametrize('key,field_type', FIELDS, ids=[k for k, _ in FIELDS])
def test_every_field_can_be_overridden(key, field_type):
  arg, want = SAMPLES[field_type]
  config = parse_command_line('experiments/configs/synthetic_fedprox.py:testing',
                              f'--config.{key}={arg}')
  assert config_lib.get(config, key) == want


def test_leaf_dir_from_the_command_line_reaches_the_loader(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (('train', 3), ('test', 2)):
    (tmp_path / split).mkdir()
    (tmp_path / split / 'all_data_0.json').write_text(json.dumps({
        'users': ['f0001_01', 'f0002_02'], 'num_samples': [n, n],
        'user_data': {u: {'x': rng.random((n, 784)).tolist(),
                          'y': rng.integers(0, 62, n).tolist()}
                      for u in ('f0001_01', 'f0002_02')}}))
  config = parse_command_line('experiments/configs/femnist_fedavg.py:testing',
                              f'--config.data.leaf_dir={tmp_path}')
  splits = registry.load_splits(config.data)
  assert splits.train.client_names.tolist() == ['f0001_01', 'f0002_02']
  assert splits.train.num_examples == 6


def test_model_kwargs_from_the_command_line():
  """A model's constructor arguments are the user's to choose: new keys
  under model.kwargs are accepted, and reach the model."""
  config = parse_command_line('experiments/configs/synthetic_fedprox.py:testing',
                              '--config.model.name=mlp',
                              '--config.model.kwargs.hidden=(5,)')
  assert config.model.kwargs.hidden == (5,)
  params = training.build(config).model.init(jax.random.key(0))
  assert params['Dense_0']['bias'].shape == (5,)


def test_misspelt_option_is_refused_with_the_nearest_name(tmp_path,
                                                          monkeypatch):
  no_data_loading(monkeypatch)
  config = parse_command_line('experiments/configs/synthetic_fedprox.py:testing',
                              '--config.client.learnin_rate=0.1')
  with pytest.raises(ValueError, match=re.escape(
      'unknown option client.learnin_rate; did you mean client.learning_rate?')):
    training.run(config, str(tmp_path))


def test_plays_from_the_command_line_split_on_commas():
  config = parse_command_line('experiments/configs/shakespeare_fedavg.py:testing',
                              '--config.data.plays=macbeth,the-tempest')
  assert shakespeare._as_list(config.data.plays) == ['macbeth', 'the-tempest']  # pylint: disable=protected-access


# -- 2. values no run can use, refused before the data is loaded ----------------------


@pytest.mark.parametrize('overrides,message', [
    ({'eval_batch_size': 0}, 'eval_batch_size must be >= 1, got 0.'),
    ({'eval_clients_per_chunk': 0}, 'eval_clients_per_chunk must be >= 1'),
    ({'seed': -1}, 'seed must be an integer in [0, 2**32), got -1.'),
    ({'seed': 2**32}, 'seed must be an integer in [0, 2**32), got 4294967296'),
    ({'rounds': 0}, 'rounds must be >= 1, got 0.'),
    ({'personalization.local_epochs': -1},
     'personalization.local_epochs must be >= 0, got -1.'),
    ({'personalization.finetune_epochs': -1},
     'personalization.finetune_epochs must be >= 0, got -1.'),
    ({'personalization.num_clusters': 0},
     'personalization.num_clusters must be >= 1, got 0.'),
    ({'client.max_steps': 0}, 'client.max_steps must be >= 1 or None, got 0.'),
    ({'client.momentum': 1.5}, 'client.momentum must be a number in [0, 1), '
     'got 1.5.'),
    ({'server.b2': 1.0}, 'server.b2 must be a number in [0, 1), got 1.0.'),
    ({'stragglers.fraction': 1.5}, 'stragglers.fraction must be a number in '
     '[0, 1], got 1.5.'),
    ({'data.test_fraction': 1.0}, 'data.test_fraction must be a number in '
     '[0, 1), got 1.0.'),
    ({'data.heldout_fraction': -0.1}, 'data.heldout_fraction must be a number '
     'in [0, 1), got -0.1.'),
    ({'data.max_clients': 0}, 'data.max_clients must be >= 1 or None, got 0.'),
    ({'server.learning_rate': 1e39}, 'server.learning_rate=1e+39 does not fit '
     'float32'),
    ({'client.learning_rate': float('inf')}, 'client.learning_rate=inf does '
     'not fit float32'),
    ({'client.proximal_mu': float('nan')}, 'client.proximal_mu must be a '
     'finite number >= 0, got nan.'),
])
def test_impossible_value_is_refused_before_loading(tmp_path, monkeypatch,
                                                     overrides, message):
  no_data_loading(monkeypatch)
  with pytest.raises(ValueError, match=re.escape(message)):
    training.run(small_config(**overrides), str(tmp_path / 'w'))


def test_missing_paths_are_refused_before_loading(tmp_path, monkeypatch):
  no_data_loading(monkeypatch)
  with pytest.raises(FileNotFoundError,
                     match=re.escape(f"data.path='{tmp_path}/nope' does not "
                                     "exist (data.name='synthetic'")):
    training.run(small_config(**{'data.path': f'{tmp_path}/nope'}),
                 str(tmp_path / 'w'))
  (tmp_path / 'model').mkdir()
  with pytest.raises(FileNotFoundError, match=re.escape(
      f"model.pretrained='{tmp_path}/model' has no config.json")):
    training.run(small_config(**{'model.pretrained': f'{tmp_path}/model'}),
                 str(tmp_path / 'w'))


# -- 3. the workdir -------------------------------------------------------------------


def test_empty_workdir_is_named(monkeypatch):
  no_data_loading(monkeypatch)
  with pytest.raises(ValueError, match='--workdir is empty'):
    training.run(small_config(), '')


def test_unwritable_workdir_is_found_first(tmp_path, monkeypatch):
  no_data_loading(monkeypatch)
  (tmp_path / 'a_file').write_text('not a directory')
  with pytest.raises(ValueError, match=re.escape(
      f"--workdir='{tmp_path}/a_file/run' cannot be written")):
    training.run(small_config(), str(tmp_path / 'a_file' / 'run'))


def test_workdir_flag_empty_on_the_command_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=experiments/configs/synthetic_fedprox.py:testing',
       '--workdir='], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert '--workdir is empty' in out.stderr


# -- 4. checkpoints -------------------------------------------------------------------


@pytest.fixture(scope='module')
def one_round(tmp_path_factory):
  """A workdir after one round of `small_config`: each test changes a copy."""
  workdir = str(tmp_path_factory.mktemp('one_round'))
  training.run(small_config(rounds=1), workdir)
  return workdir


def copy_of(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / 'w')
  return str(tmp_path / 'w')


def newest_state_file(workdir):
  """The largest array data file of the newest checkpoint."""
  ckpt = checkpoint_lib.Checkpointer(workdir)
  step = ckpt.latest_round()
  data = glob.glob(os.path.join(ckpt.directory, str(step), 'state', '**', 'd',
                                '*'), recursive=True)
  return step, max(data, key=os.path.getsize)


def flip_bit(path, offset):
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x10]))


def test_flipped_bit_in_the_state_is_refused(tmp_path, one_round):
  workdir = copy_of(one_round, tmp_path)
  step, data = newest_state_file(workdir)
  flip_bit(data, os.path.getsize(data) // 2)  # inside the compressed arrays
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=rf'checkpoints/{step} is corrupt: 1 of its \d+ '
                     r'arrays differ from what was saved \(sha256 digests\), '
                     r"e\.g\. .*Delete that directory to resume from the "
                     'previous checkpoint'):
    training.run(small_config(rounds=2), workdir)


def test_edited_checkpoint_record_is_refused(tmp_path, one_round):
  workdir = copy_of(one_round, tmp_path)
  meta = os.path.join(workdir, 'checkpoints', '1', 'meta', 'metadata')
  with open(meta) as f:
    text = f.read()
  with open(meta, 'w') as f:
    f.write(text.replace('"round": 1', '"round": 7'))
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match='checkpoints/1 is corrupt: its JSON record does '
                     'not match the digest saved with it'):
    training.run(small_config(rounds=2), workdir)


def test_unreadable_checkpoint_is_one_line(tmp_path, one_round):
  workdir = copy_of(one_round, tmp_path)
  _, data = newest_state_file(workdir)
  flip_bit(data, 0)  # the first compressed frame's magic number
  with pytest.raises(checkpoint_lib.CheckpointError) as info:
    training.run(small_config(rounds=2), workdir)
  message = str(info.value)
  assert re.search(r'checkpoints/1 is unreadable \(ValueError: .*ZSTD', message)
  assert '\n' not in message and 'TensorStore({' not in message
  assert len(message) < 700


def test_refused_run_keeps_config_json_and_names_the_key(tmp_path, one_round):
  workdir = copy_of(one_round, tmp_path)
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    before = f.read()
  with pytest.raises(checkpoint_lib.CheckpointError) as info:
    training.run(small_config(rounds=2, **{'client.learning_rate': 0.07,
                                           'data.num_clients': 13}),
                 workdir)
  message = str(info.value)
  assert ('differ in 2 key(s): client.learning_rate: 0.05 in the checkpoint, '
          '0.07 now; data.num_clients: 12 in the checkpoint, 13 now.') in message
  assert ('only rounds, checkpoint_every, progress, execution.* may change'
          in message)
  with open(path) as f:
    assert f.read() == before


def test_shape_mismatch_also_names_the_keys(tmp_path, one_round):
  workdir = copy_of(one_round, tmp_path)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=re.escape("model.kwargs.hidden: [8] in the "
                                     'checkpoint, [16] now')):
    training.run(small_config(rounds=2, **{'model.kwargs.hidden': (16,)}),
                 workdir)


def test_checkpoint_from_before_digests_still_resumes(tmp_path,
                                                     uninterrupted):  # noqa: F811
  """A record as earlier versions wrote it (no digests, config or totals,
  and the fingerprint of the whole config): the run resumes exactly, the
  totals come from metrics.jsonl, and a different config is named from
  config.json."""
  training.run(small_config(), str(tmp_path), stop_after=2)
  meta = os.path.join(tmp_path, 'checkpoints', '2', 'meta', 'metadata')
  with open(meta) as f:
    record = json.load(f)
  whole = small_config().to_dict()
  for k in config_lib.RESUMABLE_KEYS:
    whole.pop(k)
  with open(meta, 'w') as f:
    json.dump({'fingerprint': checkpoint_lib.fingerprint(whole),
               'round': 2, 'signature': record['signature']}, f)
  with pytest.raises(checkpoint_lib.CheckpointError, match=re.escape(
      'client.learning_rate: 0.05 in ') + '.*config.json, 0.07 now'):
    training.run(small_config(**{'client.learning_rate': 0.07}), str(tmp_path))
  training.run(small_config(), str(tmp_path))
  assert without_time(training.read_metrics(str(tmp_path))) == without_time(
      uninterrupted)


def test_workdir_from_before_an_option_existed_resumes(tmp_path, monkeypatch,
                                                       uninterrupted):  # noqa: F811
  """A later version adds an option with a default: a workdir written
  without it resumes, and ends as an uninterrupted run."""
  training.run(small_config(), str(tmp_path), stop_after=2)
  real = config_lib.default_config

  def with_new_option():
    c = real()
    c.client.new_option = 3
    return c

  monkeypatch.setattr(config_lib, 'default_config', with_new_option)
  monkeypatch.setattr(training, 'default_config', with_new_option)
  config = small_config()
  assert config.client.new_option == 3
  training.run(config, str(tmp_path))
  assert without_time(training.read_metrics(str(tmp_path))) == without_time(
      uninterrupted)
  config.client.new_option = 4  # now it is set: another experiment
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=re.escape('client.new_option: 3 in the checkpoint, '
                                     '4 now')):
    training.run(config, str(tmp_path))


def test_fewer_rounds_on_the_command_line_says_which_round(tmp_path):
  config = synthetic_fedprox.get_config('testing')  # what the command runs
  config.progress = False
  training.run(config, str(tmp_path))
  cmd = [sys.executable, '-m', 'experiments.main',
         '--config=experiments/configs/synthetic_fedprox.py:testing',
         f'--workdir={tmp_path}', '--config.progress=false']
  again = subprocess.run(cmd + ['--config.rounds=1'], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'final metrics (round 3):' in again.stdout
  assert ('holds a run of 3 rounds (its newest checkpoint), more than '
          'rounds=1: nothing was run, and the metrics reported are those of '
          'round 3') in again.stderr
  rows = training.read_metrics(str(tmp_path))
  assert [r['round'] for r in rows] == [1, 2, 3]
  assert f"{rows[-1]['train_loss']:.4f}" in again.stdout


# -- 5. metrics.jsonl -----------------------------------------------------------------


def test_lost_metrics_file_warns_and_keeps_running_totals(tmp_path,
                                                          uninterrupted):  # noqa: F811
  training.run(small_config(), str(tmp_path), stop_after=2)
  os.remove(os.path.join(tmp_path, 'metrics.jsonl'))
  with pytest.warns(training.ResumeWarning,
                    match=r'metrics.jsonl is missing but the checkpoint is '
                    'round 2: the rows in between are lost'):
    training.run(small_config(), str(tmp_path))
  rows = training.read_metrics(str(tmp_path))
  assert [r['round'] for r in rows] == [3, 4]
  assert without_time(rows) == without_time(uninterrupted[2:])
  assert rows[-1]['comm/upload_bytes_cumulative'] == sum(
      r['comm/upload_bytes'] for r in uninterrupted)


def test_torn_last_line_is_dropped_and_the_run_resumes(tmp_path,
                                                       uninterrupted):  # noqa: F811
  config = small_config(checkpoint_every=2)
  training.run(config, str(tmp_path), stop_after=2)
  with open(os.path.join(tmp_path, 'metrics.jsonl'), 'a') as f:
    f.write('{"round": 3, "train_lo')  # a crash while writing round 3
  with warnings.catch_warnings():
    warnings.simplefilter('error', training.ResumeWarning)  # nothing is lost
    training.run(config, str(tmp_path))
  assert without_time(training.read_metrics(str(tmp_path))) == without_time(
      uninterrupted)


def test_unreadable_row_before_the_checkpoint_names_the_line(tmp_path):
  training.run(small_config(rounds=3), str(tmp_path))
  path = os.path.join(tmp_path, 'metrics.jsonl')
  with open(path) as f:
    lines = f.readlines()
  lines[1] = 'garbage\n'
  with open(path, 'w') as f:
    f.writelines(lines)
  with pytest.raises(training.MetricsFileError,
                     match=re.escape(f'{path} line 2 is not a metrics row')):
    training.run(small_config(rounds=4), str(tmp_path))


# -- 6. non-finite numbers --------------------------------------------------------------


def test_overflowing_server_step_is_not_checkpointed(tmp_path):
  """lr 3e38 fits float32, but its product with the clients' mean update
  does not: the loss of round 1 is finite, its new params are not."""
  config = small_config(**{'server.optimizer': 'fedavg',
                           'server.learning_rate': 3e38,
                           'client.learning_rate': 0.5})
  with pytest.raises(training.NonFiniteStateError,
                     match=r"round 1: its training loss was finite, but the "
                     r"state it produced holds NaN or inf in \d+ array\(s\), "
                     r"e\.g\. \.params\['Dense_\d'\]\[.*No checkpoint was "
                     'written before it.*server.learning_rate'):
    training.run(config, str(tmp_path))
  assert checkpoint_lib.Checkpointer(str(tmp_path)).latest_round() is None
  assert not os.path.exists(os.path.join(tmp_path, 'metrics.jsonl')) or \
      not training.read_metrics(str(tmp_path))


# -- 7. data files that are not what they should be ---------------------------------------


def random_bytes(path, n=4096, seed=0):
  path.write_bytes(np.random.default_rng(seed).integers(0, 256, n,
                                                        np.uint8).tobytes())
  return path


def assert_names_file(info, path, *words):
  message = str(info.value)
  assert str(path) in message, message
  assert 'pickle' not in message.replace(str(path), '').lower(), message
  for w in words:
    assert w in message, message


def test_leaf_json_that_is_not_json(tmp_path):
  (tmp_path / 'a.json').write_text('not json at all')
  with pytest.raises(files.DataFileError) as info:
    femnist.load_leaf_json(tmp_path)
  assert_names_file(info, tmp_path / 'a.json', 'a LEAF FEMNIST json file',
                    'invalid JSON')


def test_leaf_json_that_is_not_leaf(tmp_path):
  (tmp_path / 'a.json').write_text('{}')
  with pytest.raises(files.DataFileError) as info:
    femnist.load_leaf_json(tmp_path)
  assert_names_file(info, tmp_path / 'a.json', 'lacks a "users" list')


def test_leaf_json_with_a_user_without_data(tmp_path):
  (tmp_path / 'a.json').write_text(json.dumps(
      {'users': ['w1'], 'num_samples': [1], 'user_data': {}}))
  with pytest.raises(files.DataFileError) as info:
    femnist.load_leaf_json(tmp_path)
  assert_names_file(info, tmp_path / 'a.json', "listed user 'w1'")


def test_femnist_npz_of_random_bytes(tmp_path):
  path = random_bytes(tmp_path / 'femnist.npz')
  with pytest.raises(files.DataFileError) as info:
    femnist.load_npz(path, 'train')
  assert_names_file(info, path, 'a FEMNIST .npz', 'does not begin as a NumPy '
                    'file does')


def test_femnist_npz_without_its_arrays(tmp_path):
  path = tmp_path / 'femnist.npz'
  np.savez(path, something=np.zeros(3))
  with pytest.raises(files.DataFileError) as info:
    femnist.load_npz(path, 'train')
  assert_names_file(info, path, "lacks the array(s) ['train_images'")


def test_truncated_npz(tmp_path):
  path = tmp_path / 'femnist.npz'
  np.savez(path, train_images=np.zeros((3, 28, 28), np.uint8))
  path.write_bytes(path.read_bytes()[:60])
  with pytest.raises(files.DataFileError) as info:
    femnist.load_npz(path, 'train')
  assert_names_file(info, path, 'cannot be read')


def test_femnist_npz_of_random_bytes_through_the_config(tmp_path):
  path = random_bytes(tmp_path / 'femnist.npz')
  config = small_config(**{'data.name': 'femnist', 'data.path': str(path)})
  with pytest.raises(files.DataFileError) as info:
    training.run(config, str(tmp_path / 'w'))
  assert_names_file(info, path)


def test_inter_of_random_bytes(tmp_path):
  path = random_bytes(tmp_path / 'ml-100k.inter')
  with pytest.raises(files.DataFileError) as info:
    movielens.load(str(path))
  assert_names_file(info, path, 'a RecBole atomic .inter file',
                    'not UTF-8 text')


def test_inter_with_a_word_for_a_number(tmp_path):
  path = tmp_path / 'ml-100k.inter'
  path.write_text('user_id:token\titem_id:token\trating:float\t'
                  'timestamp:float\n1\t2\t3\t4\n1\tabc\t3\t5\n')
  with pytest.raises(files.DataFileError) as info:
    movielens.load(str(path))
  assert_names_file(info, path, "line 3 ('1\\tabc\\t3\\t5') is not 4 "
                    'tab-separated numbers')


def test_safetensors_of_random_bytes(tmp_path):
  config, _ = gpt2_checkpoint()
  (tmp_path / 'config.json').write_text(json.dumps(config))
  path = random_bytes(tmp_path / 'model.safetensors')
  with pytest.raises(hf_io.CheckpointFormatError) as info:
    hf_io.load_pretrained(tmp_path)
  assert_names_file(info, path, 'is not a safetensors file')


def test_saved_dataset_with_random_bytes_for_an_array(tmp_path):
  ds = federated.FederatedDataset.from_clients(
      [{'x': np.zeros((2, 3), np.float32)}], ['a'], {})
  ds.save(str(tmp_path / 'ds'))
  path = random_bytes(tmp_path / 'ds' / 'offsets.npy')
  with pytest.raises(files.DataFileError) as info:
    federated.FederatedDataset.load(str(tmp_path / 'ds'))
  assert_names_file(info, path, 'part of a saved FederatedDataset')


def test_saved_dataset_with_garbage_metadata(tmp_path):
  ds = federated.FederatedDataset.from_clients(
      [{'x': np.zeros((2, 3), np.float32)}], ['a'], {})
  ds.save(str(tmp_path / 'ds'))
  path = tmp_path / 'ds' / 'metadata.json'
  path.write_text('{"unfinished": ')
  with pytest.raises(files.DataFileError) as info:
    federated.FederatedDataset.load(str(tmp_path / 'ds'))
  assert_names_file(info, path, 'invalid JSON')


def test_object_array_npy_is_never_loaded(tmp_path):
  path = tmp_path / 'column_x.npy'
  np.save(path, np.array([{'a': 1}], dtype=object), allow_pickle=True)
  with pytest.raises(files.DataFileError) as info:
    files.load_npy(path, 'a column')
  assert_names_file(info, path, 'holds Python objects', 'never loaded')


def test_speeches_jsonl_with_a_bad_line(tmp_path):
  path = tmp_path / 'speeches.jsonl'
  path.write_text(json.dumps({'work_id': 'w', 'speaker': 's', 'text': 't'}) +
                  '\n{"work_id": \n')
  with pytest.raises(files.DataFileError) as info:
    shakespeare.load_speeches_jsonl(path, min_chars=1)
  assert_names_file(info, path, 'line 2: invalid JSON')


def test_speeches_jsonl_record_without_text(tmp_path):
  path = tmp_path / 'speeches.jsonl'
  path.write_text(json.dumps({'work_id': 'w', 'speaker': 's'}) + '\n')
  with pytest.raises(files.DataFileError) as info:
    shakespeare.load_speeches_jsonl(path, min_chars=1)
  assert_names_file(info, path, 'line 1 lacks a "work_id", "speaker" or '
                    '"text" string')


def test_speeches_gz_that_is_not_gzip(tmp_path):
  path = random_bytes(tmp_path / 'speeches.jsonl.gz')
  with pytest.raises(files.DataFileError) as info:
    shakespeare.load_speeches_jsonl(path)
  assert_names_file(info, path, 'cannot be read')
  good = tmp_path / 'cut.jsonl.gz'
  with gzip.open(good, 'wt') as f:
    f.write(json.dumps({'work_id': 'w', 'speaker': 's', 'text': 't' * 50}))
  good.write_bytes(good.read_bytes()[:-6])  # cut short
  with pytest.raises(files.DataFileError):
    shakespeare.load_speeches_jsonl(good)


def test_tokenizer_json_that_is_not_a_tokenizer(tmp_path):
  pytest.importorskip('tokenizers')
  from fedjax_pfi.data import tokenizer  # pylint: disable=g-import-not-at-top
  (tmp_path / 'tokenizer.json').write_text('{"nonsense": 1}')
  with pytest.raises(ValueError) as info:
    tokenizer.load_tokenizer(str(tmp_path))
  assert_names_file(info, tmp_path / 'tokenizer.json',
                    'is not a Hugging Face tokenizer.json')


def test_no_loader_unpickles():
  """``allow_pickle`` is never turned on, and nothing imports pickle."""
  for top in ('fedjax_pfi', 'experiments', 'launch'):
    for path in glob.glob(os.path.join(ROOT, top, '**', '*.py'),
                          recursive=True):
      with open(path) as f:
        text = f.read()
      assert 'allow_pickle=True' not in text, path
      assert not re.search(r'^\s*(import|from) (c?pickle|dill|joblib)', text,
                           re.M), path


# -- 8. kill -9 -----------------------------------------------------------------------------


def child(workdir, fault):
  return subprocess.run([sys.executable, '-m', 'tests.kill_child',
                         str(workdir), fault], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def test_kill_9_anywhere_then_resume_equals_uninterrupted(tmp_path,
                                                          uninterrupted):  # noqa: F811
  """SIGKILL inside a checkpoint write, inside a metrics row write, and at
  random moments (seeded; a run that finishes first is not killed); each
  restart resumes, and the run ends with the uninterrupted run's
  metrics."""
  for fault in ('checkpoint:2', 'metrics:2'):
    out = child(tmp_path, fault)
    assert out.returncode == -signal.SIGKILL, (fault, out.stderr[-2000:])
  rng = random.Random(12)
  for _ in range(2):  # a random moment of building, compiling or a round
    out = child(tmp_path, f'after:{rng.uniform(1.0, 6.0):.3f}')
    assert out.returncode in (0, -signal.SIGKILL), out.stderr[-2000:]
  out = child(tmp_path, 'none')
  assert out.returncode == 0, out.stderr[-3000:]
  rows = training.read_metrics(str(tmp_path))
  assert without_time(rows) == without_time(uninterrupted)
