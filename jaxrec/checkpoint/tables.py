"""Table store: every table and its optimizer state as one zarr array, by name.

Stored under the checkpoint item `embeddings/`:

    embeddings/tables/<table>/             [rows, dim] f32/bf16/f16   zarr v2 (tensorstore)
    embeddings/tables/<table>/{q,scale,bias}/   int8 tables: [rows, dim] int8, [rows] f32 x2
    embeddings/table_opt/<table>/<name>/   [rows, dim] | [rows]   the table's own optimizer's
    embeddings/index.json                  {"processes", "arrays": {name: {shape, dtype}}}
    embeddings/fingerprints.<process>.json {name: partial fingerprint}

A save of `DATABASE_ARRAYS` arrays or more keeps the arrays' files in one OCDBT database
(`embeddings/manifest.ocdbt`, `embeddings/d/`) under the same names: a file per array and
chunk cost ~5 ms each to create and sync (3,000 tables: 12,000 files, 39-115 s a save on a
loaded 2-core host; 6-14 s as one database). Each process writes its own rows into the
shared arrays; several processes write one database through a shared OCDBT coordinator
(`table_writers`: the plain files when a process cannot reach it). A reader opens either
(`open_many`).

The layout does not depend on mesh or plan. A restore widens a stored floating-point array
to a wider configured dtype when that is exact (float16/bfloat16 → float32, e.g. an
imported TorchRec table), and reads an int8 table configured as float32 as the values its
lookup saw (`dequantized`); narrowing is refused (`compatible`: what fits, table by table,
optimizer state included: each table's is its own optimizer's). Saving copies each
device's shard of the stacked arrays to host (the only blocking part) and writes the table
pieces it holds in the background; restoring builds each device's shard of the new stacked
arrays from the table pieces it covers, one shard at a time, each put on its device before
the next is read. No host or device ever holds a whole sharded table, and nothing moves
between devices. Fingerprints are summed over the pieces on both sides, so a restore is
checked bit for bit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from jaxrec import signals
from jaxrec.checkpoint import canonical as canonical_lib
from jaxrec.checkpoint import dequantized as dequantized_lib
from jaxrec.checkpoint import table_records, table_writers
from jaxrec.checkpoint.table_records import INDEX, read_index, saved_fingerprints  # noqa: F401
from jaxrec.checkpoint.canonical import fingerprint_np
from jaxrec.embedding import layout as layout_lib
from jaxrec.embedding import optimizers as optimizers_lib
from jaxrec.embedding.specs import TableSpec
from jaxrec.futures import wait_all

CHUNK_BYTES = 8 << 20
COPY_BYTES = 16 << 20   # host copies run in parallel blocks of about this size
BLOCK_CHUNKS = 16       # `write_pieces` commits this many chunks of rows at a time
DATABASE_ARRAYS = 64    # a one-process save of this many arrays or more is one database
WINDOW_BYTES = 32 << 20   # a restore reads a stacked array in row windows of about this
READ_CACHE_BYTES = 128 << 20   # decoded chunks a restore keeps (a window's, all columns)


@dataclasses.dataclass(frozen=True)
class Piece:
  """A block of one stored array: `data` goes at `start` (row[, col]); `data` may be a
  function returning it, called when its array is written (`write_pieces`)."""
  array: str
  start: tuple[int, ...]
  data: np.ndarray | Callable[[], np.ndarray]


def table_name(table: str, leaf: str = "") -> str:
  """Stored name of a table (or of one leaf of a `QuantizedTable`: `q`, `scale`, `bias`)."""
  return f"tables/{table}/{leaf}" if leaf else f"tables/{table}"


def opt_name(table: str, name: str) -> str:
  return f"table_opt/{table}/{name}"


@functools.lru_cache(maxsize=16)
def _abstract_state(collection) -> dict:
  """ShapeDtypeStructs of the collection's `EmbeddingState` (nothing is computed)."""
  return jax.eval_shape(collection.init, jax.random.key(0))


@functools.lru_cache(maxsize=16)
def stored_arrays(collection) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{array name: (shape, dtype)}` the collection's state is stored as (cached: do not
  modify the result)."""
  out = {}
  for t in collection.tables:
    out.update(table_arrays(t, collection.optimizer))
  return out


def table_arrays(spec, optimizer) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{array name: (shape, dtype)}` of one table (`TableSpec`) and the state of its sparse
  optimizer (`optimizer`, or its entry for the table when per table)."""
  out = {}
  for leaf, per_row, dtype in _row_leaves(spec.dim, spec.dtype):
    out[table_name(spec.name, leaf)] = ((spec.rows,) + per_row, dtype)
  for k, (per, _) in optimizers_lib.of(optimizer, spec.name).state_layout().items():
    out[opt_name(spec.name, k)] = ((spec.rows, spec.dim) if per == "element" else (spec.rows,),
                                   "float32")
  return out


@functools.lru_cache(maxsize=None)
def _row_leaves(dim: int, dtype: str) -> tuple[tuple[str, tuple[int, ...], str], ...]:
  """`(leaf name, shape after the rows axis, dtype)` of a stored table's arrays (an int8
  table: values, scale, bias), from one trace per (dim, dtype): traced per table,
  restoring 300 tables spent 8.6 of 11.5 s here and the first save of 750 tables ~15 s."""
  abstract = jax.eval_shape(lambda: layout_lib.init_table(jax.random.key(0),
                                                           TableSpec("t", 1, dim, dtype)))
  leaves = tuple(canonical_lib.leaf_names(abstract))
  if any(not a.shape or a.shape[0] != 1 for _, a in leaves):   # every array is per row
    raise AssertionError(f"a table array without a leading rows axis: {leaves}")
  return tuple((leaf, tuple(a.shape[1:]), str(np.dtype(a.dtype))) for leaf, a in leaves)


def _stack_arrays(l, emb):
  """`(name of a slot's piece, stacked array)` for every array of one stack (its
  optimizer state as the stack's own optimizer shapes it, `StackLayout.optimizer`)."""
  for leaf, arr in canonical_lib.leaf_names(emb["tables"][l.name]):
    yield (lambda slot, leaf=leaf: table_name(slot, leaf)), arr
  for k in l.optimizer.state_layout():
    yield (lambda slot, k=k: opt_name(slot, k)), emb["opt"][l.name][k]


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _overlaps(layout, rows: tuple[int, int]):
  """`(slot, piece rows in the table, piece rows in the block)` for slots meeting `rows`."""
  lo, hi = rows
  for slot in layout.slots:
    start = layout.slot_start(slot)
    a, b = max(lo, start), min(hi, start + slot.rows)
    if a < b:
      yield slot, (a - start, b - start), (a - lo, b - lo)


def _real_cols(layout, bounds) -> tuple[tuple, tuple] | None:
  """The column index (no slice for a per-row array) of a block `bounds` of a stacked
  array's real columns (`StackLayout.real_columns`): `(in the stored table, in the
  block)`; None when the block holds padding columns only."""
  if len(bounds) == 1:
    return (), ()
  c0, c1 = layout.real_columns(*bounds[1])
  return ((slice(c0, c1),), (slice(0, c1 - c0),)) if c0 < c1 else None


def host_pieces(collection, emb, buffers: dict | None = None) -> list[Piece]:
  """Copies the unique shards of every stacked array to host and cuts them into table
  pieces. Blocks until the copies are made (the caller may then donate `emb`). Only the
  rows and shards that hold tables are copied: a stack's padding rows (a `tw` plan pads
  every slice to its largest: 4.8 GiB of stacks for 0.66 GiB of tables, 5.4 s of copies
  blocking the loop) and shards of padding columns only are not.

  `buffers` (kept by the caller between saves, once the previous save has committed)
  holds the host copies for reuse: the copy then touches no fresh memory."""
  buffers = {} if buffers is None else buffers
  shards = []
  for l in collection.layouts:
    for name_of, arr in _stack_arrays(l, emb):
      for shard in arr.addressable_shards:
        if shard.replica_id == 0:
          shard.data.copy_to_host_async()
          shards.append((l, name_of, arr.shape, shard))
  pieces, copies = [], []
  for l, name_of, shape, shard in shards:
    bounds = _bounds(shard.index, shape)
    key = (name_of(l.name), bounds)
    block = buffers.get(key)
    if block is None or block.shape != shard.data.shape or block.dtype != shard.data.dtype:
      block = buffers[key] = np.empty(shard.data.shape, shard.data.dtype)
    cols = _real_cols(l, bounds)
    if cols is None:   # a block of padding columns only
      continue
    src = np.asarray(shard.data)
    rows = max(1, COPY_BYTES // max(1, block[:1].nbytes))
    stored, local = cols
    for slot, (t0, t1), (b0, b1) in _overlaps(l, bounds[0]):
      start = (t0,) + tuple(c.start for c in stored)
      pieces.append(Piece(name_of(slot.name), start, block[(slice(b0, b1),) + local]))
      copies += [(block[r:min(r + rows, b1)], src[r:min(r + rows, b1)])
                 for r in range(b0, b1, rows)]
  list(_copy_pool().map(lambda c: np.copyto(*c), copies))   # numpy copies release the GIL
  return pieces


@functools.lru_cache(maxsize=1)
def _copy_pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1),
                                               thread_name_prefix="jaxrec_ckpt_copy")


def uses_database(directory: epath.PathLike) -> bool:
  """Whether a stored item (`embeddings`, see `write_pieces`, or orbax's dense `state`) is
  one OCDBT database rather than a directory of files per array."""
  return (epath.Path(directory) / "manifest.ocdbt").exists()


def kvstore(directory: epath.PathLike, name: str, database: bool) -> dict:
  """The tensorstore kvstore of array `name` under `directory`: a key prefix of the OCDBT
  database there (`database`), else its own directory of files. The base is a file
  kvstore spec, not a `file://` URL: a path's `#` or `?` failed the save, its `%41`
  wrote the database into another directory (`A`) and the step lost it. (Also the dense
  `state` item's, which orbax writes the same ways: `storage`.)"""
  directory = epath.Path(directory)
  if database:
    return {"driver": "ocdbt", "base": {"driver": "file", "path": f"{directory}/"},
            "path": f"{name}/"}
  return {"driver": "file", "path": f"{directory / name}/"}


def _spec(directory: epath.Path, name: str, shape, dtype, chunk_bytes: int,
          database: bool) -> dict:
  row_bytes = max(1, math.prod(shape[1:]) * np.dtype(dtype).itemsize)
  chunks = [max(1, min(shape[0], chunk_bytes // row_bytes)), *shape[1:]]
  return {"driver": "zarr", "kvstore": kvstore(directory, name, database),
          "dtype": np.dtype(dtype).name,
          "metadata": {"shape": list(shape), "chunks": chunks,
                       "compressor": {"id": "zstd", "level": 1}}}


def _waves(arrays: Mapping[str, tuple], opened: Mapping[str, ts.TensorStore],
           by_array: Mapping[str, list], chunk_bytes: int
           ) -> Iterator[list[tuple[str, int, int]]]:
  """`(array, first row, end row)` blocks of `BLOCK_CHUNKS` chunks of rows of every array
  holding pieces, in array order, grouped into waves of at most `BLOCK_CHUNKS` x
  `chunk_bytes` (or one block), each written in one transaction: one for a whole array
  held a second copy of it (1.8 GB more for a 3e7 x 16 table); writing one array at a time
  waited on each small array's files in turn. An array with a lazy piece (an import's
  table, read when its turn comes) shares no wave: one such table is in memory at a time."""
  wave, wave_bytes = [], 0
  for name, (shape, dtype) in arrays.items():
    if not by_array[name]:
      continue
    chunk = opened[name].chunk_layout.write_chunk.shape[0]
    row_bytes = max(1, math.prod(shape[1:]) * np.dtype(dtype).itemsize)
    lazy = any(callable(p.data) for p in by_array[name])
    for lo in range(0, shape[0], chunk * BLOCK_CHUNKS):
      hi = min(shape[0], lo + chunk * BLOCK_CHUNKS)
      if wave and (lazy or wave_bytes + (hi - lo) * row_bytes > BLOCK_CHUNKS * chunk_bytes):
        yield wave
        wave, wave_bytes = [], 0
      wave.append((name, lo, hi))
      wave_bytes += (hi - lo) * row_bytes
    if lazy and wave:
      yield wave
      wave, wave_bytes = [], 0
  if wave:
    yield wave


def _fingerprint(shape, parts) -> int:
  total = 0
  for start, data in parts:
    total = (total + fingerprint_np(data, shape, start)) & 0xFFFFFFFF
  return total


def _open_arrays(directory, arrays, chunk_bytes, w) -> dict[str, ts.TensorStore]:
  """The arrays to write (`w`: `table_writers.Writers`): a database's created by one process
  in one commit (each array its own: minutes at 3,000), then opened by the others; the
  files' by whichever process gets there first."""
  if w.database and not w.creates:
    w.wait_created()
  txn, ok = ts.Transaction() if w.database and w.creates else None, False
  # every open done before any error is raised: one still creating its array's files in
  # orbax's tmp directory after the save failed is a file the failure's clean-up missed
  try:
    opened = dict(zip(arrays, wait_all([
        ts.open(_spec(directory, name, shape, dtype, chunk_bytes, w.database), open=True,
                create=w.creates or not w.database, context=w.context, transaction=txn)
        for name, (shape, dtype) in arrays.items()])))
    if txn is not None:
      txn.commit_async().result()
    ok = True
  finally:
    if w.database and w.creates:
      w.created(ok)
  return opened


def _write_waves(arrays, opened, pieces, chunk_bytes) -> dict[str, int]:
  """Writes `pieces` into the `opened` arrays (`_waves`); this process's fingerprints."""
  by_array: dict[str, list[Piece]] = {name: [] for name in arrays}
  for p in pieces:
    by_array[p.array].append(p)
  prints, parts = dict.fromkeys(arrays, 0), {}   # 0: no piece here (another process's)
  for wave in _waves(arrays, opened, by_array, chunk_bytes):
    txn, writes = ts.Transaction(), []
    for name, lo, hi in wave:
      if name not in parts:   # a lazy piece (an import's table) is read when its array's
        parts[name] = [(p.start, p.data() if callable(p.data) else p.data)   # turn comes
                       for p in by_array[name]]
        prints[name] = _fingerprint(arrays[name][0], parts[name])
      for start, data in parts[name]:
        a, b = max(lo, start[0]), min(hi, start[0] + data.shape[0])
        if a < b:
          region = (slice(a, b),) + tuple(slice(s, s + n)
                                          for s, n in zip(start[1:], data.shape[1:]))
          writes.append(opened[name].with_transaction(txn)[region].write(
              data[a - start[0]:b - start[0]], can_reference_source_data_indefinitely=True))
    wait_all([w.copy for w in writes])
    txn.commit_async().result()
    for name, lo, hi in wave:   # nothing held past its array's last block
      if hi == arrays[name][0][0]:
        del parts[name]
    txn = writes = None
  return prints


async def write_pieces(directory: epath.Path, arrays: Mapping[str, tuple], pieces: list[Piece],
                       chunk_bytes: int = CHUNK_BYTES) -> None:
  """Writes this process's `pieces` into the zarr arrays under `directory` (a database's
  created by process 0, files by whichever process gets there first; `table_writers`), its
  partial fingerprints to `fingerprints.<process>.json` and, on process 0, `index.json`.

  Runs in orbax's background commit thread; it waits on tensorstore futures directly
  (`.result()`) rather than through that thread's event loop."""
  with table_writers.writers(directory, len(arrays) >= DATABASE_ARRAYS) as w:
    opened = _open_arrays(directory, arrays, chunk_bytes, w)
    prints = _write_waves(arrays, opened, pieces, chunk_bytes)
  table_records.write(directory, arrays, prints)


def read_context() -> ts.Context:
  """A context for reading one stored item's arrays: its cache keeps decoded chunks and a
  database's index nodes (without one, each of 6,000 arrays read its manifest and index
  anew: 11 s to open them where files took 2)."""
  return ts.Context({"cache_pool": {"total_bytes_limit": READ_CACHE_BYTES}})


def open_stored(directory: epath.PathLike, name: str, context: ts.Context | None = None
                ) -> ts.TensorStore:
  """One stored array, read-only (`context`: pass one `read_context()` to every array
  read from one item)."""
  return open_many(directory, [name], context)[name]


def open_many(directory: epath.PathLike, names, context: ts.Context | None = None
              ) -> dict[str, ts.TensorStore]:
  """`{name: stored array}`, read-only, opened together (a database's 6,000 arrays opened
  one after another took 2.6 s, together 0.7 s)."""
  directory = epath.Path(directory)
  database = uses_database(directory)
  if not database and (directory / "d").is_dir():   # read as files, it blamed a `.zarray`
    raise ValueError(f"{directory / 'manifest.ocdbt'} is missing: the tables database's "
                     f"data files ({directory / 'd'}) cannot be read without it")
  return dict(zip(names, wait_all([
      ts.open({"driver": "zarr", "kvstore": kvstore(directory, name, database)},
              open=True, read=True, context=context) for name in names])))


def open_restorable(directory: epath.PathLike, name: str, stored: Mapping,
                    context: ts.Context | None = None):
  """Stored array `name` for reading into a configured table or optimizer state:
  `open_stored`, or a `DequantizedArray` when `stored` (the index's arrays) holds it as an
  int8 table (a float32 table now, see `compatible.check_compatible`)."""
  if dequantized_lib.is_quantized(stored, name):
    return dequantized_lib.DequantizedArray(
        *(open_stored(directory, p, context) for p in dequantized_lib.stored_parts(name)))
  return open_stored(directory, name, context)


def dequantized_parts(index: Mapping, names) -> list[str]:
  """The stored int8 parts (`tables/<t>/q`, ...) of those of `names` that a restore reads
  dequantised: they are not read as saved, so they are checked on their own."""
  return [p for n in names if dequantized_lib.is_quantized(index["arrays"], n)
          for p in dequantized_lib.stored_parts(n)]


def _read_block(layout, name_of, shape, dtype, bounds, handles, prints, fills=None):
  """The block `bounds` of one stacked array, assembled from table pieces (each
  fingerprinted as stored, then widened to `dtype` if stored narrower). Slots of tables
  without a handle hold their `fills` value (`{piece name: value}`: fresh optimizer
  state), else zero."""
  block = np.zeros(tuple(b - a for a, b in bounds), dtype)
  cols = _real_cols(layout, bounds)
  if cols is None:   # padding columns only: zeros
    return block
  stored, local = cols
  reads = []
  for slot, (t0, t1), (b0, b1) in _overlaps(layout, bounds[0]):
    name = name_of(slot.name)
    if name not in handles:
      if name in (fills or {}):
        block[(slice(b0, b1),) + local] = fills[name]
      continue
    reads.append((name, (t0,) + tuple(c.start for c in stored), (b0, b1),
                  handles[name][(slice(t0, t1),) + stored].read()))
  # every read done before the first error is raised: none still fills a buffer after it
  for (name, start, (b0, b1), _), data in zip(reads, wait_all([r[-1] for r in reads])):
    if name in prints:
      prints[name] = (prints[name] + fingerprint_np(data, tuple(handles[name].shape),
                                                     start)) & 0xFFFFFFFF
    block[(slice(b0, b1),) + local] = data   # exact: `compatible` allows only widening
  return block


def _read_array(l, name_of, abstract, sharding, handles, prints, fills=None) -> jax.Array:
  """One stacked array on `sharding`, each device's block read from the table pieces.

  Blocks are read one at a time and put on their device(s) before the next is read, so
  the host holds one device's block at a time (`jax.make_array_from_callback` would
  gather every addressable block on the host first: a whole sharded table on one host).
  When the array is split by columns, the blocks are read in windows of rows
  (`WINDOW_BYTES` of the array's full width), each written into its block on the device
  in place, and the column blocks of one row range window by window in turn: the chunks a
  window decodes (stored chunks hold whole rows) serve each of them from the read cache
  (`READ_CACHE_BYTES`). Read a block at a time, a column split decoded every chunk once per
  block, all of a block's chunks at once: a restore of a 1 GB table onto `col=8` took 28 s
  and peaked 2.2 GB over its start (11 s and 1.3 GB now; onto `row=8` 4-9 s, 1.4 GB)."""
  shape, dtype = tuple(abstract.shape), np.dtype(abstract.dtype)
  owners = {}   # block -> its first device: only that device's process fingerprints it
  for device, index in sharding.devices_indices_map(shape).items():
    owners.setdefault(_bounds(index, shape), device)
  by_block: dict[tuple, list] = {}   # replicas of a block read it once
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    by_block.setdefault(_bounds(index, shape), []).append(device)
  whole = len(shape) < 2 or all(b[1] == (0, shape[1]) for b in by_block)   # no col split
  width = max(1, shape[0] if whole else WINDOW_BYTES // (math.prod(shape[1:]) * dtype.itemsize))
  windows = sorted(((w, bounds[1:], bounds) for bounds in by_block   # window-major: a row
                    for w in range(bounds[0][0], max(bounds[0][1], bounds[0][0] + 1), width)),
                   key=lambda x: x[:2])   # range's column blocks in turn
  placed: dict = {}
  for w, _, bounds in windows:
    signals.check()   # Ctrl-C during a long restore: between windows (nothing is written)
    (r0, r1), devices = bounds[0], by_block[bounds]
    mine = owners[bounds].process_index == jax.process_index()
    window = _read_block(l, name_of, shape, dtype, ((w, min(w + width, r1)),) + bounds[1:],
                         handles, prints if mine else {}, fills)
    if window.shape[0] == r1 - r0:   # the whole block
      placed.update((d, jax.device_put(window, d)) for d in devices)
    else:
      for d in devices:
        if d not in placed:
          placed[d] = jnp.zeros((r1 - r0,) + window.shape[1:], dtype, device=d)
        placed[d] = _write_rows(placed[d], jax.device_put(window, d), w - r0)
    jax.block_until_ready([placed[d] for d in devices])   # the host copy may go now
    del window
  return jax.make_array_from_single_device_arrays(
      shape, sharding, [placed[d] for d in sharding.addressable_devices_indices_map(shape)])


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(block, window, start):
  """`block` with `window` at row `start`, in place (`block` is donated)."""
  return jax.lax.dynamic_update_slice_in_dim(block, window, start, axis=0)


def read_state(directory: epath.PathLike, collection, fresh: tuple[str, ...] = (),
               sources: Mapping[str, ts.TensorStore] | None = None,
               skip: tuple[str, ...] = ()) -> tuple[dict, dict]:
  """Builds the `EmbeddingState` on the collection's mesh and plan from the stored
  tables and their optimizer state, but the state of the tables in `fresh` (stored
  without any, `compatible.check_compatible`): theirs starts at its initial values.
  Returns it with `{array name: fingerprint}` of what this process read from `directory`
  (summed over processes: the whole arrays).

  `sources` (`{array name: tensorstore}`) are read instead of the stored arrays of those
  names and not fingerprinted (an offloaded table's whole arrays from its snapshot, where
  the checkpoint holds its device cache). The tables in `skip` are not read: their rows
  stay zero (the device cache of a table this run offloads, refilled from its store). An
  int8 table configured as float32 is read dequantised and not fingerprinted here either
  (its stored parts are checked on their own: `dequantized_parts`)."""
  directory = epath.Path(directory)
  sources, fresh = dict(sources or {}), set(fresh)
  names = [n for n in stored_arrays(collection)
           if (n.startswith("tables/") or n.split("/")[1] not in fresh)
           and n.split("/")[1] not in skip]
  index = read_index(directory)["arrays"]
  cache = read_context()
  plain = open_many(directory, [n for n in names if n not in sources
                                and not dequantized_lib.is_quantized(index, n)], cache)
  handles = {n: sources[n] if n in sources else plain[n] if n in plain else
             open_restorable(directory, n, index, cache) for n in names}
  prints = {n: 0 for n in names if n not in sources and n in index}
  abstract, shardings = _abstract_state(collection), collection.shardings()
  out = {"tables": {}, "opt": {}}
  all_fresh = [l for l in collection.layouts if {s.name for s in l.slots} <= fresh]
  read_opt = {l.name for l in collection.layouts} - {l.name for l in all_fresh}
  for l in collection.layouts:
    tree = abstract["tables"][l.name]
    leaves = [_read_array(l, lambda slot, leaf=leaf: table_name(slot, leaf), a, sh, handles,
                          prints)
              for (leaf, a), sh in zip(canonical_lib.leaf_names(tree),
                                       jax.tree.leaves(shardings["tables"][l.name]))]
    out["tables"][l.name] = jax.tree.unflatten(jax.tree.structure(tree), leaves)
    if l.name in read_opt:   # a fresh table in a stack of restored ones: initial values
      out["opt"][l.name] = {
          k: _read_array(l, lambda slot, k=k: opt_name(slot, k), abstract["opt"][l.name][k],
                         shardings["opt"][l.name][k], handles, prints,
                         {opt_name(s.name, k): initial for s in l.slots if s.name in fresh})
          for k, (_, initial) in l.optimizer.state_layout().items()}
  out["opt"].update(_fresh_opt(collection, all_fresh))
  return out, prints


def _fresh_opt(collection, layouts) -> dict:
  """The initial optimizer state of the stacks `layouts`, on the collection's shardings."""
  def init():
    return {l.name: {k: jnp.full(l.shape if per == "element" else l.shape[:1], initial,
                                 jnp.float32)
                     for k, (per, initial) in l.optimizer.state_layout().items()}
            for l in layouts}
  shardings = collection.shardings()["opt"]
  return jax.jit(init, out_shardings={l.name: shardings[l.name] for l in layouts})()


# ----------------------------------------------------------------------------- orbax item
class TableStoreHandler(ocp.AsyncCheckpointHandler):
  """Orbax handler of the `embeddings` item: writes in orbax's temporary step directory,
  so the item is committed atomically with the rest of the checkpoint."""

  async def async_save(self, directory: epath.Path, args: "TablesSave" = None):
    coro = write_pieces(epath.Path(directory), args.arrays, args.pieces, args.chunk_bytes)
    return [ocp.future.CommitFutureAwaitingContractedSignals(coro, name="jaxrec_tables")]

  def save(self, directory: epath.Path, args: "TablesSave" = None):
    asyncio.run(write_pieces(epath.Path(directory), args.arrays, args.pieces, args.chunk_bytes))

  def restore(self, directory: epath.Path, args: "TablesRestore" = None):
    return read_state(directory, args.collection, args.fresh, args.sources, args.skip)

  def metadata(self, directory: epath.Path):
    return read_index(directory)

  def close(self):
    pass


@ocp.args.register_with_handler(TableStoreHandler, for_save=True)
@dataclasses.dataclass
class TablesSave(ocp.args.CheckpointArgs):
  """Arrays to create (`{name: (shape, dtype)}`) and the host pieces to write in them."""
  arrays: Mapping[str, tuple]
  pieces: list
  chunk_bytes: int = CHUNK_BYTES


@ocp.args.register_with_handler(TableStoreHandler, for_restore=True)
@dataclasses.dataclass
class TablesRestore(ocp.args.CheckpointArgs):
  """The collection to restore into; `fresh`, `sources` and `skip` as in `read_state`."""
  collection: Any
  fresh: tuple[str, ...] = ()
  sources: Mapping[str, Any] | None = None
  skip: tuple[str, ...] = ()
