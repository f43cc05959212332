"""Sharding plans: per table, which mesh axes split it. Plans are data, not classes.

Mesh axes are `('data', 'table', 'row', 'col')`. A placement kind names the axes that
split a table; every other axis holds replicas of it (data-parallel for that table):

  dp    replicated everywhere          tw    whole table on one `table` slice
  rw    rows split over `row`          cw    columns (dim) split over `col`
  twrw  one `table` slice, rows over `row`
  twcw  one `table` slice, columns over `col`
  grid  one `table` slice, rows over `row` and columns over `col`

Tables with the same dim, dtype and kind form one *stack* (see `embedding.layout`): they are
concatenated row-wise per `table` slice and looked up by one fused operation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import logging
import numbers
import os
from typing import Callable, Iterator, Mapping, Sequence

from jaxrec.errors import ConfigError, close_to, in_order, some

MESH_AXES = ("data", "table", "row", "col")

KIND_AXES: dict[str, tuple[str, ...]] = {
    "dp": (),
    "tw": ("table",),
    "rw": ("row",),
    "cw": ("col",),
    "twrw": ("table", "row"),
    "twcw": ("table", "col"),
    "grid": ("table", "row", "col"),
}
KINDS = tuple(KIND_AXES)


@dataclasses.dataclass(frozen=True)
class TablePlacement:
  """Where one table lives.

  Attributes:
    kind: one of `KINDS`.
    table_slice: index along the `table` axis that holds the table (kinds using `table`);
      ignored otherwise.
  """

  kind: str
  table_slice: int = 0

  def __post_init__(self):
    if not isinstance(self.kind, str) or self.kind not in KIND_AXES:   # a list: unhashable
      raise ConfigError(f"unknown placement kind {self.kind!r} (known: {', '.join(KINDS)})")
    if isinstance(self.table_slice, bool) or not isinstance(self.table_slice, numbers.Integral):
      raise ConfigError(f"table_slice must be an integer, got {self.table_slice!r}")
    object.__setattr__(self, "table_slice", int(self.table_slice))

  @property
  def axes(self) -> tuple[str, ...]:
    return KIND_AXES[self.kind]


class PlanTablesError(ConfigError):
  """A plan whose tables are not the config's (`Plan.check_tables`): the same on every
  mesh, so a plan file's error says it once, without the other-mesh note."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """Placement of every table, by table name."""

  placements: Mapping[str, TablePlacement]

  def __getitem__(self, table: str) -> TablePlacement:
    try:
      return self.placements[table]
    except KeyError:
      raise ConfigError(f"plan has no placement for table '{table}'") from None

  def check_tables(self, names: Sequence[str], allow_unknown: bool = False) -> None:
    """ConfigError naming the tables of `names` without a placement and (unless
    `allow_unknown`) the placed tables not in `names`; the first few of each and a count."""
    unknown = [] if allow_unknown else in_order(set(self.placements) - set(names))
    missing = [n for n in names if n not in self.placements]
    parts = []
    if unknown:
      parts.append(f"names unknown tables [{some(unknown)}] (tables: [{some(list(names))}])")
    if len(missing) == 1:
      parts.append(f"has no placement for table '{missing[0]}'")
    elif missing:
      parts.append(f"has no placement for {len(missing)} tables: [{some(missing)}]")
    if parts:
      raise PlanTablesError("plan " + "; it ".join(parts))

  def to_json(self) -> dict:
    return {name: dataclasses.asdict(p) for name, p in sorted(self.placements.items())}

  @classmethod
  def from_json(cls, obj: Mapping[str, Mapping]) -> "Plan":
    placements = {}
    fields = [f.name for f in dataclasses.fields(TablePlacement)]
    for name, p in obj.items():
      unknown = sorted(set(p) - set(fields)) if isinstance(p, Mapping) else []
      if unknown:
        raise ConfigError(f"table '{name}': unknown placement field(s) {unknown} (fields: "
                          f"{', '.join(fields)})")
      if isinstance(p, Mapping) and "kind" not in p:
        raise ConfigError(f"table '{name}': no \"kind\" (kinds: {', '.join(KINDS)})")
      try:
        placements[name] = TablePlacement(**p)
      except ConfigError as e:
        raise ConfigError(f"{e} (table '{name}')") from None
    return cls(placements)

  def dumps(self) -> str:
    return json.dumps(self.to_json(), indent=2, sort_keys=True)

  @classmethod
  def load(cls, path: str) -> "Plan":
    """A plan from a JSON file: a run's `W/plan.json`, `scripts/plan.py --json` output (both
    hold it under `"plan"`; with `--profile`, the proposed one under `"proposed"`), or a
    bare `{table: {"kind": ..., "table_slice": ...}}`."""
    return cls.load_with_mesh(path)[0]

  @classmethod
  def load_with_mesh(cls, path: str) -> tuple["Plan", dict[str, int] | None]:
    """`load`, and the mesh the file was made for (a run's `plan.json` and `scripts/plan.py
    --json` record it under `"mesh"`; all four axes), None for a bare plan."""
    return cls._load(path)[:2]

  @classmethod
  def _load(cls, path: str) -> tuple["Plan", dict[str, int] | None, dict[str, tuple]]:
    """`load_with_mesh`, and the `(rows, dim)` the file records for its tables (a run's
    `plan.json` and `scripts/plan.py --json` list them under `"tables"`; {} for a bare
    plan), read from the one parse of the file."""
    try:
      with open(path, encoding="utf-8") as f:
        obj = json.load(f, object_pairs_hook=_unique_keys)
    except OSError as e:
      raise ConfigError(f"--plan: cannot read '{path}': {e.strerror}") from None
    except UnicodeDecodeError as e:   # a binary or Latin-1 file was a traceback
      raise ConfigError(f"--plan: {path}: not a JSON text file (byte {e.start} is not UTF-8)"
                        ) from None
    except json.JSONDecodeError as e:
      raise ConfigError(f"--plan: {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except ConfigError as e:
      raise ConfigError(f"--plan: {path}: {e}") from None
    mesh = None
    if isinstance(obj, dict) and isinstance(obj.get("proposed"), dict):
      obj = obj["proposed"]       # `scripts/plan.py --profile --json`: the plan it proposes
    recorded = obj.get("tables") if isinstance(obj, dict) else None
    sizes = {t.get("name"): (t.get("rows"), t.get("dim")) for t in recorded
             if isinstance(t, dict)} if isinstance(recorded, list) else {}
    if isinstance(obj, dict) and isinstance(obj.get("plan"), dict):
      problem = mesh_problem(obj["mesh"]) if "mesh" in obj else None
      if problem:   # a hand edit's typo was taken as no mesh
        raise ConfigError(f"--plan: {path}: \"mesh\" {json.dumps(obj['mesh'])}: {problem}")
      mesh = stored_mesh(obj.get("mesh"))
      obj = obj["plan"]
    if not isinstance(obj, dict) or not all(isinstance(p, dict) for p in obj.values()):
      raise ConfigError(f"--plan: {path}: expected {{table: {{\"kind\": ..., \"table_slice\": "
                        "...}} or a plan.json holding one under \"plan\"")
    try:
      return cls.from_json(obj), mesh, sizes
    except TypeError as e:
      raise ConfigError(f"--plan: {path}: {e}") from None
    except ConfigError as e:
      raise ConfigError(f"--plan: {path}: {e}") from None


def stored_mesh(stored) -> dict[str, int] | None:
  """A recorded mesh (a plan file's `"mesh"`, a checkpoint's `saved_mesh`) with all four
  axes; None when it is absent or damaged (`mesh_problem`) rather than a guess
  (`{"tabel": 4}` was one device, `{"data": 2.5}` data=2) that `--mesh=auto` and
  `scripts/plan.py` use."""
  if mesh_problem(stored) is not None:
    return None
  return {a: int(stored.get(a, 1)) for a in MESH_AXES}


def mesh_problem(stored) -> str | None:
  """Why a recorded mesh `stored` does not read (not an object, an unknown axis, a size
  that is not a positive integer), for an error naming the field; None when it reads."""
  if not isinstance(stored, dict):
    return "expected an object of axis sizes, e.g. {\"row\": 8}"
  unknown = [a for a in stored if a not in MESH_AXES]
  if unknown:
    return f"unknown axes {unknown} (axes: {', '.join(MESH_AXES)})"
  bad = [a for a, v in stored.items()
         if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1)]
  return (f"axis '{bad[0]}': size {json.dumps(stored[bad[0]])} is not a positive integer"
          if bad else None)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
  """A JSON object, refusing a key given twice (json keeps the last one silently: a table
  listed twice in a hand-edited plan lost its first placement)."""
  out = {}
  for key, value in pairs:
    if key in out:
      raise ConfigError(f"key '{key}' appears twice in one object (each table once)")
    out[key] = value
  return out


def format_mesh(shape: Mapping[str, int]) -> str:
  """`data=2,table=1,row=4,col=1` (absent axes are 1)."""
  return ",".join(f"{a}={shape.get(a, 1)}" for a in MESH_AXES)


def load_plan_file(path: str, mesh_shape: Mapping[str, int], fix: str = "",
                   tables: Sequence = ()) -> Plan:
  """`Plan.load`, with a warning when the file records another mesh than `mesh_shape` (its
  placements are kept where they fit; `fix` ends the warning, e.g. how to re-plan), and
  one when it records other sizes for `tables` (as the collection sees them). The mesh
  warning is logged once per process, and inside `mesh_warning_held` only for the mesh
  finally chosen."""
  plan, made_for, sizes = Plan._load(path)   # pylint: disable=protected-access
  here = _all_axes(mesh_shape)
  if made_for is not None and made_for != here:
    message = (f"--plan={path} was made for mesh {format_mesh(made_for)}, the mesh here is "
               f"{format_mesh(here)}: its placements are kept where they fit, but may be "
               f"unbalanced here{fix}")
    warn_for_mesh(message, here)
  for (kind, same), names in collapsed_placements(plan, here).items():
    warn_for_mesh(f"--plan={path}: tables [{some(names)}] ({kind}) split over "
                  f"{_axes_text(KIND_AXES[kind])}, of size 1 in mesh {format_mesh(here)}: "
                  f"they are placed as {same} here{fix}", here)
  _warn_other_sizes(path, sizes, tables, fix)
  return plan


def _warn_other_sizes(path: str, sizes: Mapping[str, tuple], tables: Sequence,
                      fix: str) -> None:
  """Warns when plan file `path` records other sizes (`sizes`: `rows x dim`) for tables of
  `tables` than they have here: a plan of another config whose tables have the same names
  was taken without a word, its placements chosen for tables of other sizes. Offloaded
  tables are compared as their caches (`tables` as the collection sees them)."""
  changed = [f"{t.name} {sizes[t.name][0]:,} x {sizes[t.name][1]} there, {t.rows:,} x {t.dim} "
             "here" for t in tables if t.name in sizes
             and all(isinstance(v, int) for v in sizes[t.name])
             and sizes[t.name] != (t.rows, t.dim)]
  if changed:
    more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
    warn_once(f"--plan={path} was made for tables of other sizes ({'; '.join(changed[:3])}"
              f"{more}): its placements are kept, but were chosen for those sizes{fix}")


def collapsed_placements(plan: "Plan", mesh_shape: Mapping[str, int]
                         ) -> dict[tuple[str, str], list[str]]:
  """`{(kind, placed as): [tables]}`: the placements of `plan` that split over axes of
  size 1 in `mesh_shape` of several devices, and so place their tables as another kind
  (`placed_as`; a file's `rw` on `data=8` holds every table whole on every device)."""
  if math.prod(int(mesh_shape.get(a, 1)) for a in MESH_AXES) == 1:
    return {}
  out: dict[tuple[str, str], list[str]] = {}
  for name, p in plan.placements.items():
    same = placed_as(p.kind, mesh_shape)
    if same is not None:
      out.setdefault((p.kind, same), []).append(name)
  return out


def plan_file_mesh_note(path: str, mesh_shape: Mapping[str, int]) -> str:
  """For an error with plan file `path` on `mesh_shape`: the mesh the file was made for,
  when it is another (its placements may not fit this one), and what to do; else ""."""
  made_for, here = Plan.load_with_mesh(path)[1], _all_axes(mesh_shape)
  if made_for is None or made_for == here:
    return ""
  return (f" (the file was made for mesh {format_mesh(made_for)}, "
          f"{math.prod(made_for.values())} devices; the mesh here is {format_mesh(here)}: "
          "run it on that mesh, or give --plan=auto to plan for this one)")


def _all_axes(mesh_shape: Mapping[str, int]) -> dict[str, int]:
  """`mesh_shape` with all four axes (absent ones 1)."""
  return {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}


def warn_for_mesh(message: str, shape: Mapping[str, int]) -> None:
  """`warn_once(message)`, a warning about planning on mesh `shape`; inside
  `mesh_warning_held`, held until that mesh is the one taken."""
  held = _HELD.get()
  if held is None:
    warn_once(message)
  else:
    held.setdefault(format_mesh(shape), []).append(message)


# Other-mesh warnings of the meshes tried so far (`mesh_warning_held`), and the warnings
# `warn_once` logged.
_HELD: contextvars.ContextVar[dict[str, list[str]] | None] = contextvars.ContextVar(
    "held_plan_warnings", default=None)
_WARNED: set[str] = set()


def warn_once(message: str, logger: logging.Logger | None = None) -> None:
  """Logs warning `message` (to `logger`, default this module's) unless this process
  already did: for warnings about the run's inputs that re-planning repeats (`--mesh=auto`,
  each elastic generation and process count)."""
  if message not in _WARNED:
    _WARNED.add(message)
    (logger or logging.getLogger(__name__)).warning("%s", message)


@contextlib.contextmanager
def mesh_warning_held() -> Iterator[Callable[[Mapping[str, int]], None]]:
  """While several meshes are tried (`--mesh=auto`, each elastic re-plan), holds
  `warn_for_mesh`'s warnings (a plan file's other mesh, a forced kind placed as another);
  yields `chosen(shape)`, which logs the one for
  the mesh taken (the others are dropped)."""
  held: dict[str, list[str]] = {}
  token = _HELD.set(held)
  try:
    yield lambda shape: [warn_once(m) for m in held.get(format_mesh(shape), [])]
  finally:
    _HELD.reset(token)


def is_plan_file(plan: str) -> bool:
  """Whether a `--plan` value names a JSON file rather than `auto` or a kind: a name ending
  in `.json` or holding a `/`, or an existing file (`cp W/plan.json smallplan`: scripts
  told it apart three ways). `auto` and the kinds stay themselves even as file names."""
  if plan == "auto" or plan in KIND_AXES:
    return False
  return plan.endswith(".json") or "/" in plan or os.path.isfile(plan)


def recorded_mesh(plan: str) -> dict[str, int] | None:
  """The mesh the file a `--plan` value names records (all four axes, each a positive
  integer); None for `auto`, a kind, a bare plan or a damaged `"mesh"`."""
  return Plan.load_with_mesh(plan)[1] if is_plan_file(plan) else None


def check_plan_flag(plan: str) -> None:
  """ConfigError unless `--plan` is `auto`, a kind, or a plan file that loads (before any
  planning, which would otherwise fail on every mesh)."""
  if is_plan_file(plan):
    Plan.load_with_mesh(plan)
  elif plan != "auto" and plan not in KINDS:
    hint = close_to(plan.lower(), ("auto", *KINDS))   # `TW`: the kinds are lower case
    raise ConfigError(f"--plan: unknown plan '{plan}' (known: auto, {', '.join(KINDS)}, or a "
                      f"plan .json file){hint}")


def warn_collapsed_kind(kind: str, mesh_shape: Mapping[str, int]) -> None:
  """Warns (once) when `--plan=kind`, forced, places tables as another kind on this mesh
  of several devices: the axes it splits over that have size 1 split nothing (`cw` on
  `data=8` holds every table whole on every device, as `dp`; `twrw` on `table=8` is `tw`,
  and so on 2 devices, where no mesh splits both). Plans compared on such a mesh were one
  plan under two names."""
  n = math.prod(int(mesh_shape.get(a, 1)) for a in MESH_AXES)
  same = placed_as(kind, mesh_shape)
  if n == 1 or same is None:
    return
  axes = KIND_AXES[kind]
  split = [a for a in axes if mesh_shape.get(a, 1) > 1]
  ones = [a for a in axes if a not in split]
  which = (("which is" if len(ones) == 1 else "which are all") if ones == list(axes) else
           f"and {_axes_text(ones)} {'is' if len(ones) == 1 else 'are'}")
  how = ("whole on every device" if same == "dp" else
         "each whole on one slice of axis table" if same == "tw" else
         f"split over {_axes_text(split)}")
  example = kind_mesh(kind, n)
  fix = (f"; for {kind} give e.g. --mesh={','.join(f'{a}={v}' for a, v in example.items())}"
         if example else f"; no mesh of {n} devices splits all of {_axes_text(axes)[5:]}")
  warn_for_mesh(f"--plan={kind} splits tables over {_axes_text(axes)}, {which} 1 in mesh "
                f"{format_mesh(mesh_shape)}: the tables are placed as --plan={same} ({how})"
                + fix, mesh_shape)


def placed_as(kind: str, mesh_shape: Mapping[str, int]) -> str | None:
  """The other kind that splits over exactly the axes of size > 1 that `kind` splits over
  on this mesh, which therefore places tables as `kind` does (`twrw` on `table=1` is `rw`,
  `cw` on `data=8` is `dp`); None when no other kind does (`grid` on `table=1` is the only
  row x column split)."""
  split = {a for a in KIND_AXES[kind] if mesh_shape.get(a, 1) > 1}
  return next((k for k, axes in KIND_AXES.items() if k != kind and set(axes) == split), None)


def kind_mesh(kind: str, n: int) -> dict[str, int] | None:
  """The axes of a mesh of `n` devices that places `kind` as itself: all on its one axis;
  for several, the smallest factor of what is left on each but the last, which takes the
  rest (`twrw` on 8: `table=2,row=4`, on 9 `table=3,row=3`; `grid` on 4, too few for
  three axes: `row=2,col=2`, grid on `table=1`); None for `dp` and where `n` allows none
  (`twrw` on 2 or 7). `--mesh=auto`'s mesh for a forced kind."""
  axes = KIND_AXES[kind]
  if len(axes) == 1:
    return {axes[0]: n}
  for split in (axes, ("row", "col") if kind == "grid" else ()):
    sizes, left = {}, n
    for a in split[:-1]:
      sizes[a] = next((f for f in range(2, left + 1) if left % f == 0), 1)
      left //= sizes[a]
    if split and left >= 2 and all(v >= 2 for v in sizes.values()):
      return sizes | {split[-1]: left}
  return None


def _axes_text(axes: Sequence[str]) -> str:
  """`axis row`, `axes table and row`, `axes table, row and col`."""
  if len(axes) == 1:
    return f"axis {axes[0]}"
  return f"axes {', '.join(axes[:-1])} and {axes[-1]}"


def uniform_plan(kind: str, tables: Sequence, table_axis_size: int) -> Plan:
  """Forces `kind` on every table; table-wise kinds spread tables over `table` slices,
  biggest first onto the least-loaded slice (greedy balance by rows x dim)."""
  if kind not in KIND_AXES:
    raise ConfigError(f"--plan: unknown plan '{kind}' (known: auto, {', '.join(KINDS)})")
  load = [0] * max(1, table_axis_size)
  placements = {}
  for t in sorted(tables, key=lambda t: (-t.rows * t.dim, t.name)):
    if "table" in KIND_AXES[kind]:
      s = min(range(len(load)), key=lambda i: (load[i], i))
      load[s] += t.rows * t.dim
    else:
      s = 0
    placements[t.name] = TablePlacement(kind, s)
  return Plan(placements)
