"""``RUN/metrics.jsonl``: one JSON line per learned chunk, for following a run as it learns.

Each line: ``chunk`` (its number in the run, from 0), ``task``, ``file``, ``samples``, ``loss`` (mean
training loss over the chunk's steps; null when nothing was trained), ``density`` (live prunable
weights after the chunk), ``seconds`` (its training time, reading included), ``samples_per_second``,
and with ``--anytime`` ``anytime_acc_class_il``. A line is appended just before the chunk's state is
saved; on resume, lines for chunks the saved state does not hold (a crash between the two) are
dropped first, so each learned chunk has exactly one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write

FILE_NAME = "metrics.jsonl"


def trim(path: Path, chunks: int) -> None:
    """Keep only the lines of the first ``chunks`` chunks (rewritten atomically, only if needed)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["chunk"] < chunks:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    if kept != lines:
        text = "".join(kept).encode("utf-8")
        atomic_write(path, lambda f: f.write(text))


def append(path: Path, entry: dict) -> None:
    """Append one chunk's line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
