r"""Flipped bits in a checkpoint: which are refused, and how.

  python -m experiments.checkpoint_corruption --workdir=/tmp/fedjax_pfi/bitflip --every=66

Runs ``synthetic_fedprox.py:testing`` (3 rounds) once, then, for every
``--every``-th byte of the largest array data file of its newest checkpoint,
flips bit 4 of that byte in a copy of the workdir and resumes it for one more
round. Each position is one of:

- ``unreadable``: orbax (zstd, OCDBT) fails to read the arrays;
- ``corrupt``: orbax restores the arrays without error, and the digests saved
  with them refuse them;
- ``identical``: the restored arrays equal what was saved (their digests
  match: orbax does not read that byte), and the run resumes;
- ``other``: anything else (none is expected).
"""

from __future__ import annotations

import collections
import glob
import os
import shutil
import warnings

from absl import app
from absl import flags
from absl import logging

from experiments.configs import synthetic_fedprox
from fedjax_pfi import checkpoint as checkpoint_lib
from fedjax_pfi import training


def config(rounds: int):
  c = synthetic_fedprox.get_config('testing')
  c.progress = False
  c.rounds = rounds
  return c


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  base = os.path.join(_WORKDIR.value, 'base')
  training.run(config(3), base)
  step = checkpoint_lib.Checkpointer(base).latest_round()
  data = max(glob.glob(os.path.join(base, 'checkpoints', str(step), 'state',
                                    '**', 'd', '*'), recursive=True),
             key=os.path.getsize)
  size = os.path.getsize(data)
  outcome = {}
  for pos in range(0, size, _EVERY.value):
    work = os.path.join(_WORKDIR.value, 'flipped')
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    target = os.path.join(work, os.path.relpath(data, base))
    with open(target, 'r+b') as f:
      f.seek(pos)
      byte = f.read(1)[0]
      f.seek(pos)
      f.write(bytes([byte ^ 0x10]))
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        training.run(config(4), work)
      outcome[pos] = 'identical'
    except checkpoint_lib.CheckpointError as e:
      outcome[pos] = 'corrupt' if 'is corrupt' in str(e) else 'unreadable'
    except Exception:  # pylint: disable=broad-except
      outcome[pos] = 'other'
  counts = collections.Counter(outcome.values())
  print(f'{data} ({size} bytes), {len(outcome)} positions flipped:')
  for kind in ('unreadable', 'corrupt', 'identical', 'other'):
    where = [p for p, k in outcome.items() if k == kind]
    print(f'  {kind:10s} {counts[kind]:3d}  bytes {where[:8]}'
          f'{" ..." if len(where) > 8 else ""}')


if __name__ == '__main__':
  # Flags exist only when this module is the program, so that tests
  # can import experiment modules side by side.
  _WORKDIR = flags.DEFINE_string('workdir', '/tmp/fedjax_pfi/bitflip',
                                 'Scratch directory (emptied).')
  _EVERY = flags.DEFINE_integer('every', 66, 'Flip every N-th byte.')
  app.run(main)
