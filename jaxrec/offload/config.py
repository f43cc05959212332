"""Where each table lives: on device (default) or offloaded to a tensorstore tier.

An offloaded table keeps its full `[rows, dim]` array (and its sparse optimizer state) in a
tensorstore array on local disk (or in host memory), and only a cache of `cache_rows` rows
on the device. The embedding collection sees the cache as an ordinary table of
`cache_rows` rows (`device_tables`), placed by the plan like any other table; the batch's
ids of the table's features are rewritten to cache slots before each step (`tier`).

Gin:

    OffloadConfig.tables = {'big': {'cache_rows': 1000000, 'path': '/ssd/big'}}
    OffloadConfig.prefetch_depth = 4
    OffloadConfig.max_staleness = 0
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import gin
import jax.numpy as jnp

from jaxrec import files, gin_usage, workdir_layout
from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import TableSpec, flag, whole
from jaxrec.errors import ConfigError, JaxrecError, OffloadError, in_order  # noqa: F401 re-exported
from jaxrec.errors import some
from jaxrec.kernels.optim import hparam

DRIVERS = ("zarr", "zarr3")
KVSTORES = ("file", "memory")
OFFLOAD_DTYPES = ("float32", "bfloat16", "float16")
SNAPSHOT_CHECKS = ("full", "sizes")   # `OffloadConfig.snapshot_check`
INITS = ("random", "existing")
SHARD_CHUNKS = 16     # chunks per file of a `zarr3` store by default (`OffloadTable.shard_rows`)
FRACTION = (lambda v: 0 < v < 1, "a number in (0, 1)")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OffloadTable:
  """One offloaded table.

  Attributes:
    name: the table (a `TableSpec.name`).
    cache_rows: rows of the device cache; or give `cache_bytes`.
    cache_bytes: device memory budget for the cache (rows + the state of the table's own
      sparse optimizer, `row_bytes`), in bytes.
    path: tensorstore directory of the full table; None → `<workdir>/offload/<name>`.
      A leading `~` or `~user` is expanded; a relative path is relative to the current
      directory. It belongs to one workdir (`owner`): another workdir's is refused.
    driver: tensorstore array driver (`zarr` or `zarr3`).
    kvstore: `file` (local disk) or `memory` (host RAM; no hard-link snapshots).
    chunk_rows: rows per tensorstore chunk: what a read of one row reads.
    shard_rows: `zarr3` only: rows per file, a multiple of `chunk_rows` (the file holds
      its chunks and an index of them). A write-back rewrites whole files, a read reads
      only the chunks it needs. None: `SHARD_CHUNKS` (16) chunks per file with `zarr3`, one
      file per chunk with `zarr`. Fewer files make write-backs and snapshots much cheaper
      (`docs/offload.md`); `shard_rows=chunk_rows` keeps one file per chunk.
    init: `random` (fresh run: (re)write the table with the same values the on-device
      table would get) or `existing` (start from the arrays already at `path`; they must
      exist with shape `[rows, dim]` and the table's dtype).
  """

  name: str
  cache_rows: int | None = None
  cache_bytes: int | None = None
  path: str | None = None
  driver: str = "zarr3"
  kvstore: str = "file"
  chunk_rows: int = 256
  shard_rows: int | None = None
  init: str = "random"

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ConfigError(f"OffloadTable.name must be a table name, got {self.name!r}")
    if (self.cache_rows is None) == (self.cache_bytes is None):
      raise ConfigError(f"offloaded table '{self.name}': give exactly one of cache_rows and "
                        "cache_bytes")
    for field in ("cache_rows", "cache_bytes", "chunk_rows", "shard_rows"):
      if getattr(self, field) is not None:
        object.__setattr__(self, field, whole(getattr(self, field),
                                              f"offloaded table '{self.name}': {field}"))
    if self.path is not None and not isinstance(self.path, str):
      raise ConfigError(f"offloaded table '{self.name}': path must be a string, got "
                        f"{self.path!r}")
    if self.path and self.path.startswith("~"):   # as a shell would: `~/x`, `~user/x`
      path = os.path.expanduser(self.path)
      if path.startswith("~"):
        raise ConfigError(f"offloaded table '{self.name}': path '{self.path}': cannot expand "
                          f"'{self.path.split('/')[0]}' (no such user, or no HOME)")
      object.__setattr__(self, "path", path)
    if self.kvstore not in KVSTORES:
      raise ConfigError(f"offloaded table '{self.name}': kvstore must be one of {KVSTORES}, "
                        f"got '{self.kvstore}'")
    if self.init not in INITS:
      raise ConfigError(f"offloaded table '{self.name}': init must be one of {INITS}, "
                        f"got '{self.init}'")
    if self.driver not in DRIVERS:
      raise ConfigError(f"offloaded table '{self.name}': driver must be one of {DRIVERS}, "
                        f"got '{self.driver}'")
    if self.shard_rows is not None:
      if self.driver != "zarr3":
        raise ConfigError(f"offloaded table '{self.name}': shard_rows={self.shard_rows} needs "
                          f"driver 'zarr3' (driver is '{self.driver}'); set shard_rows=None "
                          "for one file per chunk")
      if self.shard_rows % self.chunk_rows:
        raise ConfigError(f"offloaded table '{self.name}': shard_rows={self.shard_rows} must "
                          f"be a multiple of chunk_rows={self.chunk_rows}")

  def file_rows(self, rows: int) -> tuple[int, int | None]:
    """`(chunk, shard)` rows of a `rows`-row table's arrays (shard None: one file per
    chunk). Both are cut to the table: a chunk larger than the table would be allocated
    whole (`chunk_rows=10**9` made tensorstore abort with std::bad_alloc)."""
    chunk = min(self.chunk_rows, rows)
    if self.driver != "zarr3":
      return chunk, None
    shard = self.shard_rows if self.shard_rows is not None else SHARD_CHUNKS * self.chunk_rows
    return chunk, min(shard, -(-rows // chunk) * chunk)

  def resolve_cache_rows(self, spec: TableSpec, optimizer) -> int:
    """Cache rows from `cache_rows` or the byte budget (`row_bytes` of the table's
    optimizer: `optimizer`, or its entry when per table); checked against the table."""
    if self.cache_rows is not None:
      rows = int(self.cache_rows)
    else:
      rows = int(self.cache_bytes) // row_bytes(spec, optimizer)
    # named as the binding (`auto`'s caches are 1 to `rows` rows): `gin_usage.locate` puts
    # where it was written in front
    if rows <= 0:
      raise ConfigError(f"OffloadConfig.tables['{spec.name}']: the cache holds {rows} rows "
                        f"(cache_rows={self.cache_rows}, cache_bytes={self.cache_bytes}); "
                        f"one row takes {row_bytes(spec, optimizer)} bytes")
    if rows > spec.rows:
      raise ConfigError(f"OffloadConfig.tables['{spec.name}']: cache of {rows} rows is larger "
                        f"than the table ({spec.rows} rows); keep the table on the device "
                        "instead")
    return rows

  def resolve_path(self, workdir: str | None) -> str:
    if self.path:
      return os.path.abspath(self.path)
    if self.kvstore == "memory":
      return f"memory/{self.name}"
    if not workdir:
      raise ConfigError(f"offloaded table '{self.name}': no path and no workdir to put it in")
    return workdir_layout.offload_dir(workdir, self.name)


@gin.configurable(denylist=["auto_added"])
@dataclasses.dataclass(frozen=True)
class OffloadConfig:
  """The offload tier (see `tier` for the pipeline).

  Attributes:
    tables: offloaded tables: `OffloadTable`s, or `{name: {field: value}}`.
    prefetch_depth: K, batches planned, read and copied to the device ahead of the step
      that uses them (a background thread); 0 does it all on the training thread.
    protect_ahead: H, rows needed by the next H batches are evicted last; None = K.
    max_staleness: S, a missing row whose newest value is still on its way back from the
      device may be installed from its older host/disk value when that value lacks at most
      S of the row's updates (those updates are then lost); 0 is exact (and, as the newest
      value is copied on the device, costs no waiting; see `tier`).
    host_buffer_rows: evicted rows kept in host memory before they are written to the
      store (write combining: one write per chunk for many rows); they also serve reads.
      At most the table's rows (`buffer_rows`).
    auto: let `planning.plan_with_offload` offload the largest tables when they do not fit.
    auto_cache_fraction: cache size of a table offloaded by `auto`, as a share of its rows.
    snapshot_check: what a restore checks of an offload snapshot before it uses it:
      `full` (every file's size and CRC32: reads the whole snapshot) or `sizes` (names and
      sizes only: no read, for tables too large to read at every restart). A NaN rollback
      reads the snapshot for NaN/inf either way.
    auto_added: the tables `auto` offloaded (set by `planning.plan_with_offload`, not gin).
  """

  tables: Any = ()
  prefetch_depth: int = 4
  protect_ahead: int | None = None
  max_staleness: int = 0
  host_buffer_rows: int = 1 << 20
  auto: bool = False
  auto_cache_fraction: float = 0.1
  snapshot_check: str = "full"
  auto_added: tuple[str, ...] = ()

  def __post_init__(self):
    tables = self.tables
    if isinstance(tables, Mapping):
      tables = tuple(_table(name, t) for name, t in tables.items())
    if isinstance(tables, (str, bytes)) or not isinstance(tables, Sequence):
      tables = (tables,)
    tables = tuple(tables)
    if not all(isinstance(t, OffloadTable) for t in tables):
      raise ConfigError("OffloadConfig.tables: expected OffloadTable entries or "
                        "{name: {field: value}}")
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
      raise ConfigError(f"OffloadConfig.tables: a table is offloaded twice: {sorted(names)}")
    object.__setattr__(self, "tables", tables)
    for name, minimum in (("prefetch_depth", 0), ("max_staleness", 0), ("host_buffer_rows", 1)):
      object.__setattr__(self, name, whole(getattr(self, name), f"OffloadConfig.{name}", minimum))
    if self.protect_ahead is not None:
      object.__setattr__(self, "protect_ahead", whole(self.protect_ahead,
                                                      "OffloadConfig.protect_ahead", 0))
    flag(self.auto, "OffloadConfig.auto")
    object.__setattr__(self, "auto_cache_fraction", hparam(
        "OffloadConfig.auto_cache_fraction", self.auto_cache_fraction, FRACTION))
    if self.snapshot_check not in SNAPSHOT_CHECKS:
      raise ConfigError(f"OffloadConfig.snapshot_check must be one of {SNAPSHOT_CHECKS}, got "
                        f"{self.snapshot_check!r}")

  @property
  def horizon(self) -> int:
    return int(self.prefetch_depth if self.protect_ahead is None else self.protect_ahead)

  def buffer_rows(self, spec: TableSpec) -> int:
    """Rows of table `spec`'s host write-back buffer: `host_buffer_rows`, at most its rows
    (it holds a row once: a 200,000-row table's buffer was 1,048,576 rows, 88 MiB counted
    for a 12 MiB table)."""
    return min(self.host_buffer_rows, spec.rows)

  def table(self, name: str) -> OffloadTable | None:
    return next((t for t in self.tables if t.name == name), None)

  def with_tables(self, tables: Sequence[OffloadTable]) -> "OffloadConfig":
    return dataclasses.replace(self, tables=tuple(tables))

  def cache_advice(self, name: str) -> str:
    """How to give offloaded table `name` a bigger cache: `auto_cache_fraction` sized the
    cache of a table `auto` offloaded, its `OffloadTable` that of a configured one."""
    if name in self.auto_added:
      return (f"raise OffloadConfig.auto_cache_fraction (now {self.auto_cache_fraction:g}; "
              f"OffloadConfig.auto offloaded '{name}'), or list '{name}' in "
              "OffloadConfig.tables with its cache_rows/cache_bytes")
    where = gin_usage.bound_where("OffloadConfig.tables")
    return (f"raise its cache_rows/cache_bytes (OffloadConfig.tables['{name}']"
            f"{', ' + where if where else ''})")


def _table(name, fields) -> OffloadTable:
  """`OffloadConfig.tables[name]`: an `OffloadTable` or a `{field: value}` mapping."""
  if isinstance(fields, OffloadTable):
    return fields
  known = [f.name for f in dataclasses.fields(OffloadTable) if f.name != "name"]
  if not isinstance(fields, Mapping) or set(fields) - set(known):
    raise ConfigError(f"OffloadConfig.tables['{name}']: expected {{field: value}} with fields "
                      f"from {', '.join(known)}, got {fields!r}")
  try:
    return OffloadTable(name, **fields)
  except ConfigError as e:   # named as the binding, for gin_usage.locate's FILE:LINE
    text = str(e).removeprefix(f"offloaded table '{name}': ")
    raise ConfigError(f"OffloadConfig.tables['{name}']: {text}") from None


def row_bytes(spec: TableSpec, optimizer) -> int:
  """Device bytes per cached row: the row plus the state of its table's optimizer
  (`optimizer`, or its entry for `spec.name` when per table)."""
  item = jnp.dtype(spec.dtype).itemsize
  total = spec.dim * item
  for per, _ in optimizers.of(optimizer, spec.name).state_layout().values():
    total += spec.dim * 4 if per == "element" else 4
  return total


# Host bytes per cache slot: `CacheMap`'s id_of, last, _pin, _soft, _free (int64) and uses
# (int32), and the tier's resident (int64) and dirty (bool) flags.
SLOT_BYTES = 5 * 8 + 4 + 8 + 1
# ... per write-back buffer row, besides the row and its optimizer state: `HostBuffer`'s
# row_at, version and free list (int64); the buffer holds `host_buffer_rows` of them.
BUFFER_ROW_BYTES = 3 * 8


def host_bytes(tables: Sequence[TableSpec], config: OffloadConfig, optimizer) -> int:
  """About the host memory the tier keeps for `config`'s tables, their stores' files
  aside: 12 bytes per table row (the cache's row → slot map and use counts, the write-back
  buffer's index), `SLOT_BYTES` per cache slot (its row, last use, pins, free list, use
  count, dirty flag: 0.5 GB for a 10M-row cache, which this left out), the buffer's
  `buffer_rows` with their optimizer state and `BUFFER_ROW_BYTES` each (all of them: the
  buffer allocates them), and a `kvstore='memory'` store's whole table. `optimizer`: the
  sparse optimizer, or one per table (each table's state counted as its own)."""
  by_name = {t.name: t for t in tables}
  total = 0
  for off in config.tables:
    spec = by_name[off.name]
    per_row = row_bytes(spec, optimizer)
    total += (12 * spec.rows + SLOT_BYTES * off.resolve_cache_rows(spec, optimizer)
              + config.buffer_rows(spec) * (per_row + BUFFER_ROW_BYTES))
    if off.kvstore == "memory":
      total += spec.rows * per_row
  return total


def check_tables(tables: Sequence[TableSpec], config: OffloadConfig) -> None:
  known = {t.name for t in tables}
  dtypes = {t.name: t.dtype for t in tables}
  for t in config.tables:
    if t.name not in known:
      raise ConfigError(f"OffloadConfig.tables: offloaded table '{t.name}' is not a configured "
                        f"table (tables: {some(in_order(known), quote=False)})")
    if dtypes[t.name] not in OFFLOAD_DTYPES:
      raise ConfigError(f"OffloadConfig.tables: table '{t.name}' has dtype "
                        f"'{dtypes[t.name]}', which cannot be offloaded (supported: "
                        f"{', '.join(OFFLOAD_DTYPES)}): keep it on the devices or give it "
                        "one of those")


def check_paths(config: OffloadConfig, workdir: str | None) -> None:
  """Each table on disk needs a store directory of its own: two tables in one directory
  (or one inside the other's) would overwrite each other's arrays, and a snapshot or restore
  of one would copy or delete the other's. Paths are compared with symlinks resolved: two
  spellings of one directory are one directory."""
  seen: dict[str, tuple[str, str]] = {}   # table -> (path as given, real path)
  for t in config.tables:
    if t.kvstore == "memory":   # a memory store lives in its own tensorstore context
      continue
    path = t.resolve_path(workdir)
    files.check_tensorstore_path(f"offloaded table '{t.name}': its store directory "
                                 "('path' in OffloadConfig.tables)", path)
    real = os.path.realpath(path)
    if workdir is not None:
      _check_apart_from_run_files(t.name, path, workdir)
    for name, (given, other) in seen.items():
      if os.path.commonpath([real, other]) in (real, other):
        same = real == other
        where = (f"share the store directory '{path}'" if same and path == given else
                 f"share one store directory: '{given}' and '{path}' are both '{real}'"
                 if same else
                 f"have store directories '{given}' and '{path}', one inside the other")
        if not same and os.path.commonpath([path, given]) not in (path, given):
          where += f" (through symlinks: '{other}' and '{real}')"
        raise ConfigError(f"offloaded tables '{name}' and '{t.name}' {where} "
                          "('path' in OffloadConfig.tables): give each table a directory of "
                          "its own")
    seen[t.name] = (path, real)


def _check_apart_from_run_files(table: str, path: str, workdir: str) -> None:
  """A store directory must not hold the workdir (a snapshot of it would copy the snapshots
  into themselves) nor sit among its checkpoints or snapshots (a restore rewrites it)."""
  p, w = os.path.realpath(path), os.path.realpath(workdir)
  inside = [d for d in (workdir_layout.CHECKPOINTS_DIR, workdir_layout.SNAPSHOTS_DIR)
            if os.path.commonpath([p, os.path.join(w, d)]) == os.path.join(w, d)]
  if os.path.commonpath([p, w]) == p or inside:
    where = (f"is inside '{os.path.join(workdir, inside[0])}', which the run rewrites"
             if inside else "is the workdir" if p == w else f"holds the workdir '{workdir}'")
    raise ConfigError(f"offloaded table '{table}': its store directory '{path}' "
                      f"('path' in OffloadConfig.tables) {where}: give it a directory of its own "
                      f"(default: '{workdir_layout.offload_dir(workdir, table)}')")


def device_tables(tables: Sequence[TableSpec], config: OffloadConfig, optimizer
                  ) -> tuple[TableSpec, ...]:
  """The tables as the embedding collection sees them: each offloaded table becomes its
  cache, `TableSpec(name, cache_rows, dim)` (`cache_bytes` over its own optimizer's
  `row_bytes`; `optimizer` may be per table); the others are unchanged."""
  check_tables(tables, config)
  out = []
  for t in tables:
    off = config.table(t.name)
    if off is None:
      out.append(t)
    else:
      out.append(dataclasses.replace(t, rows=off.resolve_cache_rows(t, optimizer),
                                     init_scale=t.scale))
  return tuple(out)
