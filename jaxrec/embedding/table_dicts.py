"""`embedding_tables`: tables and features in gin, one entry each.

`uniform_tables` names its tables `t0..tN-1`, gives each one feature and one pooling, and
shares none; the general form, a `TableSpec` and a `FeatureSpec` per gin scope, took 5.5
lines a table (16,477 lines for 3,000 tables). Here a table or a feature is one entry:

    ExperimentConfig.embedding = @embedding_tables()
    embedding_tables.tables = {
        'user': (1000000, 64),                                   # (rows, dim[, dtype[, init_scale]])
        'item': {'rows': 500000, 'dim': 64, 'dtype': 'bfloat16'},
    }
    embedding_tables.features = [                  # default: one one-hot feature per table
        ('user_id', 'user'),                                     # a table: one-hot, sum
        ('item_id', 'item'),
        ('history', ('item', 20, 'mean')),                       # (table[, max_len[, pooling[, weighted]]])
        ('tags', {'table': 'item', 'max_len': 5, 'weighted': True}),
    ]

Features are a list of `(name, entry)` pairs: their order is the batch's (`[batch,
features, dim]`, the dense model's input order, a data file's column order), and a dict's
order would not survive `W/config.gin` (gin writes dicts sorted by key). Tables are a dict,
taken in name order as config.gin writes it, or pairs, taken in their order. Several
features may read one table. Each entry builds a `TableSpec` / `FeatureSpec` with their checks, an
error naming the entry (`embedding_tables.tables['item']: ...`).
"""

from __future__ import annotations

import reprlib
from typing import Any, Mapping

import gin

from jaxrec import gin_usage
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError, close_to

TABLE_FIELDS = ("rows", "dim", "dtype", "init_scale")
FEATURE_FIELDS = ("table", "max_len", "pooling", "weighted")
_REQUIRED = {"tables": ("rows", "dim"), "features": ("table",)}
_FIELDS = {"tables": TABLE_FIELDS, "features": FEATURE_FIELDS}
_EXAMPLE_PAIR = {"tables": "('user', (1000000, 64))", "features": "('history', ('item', 20))"}
_EXAMPLE = {"tables": "{'user': (1000000, 64), 'item': {'rows': 500000, 'dim': 64}}",
            "features": "[('user_id', 'user'), ('history', ('item', 20, 'mean'))]"}


@gin.configurable
def embedding_tables(tables: Mapping[str, Any] = gin.REQUIRED,
                     features: Mapping[str, Any] | None = None
                     ) -> tuple[tuple[TableSpec, ...], tuple[FeatureSpec, ...]]:
  """`(tables, features)` for `ExperimentConfig.embedding` from `tables` (`{name: entry}`
  or `(name, entry)` pairs) and `features` (pairs; module docstring). `features` None: one
  one-hot, sum-pooled feature per table, named as its table, in name order."""
  specs = _built("tables", tables, TableSpec)
  if features is None:
    return specs, tuple(FeatureSpec(t.name, t.name) for t in specs)
  feats = _built("features", features, FeatureSpec)
  names = {t.name for t in specs}
  for f in feats:
    if f.table not in names:
      raise ConfigError(f"{_where('features')}['{f.name}']: table '{f.table}' is not one "
                        f"of {_where('tables')}{close_to(f.table, sorted(names))}")
  return specs, feats


def _built(field: str, entries, cls) -> tuple:
  """The specs (`cls`) of `embedding_tables.<field>`'s entries; a spec's own error is
  prefixed with its entry."""
  where = _where(field)
  if isinstance(entries, Mapping) and field == "features":
    raise ConfigError(f"{where} must be a list of (name, entry) pairs in the batch's feature "
                      "order (the data's column order), e.g. [('user_id', 'user'), "
                      "('history', ('item', 20, 'mean'))]: a dict's order is not kept in "
                      "W/config.gin (gin writes it sorted by key)")
  if isinstance(entries, Mapping):
    pairs = sorted(entries.items(), key=lambda kv: str(kv[0]))   # as config.gin writes it
  elif isinstance(entries, (list, tuple)):
    bad = next((i for i, p in enumerate(entries)
                if not (isinstance(p, (list, tuple)) and len(p) == 2)), None)
    if bad is not None:   # (it said the whole list must be pairs, naming no item)
      raise ConfigError(f"{where}[{bad}] must be a (name, entry) pair, e.g. "
                        f"{_EXAMPLE_PAIR[field]}, got {reprlib.repr(entries[bad])}")
    pairs = list(entries)
  else:
    pairs = []
  if not pairs:
    what = "list of (name, entry) pairs" if field == "features" else (
        "dict {name: entry} or list of (name, entry) pairs")
    raise ConfigError(f"{where} must be a non-empty {what}, e.g. {_EXAMPLE[field]}, got "
                      f"{reprlib.repr(entries)}")
  out, seen = [], set()
  for name, entry in pairs:
    if not isinstance(name, str):
      raise ConfigError(f"{where}: key {name!r} is not a name (a string)")
    if name in seen:
      raise ConfigError(f"{where}: '{name}' is given twice")
    seen.add(name)
    kw = _fields(f"{where}['{name}']", field, entry)
    try:
      spec = cls(name, **kw)
    except ConfigError as e:
      raise ConfigError(f"{where}['{name}']: {e}") from None
    # the entry, for errors found later (`specs.bound_field`: a resume's other rows or
    # dtype, mixed dims), scoped as bound (`big/embedding_tables.tables['t0']`)
    object.__setattr__(spec, "_entry", f"{where}[{name!r}]")
    out.append(spec)
  return tuple(out)


def _where(field: str) -> str:
  """`embedding_tables.<field>` as bound for the call in progress (`big/embedding_tables.
  tables` for `@big/embedding_tables()`): an error then finds its file:line (the unscoped
  name had none, and named no scope)."""
  return gin_usage.calling_name("embedding_tables", field)


def _fields(where: str, field: str, entry) -> dict[str, Any]:
  """An entry's keyword arguments: a dict of `_FIELDS[field]`, a tuple of their first
  values in order, or (a feature) its table's name."""
  names, required = _FIELDS[field], _REQUIRED[field]
  if field == "features" and isinstance(entry, str):
    entry = (entry,)
  if isinstance(entry, Mapping):
    unknown = [k for k in entry if k not in names]
    if unknown:
      raise ConfigError(f"{where}: unknown key(s) {unknown}; the keys are {names}")
    kw = dict(entry)
  elif isinstance(entry, (tuple, list)) and len(required) <= len(entry) <= len(names):
    kw = dict(zip(names, entry))
  else:
    shape = ", ".join(names[:len(required)]) + "".join(f"[, {n}" for n in names[len(required):])
    raise ConfigError(f"{where} must be ({shape}{']' * (len(names) - len(required))}) or a "
                      f"dict of {names}" + (" or a table's name" if field == "features" else "")
                      + f", got {reprlib.repr(entry)}")
  missing = [k for k in required if k not in kw]
  if missing:
    raise ConfigError(f"{where}: missing {missing} (given: {sorted(kw)})")
  return kw
