"""``metrics.jsonl``: one JSON object per round, written as a log and read
back on resuming (`parse_metrics`), with TensorBoard scalars beside it.

The checkpoint is the truth and this file is its log: resuming keeps the rows
up to the checkpoint's round, drops what a crash left past it (a torn last
line, rows of rounds it computes again), refuses an unreadable row before it
naming the file and the line, and warns when the file does not reach it.
"""

from __future__ import annotations

import json
import os
from typing import Optional
import warnings

from absl import logging


class ResumeWarning(UserWarning):
  """What a resumed run found in its workdir that does not match its
  checkpoint (a lost or cut ``metrics.jsonl``, more rounds than asked)."""


class MetricsFileError(ValueError):
  """A row of ``metrics.jsonl`` before the checkpoint cannot be read."""


def parse_metrics(path: str, upto: Optional[int] = None
                  ) -> tuple[list[str], list[str]]:
  """The rows of a ``metrics.jsonl`` worth keeping, as lines, and notes on
  what was dropped.

  ``upto`` (a checkpoint's round): rows past it are dropped, and so is
  anything unreadable past the last row at or before it. An unreadable last
  line (a run stopped while writing it) is dropped anywhere. Any other
  unreadable row raises `MetricsFileError` naming the file and the line.
  """
  with open(path, 'rb') as f:
    lines = f.read().decode('utf-8', errors='replace').split('\n')
  numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
  kept, notes, past, torn = [], [], False, 0  # notes: what a resume says
  for n, (lineno, line) in enumerate(numbered):
    try:
      row = json.loads(line)
      r = int(row['round'])
    except (ValueError, KeyError, TypeError) as e:
      if n == len(numbered) - 1:
        notes.append(f'dropped its torn last line (line {lineno}), cut off '
                     'while it was written')
        torn = 1
        break
      if past:
        continue
      raise MetricsFileError(
          f'{path} line {lineno} is not a metrics row ({e}: '
          f'{line[:80]!r}), and it lies before the checkpoint (round '
          f'{upto}). Repair or delete that line, or use a fresh --workdir.'
      ) from e
    if upto is not None and r > upto:
      past = True
      continue
    kept.append(line + '\n')
  dropped = len(numbered) - len(kept) - torn
  if dropped:
    where = (f'past the checkpoint (round {upto})' if upto else
             'of rounds that no checkpoint holds')
    notes.append(f'dropped {dropped} row(s) {where}, which resuming computes '
                 'again')
  return kept, notes


class MetricsWriter:
  """Appends one JSON object per line; TensorBoard scalars beside it.

  Opening it on a resumed run keeps the rows up to the checkpoint's round
  (`parse_metrics`) and warns (`ResumeWarning`) where the file does not
  reach that round: a lost or cut file keeps its gap, and the running totals
  come from the checkpoint, not from the file.
  """

  def __init__(self, workdir: str, resume_round: int, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    kept, notes = [], []
    if os.path.exists(self.path):  # drop rows past the restored checkpoint
      kept, notes = parse_metrics(self.path, resume_round)
    self.last_row = json.loads(kept[-1]) if kept else {}
    self.enabled = enabled  # a multi-host run's other processes write nothing
    if not enabled:
      return
    if notes:  # what any crash leaves: said, not warned about
      logging.warning('%s: %s.', self.path, '; '.join(notes))
    if resume_round and self.last_row.get('round') != resume_round:
      have = (f'ends at round {self.last_row["round"]}' if kept else
              'has no rows' if os.path.exists(self.path) else 'is missing')
      warnings.warn(
          f'{self.path} {have} but the checkpoint is round {resume_round}: '
          'the rows in between are lost. The run continues from the '
          'checkpoint (with its running totals); the file keeps the gap.',
          ResumeWarning, stacklevel=2)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, 'a')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:  # TensorBoard logging is optional
      self._tb = None

  def write(self, round_idx: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps({'round': round_idx, **metrics}) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, round_idx)

  def close(self):
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl`` (a torn last line left out)."""
  kept, _ = parse_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return [json.loads(line) for line in kept]
