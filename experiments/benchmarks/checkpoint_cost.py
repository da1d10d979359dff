r"""What the checkpoints' integrity digests cost: sha256 of every array on
save, checked again on restore.

  python -m experiments.benchmarks.checkpoint_cost --mib=1,100,400

For a state of one float32 array of each size, prints the time of
`checkpoint.leaf_digests` alone, of `Checkpointer.save` (which computes them)
and of `Checkpointer.restore` (which checks them), in one process.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np

from fedjax_pfi import checkpoint as checkpoint_lib

_MIB = flags.DEFINE_list('mib', '1,100,400', 'State sizes in MiB.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  print(f'{"state MiB":>9s} {"digests s":>10s} {"save s":>8s} '
        f'{"restore s":>10s}')
  for mib in (int(m) for m in _MIB.value):
    state = {'w': jnp.asarray(np.random.default_rng(0).standard_normal(
        mib * 2**18, np.float32))}
    with tempfile.TemporaryDirectory() as workdir:
      ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'run'))
      t = time.perf_counter()
      checkpoint_lib.leaf_digests(state)  # the first host copy included
      digests = time.perf_counter() - t
      t = time.perf_counter()
      ckpt.save(1, state, {})
      save = time.perf_counter() - t
      t = time.perf_counter()
      ckpt.restore(1, state)
      restore = time.perf_counter() - t
    print(f'{mib:9d} {digests:10.3f} {save:8.3f} {restore:10.3f}')


if __name__ == '__main__':
  app.run(main)
