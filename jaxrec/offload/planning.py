"""Which tables to offload: the planner's answer when the tables do not fit the devices.

`plan_with_offload` first plans the configured tables with every table listed in
`OffloadConfig.tables` replaced by its cache. If that does not fit the memory budget and
`OffloadConfig.auto` is set, it offloads more tables — biggest first (rows x bytes per
row, optimizer state included), each with a cache of `auto_cache_fraction` of its rows but
at least the ids of H+1 training batches (what the look-ahead may pin) — until the planner
finds a plan that fits. Tables whose cache would hold half their rows or more stay on the
device, as do int8 tables (not offloadable). The decision is written into the plan's notes.
An eval batch whose rows do not fit such a cache is evaluated in pieces that do
(`eval_split`; start-up warns), so the cache is not sized for eval batches.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import BudgetError, some
from jaxrec.offload.config import (OFFLOAD_DTYPES, OffloadConfig, OffloadTable, device_tables,
                                   BUFFER_ROW_BYTES, host_bytes, row_bytes)
from jaxrec.planner.result import format_bytes


def plan_with_offload(tables: Sequence[TableSpec], features: Sequence[FeatureSpec],
                      mesh_shape: Mapping[str, int], config: OffloadConfig, optimizer,
                      memory_per_device_bytes: int | None, batch_size: int,
                      may_auto_offload: bool = True, **planner_kwargs):
  """Plans `tables`, offloading tables when needed (see module docstring). `optimizer`:
  the sparse optimizer, or one per table: each table's caches, rows and store are sized
  with its own optimizer's state (`row_bytes`). `may_auto_offload=False`: plan as if
  `OffloadConfig.auto` were off (`mesh_choice.auto_mesh`'s on-device pass), its error
  stating `auto` as bound.

  Returns:
    `(result, config, device_specs)`: the planner's `PlanResult` (over the device
    tables), the offload config with every offloaded table (those `auto` chose in its
    `auto_added`), and the tables as the
    embedding collection must be built (`device_tables`).

  Raises:
    BudgetError: no plan fits, even with every table offloaded (or `auto` is off); other
      ConfigErrors (a bad binding the planner reads) as they are.
  """
  from jaxrec import planner  # pylint: disable=import-outside-toplevel
  rows_of = auto_cache_rows(features, config, batch_size)
  candidates = auto_candidates(tables, features, config, optimizer, batch_size)
  while True:
    specs = device_tables(tables, config, optimizer)
    try:
      result = planner.propose_plan(specs, features, dict(mesh_shape),
                                    memory_per_device_bytes=memory_per_device_bytes,
                                    optimizer_state_factor=optimizer, batch_size=batch_size,
                                    **planner_kwargs)
      break
    except BudgetError as e:   # other errors (a bad EmbeddingOptions binding) as they are
      if not (config.auto and may_auto_offload) or not candidates:   # offloading cannot help
        unused = " (planned on the devices only)" if config.auto and not may_auto_offload else ""
        if config.auto and may_auto_offload:
          unused = _passed_over(tables, config, rows_of)
        raise BudgetError(f"{e} (offloaded tables, planned as their device caches: "  # gin's
                          f"{_caches(tables, config, optimizer)}; "  # wrapped ones had none
                          f"OffloadConfig.auto={config.auto}{unused}{_smaller(config)})"
                          ) from None
      config = _auto_offload(config, candidates.pop(0), rows_of)
  return with_offload_notes(result, tables, config, optimizer), config, specs


def auto_candidates(tables: Sequence[TableSpec], features: Sequence[FeatureSpec],
                    config: OffloadConfig, optimizer, batch_size: int) -> list[TableSpec]:
  """The tables `OffloadConfig.auto` may offload, in the order it does: not configured,
  offloadable (not int8), and with a cache under half their rows; biggest first."""
  rows_of = auto_cache_rows(features, config, batch_size)
  return sorted((t for t in tables if _may_auto_offload(t, config, rows_of)),
                key=lambda t: (-t.rows * row_bytes(t, optimizer), t.name))


def auto_cache_rows(features: Sequence[FeatureSpec], config: OffloadConfig, batch_size: int):
  """`rows_of(table)`: the cache `OffloadConfig.auto` gives a table it offloads.

  `auto_cache_fraction` of its rows, but at least the rows one step may need resident:
  this batch's and the next H batches' ids. (An eval batch that needs more is split,
  `eval_split`: any cache that takes a batch takes an example.)"""
  ids: dict[str, int] = {}
  for f in features:
    ids[f.table] = ids.get(f.table, 0) + f.max_len
  return lambda t: max(batch_size * (config.horizon + 1) * ids.get(t.name, 0),
                       int(t.rows * config.auto_cache_fraction))


def with_auto_offloaded(tables: Sequence[TableSpec], features: Sequence[FeatureSpec],
                        config: OffloadConfig, names: Sequence[str], batch_size: int
                        ) -> OffloadConfig:
  """`config` with the tables `names` offloaded as `OffloadConfig.auto` offloads them (in
  `auto_added`), where auto may offload them (`auto_candidates`; not those `config` lists,
  nor those gone or renamed). E.g. the tables `OffloadConfig.auto` offloaded in a resumed
  checkpoint (its meta), so that its recorded plan, made over their caches, is checked over
  the same ones without a planner search; the others stay on the device."""
  rows_of = auto_cache_rows(features, config, batch_size)
  for t in tables:
    if t.name in names and _may_auto_offload(t, config, rows_of):
      config = _auto_offload(config, t, rows_of)
  return config


def _passed_over(tables: Sequence[TableSpec], config: OffloadConfig, rows_of) -> str:
  """Why `auto` offloaded no more: the tables it may not take (its error said only
  `OffloadConfig.auto=True`, where every table was int8)."""
  free = [t for t in tables if config.table(t.name) is None]
  int8 = [t.name for t in free if t.dtype not in OFFLOAD_DTYPES]
  small = [t.name for t in free if t.dtype in OFFLOAD_DTYPES and rows_of(t) >= t.rows / 2]
  why = ([f"{some(int8)} {'is' if len(int8) == 1 else 'are'} int8, which cannot be "
          "offloaded (store them as bfloat16/float16)"] if int8 else []) + (
      [f"{some(small)}: a cache would hold half their rows or more"] if small else [])
  return f" (it passes over the rest: {'; '.join(why)})" if why else ""


def _may_auto_offload(table: TableSpec, config: OffloadConfig, rows_of) -> bool:
  return (config.table(table.name) is None and table.dtype in OFFLOAD_DTYPES
          and rows_of(table) < table.rows / 2)


def _auto_offload(config: OffloadConfig, table: TableSpec, rows_of) -> OffloadConfig:
  return dataclasses.replace(
      config, tables=config.tables + (OffloadTable(table.name, cache_rows=rows_of(table)),),
      auto_added=config.auto_added + (table.name,))


def with_offload_notes(result, tables: Sequence[TableSpec], config: OffloadConfig, optimizer):
  """`result` (a `PlanResult`) with a note per offloaded table: its cache size, the
  store's size and the tier's host memory (`host_bytes`; the plan's memory is the
  devices'), and whether `OffloadConfig.auto` offloaded it (`config.auto_added`)."""
  auto = " (added by OffloadConfig.auto: the tables did not fit)"
  notes = []
  for o in config.tables:
    spec = _spec(tables, o.name)
    host = host_bytes([spec], dataclasses.replace(config, tables=(o,)), optimizer)
    buffer = config.buffer_rows(spec) * (row_bytes(spec, optimizer) + BUFFER_ROW_BYTES)
    notes.append(f"offloaded '{o.name}': {o.resolve_cache_rows(spec, optimizer):,}-row "
                 f"device cache, full table in tensorstore ("
                 f"{format_bytes(spec.rows * row_bytes(spec, optimizer))} with its optimizer "
                 f"state, {'in host memory' if o.kvstore == 'memory' else 'on disk'}; the "
                 f"tier keeps ~{format_bytes(host)} in host memory, {format_bytes(buffer)} of "
                 f"it the write-back buffer's {config.buffer_rows(spec):,} rows)"
                 + (auto if o.name in config.auto_added else ""))
  # the stats table's row of an offloaded table shows its cache's rows: said on that row
  # (only the notes below the table said it was not the table)
  whole = {o.name: _spec(tables, o.name).rows for o in config.tables}
  marked = tuple(dataclasses.replace(t, reason=f"offloaded cache of its {whole[t.name]:,} "
                                               f"rows; {t.reason}")
                 if t.name in whole else t for t in result.tables)
  return dataclasses.replace(result, tables=marked,
                             notes=tuple(result.notes) + tuple(notes),
                             auto_offloaded=tuple(config.auto_added))


def _caches(tables: Sequence[TableSpec], config: OffloadConfig, optimizer) -> str:
  """`'t0' (cache of 200,000 of its 2,000,000 rows), ...`, or `none`: the planner's
  errors name an offloaded table by its cache's rows."""
  return ", ".join(
      f"'{o.name}' (cache of {o.resolve_cache_rows(_spec(tables, o.name), optimizer):,} of "
      f"its {_spec(tables, o.name).rows:,} rows)" for o in config.tables) or "none"


def _smaller(config: OffloadConfig) -> str:
  """What shrinks the caches `auto` gave when even they do not fit (it does not shrink them
  itself: a cache below H+1 batches' rows could not run a step)."""
  if not config.auto_added:
    return ""
  return (f"; the caches auto gave {', '.join(repr(n) for n in config.auto_added)} hold "
          f"OffloadConfig.auto_cache_fraction={config.auto_cache_fraction:g} of their rows: "
          "lower it, or raise --memory_per_device")


def _spec(tables: Sequence[TableSpec], name: str) -> TableSpec:
  return next(t for t in tables if t.name == name)
