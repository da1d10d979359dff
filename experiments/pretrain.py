r"""Centralized pretraining of a foundation model, saved in the Hugging Face layout.

  python -m experiments.pretrain --config=experiments/configs/pretrain_shakespeare.py \
      --workdir=/tmp/fedjax_pfi/pretrained

Runs `fedjax_pfi.pretraining.pretrain`: ``WORKDIR/metrics.jsonl`` and
``WORKDIR/model/`` (``config.json`` + ``model.safetensors``). Re-running with
the same config does nothing; a different config in the same workdir is
refused.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_pfi import pretraining


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  final = pretraining.pretrain(_CONFIG.value, _WORKDIR.value)
  for k in sorted(final):
    print(f'  {k:34s} {final[k]}')


if __name__ == '__main__':
  # Flags exist only when this module is the program, so that tests
  # can import experiment modules side by side.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'Path to a pretraining config.', lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
