"""The sparse optimizer that a run resuming a `--format=checkpoint` copy stacks its tables
with, for the layout the copy prints (`copy_layout`).

Tables of different optimizers never share a stack (`..._o<g>` stacks,
`layout.build_layouts`), so a layout printed without the optimizer showed fewer stacks
than the run builds. It is rebuilt as `ExperimentConfig.sparse_tx` builds it
(`sparse_optimizer`, SGD when unbound, and `table_optimizers`) from a gin config: the files
and bindings given (`--gin_file`, `--gin_bindings`: the config the resuming run takes),
else the operative config that the checkpoint's run recorded in its meta item (`gin`).
Gin's global configuration is as it was afterwards.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin

from jaxrec import gin_usage
from jaxrec.embedding import optimizers as optimizers_lib
from jaxrec.errors import ConfigError

GIVEN = "--gin_file/--gin_bindings"
RECORDED = "the config the checkpoint's run recorded (its meta's gin)"


def resolve(meta: Mapping, tables: Sequence[str], gin_files: Sequence[str] = (),
            gin_bindings: Sequence[str] = ()) -> tuple[Any, str]:
  """`(optimizer, where it came from)` for the checkpoint's `tables` (names): from the gin
  files and bindings given (their errors are `ConfigError`s), else from the checkpoint's
  meta item `meta`. Optimizer None (one for every table) where neither holds a config or
  the recorded one does not read here; the text then says so."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  if gin_files or gin_bindings:
    with gin_usage.isolated():
      launch.parse_gin(gin_files, gin_bindings)
      try:
        return _sparse_tx(tables), GIVEN
      except ConfigError as e:   # where the bad binding was written, as train.py says it
        raise ConfigError(launch.user_message(e)) from None
  text = meta.get("gin")
  if not isinstance(text, str) or not text.strip():
    return None, (f"none recorded (no gin config in the checkpoint's meta: an import or an "
                  f"older run), so one optimizer for every table; give the resuming run's "
                  f"{GIVEN} for the stacks of its ExperimentConfig.table_optimizers")
  try:
    with gin_usage.isolated():
      import jaxrec.configurables  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      gin.parse_config(text, skip_unknown=True)
      return _sparse_tx(tables), RECORDED
  except Exception as e:  # pylint: disable=broad-except  (any gin or configurable error)
    why = " ".join(str(e).split())[:200] or type(e).__name__
    return None, (f"the config the checkpoint's run recorded does not read here ({why}), so "
                  f"one optimizer for every table; give the resuming run's {GIVEN}")


def describe(optimizer, source: str, manifest: Mapping) -> str:
  """Lines naming the sparse optimizer(s) of the printed stacks and where they came from:
  the default's (stacks without a suffix), then each `_o<g>` family's with its tables (each
  table's own optimizer where a family's tables differ in rate; overridden tables of the
  default's family, at rates of their own, in its stacks).
  Without one, whether the checkpoint's tables hold different optimizer states (`manifest`
  `tables[t].opt`): then the run that saved it had optimizers per table."""
  if optimizer is None:
    line = f"sparse optimizer: {source}"
    states = {}
    for name, t in sorted(manifest["tables"].items()):
      states.setdefault(", ".join(t.get("opt") or ()) or "none", []).append(name)
    if len(states) > 1:
      held = "; ".join(f"{', '.join(names)}: {s}" for s, names in states.items())
      line += (f" (its tables hold different optimizer states, {held}: the run that saved "
               "it had ExperimentConfig.table_optimizers, whose stacks are not shown)")
    return line
  lines = [f"sparse optimizer from {source}: {optimizers_lib.distinct(optimizer)[0]}"]
  if isinstance(optimizer, optimizers_lib.TableOptimizers):
    for g, members in optimizer.overrides_by_group().items():   # g: the stacks' suffix
      head = f"_o{g} stacks" if g else "the default's stacks also hold"
      if g and len({opt for _, opt in members}) == 1:
        lines.append(f"  {head}: {members[0][1]} (tables {', '.join(t for t, _ in members)})")
      else:   # tables of one family at rates of their own share its stacks
        each = "; ".join(f"{t}: {opt}" for t, opt in members)
        lines.append(f"  {head}, each table at its own rate: {each}")
  return "\n".join(lines)


def given_run(gin_files: Sequence[str], gin_bindings: Sequence[str]
              ) -> tuple[int, dict[str, str]]:
  """`(ExperimentConfig.batch_size, {table: dtype})` of the resuming run's gin files and
  bindings: its batch (the default where they do not bind it) and its tables' dtypes ({}
  where they do not bind `ExperimentConfig.embedding`)."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  with gin_usage.isolated():
    launch.parse_gin(gin_files, gin_bindings)
    default = ExperimentConfig.__dataclass_fields__["batch_size"].default
    embedding = launch.bound_value("ExperimentConfig.embedding")
    tables = embedding[0] if isinstance(embedding, tuple) and embedding else ()
    return (launch.bound_value("ExperimentConfig.batch_size", default),
            {t.name: str(t.dtype) for t in tables if hasattr(t, "dtype")})


def _sparse_tx(tables: Sequence[str]):
  """`ExperimentConfig.sparse_tx()` of the parsed gin config, for `tables`."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib  # pylint: disable=import-outside-toplevel
  sparse = launch.bound_value("ExperimentConfig.sparse_optimizer")
  config_lib.check_sparse_optimizer(sparse)
  return config_lib.sparse_tx(sparse, launch.bound_value("ExperimentConfig.table_optimizers"),
                              tables)


