"""The PEFT comparison runs end to end (tiny) and its table adds up."""

import json
import os

import numpy as np

from experiments import peft_compare
from fedjax_pfi import training


def test_compare_writes_the_table(tmp_path):
  rows = peft_compare.compare(str(tmp_path), ['fedit', 'ffa_lora',
                                              'fedsa_lora', 'local_lora',
                                              'flora', 'hetlora', 'full'],
                              testing=True)
  by = {r['method']: r for r in rows}
  assert set(by) == {'fedit', 'ffa_lora', 'fedsa_lora', 'local_lora',
                     'flora', 'hetlora', 'full', 'centralized', 'pretrained'}
  for r in rows:
    assert 0.0 <= r['client_accuracy_worst'] <= r['client_accuracy_p10'] <= 1
  # Communication: nothing for local-only, half of FedIT's for FFA-LoRA and
  # for FedSA-LoRA (B or A only: equal sizes for square q/v kernels), and
  # LoRA far below full fine-tuning.
  assert by['local_lora']['bytes'] == 0
  assert by['ffa_lora']['bytes'] * 2 == by['fedit']['bytes']
  assert by['fedsa_lora']['bytes'] * 2 == by['fedit']['bytes']
  assert by['fedit']['bytes'] < by['full']['bytes'] / 10
  assert by['ffa_lora']['trainable'] * 2 == by['fedit']['trainable']
  assert by['full']['trainable'] > 10 * by['fedit']['trainable']
  assert by['centralized']['bytes'] > 0
  # every variant's run: its total is the sum of its rounds' messages, and
  # only local-only LoRA sends nothing
  for v in ('fedit', 'ffa_lora', 'fedsa_lora', 'local_lora', 'flora',
            'hetlora', 'full'):
    rows_v = training.read_metrics(os.path.join(tmp_path, v))
    assert np.isfinite(rows_v[-1]['train_loss']), v
    sent = rows_v[-1]['comm/upload_bytes_cumulative']
    assert sent == sum(r['comm/upload_bytes'] for r in rows_v), v
    assert (sent == 0) == (v == 'local_lora'), v
  table = open(os.path.join(tmp_path, 'table.md')).read()
  assert 'FedSA-LoRA (A averaged, B personal)' in table
  assert len(json.load(open(os.path.join(tmp_path, 'table.json')))) == 9
  # A second call resumes every run and pretraining: same numbers.
  again = peft_compare.compare(str(tmp_path), ['fedit'], testing=True)
  assert again[0]['client_accuracy_mean'] == by['fedit']['client_accuracy_mean']
