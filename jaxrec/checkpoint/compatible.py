"""Whether a checkpoint's stored tables fit the configured ones (`check_compatible`).

A restore takes each table whole by name (`tables`): same rows and dim; a dtype equal or
exactly widened (`widens`: float16/bfloat16 → float32), or an int8 table read dequantised
into float32; never quantised or narrowed. Each table's sparse optimizer state must be the
state of its configured optimizer (`EmbeddingCollection.optimizer_of`: one for every
table, or per table); a table stored without any starts its state fresh (e.g. SGD then,
Adagrad now, or a TorchRec import), and other changes are refused, naming the table and
the optimizer its state is of.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxrec.checkpoint import dequantized as dequantized_lib
from jaxrec.checkpoint.tables import stored_arrays, table_arrays, table_name
from jaxrec.embedding import optimizers as optimizers_lib
from jaxrec.errors import ConfigError, counted, in_order, some

# jaxrec's logger: scripts/train.py shows its INFO lines (absl's only from WARNING up).
_LOG = logging.getLogger(__name__)


def widens(stored, configured) -> bool:
  """Whether a stored array of dtype `stored` restores exactly into `configured` (equal,
  or floating point made wider: float16/bfloat16 → float32, float32 → float64)."""
  stored, configured = jnp.dtype(stored), jnp.dtype(configured)
  return stored == configured or (
      jnp.issubdtype(stored, jnp.floating) and jnp.issubdtype(configured, jnp.floating)
      and bool(np.can_cast(stored, configured, "safe")))


def _fits(have, want) -> bool:
  """Stored `(shape, dtype)` restores into configured `(shape, dtype)`."""
  return have[0] == want[0] and widens(have[1], want[1])


def _stored_int8_for_float(theirs: Mapping, ours: Mapping, table: str) -> bool:
  """Whether the stored arrays (`theirs`) hold `table` as int8 parts of the shape of the
  configured float table (`ours`): it restores dequantised if that dtype can hold it."""
  name = table_name(table)
  return (set(ours) == {name} and dequantized_lib.is_quantized(theirs, name)
          and theirs[table_name(table, "q")][0] == ours[name][0])


def _refuse_quantizing(theirs: Mapping, ours: Mapping, spec, where: str) -> None:
  """ConfigError for a float table stored `[rows, dim]` that is configured int8 now: a
  restore never quantises (it would round every row), which the generic shape message
  did not say."""
  stored = theirs.get(table_name(spec.name))
  if spec.dtype == "int8" and stored is not None and stored[0] == (spec.rows, spec.dim):
    bound = _bound(spec, "dtype") or "TableSpec.dtype, e.g. uniform_tables.dtype"
    raise ConfigError(f"table '{spec.name}': checkpoint {where} stores it as {stored[1]} "
                      f"{list(stored[0])}, which a restore does not quantise to the configured "
                      f"int8 (only the other way, int8 → float32, converts); configure the "
                      f"table's dtype as {stored[1]} ({bound})")


def _bound(spec, field: str) -> str | None:
  """`binding, bound at FILE:LINE` of `spec.field` (`specs.bound_field`: a recorded
  binding, or the `embedding_tables` entry that built the spec, alone when gin recorded no
  line for it, e.g. called from Python); None when gin did not set it."""
  from jaxrec import gin_usage   # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import bound_field   # pylint: disable=import-outside-toplevel
  b = bound_field(spec, field)
  where = gin_usage.bound_where(b) if b else None
  return f"{b}, {where}" if where else b


def _shape_hint(theirs: Mapping, spec) -> str:
  """What to do about table `spec` whose stored rows or dim differ from the configuration:
  the bindings of the fields that differ where gin set them (they were only guessed:
  `uniform_tables.rows / .dim`, in a config of scoped TableSpecs)."""
  stored = theirs.get(table_name(spec.name)) or theirs.get(table_name(spec.name, "q"))
  shape = f"[{stored[0][0]}, {stored[0][1]}]" if stored and len(stored[0]) == 2 else "its shape"
  differ = ([f for f, n in zip(("rows", "dim"), stored[0]) if getattr(spec, f) != n]
            if stored and len(stored[0]) == 2 else ["rows", "dim"])
  bound = [b for f in differ if (b := _bound(spec, f))]
  where = "; ".join(bound) if bound else "e.g. uniform_tables.rows / .dim"
  return (f": a resume cannot change a table's rows or dim (no conversion does); configure "
          f"the checkpoint's {shape} ({where}), or start a fresh --workdir"
          + (_VOCAB_ROWS if "rows" in differ and _reads_a_vocab() else ""))


# A vocabulary rebuilt on the next day's data sizes the tables anew (its vocab.gin's rows):
# the refusal named only the rows to configure, which the new vocabulary does not fit
_VOCAB_ROWS = ("; this run reads ids through an id vocabulary (open_source.vocab), whose "
               "vocab.gin binds the rows: one rebuilt from other data has other sizes and "
               "renumbers the ids, so go on through the vocabulary the checkpoint was "
               "trained with (its vocab.gin)")


def _reads_a_vocab() -> bool:
  from jaxrec import launch   # pylint: disable=import-outside-toplevel
  return bool(launch.bound_value("open_source.vocab"))


def _saved_optimizer(have_opt: Mapping) -> list[str]:
  """Names of the optimizers whose state is one table's stored `table_opt/<t>/*` arrays."""
  stored = _state_kinds(have_opt)
  return [cls.__name__ for cls in optimizers_lib.OPTIMIZERS.values()
          if _layout_kinds(cls()) == stored]


def _layout_kinds(opt) -> dict[str, str]:
  """`{state name: 'element' | 'row'}` of sparse optimizer `opt` (`state_layout`)."""
  return {k: per for k, (per, _) in opt.state_layout().items()}


def _state_kinds(have_opt: Mapping) -> dict[str, str]:
  """`{state name: 'element' | 'row'}` of one table's stored `table_opt/<t>/*` arrays
  (`{name: (shape, dtype)}`), as optimizers' `state_layout` names them."""
  return {n.split("/", 2)[2]: "element" if len(s) == 2 else "row"
          for n, (s, _) in have_opt.items()}


def check_resuming_optimizers(index: Mapping, tables: Sequence[str], optimizer,
                              where: str) -> None:
  """ConfigError naming the first of `tables` whose sparse optimizer state in `index` (a
  checkpoint's, `read_index`) `optimizer` (one, or per table) would not restore: what a
  resuming run refuses (`check_compatible`), checked for a copy made for that run
  (`convert_checkpoint.py --gin_file`) before anything is written: the copy was written
  and the run then refused it. A table stored without state starts it fresh, as there.
  The state's names and kinds (per element, per row) are compared; its dtype is left to
  the run (`check_compatible`, which converts widening ones)."""
  stored = _by_table({n: (tuple(a["shape"]), a["dtype"]) for n, a in index["arrays"].items()})
  for name in tables:
    have = stored.get(("table_opt", name))
    opt = optimizers_lib.of(optimizer, name)
    if have and _state_kinds(have) != _layout_kinds(opt):
      saved = _saved_optimizer(have)
      raise ConfigError(f"table '{name}': checkpoint {where} holds "
                        f"{saved[0] + ' ' if saved else ''}sparse optimizer state, which the "
                        f"resuming run's {type(opt).__name__} (--gin_file/--gin_bindings) "
                        "does not keep: that run would refuse the copy (a resume does not "
                        "convert optimizer state); give the config the checkpoint was saved "
                        "with, or no --gin_file (the one it records)")


def _optimizer_hint(have_opt: Mapping, optimizer, table: str, binding: str) -> str:
  """What to do about table `table`'s stored sparse optimizer state its configured
  `optimizer` cannot take: name the optimizer whose state it is, when one fits, as the
  binding that configures it (`binding`: `sparse` for `ExperimentConfig.sparse_optimizer`,
  `table` for the table's entry in `ExperimentConfig.table_optimizers`)."""
  saved = _saved_optimizer(have_opt)
  if saved == [type(optimizer).__name__]:   # the same optimizer: its state's dtype differs
    return ""
  what = ""
  if saved:
    what = (f" (ExperimentConfig.sparse_optimizer = @{saved[0]}())" if binding == "sparse"
            else f" (ExperimentConfig.table_optimizers = {{'{table}': @{saved[0]}()}})")
  return (f": a resume does not convert sparse optimizer state (only a table without "
          f"any starts it fresh); configure the optimizer it was saved with{what}, or start "
          "a fresh --workdir")


def _by_table(arrays: Mapping) -> dict[tuple[str, str], dict]:
  """`{(kind, table): {array name: value}}` of `arrays` named `<kind>/<table>[/...]`
  (`kind`: `tables` or `table_opt`), grouped once (not scanned once per table)."""
  out: dict[tuple[str, str], dict] = {}
  for n, v in arrays.items():
    out.setdefault(tuple(n.split("/")[:2]), {})[n] = v
  return out


def _binding(stored: Mapping, collection) -> str:
  """`sparse` when one optimizer saved every table's state (as one is configured now):
  `ExperimentConfig.sparse_optimizer` restores it; else `table` (`table_optimizers`)."""
  if isinstance(collection.optimizer, optimizers_lib.TableOptimizers):
    return "table"
  saved = {tuple(_saved_optimizer(stored.get(("table_opt", t.name), {})))
           for t in collection.tables}
  return "sparse" if len(saved) == 1 else "table"


def _check_optimizer_state(stored: Mapping, want: Mapping, collection,
                           where: str) -> tuple[str, ...]:
  """ConfigError naming the first table whose stored sparse optimizer state does not fit
  its configured optimizer (`collection.optimizer_of`); returns the tables stored without
  any whose optimizer has some (e.g. SGD then, Adagrad now): theirs starts fresh.
  `stored`, `want`: `_by_table` of the stored and the configured arrays."""
  fresh = []
  for t in collection.tables:
    have_opt = stored.get(("table_opt", t.name), {})
    want_opt = want.get(("table_opt", t.name), {})
    if not have_opt:
      if want_opt:
        fresh.append(t.name)
      continue
    diff = sorted(set(have_opt) ^ set(want_opt) or
                  [n for n in want_opt if not _fits(have_opt[n], want_opt[n])])
    if diff:
      first, optimizer = diff[0], collection.optimizer_of(t.name)
      hint = _optimizer_hint(have_opt, optimizer, t.name, _binding(stored, collection))
      raise ConfigError(f"table '{t.name}': checkpoint {where} has sparse optimizer state "
                        f"that does not fit the configured {type(optimizer).__name__} (first "
                        f"difference: '{first}': the checkpoint has "
                        f"{_state_text(have_opt, first)}, the optimizer keeps "
                        f"{_state_text(want_opt, first)}){hint}")
  return tuple(fresh)


def _state_text(arrays: Mapping, name: str) -> str:
  """Stored or configured array `name` of `arrays` (`{name: (shape, dtype)}`) in words."""
  shape_dtype = arrays.get(name)
  return "none" if shape_dtype is None else f"{list(shape_dtype[0])} {shape_dtype[1]}"


def check_compatible(index: Mapping, collection, where: str,
                     specs: Mapping[str, Any] | None = None) -> tuple[str, ...]:
  """Raises ConfigError unless the stored tables fit the collection's (same arrays and
  shapes; dtypes equal or exactly widened, see `widens`, logged per table) and each
  table's stored sparse optimizer state fits its optimizer (`collection.optimizer_of`);
  returns the tables whose optimizer state is not stored and starts fresh (in the
  collection's order; a table without state now is never among them). `specs`
  (`{table: TableSpec}`) replaces the collection's spec of a table the checkpoint must
  hold differently: a table this run offloads is a cache in the collection, but the
  checkpoint of an on-device run holds it whole."""
  stored = {n: (tuple(a["shape"]), a["dtype"]) for n, a in index["arrays"].items()}
  want = dict(stored_arrays(collection))
  for spec in (specs or {}).values():
    want = {n: v for n, v in want.items() if n.split("/")[1] != spec.name}
    want.update(table_arrays(spec, collection.optimizer))

  have_tables = {n.split("/")[1] for n in stored if n.startswith("tables/")}
  names = {t.name for t in collection.tables}
  if have_tables != names:
    def listed(which):   # both whole lists were ~900 characters at 24 tables
      return some(in_order(which)) or "none"
    raise ConfigError(f"checkpoint {where} has {counted(len(have_tables), 'table')}, the "
                      f"configuration {counted(len(names), 'table')} (not in the checkpoint: "
                      f"{listed(names - have_tables)}; not in the configuration: "
                      f"{listed(have_tables - names)}): a resume restores the checkpoint's "
                      "tables, no others; configure those, or start a fresh --workdir")
  stored, want = _by_table(stored), _by_table(want)
  grown = {}   # table -> "stored → configured" of tables restored wider (more memory)
  for t in [(specs or {}).get(t.name, t) for t in collection.tables]:
    theirs, ours = stored.get(("tables", t.name), {}), want.get(("tables", t.name), {})
    if _stored_int8_for_float(theirs, ours, t.name):
      if ours[table_name(t.name)][1] not in dequantized_lib.TARGETS:
        raise ConfigError(f"table '{t.name}': checkpoint {where} stores it as int8 (q, scale, "
                          f"bias), which restores into int8 or, dequantised, float32; not the "
                          f"configured {t.dtype} (TableSpec.dtype, e.g. uniform_tables.dtype)")
      _LOG.info("table '%s': dequantizing the int8 table of checkpoint %s to %s", t.name,
                   where, t.dtype)
      grown[t.name] = f"int8 → {t.dtype}"
      continue
    _refuse_quantizing(theirs, ours, t, where)
    if set(theirs) != set(ours) or any(theirs[n][0] != ours[n][0] for n in ours):
      have = ", ".join(f"{n} {list(s)} {d}" for n, (s, d) in sorted(theirs.items()))
      raise ConfigError(f"table '{t.name}': checkpoint {where} has {have}; the configuration "
                        f"has [{t.rows}, {t.dim}] {t.dtype}{_shape_hint(theirs, t)}")
    narrow = sorted(n for n in ours if not widens(theirs[n][1], ours[n][1]))
    if narrow:
      have, need = theirs[narrow[0]][1], ours[narrow[0]][1]
      raise ConfigError(f"table '{t.name}': checkpoint {where} stores '{narrow[0]}' as {have}"
                        f", which does not convert exactly to the configured {need} (only "
                        "widening, e.g. float16/bfloat16 → float32, is exact); configure the "
                        f"table's dtype as {have} (TableSpec.dtype, e.g. uniform_tables.dtype)")
    wide = {n: (theirs[n][1], ours[n][1]) for n in sorted(ours) if theirs[n][1] != ours[n][1]}
    if wide:
      _LOG.info("table '%s': widening %s from checkpoint %s", t.name, ", ".join(
          f"{n} {a} → {b}" for n, (a, b) in wide.items()), where)
      if table_name(t.name) in wide:
        grown[t.name] = " → ".join(wide[table_name(t.name)])
  if grown:   # a resume that forgot its dtype binding: only INFO lines said so
    kinds = ", ".join(sorted(set(grown.values())))
    _LOG.warning("%s restore wider than checkpoint %s stores them (%s): they take more "
                 "memory than in the run that saved them; to keep theirs, bind "
                 "TableSpec.dtype (e.g. uniform_tables.dtype) as saved",
                 f"{len(grown)} table(s) ({some(grown)})", where, kinds)
  return _check_optimizer_state(stored, want, collection, where)
