"""Start-up check that the offloaded tables' stores and their checkpoint snapshots fit
their disks.

A checkpoint snapshot hard-links a store's files where it can (the store and
`W/offload_snapshots` on one filesystem); a run touching rows all over a table rewrites
nearly every file between checkpoints, so each kept snapshot holds up to a whole copy.
Elsewhere a snapshot is a whole copy on the snapshots' disk: a store on another
filesystem, and a `kvstore='memory'` store (written out as zarr files).
"""

from __future__ import annotations

import logging
import math
import os
import shutil

from jaxrec import files
from jaxrec.planner.result import format_bytes

_LOG = logging.getLogger(__name__)


def filesystem(path: str) -> int | None:
  """The device id (`st_dev`) of `path`, or of its nearest existing parent; None when it
  cannot be read (the store's own checks name such a path)."""
  try:
    return os.stat(files.deepest_existing(os.path.abspath(path))).st_dev
  except OSError:
    return None


def store_bytes(store) -> int:
  """Bytes of a `TableStore`'s arrays written whole: the table and its optimizer state."""
  return sum(math.prod(store.array_shape(n)) * store.array_dtype(n).itemsize
             for n in store.names)


def warn_disk_space(tables, keep: int, snapshots: str,
                    free_bytes=lambda path: shutil.disk_usage(path).free) -> list[str]:
  """Warns (and returns the warnings) for each disk that the stores of `tables` (`{name:
  TierTable}`) and `keep` snapshots of them may overfill: what they need there (see the
  module docstring; `keep` + 1 copies where snapshots hard-link, as a save runs before
  the oldest goes) against its free space and, only when that is short, the files already
  there (the stores' arrays, the kept snapshots). A 1e8-row bf16 table (3.2 GB) with two
  checkpoints kept took 6.1 GB of a 9.8 GB disk, with no word of it."""
  on_snapshots = filesystem(snapshots)
  need: dict[int | None, dict] = {}

  def add(where, name, size, path=None, dirs=()):
    d = need.setdefault(where, {"bytes": 0, "names": [], "path": path, "dirs": []})
    d["bytes"] += size
    d["names"].append(name)
    d["path"] = d["path"] or path
    d["dirs"] += list(dirs)

  for name, t in tables.items():
    size = store_bytes(t.store)
    memory = t.store.off.kvstore == "memory"
    where = None if memory else filesystem(t.store.path)
    arrays = [os.path.join(t.store.path, n) for n in t.store.names]
    if where is not None and where == on_snapshots:   # linked: up to keep + 1 copies
      add(where, name, (keep + 1) * size, t.store.path, arrays)
      continue
    if where is not None:
      add(where, name, size, t.store.path, arrays)
    add(on_snapshots, name, (keep + 1) * size, snapshots)   # whole copies each
  warnings = []
  for where, d in need.items():
    if where is None:
      continue
    shown = files.deepest_existing(os.path.abspath(d["path"]))
    try:
      free = free_bytes(shown)
    except OSError:   # unknown: the stores' own checks name a bad path
      continue
    if free >= d["bytes"]:
      continue
    dirs = d["dirs"] + (_kept_snapshots(snapshots) if where == on_snapshots else [])
    have = free + files.bytes_under(dirs)
    if d["bytes"] <= have:
      continue
    warnings.append(
        f"offloaded table(s) {', '.join(map(repr, d['names']))}: the stores and "
        f"--keep_checkpoints={keep} snapshots of them (each up to a whole copy when training "
        f"touches rows all over a table) may need {format_bytes(d['bytes'])} on the disk "
        f"holding {d['path']}, which has {format_bytes(have)} for them (free, and their "
        "files already there). Free space or lower --keep_checkpoints")
    _LOG.warning("%s", warnings[-1])
  return warnings


def _kept_snapshots(snapshots: str) -> list[str]:
  """The numbered snapshot directories (not `rejected/`, which nothing removes)."""
  try:
    return [os.path.join(snapshots, d) for d in os.listdir(snapshots) if d.isdigit()]
  except OSError:
    return []
