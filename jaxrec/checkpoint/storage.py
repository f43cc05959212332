"""Direct, streaming access to the arrays of one stored checkpoint step (no devices).

Dense arrays: orbax writes each leaf of the `state` item as a tensorstore zarr array
(inside an OCDBT database by default) named after its pytree path. Tables: zarr arrays of
the `embeddings` item (see `tables`: files, or one OCDBT database for many arrays). These
helpers open both with tensorstore, so tools (export, full validation) read them in row
blocks: a table is never held whole in memory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import sys
from typing import Iterator

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from jaxrec import phase_log
from jaxrec.checkpoint import canonical as canonical_lib
from jaxrec.checkpoint import dequantized
from jaxrec.checkpoint import tables as tables_lib
from jaxrec.errors import in_order

# Items of a step directory (see `manager`).
STATE, TABLES, DATA_STATE, META, MANIFEST = "state", "embeddings", "data_state", "meta", "manifest"
ITEMS = (STATE, TABLES, DATA_STATE, META, MANIFEST)
BLOCK_BYTES = 64 << 20   # rows read at a time: about this many bytes


def read_json(step_dir: epath.PathLike, item: str) -> dict:
  """A JSON item (`manifest`, `meta`, `data_state`) of a step directory; ValueError naming
  its file (and line) when that does not hold a JSON object."""
  path = _json_item(step_dir, item)
  try:
    value = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: holds {json.dumps(value)[:40]}, expected a JSON object")
  return value


def io_failure(e: BaseException) -> str | None:
  """One line saying which file a filesystem error (`OSError`, or tensorstore's error with
  an `os_error_code`) in `e` or its causes hit; None when there is none."""
  for e in _causes(e):
    if isinstance(e, OSError) and e.strerror:
      return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    code = os_error_code(e)   # tensorstore: 'Error writing local file "F": ...', with the errno
    if code is not None:   # as an OSError's: its full text was 300-600 characters
      file = _failed_file(e)
      return f"{os.strerror(code)}: {file}" if file else os.strerror(code)
  return None


def _causes(e: BaseException | None) -> Iterator[BaseException]:
  """`e`, then its cause (else context), and so on, each once."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


class ReadError(Exception):
  """A file of a stored step could not be read because the filesystem failed (EIO,
  EACCES, ...): not a corrupt checkpoint. `path`, `reason`; message `cannot read PATH:
  REASON`."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"cannot read {path}: {reason}")
    self.path, self.reason = str(path), reason


def read_failure(e: BaseException, where: str) -> tuple[str, str] | None:
  """`(file, reason)` when `e` is a filesystem read error: an OSError or tensorstore's
  error with an `os_error_code`, a missing file excepted (a damaged checkpoint). The file
  is the one the error names, else `where`; None for any other error."""
  if isinstance(e, OSError):
    # (orbax raises FileNotFoundError(message) for a missing _METADATA: errno None)
    if e.errno == errno.ENOENT or isinstance(e, FileNotFoundError):
      return None
    return str(e.filename or where), e.strerror or str(e)
  code = os_error_code(e)
  if code is None or code == errno.ENOENT:
    return None
  return _failed_file(e) or str(where), os.strerror(code)


def _failed_file(e: BaseException) -> str | None:
  """The file a tensorstore error failed on: the last `local file "F"` it names (an OCDBT
  read names its database's directory first, `... in OCDBT database at local file
  ".../embeddings/": Error reading ... of local file ".../embeddings/d/<data file>"`, or
  `...: Failed writing: ".../d/<data file>.__lock"`: a data file that could not be read or
  written was reported as the directory)."""
  files = re.findall(r'(?:local file|Failed writing:) "([^"]+)"', str(e))
  return files[-1].removesuffix(".__lock") if files else None   # (the file being written)


def unreadable(e: BaseException, where) -> tuple[str, str] | None:
  """`(file, reason)` when `e` or one of its causes is a filesystem read failure
  (`ReadError`, or as `read_failure` says); None when none is."""
  for e in _causes(e):
    if isinstance(e, ReadError):
      return e.path, e.reason
    failed = read_failure(e, where) if isinstance(e, (OSError, ValueError)) else None
    if failed is not None:
      return failed
  return None


def os_error_code(e: BaseException) -> int | None:
  """The errno in a tensorstore error (`[os_error_code='28']`), None without one."""
  code = re.search(r"os_error_code='(\d+)'", str(e))
  return int(code.group(1)) if code else None


@contextlib.contextmanager
def _reading(where) -> Iterator[None]:
  """A filesystem error in the body becomes `ReadError` (naming its file, else `where`)."""
  try:
    yield
  except (OSError, ValueError) as e:
    failed = read_failure(e, where)
    if failed is None:
      raise
    raise ReadError(*failed) from e


def is_step_dir(path: epath.PathLike) -> bool:
  """Whether `path` is a checkpoint's step directory (it holds a manifest)."""
  return _json_item(path, MANIFEST).is_file()


def _json_item(step_dir: epath.PathLike, item: str) -> epath.Path:
  return epath.Path(step_dir) / item / "metadata"


def _closed_loop_noise(hook):
  """`sys.unraisablehook` that drops `RuntimeError('Event loop is closed')` and hands any
  other unraisable to `hook`. orbax's `metadata()` of a step whose OCDBT data files are
  gone fails, closes its event loop, and tensorstore's pending futures then call into it:
  20-40 such tracebacks were printed before the one-line 'corrupt' warning."""
  def filtered(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
            or _orbax_read_left(unraisable.object, e)):
      hook(unraisable)
  filtered.jaxrec_closed_loop = True
  return filtered


def _orbax_read_left(obj, e) -> bool:
  """Whether an unraisable is one of orbax's array reads of a step whose restore already
  failed (a corrupt checkpoint, reported and moved to `rejected/`): its other reads were
  left pending, and closing them at exit printed 3-13 `Exception ignored in: <coroutine
  object _read_array_index_and_device_put>` tracebacks, each with a whole TensorStore
  spec, after `results in ...` (4 runs in 10)."""
  code = getattr(obj, "cr_code", None)
  return (isinstance(e, Exception) and code is not None
          and f"{os.sep}orbax{os.sep}" in code.co_filename
          and "error while reading array" in str(e))


def quiet_closed_loops() -> None:
  """Installs `_closed_loop_noise` as `sys.unraisablehook` (once). Also for saves: one that
  failed on a full disk printed 10-20 such tracebacks around its one-line error."""
  if not getattr(sys.unraisablehook, "jaxrec_closed_loop", False):
    sys.unraisablehook = _closed_loop_noise(sys.unraisablehook)


def _dense_arrays(step_dir: epath.Path) -> dict[str, ts.TensorStore]:
  """Arrays of the orbax `state` item, opened from orbax's metadata tree."""
  quiet_closed_loops()
  try:
    meta = ocp.StandardCheckpointHandler().metadata(step_dir / STATE)
  except json.JSONDecodeError as e:   # orbax's own file; the error alone names no file
    raise ValueError(f"{step_dir / STATE / '_METADATA'}:{e.lineno}: not valid JSON "
                     f"({e.msg})") from None
  driver = "zarr3" if getattr(meta, "use_zarr3", False) else "zarr"
  out = {}
  for name, leaf in canonical_lib.leaf_names(getattr(meta, "tree", meta)):
    if leaf is None or not hasattr(leaf, "name"):
      continue
    directory = epath.Path(leaf.directory or step_dir / STATE)
    kvstore = tables_lib.kvstore(directory, leaf.name, tables_lib.uses_database(directory))
    out[name] = ts.open({"driver": driver, "kvstore": kvstore}, open=True,
                        read=True).result()
  return out


def open_arrays(step_dir: epath.PathLike) -> dict[str, ts.TensorStore]:
  """`{canonical name: read-only TensorStore}` for every stored array of a step:
  `step`, `params/...`, `opt_state/...`, `rng`, `fingerprint`, `tables/<t>`,
  `table_opt/<t>/<name>`."""
  step_dir = epath.Path(step_dir)
  with _reading(step_dir):
    out = _dense_arrays(step_dir)
    out.update(tables_lib.open_many(step_dir / TABLES,
                                    list(tables_lib.read_index(step_dir / TABLES)["arrays"]),
                                    tables_lib.read_context()))
  return out


def saved_fingerprints(step_dir: epath.PathLike, manifest: dict, arrays: dict,
                       tables: dict[str, int] | None = None) -> dict[str, int]:
  """`{canonical name: fingerprint recorded when saving}` (`tables`: the tables' part, when
  already read with `tables.saved_fingerprints`)."""
  out = {}
  if manifest.get("fingerprint"):
    values = np.asarray(arrays["fingerprint"].read().result()).tolist()
    out.update(zip(manifest["fingerprint"], values))
  if tables is None:
    tables = tables_lib.saved_fingerprints(epath.Path(step_dir) / TABLES)
  out.update(tables)
  return out


def row_blocks(array: ts.TensorStore, block_bytes: int = BLOCK_BYTES
               ) -> Iterator[tuple[int, np.ndarray]]:
  """Yields `(start_row, block)` covering `array` in row blocks of ~`block_bytes`."""
  shape = tuple(array.shape)
  if not shape or shape[0] == 0:
    yield 0, np.asarray(array.read().result())
    return
  row_bytes = max(1, math.prod(shape[1:]) * array.dtype.numpy_dtype.itemsize)
  step = max(1, block_bytes // row_bytes)
  for start in range(0, shape[0], step):
    yield start, np.asarray(array[start:min(start + step, shape[0])].read().result())


def logged_blocks(array: ts.TensorStore, what: str, blocks: Iterator | None = None,
                  detail: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
  """`blocks` (`(start_row, block)`; default `row_blocks(array)`), read inside a phase
  logged as `what` (`phase_log`, with `detail`) when `array` is large, its progress
  counted in rows: a copy or an export reads every array, a table of GBs for minutes."""
  shape = tuple(array.shape)
  size = math.prod(shape) * array.dtype.numpy_dtype.itemsize
  with phase_log.logged(what, size, detail, total=shape[0] if shape else 1) as phase:
    for start, block in row_blocks(array) if blocks is None else blocks:
      yield start, block
      phase.advance(len(block) if shape else 1)


def array_fingerprint(array: ts.TensorStore, visit=None, blocks: Iterator | None = None
                      ) -> int:
  """`canonical.fingerprint` of a stored array, read block by block (`blocks`, default
  `row_blocks(array)`); `visit(block)`, when given, sees every block as read (e.g. to
  check values in the same pass)."""
  shape, total = tuple(array.shape), 0
  for start, block in row_blocks(array) if blocks is None else blocks:
    total = (total + canonical_lib.fingerprint_np(block, shape, (start,))) & 0xFFFFFFFF
    if visit is not None:
      visit(block)
  return total


def check_manifest_step(manifest: dict, step_dir: epath.PathLike, step: int | None) -> None:
  """Raises when `manifest` (of `step_dir`) records a step other than `step` (None: any)."""
  if step is not None and manifest.get("step", step) != step:
    raise ValueError(f"{step_dir} holds step {manifest['step']}, not step {step}")


def check_step(step_dir: epath.PathLike, full: bool = False, step: int | None = None) -> dict:
  """Checks a step directory; returns its manifest or raises.

  Always: the JSON items parse, the manifest is ours, every listed array opens with its
  listed shape and dtype; with `step`, the manifest records that step (a directory copied
  or renamed by hand holds another). `full`: also reads every array and compares
  fingerprints. A file the filesystem fails to read is a `ReadError` naming it.
  """
  step_dir = epath.Path(step_dir)
  with _reading(step_dir):
    return _check_step(step_dir, full, step)


def _check_index_tables(manifest: dict, index: dict) -> None:
  """Raises unless `embeddings/index.json` (`index`: its arrays) lists the tables the
  manifest records, each with the sparse optimizer arrays the manifest records for it
  (`opt`: each table's own optimizer's), or, in a checkpoint whose manifest records none
  (saved before tables had optimizers of their own), the same ones for every table: the
  index is what every reader takes as the list of arrays, so an entry lost from it dropped
  a table (or its optimizer state) from exports and copies without a word."""
  where = f"{TABLES}/{tables_lib.INDEX}"
  recorded = manifest.get("tables") or {}
  tables = sorted(recorded)
  listed: dict[str, set[str]] = {}
  parts: dict[str, set[str]] = {}   # an int8 table's stored parts (`q`, `scale`, `bias`)
  for name in index:
    kind, _, rest = name.partition("/")
    table, _, leaf = rest.partition("/")
    listed.setdefault(table, set()).add(f"{kind}/{leaf}" if kind == "table_opt" else kind)
    if kind == "tables":
      parts.setdefault(table, set()).add(leaf)
  for table in tables:
    if "tables" not in listed.get(table, ()):
      raise ValueError(f"{where} lists no array of table '{table}' (the manifest's tables: "
                       f"{tables})")
    dtype = (recorded[table] or {}).get("dtype")
    want = set(dequantized.PARTS) if dtype == "int8" else {""}
    if dtype is not None and parts[table] != want:   # one int8 part lost: exports wrote
                                                     # the table without it
      raise ValueError(f"{where} lists table '{table}' ({dtype}) as "
                       f"{sorted(p or 'one array' for p in parts[table])}, not "
                       f"{sorted(p or 'one array' for p in want)}")
  extra = in_order(set(listed) - set(tables))
  if extra and tables:
    raise ValueError(f"{where} lists arrays of tables {extra} that the manifest does not "
                     f"record (its tables: {tables})")
  unrecorded = []   # tables whose manifest entry has no `opt`
  for table in tables:
    opt = (recorded[table] or {}).get("opt")
    if opt is None:
      unrecorded.append(table)
      continue
    have = sorted(n.partition("/")[2] for n in listed[table] if n.startswith("table_opt/"))
    if have != sorted(opt):
      differ = sorted(set(have) ^ set(opt))[0]
      raise ValueError(f"{where} {'lists' if differ in have else 'does not list'} the sparse "
                       f"optimizer array '{differ}' of table '{table}' (the manifest records "
                       f"{sorted(opt)})")
  for table in unrecorded[1:]:
    if listed[table] != listed[unrecorded[0]]:
      differ = sorted(listed[table] ^ listed[unrecorded[0]])[0].partition("/")[2]
      raise ValueError(f"{where}: the sparse optimizer array '{differ}' is listed for one of "
                       f"tables '{unrecorded[0]}' and '{table}' but not the other")


def _check_step(step_dir: epath.Path, full: bool, step: int | None) -> dict:
  manifest = read_json(step_dir, MANIFEST)
  if manifest.get("format") != canonical_lib.FORMAT:
    raise ValueError(f"{step_dir} is not a jaxrec checkpoint (manifest format "
                     f"{manifest.get('format')!r})")
  check_manifest_step(manifest, step_dir, step)
  read_json(step_dir, META)
  read_json(step_dir, DATA_STATE)
  arrays = open_arrays(step_dir)
  index = tables_lib.read_index(step_dir / TABLES)["arrays"]
  _check_index_tables(manifest, index)   # (its messages first: they say more)
  saved_tables = tables_lib.saved_fingerprints(step_dir / TABLES)   # present and readable
  expected = dict(manifest["leaves"], **index)
  for name, info in expected.items():
    if name not in arrays:
      raise ValueError(f"array '{name}' is missing")
    a = arrays[name]
    if list(a.shape) != list(info["shape"]) or str(a.dtype.numpy_dtype) != info["dtype"]:
      raise ValueError(f"array '{name}' is {a.dtype.numpy_dtype}{list(a.shape)}, expected "
                       f"{info['dtype']}{info['shape']}")
  if full:
    for name, expect in saved_fingerprints(step_dir, manifest, arrays, saved_tables).items():
      what = f"checkpoint {step_dir}: checking '{name}'"
      if array_fingerprint(arrays[name], blocks=logged_blocks(arrays[name], what)) \
          != int(expect):
        raise ValueError(f"array '{name}' fails its fingerprint check (stored data differ "
                         "from what was saved)")
  return manifest
