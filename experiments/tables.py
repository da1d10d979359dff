"""The comparison scripts' output: one Markdown table and its rows as JSON."""

from __future__ import annotations

import json
import os


def write(workdir: str, lines: list[str], rows: list[dict]) -> str:
  """Writes ``lines`` as ``WORKDIR/table.md`` and ``rows`` as
  ``WORKDIR/table.json`` (numpy scalars as floats), prints and returns the
  table."""
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(workdir, 'table.json'), 'w') as f:
    json.dump(rows, f, indent=1, default=float)
  print(text)
  return text
