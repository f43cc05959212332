"""The full offloaded table in tensorstore: `[rows, dim]` plus its optimizer state.

One directory per table holds one tensorstore array per piece:

    <path>/table/        [rows, dim]  the embedding rows
    <path>/opt.<name>/   [rows, dim] or [rows]  per `optimizer.state_layout()` entry

Chunks are `[chunk_rows, ...]`, uncompressed. With `zarr3` (the default) a file holds
`shard_rows` rows: its chunks and an index of them (`sharding_indexed`); a read reads the
index and the chunks it needs, a write rewrites the whole file. With 256-row chunks a
write-back of rows spread over the table rewrites nearly every file anyway, so 16 chunks
per file write the same bytes in 16x fewer files (1M x 16 table, 50k rows on this VM's
ext4: ~0.12 s instead of 0.4–1.4 s) while a read of ~150 rows takes 1.5–2.5x as long
(the index is read first; the planner reads batches ahead to hide it). Reads and writes
use separate handles with separate I/O thread pools (writes: 2 threads, in pieces of 2048
rows), so the reads the next steps wait for do not queue behind a write-back. Writes go
to whole files (tensorstore reads, modifies and replaces a file by rename), so a write
never changes a file in place:
a snapshot made of hard links to the store's files stays valid while training goes on
(`snapshot` / `restore_snapshot`; falls back to copying where links are impossible). An
existing store opens in the format it was written in (`open_existing`).

Fresh tables are initialised with exactly the values `embedding.layout.init_table` gives
the on-device table (`init_rows`, chunk by chunk: `embedding.table_init` computes any row
range), so offloading does not change a run.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from jaxrec import files, signals, tree_copy
from jaxrec.embedding import optimizers, table_init
from jaxrec.embedding.specs import TableSpec
from jaxrec.errors import ConfigError
from jaxrec.futures import wait_all
from jaxrec.offload import integrity
from jaxrec.offload.config import OffloadError, OffloadTable
from jaxrec.offload import owner
from jaxrec.offload.owner import OWNER, TRAINED
from jaxrec.planner.result import format_bytes

TABLE = "table"
_INIT_BLOCK_ROWS = 1 << 18
_WRITE_PIECE_ROWS = 2048    # a write-back goes in pieces, so reads are not queued behind it
# ... of at most this many bytes of files: tensorstore reads and rewrites a file it writes
# to whole, and 2048 rows spread over a table touched 2048 files (a 2 GB table's 977 files
# of 2 MiB took the process from 0.4 to 2.3 GiB)
_WRITE_PIECE_FILE_BYTES = 64 << 20
# Writing the initial rows of a table this large is logged, every this many seconds.
_PROGRESS_MIN_BYTES = 256 << 20
_PROGRESS_EVERY_S = 10.0
FILES_CHECK_S = 1.0   # a write-back lists the store for deleted files at most this often
_LOG = logging.getLogger(__name__)


def _contexts() -> tuple[ts.Context, ts.Context]:
  """(read, write) contexts: writes get 2 file I/O threads of their own, so the reads the
  next steps wait for never queue behind a large write-back."""
  read = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
  write = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                      "file_io_concurrency": {"limit": 2}, "data_copy_concurrency": {"limit": 1}})
  return read, write


# ------------------------------------------------------------------------------- init
@functools.partial(jax.jit, static_argnums=(2, 3))   # one compile per block shape
def _rows(words, start, rows: int, dim: int, scale):
  return table_init.row_values(words, start, rows, dim, scale)


def init_rows(key: jax.Array, spec: TableSpec, start: int, stop: int) -> np.ndarray:
  """Rows `[start, stop)` of `embedding.layout.init_table(key, spec)` without building the
  whole table."""
  words = table_init.key_words(key, [spec.name])[0]
  return np.asarray(_rows(words, jnp.uint32(start), stop - start, spec.dim,
                          jnp.float32(spec.scale)).astype(spec.dtype))


# ------------------------------------------------------------------------------- store
def _driver_metadata(driver: str, shape, chunks, dtype, shard_rows: int | None = None
                     ) -> dict:
  """Metadata of a new uncompressed array; `shard_rows` (zarr3): rows per file, holding
  its `chunks` and their index (tensorstore's `sharding_indexed` codec). zarr3 files are
  named `c.<i>.0` in the array's directory, as zarr's are: zarr3's default `c/<i>/0` made
  a directory per file, which every snapshot, restore and pruned snapshot creates or
  removes (docs/offload.md)."""
  name = jnp.dtype(dtype).name
  if driver == "zarr":
    return {"metadata": {"compressor": None, "shape": list(shape), "chunks": list(chunks),
                         "dtype": name if name == "bfloat16" else jnp.dtype(dtype).str}}
  if driver == "zarr3":
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}]
    grid, codecs = list(chunks), raw
    if shard_rows is not None:
      grid = [shard_rows] + list(chunks[1:])
      codecs = [{"name": "sharding_indexed", "configuration": {
          "chunk_shape": list(chunks), "codecs": raw,
          "index_codecs": raw + [{"name": "crc32c"}]}}]
    return {"metadata": {"shape": list(shape), "data_type": name, "codecs": codecs,
                         "chunk_key_encoding": {"name": "default",
                                                "configuration": {"separator": "."}},
                         "chunk_grid": {"name": "regular",
                                        "configuration": {"chunk_shape": grid}}}}
  raise ConfigError(f"offload driver '{driver}' is not supported (zarr, zarr3)")


def driver_on_disk(directory: str) -> str | None:
  """The zarr driver of the array in `directory` (`zarr3`: `zarr.json`, `zarr`:
  `.zarray`), None when there is none."""
  for driver, meta in (("zarr3", "zarr.json"), ("zarr", ".zarray")):
    if os.path.exists(os.path.join(directory, meta)):
      return driver
  return None


class TableStore:
  """Tensorstore arrays of one offloaded table (see module docstring).

  Args:
    spec: the full table.
    off: its offload settings (driver, kvstore, chunk size, init).
    optimizer: the table's sparse optimizer (its `state_layout()` names the state arrays),
      or one per table (`optimizers.TableOptimizers`: this table's entry is taken).
    path: the table's directory (or memory-store prefix).
  """

  def __init__(self, spec: TableSpec, off: OffloadTable, optimizer, path: str):
    self.spec, self.off, self.path = spec, off, path
    # name -> (per, initial)
    self.layout = dict(optimizers.of(optimizer, spec.name).state_layout())
    self._ctx, self._write_ctx = _contexts()
    self.driver = off.driver       # of the arrays opened: an existing store keeps its own
    self.arrays: dict[str, ts.TensorStore] = {}     # write handles
    self.readers: dict[str, ts.TensorStore] = {}    # read handles (another I/O pool)
    self._marked = False                            # `TRAINED` written (`_mark_trained`)
    self._files: set[str] = set()   # chunk files known to exist (`_record_files`)
    self._files_checked = -math.inf   # `time.monotonic()` of the last `_check_files_kept`

  @property
  def names(self) -> tuple[str, ...]:
    return (TABLE,) + tuple(f"opt.{k}" for k in self.layout)

  def array_shape(self, name: str) -> tuple[int, ...]:
    if name == TABLE or self.layout[name[4:]][0] == "element":
      return (self.spec.rows, self.spec.dim)
    return (self.spec.rows,)

  def new_array_metadata(self, name: str) -> dict:
    """Driver metadata of a new array `name` in this store's format: `driver`, chunks and
    files of `OffloadTable.file_rows`."""
    chunk, shard = self.off.file_rows(self.spec.rows)
    shape = self.array_shape(name)
    return _driver_metadata(self.driver, shape, (chunk,) + shape[1:], self.array_dtype(name),
                            shard)

  def array_dtype(self, name: str) -> np.dtype:
    return jnp.dtype(self.spec.dtype if name == TABLE else "float32")

  def _kvstore(self, name: str) -> dict:
    if self.off.kvstore == "memory":
      return {"driver": "memory", "path": f"{self.path}/{name}/"}
    return {"driver": "file", "path": os.path.join(self.path, name) + "/",
            "file_io_sync": False}

  def _spec(self, name: str) -> dict:
    return {"driver": self.driver, "kvstore": self._kvstore(name)}

  def existing_arrays(self) -> list[str]:
    """Names of this table's arrays already on disk at `path` (what `create` replaces)."""
    if self.off.kvstore == "memory":
      return []
    return [n for n in self.names if os.path.isdir(os.path.join(self.path, n))]

  # ----------------------------------------------------------------------------- open
  def create(self, key: jax.Array | None) -> None:
    """Fresh arrays: rows as the on-device init from `key`, optimizer state at its
    initial value (the fill value: no chunk is written)."""
    self.driver = self.off.driver
    for name in self.names:
      fill = 0.0 if name == TABLE else float(self.layout[name[4:]][1])
      spec = dict(self._spec(name), create=True, delete_existing=True,
                  schema={"fill_value": fill}, **self.new_array_metadata(name))
      self.readers[name] = self._open(spec, "create")
    if key is not None:
      self._write_init(key)
    self._open_writers()
    self._record_files()

  def open_existing(self) -> None:
    """Opens arrays already at `path` in the format they were written in (`zarr` or
    `zarr3`, sharded or not, whatever `driver` now says); checks their shape and dtype."""
    if self.off.kvstore == "file":
      self.driver = driver_on_disk(os.path.join(self.path, TABLE)) or self.off.driver
    for name in self.names:
      try:
        arr = self._open(dict(self._spec(name), open=True), "open")
      except ConfigError as e:   # tensorstore's NOT_FOUND named neither setting nor layout
        if self.off.init != "existing" or "NOT_FOUND" not in str(e):
          raise
        raise ConfigError(f"{e} ('init': 'existing' opens the arrays an earlier run's store "
                          f"holds at its 'path': {', '.join(self.names)})") from None
      shape, want = tuple(arr.domain.shape), self.array_shape(name)
      want_dtype = self.array_dtype(name)
      if shape != want or arr.dtype.numpy_dtype != want_dtype:
        raise ConfigError(
            f"offloaded table '{self.spec.name}': tensorstore array {self._where(name)} has "
            f"shape {list(shape)} and dtype {arr.dtype.numpy_dtype}, expected {list(want)} "
            f"and {want_dtype}")
      self.readers[name] = arr
    self._open_writers()
    self._record_files()

  def _open_writers(self) -> None:
    if self.off.kvstore == "memory":    # one store per context: share the handles
      self.arrays = dict(self.readers)
      return
    self.arrays = {name: self._open(dict(self._spec(name), open=True), "open", self._write_ctx)
                   for name in self.names}

  def _open(self, spec: dict, what: str, context: ts.Context | None = None) -> ts.TensorStore:
    try:
      return ts.open(spec, context=context or self._ctx).result()
    except Exception as e:  # tensorstore raises ValueError/OSError with a status text
      raise ConfigError(f"offloaded table '{self.spec.name}': cannot {what} tensorstore "
                        f"array {self._where(spec['kvstore'])}: {_status(e)}") from None

  def _where(self, name_or_kv) -> str:
    kv = name_or_kv if isinstance(name_or_kv, dict) else self._kvstore(name_or_kv)
    return f"'{kv['path']}' ({self.driver} on {kv['driver']})"

  def _write_init(self, key: jax.Array) -> None:
    """Writes every row's initial value, in blocks; a table of `_PROGRESS_MIN_BYTES` or
    more is logged at the start and every `_PROGRESS_EVERY_S` seconds (3.2 GB took ~25 s
    on a CPU host without a word between the plan and the first step; 305 MiB takes ~2 s)."""
    rows = self.spec.rows
    arr = self.readers[TABLE]
    total = rows * self.spec.dim * self.array_dtype(TABLE).itemsize
    progress = _Progress(self.spec.name, self._where(TABLE), rows, total)
    for start in range(0, rows, _INIT_BLOCK_ROWS):
      signals.check()   # Ctrl-C: between blocks (a fresh run writes the store afresh)
      progress.at(start)
      stop = min(rows, start + _INIT_BLOCK_ROWS)
      try:
        arr[start:stop].write(init_rows(key, self.spec, start, stop)).result()
      except Exception as e:   # e.g. disk full: was a tensorstore traceback naming no table
        raise OffloadError(f"offloaded table '{self.spec.name}': writing its initial rows "
                           f"{start}..{stop} of {rows:,} ({self.spec.dim} x "
                           f"{self.array_dtype(TABLE).name} each) to {self._where(TABLE)} "
                           f"failed: {_status(e)}") from None

  # ----------------------------------------------------------------------------- rows
  def read(self, rows: np.ndarray) -> "PendingRead":
    """Starts reading `rows` (sorted unique int64) from every array. `OffloadError` when
    the store was deleted or moved during the run (`check_intact`)."""
    if len(rows):
      self.check_intact("the run stops before training on them")
    futures = {name: arr[rows].read() for name, arr in self.readers.items()} if len(rows) \
        else {}
    return PendingRead(self, rows, futures)

  def write(self, rows: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
    """Writes `values[name][i]` to row `rows[i]` of each array and waits for the commit.
    Raises `OffloadError` (naming the table and path) when the write fails."""
    if not len(rows):
      return
    if time.monotonic() - self._files_checked >= FILES_CHECK_S:
      self._check_files_kept("the run stops before writing into it")
    self._mark_trained()
    order = np.argsort(rows, kind="stable")
    try:
      for piece in self._write_pieces(rows[order]):
        piece = order[piece]
        wait_all([self.arrays[name][rows[piece]].write(values[name][piece])
                  for name in self.names])   # none still writing after an error
    except Exception as e:
      raise OffloadError(f"offloaded table '{self.spec.name}': write-back of {len(rows)} rows "
                         f"to {self._where(TABLE)} failed: {_status(e)}") from None

  def _write_pieces(self, rows: np.ndarray) -> list[slice]:
    """Pieces of sorted `rows` to write one after the other: each at most
    `_WRITE_PIECE_ROWS` rows and `_WRITE_PIECE_FILE_BYTES` of the files they touch (every
    array's; at least one file)."""
    chunk, shard = self.off.file_rows(self.spec.rows)
    file_rows = shard or chunk
    row_bytes = sum(math.prod(self.array_shape(n)[1:]) * self.array_dtype(n).itemsize
                    for n in self.names)
    max_files = max(1, _WRITE_PIECE_FILE_BYTES // (file_rows * row_bytes))
    files = rows // file_rows
    ordinal = np.concatenate([[0], np.cumsum(files[1:] != files[:-1])])   # [n] file number
    pieces, start = [], 0
    while start < len(rows):
      stop = min(start + _WRITE_PIECE_ROWS,
                 int(np.searchsorted(ordinal, ordinal[start] + max_files)))
      pieces.append(slice(start, stop))
      start = stop
    return pieces

  def write_block(self, name: str, start: int, values: np.ndarray) -> None:
    """Writes `values` `[n, ...]` to rows `[start, start + n)` of array `name`, converted
    to its dtype (e.g. widened from a checkpoint's float16), and waits for the commit."""
    self._mark_trained()
    try:
      self.arrays[name][start:start + len(values)].write(
          np.asarray(values, self.array_dtype(name))).result()
    except Exception as e:
      raise OffloadError(f"offloaded table '{self.spec.name}': writing rows {start}.."
                         f"{start + len(values)} of {self._where(name)} failed: "
                         f"{_status(e)}") from None

  def read_all(self, name: str, start: int, stop: int) -> np.ndarray:
    return self.readers[name][start:stop].read().result()

  # ----------------------------------------------------------------------------- `existing`
  def _mark_trained(self) -> None:
    """Before the first change to arrays opened as `'init': 'existing'`: `<path>/TRAINED`
    names the workdir that owns the store (`owner`), so that a fresh start of that workdir
    refuses them (`check_untrained`)."""
    if self._marked or self.off.init != "existing" or self.off.kvstore == "memory":
      return
    workdir = owner.read_owner(self.path)
    if workdir is not None:
      files.write_text_atomic(os.path.join(self.path, TRAINED), workdir + "\n")
    self._marked = True

  def check_untrained(self) -> None:
    """`OffloadError` when a fresh run (no checkpoint to restore) would open `existing`
    arrays that an earlier run of this workdir changed in place: it stopped before its
    first checkpoint (a kill), and the rerun trained on half-updated rows with fresh dense
    layers, without a word."""
    if self.off.kvstore == "memory":
      return
    try:
      with open(os.path.join(self.path, TRAINED)) as f:
        by = f.read().strip()
    except FileNotFoundError:
      return
    if by and by == owner.read_owner(self.path):
      raise OffloadError(
          f"offloaded table '{self.spec.name}': the arrays at '{self.path}' ('init': "
          f"'existing') were changed in place by an earlier run of this workdir ({by}) "
          "that left no checkpoint to resume (killed before its first one?): they are no "
          "longer the arrays it started from. Put the original arrays back and delete "
          f"{os.path.join(self.path, TRAINED)}, or train on them as they are from a fresh "
          f"--workdir (delete {os.path.join(self.path, OWNER)} to hand the store over)")

  # ----------------------------------------------------------------------------- snapshots
  def snapshot(self, dst: str) -> None:
    """Copies the arrays to directory `dst` (hard links when possible). Call with no
    write in flight. `OffloadError` when an array lost its metadata (the store was deleted
    during the run: tensorstore reads its rows as the fill value, and the snapshots made
    of it replaced the good ones as checkpoints rotated)."""
    if self.off.kvstore == "memory":
      _copy_arrays(self, dst)
      return
    self.check_intact("a snapshot of it would replace the good ones. Nothing was saved for "
                      "this step")
    self._check_files_kept("a snapshot of it would replace the good ones. Nothing was saved "
                           "for this step")
    link_tree(self.path, dst, names=self.names)

  def _chunk_files(self) -> set[str]:
    """Files of the store's arrays (`<array>/<file>`), lock files aside."""
    if self.off.kvstore == "memory":
      return set()
    return {os.path.join(n, rel) for n in self.names
            for rel in integrity.files_under(os.path.join(self.path, n))}

  def _record_files(self) -> None:
    self._files = self._chunk_files()

  def _check_files_kept(self, consequence: str) -> None:
    """`OffloadError` when a chunk file the store had at its open, last write or snapshot
    is gone: the store only replaces its files, so it was deleted under the run, and
    tensorstore read its rows as zeros (a write-back then recreated the file with only the
    rows it wrote, and the next checkpoints linked it and rotated the good snapshots out,
    with no word). One listing of the array directories (7-10 ms at 7,325 files): every
    snapshot calls it, a write-back when `FILES_CHECK_S` have passed since the last (the
    background write-backs of a large table came every few steps). A file deleted and
    recreated by a write-back within that time is not seen."""
    now, self._files_checked = self._chunk_files(), time.monotonic()
    gone = sorted(self._files - now)
    if gone:
      raise OffloadError(
          f"offloaded table '{self.spec.name}': {len(gone)} file(s) of its store "
          f"'{self.path}' disappeared during the run (deleted?), e.g. "
          f"{os.path.join(self.path, gone[0])}: their rows read as zeros, and {consequence}; "
          "rerun the same command to resume from the last checkpoint")
    self._files |= now

  def check_intact(self, consequence: str) -> None:
    """`OffloadError` when an array of a file store lost its metadata: the directory was
    deleted or moved under the run, and tensorstore reads its rows as the fill value
    (zeros). A few `stat` calls."""
    if self.off.kvstore == "memory":
      return
    lost = [n for n in self.names if driver_on_disk(os.path.join(self.path, n)) is None]
    if lost:
      raise OffloadError(
          f"offloaded table '{self.spec.name}': its store '{self.path}' lost the metadata of "
          f"its arrays {', '.join(map(repr, lost))} during the run (deleted or moved?): its "
          f"rows can no longer be read, and {consequence}; rerun the same command to resume "
          "from the last checkpoint")

  def restore_snapshot(self, src: str) -> None:
    """Replaces the arrays by the snapshot in `src` and reopens them."""
    if not os.path.isdir(src):
      raise OffloadError(f"offloaded table '{self.spec.name}': snapshot {src} is missing")
    self._mark_trained()
    self.arrays, self.readers = {}, {}
    self._ctx, self._write_ctx = _contexts()
    if self.off.kvstore == "memory":
      self.create(None)
      for name in self.names:
        src_arr = ts.open({"driver": driver_on_disk(os.path.join(src, name)) or self.driver,
                           "kvstore": {"driver": "file", "path": os.path.join(src, name) + "/"},
                           "open": True}).result()
        self.arrays[name].write(src_arr.read().result()).result()
      return
    try:
      _clear(self.path, self.names)
      link_tree(src, self.path, names=self.names)
    except OSError as e:
      raise OffloadError(f"offloaded table '{self.spec.name}': cannot restore snapshot {src} "
                         f"into '{self.path}': {e}") from None
    self.open_existing()


class _Progress:
  """Log lines while a large table's initial rows are written (see `_write_init`)."""

  def __init__(self, table: str, where: str, rows: int, total_bytes: int):
    self.table, self.rows = table, rows
    self.on = total_bytes >= _PROGRESS_MIN_BYTES
    self.start = self.last = time.monotonic()
    if self.on:
      _LOG.info("offloaded table '%s': writing its %s initial rows (%s) to %s", table,
                f"{rows:,}", format_bytes(total_bytes), where)

  def at(self, row: int) -> None:
    now = time.monotonic()
    if self.on and row and now - self.last >= _PROGRESS_EVERY_S:
      self.last = now
      _LOG.info("offloaded table '%s': %d%% of its initial rows written (%.0f s)",
                self.table, 100 * row // self.rows, now - self.start)


def assemble(store: "TableStore", n: int, parts) -> dict[str, np.ndarray]:
  """`{array: [n, ...]}` of `store`'s arrays from `parts` `[(mask [n] bool, {array:
  values of the masked rows})]` (host buffer, store reads, ...); rows no mask covers are
  zero (filled later, e.g. on the device)."""
  out = {}
  for name in store.names:
    v = np.zeros((n,) + store.array_shape(name)[1:], store.array_dtype(name))
    for mask, values in parts:
      v[mask] = values[name]
    out[name] = v
  return out


class PendingRead:
  """Rows being read from every array of a store; `result()` waits for them."""

  def __init__(self, store: TableStore, rows: np.ndarray, futures: dict):
    self.store, self.rows, self.futures = store, rows, futures

  def result(self) -> dict[str, np.ndarray]:
    if not self.futures:
      return assemble(self.store, 0, [])
    try:
      # every array's read done before the first error is raised (none left running)
      return dict(zip(self.futures, wait_all(self.futures.values())))
    except Exception as e:
      raise OffloadError(f"offloaded table '{self.store.spec.name}': reading {len(self.rows)} "
                         f"rows from {self.store._where(TABLE)} failed: {_status(e)}") from None


def _status(e: Exception) -> str:
  return str(e).split(" [tensorstore_spec=")[0].split("\n")[0]


def _clear(path: str, names) -> None:
  """Removes the arrays `names` from the store directory `path`; nothing else there (its
  `owner.OWNER` file, a file a user put there) is touched."""
  if not os.path.isdir(path):
    return
  for name in os.listdir(path):
    full = os.path.join(path, name)
    if name not in names:
      continue
    if os.path.isdir(full) and not os.path.islink(full):
      shutil.rmtree(full, ignore_errors=True)
    else:
      os.remove(full)


def link_tree(src: str, dst: str, shown: str | None = None, names=None) -> None:
  """Recreates the files of `src` under `dst` as hard links (copies across devices),
  without tensorstore's lock files and the store's `owner.OWNER` file; with `names`, only
  those top-level entries (a store's arrays: not a file a user put in its directory).
  Snapshots and checkpoint conversion copy with it. Raises `tree_copy.CopyError` (an
  OSError naming the file and whether it was read or written; `shown` stands for `dst`)."""
  skip = lambda rel: rel.endswith(integrity.LOCK_SUFFIX) or rel in (OWNER, TRAINED)
  if names is None:
    tree_copy.copy_tree(src, dst, shown, link=True, skip=skip)
    return
  os.makedirs(dst, exist_ok=True)
  for name in names:   # nothing else is walked (the store may sit in a user's directory)
    if os.path.isdir(os.path.join(src, name)):
      tree_copy.copy_tree(os.path.join(src, name), os.path.join(dst, name),
                          os.path.join(shown or dst, name), link=True, skip=skip)


def _copy_arrays(store: TableStore, dst: str) -> None:
  """Copies a memory-backed store into zarr files under `dst`."""
  for name in store.names:
    out = ts.open(dict({"driver": store.driver, "create": True, "delete_existing": True,
                        "kvstore": {"driver": "file", "path": os.path.join(dst, name) + "/"}},
                       **store.new_array_metadata(name))).result()
    out.write(store.readers[name].read().result()).result()
