"""File lists with sizes and CRC32s of offload snapshots, to detect damage at restore.

An offload snapshot is a directory of tensorstore chunk files (hard links to the store's).
Its `offload.json` records, per table, `{relative path: {"size", "crc32", "ino",
"mtime_ns"}}` of every file. A restore checks them before it trusts the snapshot: a
truncated, changed, missing or extra chunk file makes the snapshot — and with it its
checkpoint — unusable, so the checkpoint manager falls back to an older step, instead of a
resumed run failing (or silently reading other values) mid-training.

Writing the list reads only the chunk files that changed since the previous snapshot: the
store replaces a chunk file when it writes it (a new inode), so a file whose inode, size
and mtime equal the previous snapshot's keeps that snapshot's CRC.
"""

from __future__ import annotations

import os
import zlib
from typing import Mapping

from jaxrec.errors import OffloadError

_READ_BYTES = 16 << 20
LOCK_SUFFIX = ".__lock"   # tensorstore's lock files: never part of a snapshot


def crc32_of(path: str) -> int:
  """CRC32 of the file at `path`, read in 16 MiB pieces."""
  crc = 0
  with open(path, "rb") as f:
    while piece := f.read(_READ_BYTES):
      crc = zlib.crc32(piece, crc)
  return crc


def _files(root: str) -> dict[str, os.stat_result]:
  """`{path relative to root: stat}` of every file under `root` but lock files."""
  out = {}
  for here, _, names in os.walk(root):
    for name in names:
      if not name.endswith(LOCK_SUFFIX):
        path = os.path.join(here, name)
        out[os.path.relpath(path, root)] = os.stat(path)
  return out


def files_under(root: str) -> list[str]:
  """Paths relative to `root` of its files but lock files (none when it does not exist);
  names only, no `stat`."""
  out = []
  for here, _, names in os.walk(root):   # relpath once a directory (per file: 30 us each)
    rel = os.path.relpath(here, root)
    prefix = "" if rel == "." else rel + os.sep
    out.extend(prefix + name for name in names if not name.endswith(LOCK_SUFFIX))
  return out


def file_list(root: str, previous: Mapping[str, dict] | None = None) -> dict[str, dict]:
  """`{relative path: {"size", "crc32", "ino", "mtime_ns"}}` of the files under `root`.
  A file also in `previous` (the previous snapshot's list of the same table) with the same
  inode, size and mtime keeps its CRC there; every other file is read."""
  previous = previous or {}
  out = {}
  for rel, st in sorted(_files(root).items()):
    entry = {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}
    old = previous.get(rel)
    if old is not None and all(old.get(k) == v for k, v in entry.items()):
      entry["crc32"] = old["crc32"]
    else:
      entry["crc32"] = crc32_of(os.path.join(root, rel))
    out[rel] = entry
  return out


def verify(root: str, files: Mapping[str, dict], full: bool) -> None:
  """Checks the files under `root` against `files` (`file_list` at save time): the same
  names and sizes, and with `full` the same CRC32s (reads every file). Raises
  `OffloadError` naming the first damaged file."""
  have = _files(root) if os.path.isdir(root) else {}
  for rel, want in sorted(files.items()):
    path = os.path.join(root, rel)
    st = have.get(rel)
    if st is None:
      _damaged(path, "is missing")
    if st.st_size != want["size"]:
      _damaged(path, f"has {st.st_size} bytes, {want['size']} when saved")
    if full and crc32_of(path) != want["crc32"]:
      _damaged(path, "differs from what was saved (CRC32 mismatch)")
  extra = sorted(set(have) - set(files))
  if extra:
    _damaged(os.path.join(root, extra[0]), "was not part of the snapshot when saved")


def _damaged(path: str, what: str):
  raise OffloadError(f"offload snapshot file {path} {what}: the snapshot is damaged")
