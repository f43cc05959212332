"""JSON-lines files that one run after another appends to (`metrics.jsonl`,
`profile.jsonl`, `events.jsonl`).

A writer killed mid-line leaves a last line without its newline; the next run's first
record would be glued onto it and both lost to every reader. `repair_tail` runs before a
run appends: a last line that parses is completed with its newline, one that does not is
cut off, with a warning naming the file. Readers take `complete_lines`, which leaves such
a line out (with a warning) where the file has not been appended to since.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterator

_LOG = logging.getLogger(__name__)
_BLOCK = 1 << 16


def repair_tail(path: str | os.PathLike, drop_torn: bool = True) -> None:
  """Makes `path` (if it exists) end with a newline, dropping an incomplete last line; with
  `drop_torn=False` any last line is ended instead (a reader's byte offsets count it)."""
  try:
    size = os.path.getsize(path)
  except FileNotFoundError:
    return
  if not size:
    return
  with open(path, "rb+") as f:
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    if not drop_torn:   # line readers skip it as a line that does not parse
      f.write(b"\n")
      return
    start, pos = 0, size          # start of the last line: after the last newline
    while pos > 0:
      n = min(_BLOCK, pos)
      pos -= n
      f.seek(pos)
      i = f.read(n).rfind(b"\n")
      if i >= 0:
        start = pos + i + 1
        break
    f.seek(start)
    tail = f.read()
    try:
      json.loads(tail)
    except ValueError:
      f.truncate(start)
      _LOG.warning("%s: dropped an incomplete last line of %d bytes (a run stopped while "
                   "writing it)", path, len(tail))
      return
    f.seek(size)
    f.write(b"\n")


def complete_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
  """`(line number, line)` of the non-blank lines of `path`, without a last line that lacks
  its newline and does not parse (a writer stopped while writing it; logged). Read as
  iterated, a line at a time: a run resumed on weeks of `--log_every=1` lines held the
  whole file and its lines in memory (a 225 MB file: +740 MB at start-up). Opened at the
  call (a missing or unreadable file raises there); decoding errors come while iterating."""
  f = open(path, encoding="utf-8")   # pylint: disable=consider-using-with

  def lines() -> Iterator[tuple[int, str]]:
    with f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        if not line.endswith("\n"):   # the last line, without its newline
          try:
            json.loads(line)
          except ValueError:
            _LOG.warning("%s:%d: left out an incomplete last line (a run stopped while "
                         "writing it)", path, i)
            return
        yield i, line.rstrip("\n")

  return lines()


def step_records(path: str | os.PathLike, *needles: str) -> Iterator[tuple[int, dict]]:
  """`(step, record)` of each complete line of `path` that holds one of the substrings
  `needles` (the others are not parsed: most of `metrics.jsonl` is loss lines) and parses
  to an object with an integer `step`; a missing file holds none."""
  try:
    lines = complete_lines(path)
  except FileNotFoundError:
    return
  for _, line in lines:
    if not any(n in line for n in needles):
      continue
    try:
      record = json.loads(line)
      yield int(record["step"]), record
    except (ValueError, KeyError, TypeError, OverflowError):
      continue
