"""Table store: every table and its optimizer state as one zarr array, by name.

Stored under the checkpoint item `embeddings/`:

    embeddings/tables/<table>/             [rows, dim]          zarr v2 (tensorstore)
    embeddings/table_opt/<table>/<name>/   [rows, dim] | [rows]
    embeddings/index.json                  {"arrays": {name: {shape, dtype, fingerprint}}}

The layout does not depend on mesh or plan. Saving copies each device's shard of the
stacked arrays to host (the only blocking part) and writes the table pieces it holds in
the background; restoring builds each device's shard of the new stacked arrays from the
table pieces it covers (`jax.make_array_from_callback`). No host or device ever holds a
whole sharded table, and nothing moves between devices. Fingerprints are summed over
the pieces on both sides, so a restore is checked bit for bit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from jaxrec.checkpoint.canonical import fingerprint_np
from jaxrec.errors import ConfigError

INDEX = "index.json"
CHUNK_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class Piece:
  """A block of one stored array: `data` goes at `start` (row[, col])."""
  array: str
  start: tuple[int, ...]
  data: np.ndarray


def table_name(table: str) -> str:
  return f"tables/{table}"


def opt_name(table: str, name: str) -> str:
  return f"table_opt/{table}/{name}"


def stored_arrays(collection) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{array name: (shape, dtype)}` the collection's state is stored as."""
  out = {}
  for t in collection.tables:
    if "/" in t.name or t.name.startswith("."):
      raise ConfigError(f"table '{t.name}': names with '/' or a leading '.' cannot be stored")
    out[table_name(t.name)] = ((t.rows, t.dim), str(np.dtype(t.dtype)))
    for k, (per, _) in collection.optimizer.state_layout().items():
      out[opt_name(t.name, k)] = ((t.rows, t.dim) if per == "element" else (t.rows,), "float32")
  return out


def _stack_arrays(layout, optimizer) -> Iterable[tuple[str, Any]]:
  """`(kind, getter)` for the stacked arrays of one stack: the table and each opt state."""
  yield None, lambda emb: emb["tables"][layout.name]
  for k in optimizer.state_layout():
    yield k, lambda emb, k=k: emb["opt"][layout.name][k]


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _overlaps(layout, rows: tuple[int, int]):
  """`(slot, piece rows in the table, piece rows in the block)` for slots meeting `rows`."""
  lo, hi = rows
  for slot in layout.slots:
    start = slot.table_slice * layout.slice_rows + slot.row_offset
    a, b = max(lo, start), min(hi, start + slot.rows)
    if a < b:
      yield slot, (a - start, b - start), (a - lo, b - lo)


def host_pieces(collection, emb) -> list[Piece]:
  """Copies the unique shards of every stacked array to host and cuts them into table
  pieces. Blocks until the copies are made (the caller may then donate `emb`)."""
  shards = []
  for l in collection.layouts:
    for kind, get in _stack_arrays(l, collection.optimizer):
      arr = get(emb)
      for shard in arr.addressable_shards:
        if shard.replica_id == 0:
          shard.data.copy_to_host_async()
          shards.append((l, kind, arr.shape, shard))
  pieces = []
  for l, kind, shape, shard in shards:
    block = np.array(shard.data, copy=True)
    bounds = _bounds(shard.index, shape)
    for slot, (t0, t1), (b0, b1) in _overlaps(l, bounds[0]):
      name = table_name(slot.name) if kind is None else opt_name(slot.name, kind)
      start = (t0,) + tuple(b[0] for b in bounds[1:])
      pieces.append(Piece(name, start, block[b0:b1]))
  return pieces


def _spec(path: epath.Path, shape, dtype, chunk_bytes: int) -> dict:
  row_bytes = max(1, math.prod(shape[1:]) * np.dtype(dtype).itemsize)
  chunks = [max(1, min(shape[0], chunk_bytes // row_bytes)), *shape[1:]]
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
          "metadata": {"shape": list(shape), "chunks": chunks, "dtype": np.dtype(dtype).str,
                       "compressor": {"id": "zstd", "level": 1}}}


async def write_pieces(directory: epath.Path, arrays: Mapping[str, tuple], pieces: list[Piece],
                       chunk_bytes: int = CHUNK_BYTES) -> dict:
  """Writes `pieces` into fresh zarr arrays under `directory` (one transaction), then
  `index.json` with shapes, dtypes and fingerprints. Returns the index."""
  txn = ts.Transaction()
  handles = {}
  for name, (shape, dtype) in arrays.items():
    handles[name] = await ts.open(_spec(directory / name, shape, dtype, chunk_bytes),
                                  create=True, delete_existing=True)
  prints = {name: 0 for name in arrays}
  writes = []
  for p in pieces:
    region = tuple(slice(s, s + n) for s, n in zip(p.start, p.data.shape))
    writes.append(handles[p.array].with_transaction(txn)[region].write(p.data))
    prints[p.array] = (prints[p.array] + fingerprint_np(p.data, arrays[p.array][0], p.start)
                       ) & 0xFFFFFFFF
  for w in writes:
    await w
  await txn.commit_async()
  index = {"arrays": {name: {"shape": list(shape), "dtype": dtype, "fingerprint": prints[name]}
                      for name, (shape, dtype) in arrays.items()}}
  (directory / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
  return index


def read_index(directory: epath.PathLike) -> dict:
  return json.loads((epath.Path(directory) / INDEX).read_text())


def open_stored(directory: epath.PathLike, name: str) -> ts.TensorStore:
  """One stored array, read-only."""
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(epath.Path(directory) / name)}}
  return ts.open(spec, open=True, read=True).result()


def check_compatible(index: Mapping, collection, where: str) -> bool:
  """Raises ConfigError unless the stored tables match the collection's; returns whether
  the sparse optimizer state is stored (False: it starts fresh)."""
  stored = index["arrays"]
  want = stored_arrays(collection)
  have_tables = {n.split("/", 1)[1] for n in stored if n.startswith("tables/")}
  names = {t.name for t in collection.tables}
  if have_tables != names:
    raise ConfigError(f"checkpoint {where} has tables {sorted(have_tables)} but the "
                      f"configuration has {sorted(names)} (missing: "
                      f"{sorted(names - have_tables)}, extra: {sorted(have_tables - names)})")
  for t in collection.tables:
    s = stored[table_name(t.name)]
    if (tuple(s["shape"]), s["dtype"]) != want[table_name(t.name)]:
      raise ConfigError(f"table '{t.name}': checkpoint {where} has {s['shape']} {s['dtype']}, "
                        f"configuration has [{t.rows}, {t.dim}] {t.dtype}")
  have_opt = {n: tuple(v["shape"]) for n, v in stored.items() if n.startswith("table_opt/")}
  want_opt = {n: s for n, (s, _) in want.items() if n.startswith("table_opt/")}
  if have_opt and have_opt != want_opt:
    first = sorted(set(have_opt.items()) ^ set(want_opt.items()))[0][0]
    raise ConfigError(f"checkpoint {where} has sparse optimizer state that does not fit the "
                      f"configured {type(collection.optimizer).__name__} (first difference: "
                      f"'{first}': checkpoint {have_opt.get(first)}, optimizer needs "
                      f"{want_opt.get(first)})")
  return bool(have_opt)


def _read_block(layout, kind, shape, dtype, bounds, handles, prints):
  """The block `bounds` of one stacked array, assembled from table pieces."""
  block = np.zeros(tuple(b - a for a, b in bounds), dtype)
  reads = []
  for slot, (t0, t1), (b0, b1) in _overlaps(layout, bounds[0]):
    name = table_name(slot.name) if kind is None else opt_name(slot.name, kind)
    src = (slice(t0, t1),) + tuple(slice(a, b) for a, b in bounds[1:])
    reads.append((name, (t0,) + tuple(a for a, _ in bounds[1:]), (b0, b1),
                  handles[name][src].read()))
  for name, start, (b0, b1), fut in reads:
    block[b0:b1] = fut.result()
    prints[name] = (prints[name] + fingerprint_np(block[b0:b1], tuple(handles[name].shape),
                                                   start)) & 0xFFFFFFFF
  return block


def read_state(directory: epath.PathLike, collection, with_opt: bool) -> tuple[dict, dict]:
  """Builds the `EmbeddingState` on the collection's mesh and plan from the stored
  tables (fresh optimizer state unless `with_opt`). Returns it with `{array name:
  fingerprint}` of what was read (complete when the process sees every device)."""
  directory = epath.Path(directory)
  names = [n for n in stored_arrays(collection) if with_opt or n.startswith("tables/")]
  handles = {n: open_stored(directory, n) for n in names}
  prints = {n: 0 for n in names}
  shardings = collection.shardings()
  out = {"tables": {}, "opt": {}}
  for l in collection.layouts:
    out["opt"][l.name] = {}
    for kind, _ in _stack_arrays(l, collection.optimizer):
      if kind is None:
        shape, dtype, sharding = l.shape, np.dtype(l.dtype), shardings["tables"][l.name]
      else:
        if not with_opt:
          continue
        sharding = shardings["opt"][l.name][kind]
        shape = l.shape if collection.optimizer.state_layout()[kind][0] == "element" else l.shape[:1]
        dtype = np.dtype(np.float32)
      cache = {}

      def callback(index, l=l, kind=kind, shape=shape, dtype=dtype, cache=cache):
        bounds = _bounds(index, shape)
        if bounds not in cache:
          cache[bounds] = _read_block(l, kind, shape, dtype, bounds, handles, prints)
        return cache[bounds]

      arr = jax.make_array_from_callback(shape, sharding, callback)
      cache.clear()
      if kind is None:
        out["tables"][l.name] = arr
      else:
        out["opt"][l.name][kind] = arr
  if not with_opt:
    out["opt"] = _fresh_opt(collection)
  return out, prints


def _fresh_opt(collection) -> dict:
  def init():
    opt = {}
    for l in collection.layouts:
      opt[l.name] = {k: jnp.full(l.shape if per == "element" else l.shape[:1], initial,
                                 jnp.float32)
                     for k, (per, initial) in collection.optimizer.state_layout().items()}
    return opt
  return jax.jit(init, out_shardings=collection.shardings()["opt"])()


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
    return read_state(directory, args.collection, args.with_opt)

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
  collection: Any
  with_opt: bool = True
