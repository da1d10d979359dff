"""The README's Python example runs as written."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs():
  with open(os.path.join(ROOT, 'README.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  assert len(blocks) == 1
  scope = {}
  exec(compile(blocks[0], 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  assert int(scope['state'].round) == 1
  assert int(scope['metrics']['clients']) == 10
  assert np.isfinite(float(scope['metrics']['train_loss']))
