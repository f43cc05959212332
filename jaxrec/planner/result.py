"""A proposed (or forced) plan with its estimates and reasons: the printable stats table and
its JSON form."""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

from jaxrec.planner.calibration import Calibration
from jaxrec.planner.cost_model import COST_TERMS, mesh_str
from jaxrec.sharding.plan import Plan


def format_bytes(n: float) -> str:
  """`1536` -> `1.5 KiB`."""
  n = float(n)
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} PiB"


def format_over(need: float, budget: float) -> str:
  """`need > budget` as `4.0 MiB > budget 3.9 MiB`; exact bytes when the rounded sizes read
  the same (`4,194,817 B > budget 4,194,304 B`, not `4.0 MiB > budget 4.0 MiB`)."""
  a, b = format_bytes(need), format_bytes(budget)
  if a == b:
    a, b = f"{int(need):,} B", f"{int(budget):,} B"
  return f"{a} > budget {b}"


def format_time(s: float) -> str:
  """Seconds as `12.3 us`, `1.23 ms` or `1.23 s`."""
  if abs(s) < 1e-3:
    return f"{s * 1e6:.1f} us"
  if abs(s) < 1:
    return f"{s * 1e3:.2f} ms"
  return f"{s:.2f} s"


@dataclasses.dataclass(frozen=True)
class TableReport:
  """One table in the plan.

  Attributes:
    memory: bytes of the table's own shard on each holding device: `table`, `optimizer`
      (stack padding, buffers and ids are in `PlanResult.memory`).
    time_s: the table's share of its stack's own estimated seconds (by features).
    terms: that share of the stack's cost terms.
    table_slice: index along `table`, or None when the kind does not use `table`.
  """

  name: str
  rows: int
  dim: int
  dtype: str
  kind: str
  table_slice: int | None
  holders: int
  shard_rows: int
  shard_cols: int
  memory: Mapping[str, int]
  time_s: float
  terms: Mapping[str, float]
  reason: str

  @property
  def memory_per_device(self) -> int:
    return int(sum(self.memory.values()))


@dataclasses.dataclass(frozen=True)
class SliceReport:
  """The devices of one `table` slice. Stacks pad every slice to their widest, so memory
  and time are the same on every slice; `tables` and `own_bytes` show the balance.

  Attributes:
    devices: device indices, row-major over (data, table, row, col).
    memory_bytes: bytes on each device (padded shards, buffers, ids).
    time_s: estimated step seconds on each device.
    terms: cost terms on each device, `collectives`, `stacks` and `const` included.
    tables: tables held on this slice by kinds split over `table`.
    own_bytes: those tables' shards and optimizer state, plus every table not split over
      `table` (what the slice would hold without padding).
  """

  table_slice: int
  devices: tuple[int, ...]
  memory_bytes: int
  time_s: float
  terms: Mapping[str, float]
  tables: tuple[str, ...] = ()
  own_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class StackReport:
  """One stack as the collection builds it (see `cost_model.StackCost`).

  Attributes:
    features, width, bag: F, W (features looked up per device), L.
    local_rows: rows of the (padded) shard on each device; buffer_rows: n.
    time_s: estimated seconds of the stack's own terms (its collectives group apart).
  """

  name: str
  kind: str
  tables: tuple[str, ...]
  features: int
  width: int
  bag: int
  local_rows: int
  buffer_rows: int
  dedup: bool
  replicas: int
  time_s: float
  terms: Mapping[str, float]
  memory: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class PlanResult:
  """What the planner proposes and why.

  Attributes:
    plan: the placements, ready for the trainer.
    mode: `auto` (searched) or the forced kind / `forced`.
    step_time_s: estimated step time (the same on every device).
    notes: plan-level remarks printed under the tables.
    stacks: the stacks the collection will build.
    memory: bytes per device by part (`table`, `optimizer`, `buffers`, `ids`).
    auto_offloaded: the tables `OffloadConfig.auto` offloaded (planned as their caches), so
      that the plan passed back (`--plan=W/plan.json`) offloads them again.
  """

  plan: Plan
  mesh_shape: Mapping[str, int]
  memory_per_device_bytes: int
  batch_size: int
  calibration: Calibration
  tables: tuple[TableReport, ...]
  slices: tuple[SliceReport, ...]
  step_time_s: float
  mode: str = "auto"
  notes: tuple[str, ...] = ()
  stacks: tuple[StackReport, ...] = ()
  memory: Mapping[str, int] = dataclasses.field(default_factory=dict)
  auto_offloaded: tuple[str, ...] = ()

  @property
  def num_devices(self) -> int:
    return sum(len(s.devices) for s in self.slices)

  @property
  def critical_terms(self) -> dict[str, float]:
    """Cost terms of a device (all alike): the features a profile fit regresses on."""
    return dict(self.slices[0].terms)

  def to_json(self) -> dict:
    """JSON-ready dict; `["plan"]` is `Plan.to_json()` (load with `Plan.from_json`)."""
    return {
        "plan": self.plan.to_json(),
        "mode": self.mode,
        "auto_offloaded": list(self.auto_offloaded),
        "mesh": dict(self.mesh_shape),
        "memory_per_device_bytes": int(self.memory_per_device_bytes),
        "batch_size": int(self.batch_size),
        "estimated_step_time_s": float(self.step_time_s),
        "calibration": self.calibration.to_json(),
        "tables": [dict(dataclasses.asdict(t), memory=dict(t.memory), terms=dict(t.terms),
                        memory_per_device=t.memory_per_device) for t in self.tables],
        "slices": [dict(dataclasses.asdict(s), devices=list(s.devices), terms=dict(s.terms),
                        tables=list(s.tables)) for s in self.slices],
        "stacks": [dict(dataclasses.asdict(s), tables=list(s.tables), terms=dict(s.terms),
                        memory=dict(s.memory)) for s in self.stacks],
        "memory_per_device": dict(self.memory),
        "notes": list(self.notes),
    }

  def dumps(self, **extra) -> str:
    """plan.json's text: `to_json()`, with the `extra` keys added (`step_memory.record`'s
    `steps`)."""
    return json.dumps(dict(self.to_json(), **extra), indent=2, sort_keys=True)

  def report(self, max_tables: int | None = None) -> str:
    """The stats table: per table placement, devices, memory, cost and why; per stack its
    padded width; per slice (devices) memory and estimated time. `max_tables`: list only
    that many tables (those using the most memory per device, in plan order) and notes,
    and say how many more (a run's log at start-up: 3,000 tables were 3,040 lines on every
    start, the warnings among them lost; `W/plan.json` holds them all)."""
    budget = self.memory_per_device_bytes
    lines = [
        f"Plan ({self.mode}) for {len(self.tables)} tables on mesh {mesh_str(self.mesh_shape)}"
        f" ({self.num_devices} device{'s' if self.num_devices != 1 else ''}), global batch "
        f"{self.batch_size}, budget "
        f"{format_bytes(budget)}/device",
        f"coefficients: {self.calibration.source}",
        "",
    ]
    head = ("table", "rows x dim", "kind", "slice", "devices", "shard", "mem/device",
            "est time", "why")
    rows = [head]
    shown = self.tables
    if max_tables is not None and len(shown) > max_tables:
      biggest = sorted(range(len(shown)), key=lambda i: -shown[i].memory_per_device)
      shown = [shown[i] for i in sorted(biggest[:max_tables])]
    for t in shown:
      rows.append((t.name, f"{t.rows:,} x {t.dim}", t.kind,
                   "-" if t.table_slice is None else str(t.table_slice), str(t.holders),
                   f"{t.shard_rows:,} x {t.shard_cols}", format_bytes(t.memory_per_device),
                   format_time(t.time_s), t.reason))
    lines += _columns(rows)
    if len(shown) < len(self.tables):
      rest = len(self.tables) - len(shown)
      lines.append(f"... and {rest:,} more table{'s' if rest > 1 else ''}, each using at most "
                   f"{format_bytes(min(t.memory_per_device for t in shown))}/device (the "
                   "run's W/plan.json holds every table; scripts/plan.py prints them all)")
    lines.append("")
    rows = [("stack", "tables", "features", "per device", "bag", "shard rows", "buffer",
             "est time")]
    for st in self.stacks:
      buffer = f"{st.buffer_rows:,}" + ("" if st.dedup else " (no dedup)")
      rows.append((st.name, str(len(st.tables)), str(st.features), str(st.width), str(st.bag),
                   f"{st.local_rows:,}", buffer, format_time(st.time_s)))
    lines += _columns(rows)
    lines.append("")
    rows = [("devices", "slice", "tables", "own", "memory", "of budget", "est time")]
    for s in self.slices:
      rows.append((_device_list(s.devices), str(s.table_slice), str(len(s.tables)),
                   format_bytes(s.own_bytes), format_bytes(s.memory_bytes),
                   f"{100.0 * s.memory_bytes / budget:.1f}%", format_time(s.time_s)))
    lines += _columns(rows)
    lines.append("")
    coef = dict(zip(COST_TERMS, self.calibration.vector()))
    top = sorted(((k, v * coef[k]) for k, v in self.critical_terms.items()),
                 key=lambda kv: -kv[1])
    parts = ", ".join(f"{k} {format_time(v)}" for k, v in top[:3] if v > 0)
    lines.append(f"estimated step time: {format_time(self.step_time_s)} on every device "
                 f"(largest terms: {parts or 'none'}); memory: " +
                 ", ".join(f"{k} {format_bytes(v)}" for k, v in self.memory.items()))
    notes = self.notes if max_tables is None else self.notes[:max_tables]
    lines += [f"note: {n}" for n in notes]
    if len(notes) < len(self.notes):
      lines.append(f"note: ... and {len(self.notes) - len(notes):,} more notes (in "
                   "W/plan.json)")
    return "\n".join(lines)


def _device_list(devices: tuple[int, ...], limit: int = 8) -> str:
  shown = ",".join(str(d) for d in devices[:limit])
  return shown + (f",... ({len(devices)})" if len(devices) > limit else "")


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
  """Left-aligned columns; the last column is not padded."""
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
  return ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows]
