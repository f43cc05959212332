"""Directory copies whose errors name the file that failed and the side: reading or writing.

`shutil.copytree` reports a failure as `(source, destination, reason)` strings (or, for
`sendfile`, one OSError naming both files), so a caller cannot tell an unreadable source
(EIO) from a full disk (ENOSPC). `copy_tree` copies file by file and raises `CopyError` at
the first failure: an OSError with `reading` set and `filename` the file under `src`
(reading) or under `shown` (writing: the name the destination gets, when `dst` is a
temporary directory renamed afterwards).
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

CHUNK_BYTES = 8 << 20


class CopyError(OSError):
  """A failed copy: `reading` (the source side failed), `filename` (the file), `errno`,
  `strerror` (the reason)."""

  def __init__(self, reading: bool, error: OSError, path: str):
    super().__init__(error.errno, error.strerror or str(error), path)
    self.reading = reading


def copy_tree(src, dst, shown=None, *, link: bool = False,
              skip: Callable[[str], bool] = lambda rel: False) -> None:
  """Copies the files of directory `src` into `dst` (created; modes and times kept).

  Args:
    shown: the path that error messages give for `dst` (default `dst`).
    link: hard-link files where possible (copies across devices).
    skip: called with each file's path relative to `src`; True leaves it out.

  Raises:
    CopyError: the first file (or directory) that could not be read or written.
  """
  src, dst = os.fspath(src), os.fspath(dst)
  shown = dst if shown is None else os.fspath(shown)

  def fail(reading: bool, e: OSError, rel: str):
    raise CopyError(reading, e, os.path.normpath(os.path.join(src if reading else shown, rel)))

  def unreadable(e: OSError):
    fail(True, e, os.path.relpath(e.filename or src, src))

  for root, _, files in os.walk(src, onerror=unreadable):
    rel_dir = os.path.relpath(root, src)
    try:
      os.makedirs(os.path.join(dst, rel_dir), exist_ok=True)
    except OSError as e:
      fail(False, e, rel_dir)
    for f in files:
      rel = os.path.normpath(os.path.join(rel_dir, f))
      if skip(rel):
        continue
      a, b = os.path.join(src, rel), os.path.join(dst, rel)
      if link:
        try:
          os.link(a, b)
          continue
        except OSError:
          pass   # another device, or no hard links there: copy
      _copy_file(a, b, lambda reading, e, rel=rel: fail(reading, e, rel))


def _copy_file(a: str, b: str, fail) -> None:
  """Copies file `a` to `b`; `fail(reading, error)` raises for the side that failed."""
  try:
    fsrc = open(a, "rb")
  except OSError as e:
    fail(True, e)
  with fsrc:
    try:
      with open(b, "wb") as fdst:   # closing flushes: its error is a write error
        while True:
          try:
            buf = fsrc.read(CHUNK_BYTES)
          except OSError as e:
            fail(True, e)
          if not buf:
            break
          fdst.write(buf)
    except CopyError:
      raise
    except OSError as e:
      fail(False, e)
  try:
    shutil.copystat(a, b)
  except OSError as e:
    fail(os.fspath(e.filename or "") == a, e)
