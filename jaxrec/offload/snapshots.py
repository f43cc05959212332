"""Checkpoint snapshots of offloaded tables, one directory per step.

    <directory>/<step>/offload.json        format version, step, tables, their shapes and
                                           file lists
    <directory>/<step>/<table>/...         the table's tensorstore arrays (`TableStore.snapshot`)

A snapshot is written to `<step>.tmp-<pid>` and renamed when complete, so a listed step is
always whole; a crash mid-save leaves only a tmp directory (removed by the next save).
Snapshots are hard links to the store's chunk files, which the store only ever replaces
(never rewrites), so later writes — or a failed write-back — never change it. Taking one
copies nothing on the store's filesystem (elsewhere every file is copied: start-up warns,
`hooks.warn_copied_snapshots`); a file rewritten after it becomes the snapshot's own copy.
Each table's file list (sizes and CRC32s, `integrity`) is checked before a restore or a
conversion reads the snapshot, so a damaged one is refused rather than read.

`offload.json` carries `format_version` (`FORMAT_VERSION`; files written before it existed
have none and are read as version 1). A snapshot of a higher version was written by a newer
jaxrec: reading it is refused with a `ConfigError` saying so (not a fallback to an older
step, which would move the newer checkpoints aside), before anything on disk is changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Mapping

import jaxrec
from jaxrec import phase_log
from jaxrec.errors import ConfigError, JaxrecError
from jaxrec.offload import integrity
from jaxrec.offload.config import OffloadError
from jaxrec.offload.disk_space import store_bytes
from jaxrec.planner.result import format_bytes

_LOG = logging.getLogger(__name__)
# `logged`: stores this large in all are logged around a save; so is a snapshot's CRC check
LOG_MIN_BYTES = phase_log.MIN_BYTES

META = "offload.json"
# The layout `offload.json` describes; raise it when this jaxrec could misread a snapshot
# another one wrote (e.g. a new store format), so older versions refuse it by name.
FORMAT_VERSION = 1
REJECTED = "rejected"   # snapshots of rejected checkpoints (`set_aside`)


@contextlib.contextmanager
def logged(what: str, stores: Mapping[str, object]):
  """Logs `what` (e.g. `checkpoint 400: saving`) before and its time after, when the stores
  (`{table: TableStore}`) hold `LOG_MIN_BYTES` or more: a 6e7 x 16 table's checkpoint took
  ~50 s, its restore ~60 s, with nothing logged. Their size comes from their specs (rows x
  dim x dtype, and the optimizer state), not their files: ~7,300 files at 3e7 rows."""
  size = sum(store_bytes(s) for s in stores.values())
  names = ", ".join(f"'{n}'" for n in stores)
  with phase_log.logged(f"{what} offloaded tables {names}", size,
                        f"{format_bytes(size)} in their stores", log=_LOG,
                        min_bytes=LOG_MIN_BYTES):
    yield


def steps(directory: str) -> list[int]:
  """Complete snapshot steps under `directory`, ascending."""
  if not os.path.isdir(directory):
    return []
  out = []
  for name in os.listdir(directory):
    if name.isdigit() and os.path.exists(os.path.join(directory, name, META)):
      out.append(int(name))
  return sorted(out)


def save(directory: str, step: int, stores: Mapping[str, object], keep: int | None) -> str:
  """Snapshots every store (`{table: TableStore}`) as step `step`; keeps the newest
  `keep` steps (None: all). Returns the step directory."""
  final = os.path.join(directory, str(int(step)))
  try:
    _write(directory, final, step, stores)
  except OSError as e:   # e.g. disk full: the earlier snapshots are untouched
    raise OffloadError(f"offload snapshot of step {step} in {directory} failed: {e}") from None
  if hasattr(os, "sync"):
    os.sync()
  if keep is not None:
    for old in steps(directory)[:-int(keep)]:
      shutil.rmtree(os.path.join(directory, str(old)), ignore_errors=True)
  return final


def unneeded(directory: str, kept) -> list[int]:
  """The snapshot steps no checkpoint of `kept` (the steps on disk or being saved) restores
  from: those before the newest kept step that are not kept (older than every kept one,
  or between two: early stopping's best step is kept far behind the newest). A snapshot
  past the newest kept step is a save's in progress and stays."""
  kept = set(int(s) for s in kept)
  newest = max(kept, default=None)
  return [] if newest is None else [s for s in steps(directory)
                                    if s < newest and s not in kept]


def prune(directory: str, kept) -> list[int]:
  """Removes the `unneeded` snapshots. This also clears the snapshots a run left behind
  once its tables moved back to the device, as their checkpoints are rotated out.
  Returns the removed steps."""
  gone = unneeded(directory, kept)
  for old in gone:
    shutil.rmtree(os.path.join(directory, str(old)), ignore_errors=True)
  return gone


def set_aside(directory: str, rejected: list[str]) -> list[str]:
  """Moves the snapshots of rejected checkpoints (`rejected`: their names in
  `checkpoints/rejected/`, `<step>.<reason>.<ns>`) to `<directory>/rejected/<name>`: a run
  saving that step again would replace them, and a rejected checkpoint is never deleted.
  Returns the names moved."""
  moved = []
  for name in rejected:
    step = name.partition(".")[0]
    src = os.path.join(directory, step)
    if step.isdigit() and os.path.isdir(src):
      os.makedirs(os.path.join(directory, REJECTED), exist_ok=True)
      os.rename(src, os.path.join(directory, REJECTED, name))
      moved.append(name)
  return moved


def _write(directory: str, final: str, step: int, stores: Mapping[str, object]) -> None:
  """Writes the snapshot into `<final>.tmp-<pid>`, then renames it to `final`."""
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):
    if ".tmp-" in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  tmp = f"{final}.tmp-{os.getpid()}"
  meta = {"format_version": FORMAT_VERSION, "step": int(step), "tables": {}}
  previous = _newest_meta(directory).get("tables", {})
  for name, store in stores.items():
    store.snapshot(os.path.join(tmp, name))
    files = integrity.file_list(os.path.join(tmp, name),
                                previous.get(name, {}).get("files"))
    meta["tables"][name] = {"rows": store.spec.rows, "dim": store.spec.dim,
                            "dtype": store.spec.dtype, "arrays": list(store.names),
                            "driver": store.driver, "files": files}
  with open(os.path.join(tmp, META), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  if os.path.exists(final):
    shutil.rmtree(final)
  os.rename(tmp, final)


def _newest_meta(directory: str) -> dict:
  """`offload.json` of the newest snapshot in `directory` that this jaxrec reads (one
  unreadable or of a newer format is passed over: its file lists are not trusted for
  CRCs); {} if none."""
  for step in reversed(steps(directory)):
    try:
      return read_meta(os.path.join(directory, str(step)))
    except (OSError, ValueError, JaxrecError):
      continue
  return {}


def read_meta(path: str) -> dict:
  """`offload.json` of the snapshot directory `path`. Raises `ConfigError` when a newer
  jaxrec wrote it (`format_version` above `FORMAT_VERSION`; none: version 1), naming the
  file and both versions: a training restore stops there (no fallback to an older step,
  which would move the newer checkpoints aside) and nothing on disk is changed.
  `OffloadError` when the file or its version is malformed (a damaged snapshot)."""
  meta_path = os.path.join(path, META)
  with open(meta_path) as f:
    meta = json.load(f)
  if not isinstance(meta, dict):
    raise OffloadError(f"{meta_path} holds no JSON object: the snapshot is damaged")
  version = meta.get("format_version", 1)
  if isinstance(version, bool) or not isinstance(version, int):
    raise OffloadError(f"{meta_path}: format_version {version!r} is not a whole number: the "
                       "snapshot is damaged")
  if version > FORMAT_VERSION:
    raise ConfigError(
        f"{meta_path} was written by a newer jaxrec: offload snapshot format version "
        f"{version}, this jaxrec ({jaxrec.__version__}) reads versions up to "
        f"{FORMAT_VERSION}. Upgrade jaxrec to restore or convert its checkpoint; the snapshot "
        "and the checkpoint are left as they are")
  return meta


def _check_files(path: str, meta: dict, table: str, full: bool) -> None:
  """Checks the files of `table` in snapshot `path` against its saved list (`integrity`;
  snapshots written before the lists existed have none), and that each array it lists is
  there with its metadata: a missing one is named, not left to tensorstore ("... does not
  exist", naming a metadata file of the driver it tried)."""
  files = meta["tables"][table].get("files")
  if files is not None:
    size = sum(f["size"] for f in files.values()) if full else 0   # (sizes only: quick)
    with phase_log.logged(f"offload snapshot {path}: checking table '{table}' against its "
                          "saved CRC32s", size, f"{format_bytes(size)} in {len(files):,} files",
                          log=_LOG, min_bytes=LOG_MIN_BYTES):
      integrity.verify(os.path.join(path, table), files, full)
  for name in meta["tables"][table]["arrays"]:
    array = os.path.join(path, table, name)
    what = f"{array}, the tensorstore array '{name}' of table '{table}',"
    if not os.path.isdir(array):
      _damaged(path, f"{what} is missing")
    if not any(os.path.exists(os.path.join(array, m)) for m in (".zarray", "zarr.json")):
      _damaged(path, f"{what} has no array metadata (.zarray or zarr.json)")


def _damaged(path: str, what: str):
  raise OffloadError(f"offload snapshot {path}: {what}, though its {META} lists it: the "
                     "snapshot is damaged")


def locate(directory: str, step: int, tables: Mapping[str, object]) -> str:
  """The snapshot directory of `step`; checks it holds every table with its shape and
  its files with their sizes (their contents are checked by `open_table`, which a restore
  through the checkpoint manager calls first)."""
  path = os.path.join(directory, str(int(step)))
  meta_path = os.path.join(path, META)
  if not os.path.exists(meta_path):
    have = steps(directory)
    raise OffloadError(f"no offload snapshot for checkpoint step {step} in {directory} "
                       f"(have: {have or 'none'}); the offloaded tables cannot be restored")
  meta = read_meta(path)
  for name, spec in tables.items():
    got = meta["tables"].get(name)
    if got is None or (got["rows"], got["dim"]) != (spec.rows, spec.dim):
      raise OffloadError(f"offload snapshot {path} holds table '{name}' as {got}, this run has "
                         f"{spec.rows} rows x {spec.dim}")
    _check_files(path, meta, name, full=False)
  return path


def open_table(path: str, table: str, full_check: bool = True) -> dict:
  """The arrays of `table` in the snapshot directory `path` (`<directory>/<step>`, or a
  rejected one under `<directory>/rejected/`), opened read-only (lazy tensorstore handles,
  `{"table": [rows, dim], "opt.<name>": ...}`), for checkpoint conversion and for a restore
  that keeps the table on the device: the orbax checkpoint holds only an offloaded table's
  device cache. Its files are checked first (sizes, and CRC32s with `full_check`): a
  damaged snapshot raises `OffloadError`, which makes the checkpoint manager fall back."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  meta_path = os.path.join(path, META)
  if not os.path.exists(meta_path):
    raise OffloadError(f"no offload snapshot in {path}")
  meta = read_meta(path)
  if table not in meta["tables"]:
    raise OffloadError(f"offload snapshot {path} has no table '{table}' "
                       f"(has: {sorted(meta['tables'])})")
  _check_files(path, meta, table, full=full_check)
  out = {}
  for name in meta["tables"][table]["arrays"]:
    kv = {"driver": "file", "path": os.path.join(path, table, name) + "/"}
    out[name] = ts.open({"driver": meta["tables"][table].get("driver", "zarr"), "kvstore": kv,
                         "open": True}, read=True).result()
  return out
