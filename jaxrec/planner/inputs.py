"""Planner inputs from flags and gin: mesh spec, `--tables` spec, tables bound in gin."""

from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
from typing import Any, Mapping

from jaxrec.embedding.specs import FeatureSpec, TableSpec, is_whole, uniform_tables
from jaxrec.errors import ConfigError
from jaxrec.planner import cost_model as cm
from jaxrec.planner.cost_model import TableStats


def parse_mesh(spec: str, num_devices: int | None = None, flag: str = "--mesh"
               ) -> dict[str, int]:
  """`data=2,table=2,row=2,col=1` -> axis sizes (absent axes 1). `num_devices=None` plans
  for the mesh as written (any device count); otherwise the product must match."""
  from jaxrec.sharding.mesh import parse_mesh_spec  # pylint: disable=import-outside-toplevel
  if not spec or spec.strip() == "auto":
    raise ConfigError(f"{flag}: give axis sizes to plan for, e.g. data=2,table=2,row=2,col=1")
  if num_devices is None:
    try:
      num_devices = math.prod(int(p.partition("=")[2]) for p in spec.split(",") if p.strip())
    except ValueError:
      num_devices = 0  # parse_mesh_spec names the bad part
  return parse_mesh_spec(spec, num_devices, flag)


def parse_optimizer(value: str, flag: str = "--optimizer") -> str | float:
  """An optimizer name of `cost_model.OPTIMIZER_STATES` (normalised) or a finite factor
  >= 0 of the table size (`cost_model.optimizer_state` checks it); `ConfigError` naming
  `flag` otherwise (an empty value too)."""
  if not value.strip():
    raise ConfigError(f"{flag}: empty; give {', '.join(cm.OPTIMIZER_STATES)} or a factor of "
                      "the table size (e.g. 1)")
  try:
    cm.optimizer_state(value)
  except ConfigError as e:
    raise ConfigError(f"{flag}: {e}") from None
  key = cm.optimizer_key(value)
  return key if key in cm.OPTIMIZER_STATES else float(value.strip())


@dataclasses.dataclass(frozen=True)
class PlannerInputs:
  """Tables and what else a config says that the planner uses (None: not given).
  `optimizer`: `ExperimentConfig.sparse_optimizer`; `table_optimizers`:
  `ExperimentConfig.table_optimizers` (`{table: optimizer}`, checked); `planned_optimizer`
  puts them together."""

  tables: tuple[TableSpec, ...]
  features: tuple[FeatureSpec, ...]
  table_stats: dict[str, TableStats] = dataclasses.field(default_factory=dict)
  batch_size: int | None = None
  optimizer: Any = None
  eval_batch_size: int | None = None
  table_optimizers: Mapping[str, Any] | None = None


def planned_optimizer(spec: PlannerInputs, flag_value: str | None = None,
                      flag: str = "--optimizer"):
  """The sparse optimizer to plan with: `flag_value` (`--optimizer`, see `parse_optimizer`)
  if given, else `spec.optimizer` (unbound: `sgd`), for every table but those
  `spec.table_optimizers` names, which keep their own (`--optimizer` replaces the default
  only). With such tables the result is an `optimizers.TableOptimizers` whose default is
  what the trainer would hold: unbound `SGD()`, a name that optimizer with the
  hyperparameters gin binds to its class (e.g. `Adam.lr`), else its defaults (a named
  table whose optimizer equals it shares its stacks, as in the collection); a factor stays
  a factor (an optimizer no table has: stacks of its own). `inputs_from_gin` checked and
  expanded `spec.table_optimizers`; this is their one `optimizers.per_table`."""
  default = spec.optimizer if flag_value is None else parse_optimizer(flag_value, flag)
  if not spec.table_optimizers:
    return "sgd" if default is None else default
  from jaxrec.embedding import optimizers  # pylint: disable=import-outside-toplevel
  if default is None:
    default = optimizers.SGD()
  elif isinstance(default, str):
    default = optimizers.OPTIMIZERS[default]()
  return optimizers.per_table(default, spec.table_optimizers)


def _check_name(flag: str, part: str, name: str, seen) -> None:
  """`ConfigError` for an empty table name or one already in `seen`."""
  if not name.strip():
    raise ConfigError(f"{flag}: '{part}': the table name is empty (name:rows:dim)")
  if name in seen:
    raise ConfigError(f"{flag}: table '{name}' is given twice ('{seen[name]}', '{part}'); "
                      "table names must be unique")


def parse_tables_flag(spec: str, flag: str = "--tables") -> PlannerInputs:
  """`name:rows:dim[:pooling_factor[:zipf_alpha]],...`: one table per entry, read by one
  feature `f_<name>` whose `max_len` is the pooling factor rounded up (default 1)."""
  tables, features, stats, seen = [], [], {}, {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    fields = part.split(":")
    if not 3 <= len(fields) <= 5:
      raise ConfigError(f"{flag}: '{part}' is not name:rows:dim[:pooling_factor[:zipf_alpha]]")
    _check_name(flag, part, fields[0], seen)
    seen[fields[0]] = part
    try:
      rows, dim = float(fields[1]), int(fields[2])
      pf = float(fields[3]) if len(fields) > 3 and fields[3] else None
      alpha = float(fields[4]) if len(fields) > 4 and fields[4] else None
    except ValueError:
      raise ConfigError(f"{flag}: '{part}': rows, dim, pooling factor and zipf alpha must be "
                        "numbers") from None
    if not all(math.isfinite(v) for v in (rows, pf or 0, alpha or 0)):
      raise ConfigError(f"{flag}: '{part}': rows, pooling factor and zipf alpha must be "
                        "finite numbers")
    if rows != int(rows):
      raise ConfigError(f"{flag}: '{part}': rows must be a whole number, got {fields[1]}")
    rows = int(rows)
    name = fields[0]
    if pf is not None and pf < 0:   # 0, as `TableStats`: its features' bags are empty
      raise ConfigError(f"{flag}: '{part}': table '{name}': pooling factor must be >= 0 (0: "
                        f"its features' bags are empty), got {fields[3]}")
    if alpha is not None and alpha < 0:
      raise ConfigError(f"{flag}: '{part}': table '{name}': zipf alpha must be >= 0 (0: "
                        f"uniform), got {fields[4]}")
    try:   # rows 0, dim 0: TableSpec's message named the table, not the flag
      tables.append(TableSpec(name, rows, dim))
    except ConfigError as e:
      raise ConfigError(f"{flag}: '{part}': {e}") from None
    features.append(FeatureSpec(f"f_{name}", name, max(1, math.ceil(pf or 1))))
    if pf is not None or alpha is not None:
      stats[name] = TableStats(pf, alpha)
  if not tables:
    raise ConfigError(f"{flag}: no tables given")
  return PlannerInputs(tuple(tables), tuple(features), stats)


_UNSET = object()


def _query(name: str, default=None):
  """`launch.bound_value`: a binding with its `@fn()` references called (a missing binding
  of theirs: ConfigError), `default` when unbound."""
  from jaxrec.launch import bound_value  # pylint: disable=import-outside-toplevel
  return bound_value(name, default)


def inputs_from_gin() -> PlannerInputs:
  """Tables from the parsed gin config: `ExperimentConfig.embedding` (with its
  `batch_size`, `sparse_optimizer` and `table_optimizers`), else a bound `uniform_tables`,
  else macros
  `tables` (and `features`; default one one-hot feature per table) and `batch_size`; and
  `ExperimentConfig.eval_batch_size` (the trainer's default when unbound in a trainer's
  config, one binding `ExperimentConfig.embedding`; None in a planner-only one: no eval)."""
  from jaxrec.launch import build  # pylint: disable=import-outside-toplevel
  embedding, where = _query("ExperimentConfig.embedding"), "ExperimentConfig.embedding"
  if embedding is None and _query("uniform_tables.num_tables") is not None:
    embedding, where = build(uniform_tables), "uniform_tables"
  if embedding is None and _query("%tables") is not None:
    tables, where = _query("%tables"), "gin macros %tables and %features"
    if not isinstance(tables, (tuple, list)):
      embedding = tables
    elif len(tables) == 2 and not isinstance(tables[0], TableSpec):  # `@uniform_tables()`
      embedding = tables
    else:
      embedding = (tables, _query("%features") or
                   tuple(FeatureSpec(f"f_{t.name}", t.name) for t in tables
                         if isinstance(t, TableSpec)))
  if embedding is None:
    raise ConfigError("gin config binds no tables: expected ExperimentConfig.embedding, "
                      "uniform_tables.* or a macro `tables`")
  if (not isinstance(embedding, (tuple, list)) or len(embedding) != 2
      or not all(isinstance(x, (tuple, list)) for x in embedding)):   # was a raw TypeError
    raise ConfigError(f"{where} must give (tables, features), e.g. @uniform_tables(), got "
                      f"{reprlib.repr(embedding)}")
  tables, features = (tuple(x) for x in embedding)
  if not all(isinstance(t, TableSpec) for t in tables):
    raise ConfigError("gin tables must be TableSpec objects (e.g. @uniform_tables())")
  batch, batch_from = _query("ExperimentConfig.batch_size", _UNSET), "ExperimentConfig.batch_size"
  if batch is _UNSET:
    batch, batch_from = _query("%batch_size", _UNSET), "gin macro %batch_size"
  optimizer = _query("ExperimentConfig.sparse_optimizer")
  # as the trainer checks it: `@Adagrad` (the class) failed in `state_layout()` here
  from jaxrec.train.config import check_sparse_optimizer  # pylint: disable=import-outside-toplevel
  check_sparse_optimizer(optimizer)
  per_table = _table_optimizers(tables)
  eval_batch = _query("ExperimentConfig.eval_batch_size", _UNSET)
  if eval_batch is _UNSET and where == "ExperimentConfig.embedding":   # the trainer's default
    from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
    eval_batch = ExperimentConfig.eval_batch_size   # the dataclass field's default
  return PlannerInputs(tables, features, {},
                       None if batch is _UNSET else _batch_size(batch_from, batch), optimizer,
                       None if eval_batch is _UNSET else
                       _batch_size("ExperimentConfig.eval_batch_size", eval_batch), per_table)


def _table_optimizers(tables) -> dict | None:
  """`ExperimentConfig.table_optimizers`, checked and its patterns expanded as the trainer
  does (`optimizers.checked_overrides`): `{table: optimizer}`, None when unbound or empty.
  `planned_optimizer` makes them one `TableOptimizers` once the default is known."""
  from jaxrec.embedding import optimizers  # pylint: disable=import-outside-toplevel
  value = _query("ExperimentConfig.table_optimizers")
  checked = optimizers.checked_overrides(value, tables=[t.name for t in tables])
  return dict(sorted(checked.items())) if checked else None


def _batch_size(binding: str, value) -> int:
  """`value` checked as `ExperimentConfig` checks it: a positive integer, or a whole float
  (gin writes `1e3` as one; the trainer takes it, this refused it); `ConfigError` naming
  `binding` otherwise (None too)."""
  if is_whole(value, -math.inf):
    value = int(value)
  if not isinstance(value, numbers.Integral) or isinstance(value, bool):
    raise ConfigError(f"{binding} must be an integer, got {value!r}")
  if value <= 0:
    raise ConfigError(f"{binding} must be positive, got {value}")
  return int(value)
