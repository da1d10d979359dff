"""A training run that kills itself with SIGKILL at a chosen point, for
`tests/test_hostile.py`'s kill -9 test.

  python -m tests.kill_child WORKDIR FAULT

FAULT is ``none``; ``after:S``, killed S seconds after training starts
(imports done), wherever it then is; ``checkpoint:N``, killed inside the N-th checkpoint write
(the state and its record are on disk in orbax's temporary directory, not yet
renamed into place); or ``metrics:N``, killed inside the N-th metrics row
write (half the line flushed to ``metrics.jsonl``). The config is
`tests.test_training.small_config`. Nothing of this is in the package: the
faults are injected here, by patching.
"""

import os
import signal
import sys


def die():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def main(workdir: str, fault: str) -> None:
  from fedjax_pfi import training  # pylint: disable=g-import-not-at-top
  from tests.test_training import small_config  # pylint: disable=g-import-not-at-top

  kind, _, n = fault.partition(':')
  count = {'seen': 0}

  def nth() -> bool:
    count['seen'] += 1
    return count['seen'] == int(n)

  if kind == 'checkpoint':
    rename = os.rename

    def dying_rename(src, dst, *args, **kwargs):
      if os.path.join(workdir, 'checkpoints') in os.path.abspath(
          os.fspath(dst)) and nth():
        die()
      return rename(src, dst, *args, **kwargs)

    os.rename = dying_rename
  elif kind == 'metrics':
    write = training.MetricsWriter.write

    def dying_write(self, round_idx, metrics):
      if nth():
        import json  # pylint: disable=g-import-not-at-top
        line = json.dumps({'round': round_idx, **metrics})
        self._file.write(line[:len(line) // 2])  # pylint: disable=protected-access
        self._file.flush()  # pylint: disable=protected-access
        die()
      write(self, round_idx, metrics)

    training.MetricsWriter.write = dying_write
  elif kind == 'after':
    import threading  # pylint: disable=g-import-not-at-top
    threading.Timer(float(n), die).start()
  elif kind != 'none':
    raise SystemExit(f'unknown fault {fault!r}')
  training.run(small_config(), workdir)


if __name__ == '__main__':
  main(*sys.argv[1:])
