"""The stacks a `--format=checkpoint` copy lays out (checks and prints) for its `--mesh` and
`--plan`.

The tables are the checkpoint's, stacked apart by sparse optimizer as the resuming run
stacks them (`copy_optimizer`), and whole: an offloaded table's entry in the manifest is its
device cache (`cache_rows` rows), right only for a run that offloads it with the same
cache; its rows are those its meta's `offload.tables` records (the table in its offload
snapshot). So each offloaded table is laid out whole, as a run that keeps it on the device
holds it, and the description says so and what a run that offloads it holds instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from etils import epath

from jaxrec.checkpoint import compatible, copy_optimizer, dequantized as dequantized_lib
from jaxrec.checkpoint import storage
from jaxrec.checkpoint import tables as tables_lib
from jaxrec.embedding import layout as layout_lib
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import CheckpointError, ConfigError
from jaxrec.sharding.plan import (KINDS, Plan, format_mesh, load_plan_file, uniform_plan,
                                  warn_collapsed_kind)


def tables(meta: Mapping, manifest: Mapping) -> tuple[tuple[TableSpec, ...], dict[str, dict]]:
  """The checkpoint's tables, sorted by name, offloaded ones whole; and `{table: its
  meta's offload record}` (`rows`, `cache_rows`, ...) of the offloaded ones. `meta`: the
  checkpoint's meta item (`_meta`)."""
  offloaded = (meta.get("offload") or {}).get("tables") or {}
  offloaded = {n: v for n, v in offloaded.items() if isinstance(v, dict)}
  specs = []
  for name, t in sorted(manifest["tables"].items()):
    rows = offloaded.get(name, {}).get("rows")
    rows = rows if isinstance(rows, int) else t["rows"]
    specs.append(TableSpec(name, rows, t["dim"], t["dtype"]))
  return tuple(specs), offloaded


def describe(step_dir, manifest: Mapping, plan: str, mesh_shape: Mapping[str, int],
             gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()
             ) -> tuple[Plan, str]:
  """`(plan, description)`: `--plan` (`resolve_plan`) for the checkpoint's whole tables,
  and the stacks it lays out on `mesh_shape` (checking the plan fits it) with the sparse
  optimizers of the resuming run (`copy_optimizer.resolve`: from `gin_files` and
  `gin_bindings`, else the config the checkpoint records; tables of different optimizers
  stack apart, `..._o<g>`), a line saying where those came from, and a line per table
  offloaded when saved. A ConfigError when the resuming run could not build those stacks
  (`layout.stack_error`: a table no recorded feature reads placed unlike every read one, a
  table slice past int32 rows), before anything is written."""
  meta = _meta(step_dir)
  specs, offloaded = tables(meta, manifest)
  given = bool(gin_files or gin_bindings)   # the resuming run's config, else the recorded
  devices = math.prod(mesh_shape.values())
  batch, dtypes = (copy_optimizer.given_run(gin_files, gin_bindings) if given
                   else (meta.get("batch_size"), {}))
  stored = {t.name: t.dtype for t in specs}
  specs = tuple(_resumed_dtype(t, dtypes.get(t.name), str(step_dir)) for t in specs)
  widened = [f"'{t.name}' {stored[t.name]} → {t.dtype}" for t in specs
             if t.dtype != stored[t.name]]
  if isinstance(batch, int) and batch % devices:   # (the copy was written; its run refused)
    whose = "the resuming run (--gin_file/--gin_bindings)" if given else "the checkpoint's run"
    raise ConfigError(
        f"--mesh={format_mesh(mesh_shape)}: {whose} has ExperimentConfig.batch_size={batch}, "
        f"not divisible by its {devices} devices: a run resuming the copy with that batch "
        "would refuse the mesh")
  resolved = resolve_plan(plan, specs, mesh_shape)
  optimizer, source = copy_optimizer.resolve(meta, [t.name for t in specs], gin_files,
                                             gin_bindings)
  if optimizer is not None and given:
    compatible.check_resuming_optimizers(tables_lib.read_index(step_dir / storage.TABLES),
                                         [t.name for t in specs], optimizer, str(step_dir))
  layouts = layout_lib.build_layouts(specs, recorded_features(meta, specs), resolved,
                                     mesh_shape, optimizer)
  problem = layout_lib.stack_error(layouts)
  if problem:   # the resuming run's collection would refuse these stacks at its start
    raise ConfigError(f"--plan={plan} on --mesh={format_mesh(mesh_shape)}: {problem}")
  lines = [layout_lib.describe(layouts), copy_optimizer.describe(optimizer, source, manifest)]
  if widened:   # the stacks above are in the resuming run's dtypes; the copy keeps the stored
    lines.append(f"{len(widened)} table(s) laid out wider than stored, as the resuming run "
                 f"restores them (the copy keeps the stored values): {', '.join(widened)}")
  by_name = {t.name: t for t in specs}
  for name, t in sorted(offloaded.items()):
    cache = t.get("cache_rows")
    saved = f", a {cache:,}-row device cache" if isinstance(cache, int) else ""
    rows = by_name[name].rows
    lines.append(f"table '{name}' was offloaded when saved ({rows:,} rows{saved}): laid out "
                 "whole above, as a run that keeps it on the device holds it; a run that "
                 "offloads it holds only its cache in that stack (its own cache_rows)")
  return resolved, "\n".join(lines)


def _resumed_dtype(spec: TableSpec, configured: str | None, where: str) -> TableSpec:
  """`spec` (as stored) in the dtype the resuming run configures, when its restore takes
  it (widened, or int8 dequantised); a `ConfigError` when it refuses it, as the run's
  start did after the copy was written (a copy printed the stored dtype's stacks)."""
  if configured is None or configured == spec.dtype:
    return spec
  stored = spec.dtype
  takes = (configured in dequantized_lib.TARGETS if stored == "int8" else
           configured != "int8" and compatible.widens(stored, configured))
  if not takes:
    raise ConfigError(
        f"table '{spec.name}': checkpoint {where} stores it as {stored}; the resuming run "
        f"(--gin_file/--gin_bindings) configures {configured}, which its restore refuses "
        "(only widening, e.g. bfloat16 → float32, or int8 → float32 converts): configure "
        f"{stored} there (TableSpec.dtype, e.g. uniform_tables.dtype)")
  return dataclasses.replace(spec, dtype=configured)


def resolve_plan(plan: str, tables, mesh_shape: Mapping[str, int]) -> Plan:
  """`--plan`: a kind (`rw`, `tw`, ...) forced on every table, or a plan JSON file."""
  if plan in KINDS:   # placed as another kind on this mesh: said, as train.py says it
    warn_collapsed_kind(plan, mesh_shape)
    return uniform_plan(plan, tables, mesh_shape.get("table", 1))
  if plan == "auto":
    raise ConfigError("--plan=auto: write the plan with scripts/plan.py --json=PATH and pass "
                      "--plan=PATH")
  if not epath.Path(plan).exists():
    raise ConfigError(f"--plan: '{plan}' is neither a plan kind ({', '.join(KINDS)}) nor a "
                      "plan JSON file")
  # a bare plan, a run's plan.json or scripts/plan.py --json output (these record a mesh)
  loaded = load_plan_file(plan, mesh_shape)
  try:   # a plan of another config: the copy's run would drop it and re-plan
    loaded.check_tables([t.name for t in tables])
  except ConfigError as e:
    raise ConfigError(f"--plan={plan} does not match the checkpoint: {e}") from None
  return loaded


def recorded_features(meta: Mapping, specs) -> tuple[FeatureSpec, ...]:
  """The features the run recorded in the checkpoint's meta item `meta` (bag sizes decide
  its stacks); one one-hot feature per table for a checkpoint without them (older runs,
  imports): stacks of multi-hot features then print merged."""
  try:
    recorded = meta.get("features")
    features = tuple(FeatureSpec(**f) for f in recorded or ())
  except (TypeError, ValueError, AttributeError):
    features = ()
  names = {t.name for t in specs}
  if features and {f.table for f in features} <= names:
    return features
  return tuple(FeatureSpec(f"feature_{t.name}", t.name) for t in specs)


def _meta(step_dir) -> dict:
  """The checkpoint's meta item ({} when it does not read: the copy's checks name it)."""
  try:
    meta = storage.read_json(step_dir, storage.META)
  except (CheckpointError, OSError, ValueError):
    return {}
  return meta if isinstance(meta, dict) else {}
