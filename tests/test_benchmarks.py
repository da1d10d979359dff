"""The LoRA memory benchmark runs (tiny sizes) and shows the model term."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lora_memory_benchmark_runs():
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.lora_memory',
       '--cohorts=2,6', '--batch=1', '--seq_len=4', '--dim=32', '--layers=1',
       '--heads=2', '--steps=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  slopes = dict(re.findall(r'^\s+(\w+)\s+[\d.]+ MB/client =\s+([\d.]+) x model',
                           out.stdout, re.M))
  assert set(slopes) == {'full', 'lora', 'lora_merge'}, out.stdout
  # Each client of full fine-tuning holds about two copies of the model;
  # with LoRA far less of it.
  assert float(slopes['full']) > 1.5
  assert float(slopes['lora']) < float(slopes['full']) / 3
