"""Table and feature specifications.

A *table* is one embedding matrix `[rows, dim]`. A *feature* is one sparse input column of
the batch; it names the table it reads. Several features may share a table (e.g. "user id"
in two roles). A feature is one-hot (`max_len=1`) or multi-hot (`max_len>1`: a bag of up to
`max_len` ids, padded with -1), pooled by `sum` or `mean`, optionally with per-id weights.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import gin
import numpy as np

from jaxrec import gin_usage
from jaxrec.errors import ConfigError, DataError, close_to, in_order, some
from jaxrec.kernels.optim import NONNEG, hparam
from jaxrec.kernels.quant import TABLE_DTYPES, dtype_name

POOLINGS = ("sum", "mean")


def _whole(obj, field: str, what: str) -> None:
  """Sets `obj.field` to its value as an `int` (gin writes `rows = 1e6` as a float);
  `ConfigError` naming `what` unless it is a positive whole number."""
  value = getattr(obj, field)
  if not is_whole(value):
    raise ConfigError(f"{what}: {field} must be a positive integer, got {value!r}")
  object.__setattr__(obj, field, int(value))


def is_whole(value, minimum: int = 1) -> bool:
  """A whole number (`3`, `1e6`) >= `minimum`, not a bool or string."""
  try:
    return (not isinstance(value, (bool, np.bool_, str)) and float(value).is_integer()
            and value >= minimum)
  except (TypeError, ValueError, OverflowError):
    return False


def whole(value, binding: str, minimum: int = 1) -> int:
  """`value` as an `int`; `ConfigError` naming `binding` (e.g. `OffloadConfig.prefetch_depth`)
  unless it is a whole number >= `minimum` (gin writes `1e6` as a float)."""
  if not is_whole(value, minimum):
    raise ConfigError(f"{binding} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def flag(value, binding: str, *words: str):
  """`value` as a bool (or one of the strings `words`, as is); `ConfigError` naming
  `binding` (e.g. `EmbeddingOptions.dedup`) for anything else: gin's `'False'` is truthy,
  and `1 in (True, False)` holds in Python, so neither a string nor 0/1 may pass as a bool."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, str) and value in words:
    return value
  allowed = "True or False" if not words else (
      "True, False or " + " or ".join(repr(w) for w in words))
  raise ConfigError(f"{binding} must be {allowed}, got {value!r}")


def _name(obj, field: str, what: str) -> None:
  """`ConfigError` naming `what.field` unless it is a non-empty string."""
  if not isinstance(getattr(obj, field), str) or not getattr(obj, field):
    raise ConfigError(f"{what}.{field} must be a non-empty string, got {getattr(obj, field)!r}")


MAX_TABLE_NAME_BYTES = 255   # a table's name is a file name: checkpoints, offload stores


def unstorable(table: str) -> str | None:
  """Why a table cannot be stored under its name, or None: it names a directory of each
  checkpoint, export and offload store (`tables/<name>/q` is an int8 table's codes: no
  `/`; no leading `.`: hidden; at most 255 bytes: a longer name trained every step and
  failed at the first save)."""
  if "/" in table or table.startswith("."):
    return "names with '/' or a leading '.' cannot be stored"
  if len(table.encode()) > MAX_TABLE_NAME_BYTES:
    return (f"a name of {len(table.encode())} bytes cannot be stored (at most "
            f"{MAX_TABLE_NAME_BYTES}: it names a directory of each checkpoint)")
  return None


def _binding(cls: str, field: str, value, scope=None) -> str | None:
  """The gin binding that gave `value` to `field` of a spec built in gin scope `scope`
  (default: the one gin is building now), as written (`item/TableSpec.dim`), or None (no
  binding did: a default, or a value passed in code, e.g. by `uniform_tables`). Its errors
  can then name it, and `gin_usage.locate` its FILE:LINE: they named the table or feature
  only."""
  scope = list(gin.current_scope() if scope is None else scope)
  for k in range(len(scope), -1, -1):   # the most specific scope first, as gin applies them
    name = "/".join(scope[:k] + [f"{cls}.{field}"])
    if gin_usage.bound_at(name) is None:
      continue
    try:   # (through a macro, `dim = %DIM`: its value)
      bound = gin_usage.through_macros(name, gin.query_parameter(name))[1]
    except ValueError:
      continue
    return name if bound is value or repr(bound) == repr(value) else None
  return None


def bound_field(spec, field: str) -> str | None:
  """The gin binding that gave `spec.field` its value (`_binding` in the scope the spec was
  built in), or None: for errors found after the specs are built (a duplicated name, a
  feature's unknown table, mixed dims). Looked up only then: each spec looking up its
  fields' bindings when built made start-up quadratic in the bindings (1,000 scoped
  specs: 1.4 s → 5.5 s). A spec built from an `embedding_tables` entry: that entry
  (`embedding_tables.tables['t0']`, for any field; an unused include's `uniform_tables.dim`
  was named instead)."""
  entry = getattr(spec, "_entry", None)
  if entry is not None:
    return entry
  scope = getattr(spec, "_scope", None)   # None for a spec built before gin (in code)
  return None if scope is None else _binding(type(spec).__name__, field,
                                             getattr(spec, field), scope)


def _checked(obj, field: str, check) -> None:
  """Runs `check()`; its `ConfigError` names the binding that set `obj.field`, if any
  (`_binding`): `item/TableSpec.dim: table 't_item': dim must be ...`, and carries it as
  `binding` (callers that add their own prefix leave such an error as it is)."""
  try:
    check()
  except ConfigError as e:
    cls = type(obj).__name__
    binding = _binding(cls, field, getattr(obj, field))
    if binding is None:
      raise
    text = str(e)
    if text.startswith(f"{cls}.{field} "):   # the message names it unscoped already
      text = binding + text[len(cls) + len(field) + 1:]
    else:
      text = f"{binding}: {text}"
    error = ConfigError(text)
    error.binding = binding
    raise error from None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One embedding table.

  Attributes:
    name: unique table name; checkpoints store the table under it.
    rows: number of rows (vocabulary size).
    dim: embedding width.
    dtype: storage dtype of the table: `float32`, `bfloat16`, `float16`, or `int8` (rows
      `q * scale + bias`, per-row f32 scale/bias; see `kernels.QuantizedTable`). Rows are
      pooled and updated in f32 and rounded back on store; optimizer state stays f32.
    init_scale: rows are initialised uniform in `[-init_scale, init_scale]`; `None` uses
      `1/sqrt(rows)` (the DLRM convention).
  """

  name: str
  rows: int
  dim: int
  dtype: str = "float32"
  init_scale: float | None = None

  def __post_init__(self):
    _checked(self, "name", lambda: _name(self, "name", "TableSpec"))
    _checked(self, "name", self._check_storable)
    _checked(self, "rows", lambda: _whole(self, "rows", f"table '{self.name}'"))
    _checked(self, "dim", lambda: _whole(self, "dim", f"table '{self.name}'"))
    if self.init_scale is not None:
      _checked(self, "init_scale", lambda: object.__setattr__(
          self, "init_scale", hparam(f"table '{self.name}': init_scale", self.init_scale,
                                     NONNEG)))
    _checked(self, "dtype", self._check_dtype)
    # the gin scope it was built in, for `bound_field` (not a field: specs compare and hash
    # by their fields)
    object.__setattr__(self, "_scope", tuple(gin.current_scope()))

  def _check_storable(self) -> None:
    why = unstorable(self.name)
    if why:
      raise ConfigError(f"table '{self.name[:80]}{'...' if len(self.name) > 80 else ''}': "
                        f"{why}")

  def _check_dtype(self) -> None:
    name = dtype_name(self.dtype)   # aliases as for comm_dtype: bf16, fp16, jnp.float16
    if name not in TABLE_DTYPES:
      raise ConfigError(f"table '{self.name}': dtype '{self.dtype}' is not supported; use one "
                        f"of {TABLE_DTYPES} (or bf16/fp16)")
    object.__setattr__(self, "dtype", name)

  @property
  def scale(self) -> float:
    return float(self.init_scale) if self.init_scale is not None else 1.0 / np.sqrt(self.rows)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One sparse feature of the batch.

  Attributes:
    name: feature name; the batch's `ids[name]` holds `[batch, max_len]` int32 ids.
    table: name of the table it reads.
    max_len: bag size; 1 for one-hot. Absent slots hold id -1.
    pooling: `sum` or `mean` (mean over present ids; an empty bag pools to zeros).
    weighted: if true the batch carries `weights[name]` `[batch, max_len]` float32 and each
      row is scaled by its weight before pooling.
  """

  name: str
  table: str
  max_len: int = 1
  pooling: str = "sum"
  weighted: bool = False

  def __post_init__(self):
    _checked(self, "name", lambda: _name(self, "name", "FeatureSpec"))
    _checked(self, "table", lambda: _name(self, "table", f"feature '{self.name}': FeatureSpec"))
    _checked(self, "max_len", lambda: _whole(self, "max_len", f"feature '{self.name}'"))
    _checked(self, "weighted", lambda: object.__setattr__(
        self, "weighted", flag(self.weighted, f"feature '{self.name}': weighted")))
    _checked(self, "pooling", self._check_pooling)
    # the gin scope it was built in, for `bound_field` (not a field: specs compare and hash
    # by their fields)
    object.__setattr__(self, "_scope", tuple(gin.current_scope()))

  def _check_pooling(self) -> None:
    if self.pooling not in POOLINGS:
      raise ConfigError(
          f"feature '{self.name}': pooling must be one of {POOLINGS}, got '{self.pooling}'")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EmbeddingOptions:
  """How the collection computes and communicates (what it stores is `TableSpec.dtype`).

  Attributes:
    kernel: `auto` (Pallas on GPU, XLA elsewhere), `xla` or `pallas`: the pooling of
      stage 2 and the fused optimizer update of stage 3 (see `embedding.local_ops`).
    comm_dtype: dtype of the pooled activations (and their gradients) on the wire in
      stage 2: None or `float32` (exact), `bfloat16`, `float16` or `float8_e4m3fn` (these
      two with per-row scales); aliases `bf16`, `fp16`, `fp8`.
    interpret: run Pallas kernels in interpret mode (tests on CPU); None: unless on GPU.
    stochastic_rounding: round updated bf16/fp16/int8 rows up or down at random (unbiased:
      small updates are not lost) instead of to nearest.
    dedup: deduplicate ids before the gather (`True`), or gather per slot and scatter-add
      the update (`False`; only for optimizers linear in the gradient, i.e. SGD, on float32
      tables with the XLA kernel: duplicates then sum in the scatter, and the sort is
      saved). `auto`: `False` exactly when allowed.
  """

  kernel: str = "auto"
  comm_dtype: str | None = None
  interpret: bool | None = None
  stochastic_rounding: bool = False
  dedup: bool | str = "auto"

  def __post_init__(self):
    flag(self.stochastic_rounding, "EmbeddingOptions.stochastic_rounding")
    if self.interpret is not None:
      flag(self.interpret, "EmbeddingOptions.interpret")
    flag(self.dedup, "EmbeddingOptions.dedup", "auto")   # 1 in (True, False, 'auto') holds
    from jaxrec.kernels import platform, quant  # pylint: disable=import-outside-toplevel
    if self.kernel not in platform.KERNELS:
      raise ConfigError(f"EmbeddingOptions.kernel must be one of {platform.KERNELS}, "
                        f"got '{self.kernel}'")
    if self.comm_dtype is not None:
      try:
        quant.canonical_comm_dtype(self.comm_dtype)
      except ConfigError as e:   # "comm_dtype must be ...": name the binding
        raise ConfigError(f"EmbeddingOptions.{e}") from None

  def resolve(self, backend: str) -> "EmbeddingOptions":
    """Concrete choices on `backend` (e.g. `cpu`, `gpu`): kernel `xla|pallas`, interpret
    a bool, comm_dtype None (exact) or a reduced dtype name."""
    from jaxrec.kernels import platform, quant  # pylint: disable=import-outside-toplevel
    gpu = platform.is_gpu(backend)
    kernel = platform.resolve_kernel(self.kernel, backend)
    if kernel == "pallas" and not gpu and self.interpret is False:
      raise ConfigError(f"EmbeddingOptions.interpret=False needs a GPU: on {backend} the "
                        "Pallas kernels (kernel='pallas') run only in interpret mode")
    comm = None if self.comm_dtype is None else quant.canonical_comm_dtype(self.comm_dtype)
    return dataclasses.replace(
        self, kernel=kernel,
        comm_dtype=None if comm == "float32" else comm,
        interpret=(not gpu) if self.interpret is None else bool(self.interpret))


def interpret_warning(options: EmbeddingOptions, backend: str) -> str | None:
  """The start-up warning for resolved `options` whose Pallas kernels run interpreted
  (off GPU), or None."""
  from jaxrec.kernels import platform  # pylint: disable=import-outside-toplevel
  if options.kernel != "pallas" or platform.is_gpu(backend):
    return None
  return (f"EmbeddingOptions.kernel='pallas' on {backend}: the kernels run in Pallas "
          "interpret mode (the kernels up to ~20x slower than kernel='xla'; a training "
          "step 1.7-4x in walkthroughs); kernel='xla' or 'auto' is the fast path there")


NARROW_CHUNKS = 8   # more column chunks a row than this: `narrow_chunks_warning`


def narrow_chunks_warning(kernel: str, tables: Sequence[TableSpec]) -> str | None:
  """The start-up warning for the Pallas kernels (`kernel`, resolved) over tables whose dim
  they walk in more than `NARROW_CHUNKS` column chunks (`platform.col_block`: the dim's
  largest power-of-two factor, at most 128): the kernels unroll one step per chunk, and
  dim 127 (127 one-column chunks) took 213 s to compile the fused update in interpret mode,
  ran it 2.8x slower than dim 128 and 170x slower than XLA. None when there is none."""
  from jaxrec.kernels import platform  # pylint: disable=import-outside-toplevel
  if kernel != "pallas":
    return None
  narrow = {t.dim: t.name for t in tables if t.dim // platform.col_block(t.dim) > NARROW_CHUNKS}
  if not narrow:
    return None
  named = ", ".join(f"'{name}' (dim {dim}: {dim // platform.col_block(dim)} chunks of "
                    f"{platform.col_block(dim)})" for dim, name in sorted(narrow.items())[:4])
  return (f"EmbeddingOptions.kernel='pallas': tables {named}{' ...' if len(narrow) > 4 else ''}"
          " are walked in many narrow column chunks (a dim's largest power-of-two factor, "
          "up to 128, is the chunk): compile time and step time grow with their number; "
          "a dim that is a multiple of 16 (or kernel='xla') avoids it")


def ineffective_warnings(options: EmbeddingOptions, kernel: str, dtypes) -> list[str]:
  """Warnings for settings of the given (unresolved) `options` that do nothing with the
  resolved `kernel` and tables of `dtypes` (configs shared across tables are legitimate)."""
  warnings = []
  if options.stochastic_rounding and set(dtypes) <= {"float32"}:
    warnings.append("EmbeddingOptions.stochastic_rounding=True has no effect: every table is "
                    "float32 (it rounds updated bfloat16, float16 and int8 rows)")
  if options.interpret and kernel == "xla":
    warnings.append("EmbeddingOptions.interpret=True has no effect: the kernel is XLA "
                    "(interpret mode applies to the Pallas kernels, kernel='pallas')")
  return warnings


def checked_ids(ids, feature: str, table: str, rows: int, max_len: int | None = None
                ) -> np.ndarray:
  """`ids[feature]` as an array, after the host-side checks: present, integer dtype,
  `[batch, max_len]` when `max_len` is given, every id in `[-1, rows)`. `DataError` names
  the feature and `table` (e.g. "table 't0'")."""
  if feature not in ids:
    raise DataError(f"batch has no ids for feature '{feature}'")
  x = np.asarray(ids[feature])
  if max_len is not None and (x.ndim != 2 or x.shape[1] != max_len):
    raise DataError(f"feature '{feature}': ids shape {x.shape}, expected [batch, {max_len}]")
  if x.dtype.kind not in "iu":
    raise DataError(f"feature '{feature}' ({table}): ids must be integers, got {x.dtype}")
  if x.size and (x.min() < -1 or x.max() >= rows):
    bad = x[(x < -1) | (x >= rows)][0]
    raise DataError(f"feature '{feature}' ({table}, {rows} rows): id {bad} is out of range "
                    f"[0, {rows}) (-1 marks an empty slot)")
  return x


def dedup_optional(linear_optimizer: bool, dtype: str, kernel: str) -> bool:
  """Whether a stack may skip dedup (`EmbeddingOptions.dedup`): its optimizer is linear in
  the gradient (SGD), its tables float32 and the kernel XLA, so duplicate ids add up in the
  update's scatter-add. The collection and the planner's cost model both ask this."""
  return bool(linear_optimizer) and dtype == "float32" and kernel == "xla"


def dedups(option, linear_optimizer: bool, dtype: str, kernel: str, what: str) -> bool:
  """Whether a stack deduplicates its ids under `EmbeddingOptions.dedup` = `option`: for
  `auto` unless `dedup_optional`, else as forced; `False` where dedup is not optional is a
  ConfigError ending in `what` (the stack's optimizer, dtype and kernel, as the caller
  names them). The collection and the planner's cost model both decide by it."""
  optional = dedup_optional(linear_optimizer, dtype, kernel)
  if option == "auto":
    return not optional
  if not option and not optional:
    raise ConfigError(f"EmbeddingOptions.dedup=False needs SGD, float32 tables and the xla "
                      f"kernel; {what} (leave it 'auto')")
  return bool(option)


def _unique_names(specs: Sequence, what: str) -> None:
  """ConfigError naming the duplicated names of `specs` (tables or features) and, when gin
  bound them, the bindings (`gin_usage.locate` puts the first one's FILE:LINE in front):
  `item2/TableSpec.name: duplicate table names: ['t_user'] (also bound by
  user/TableSpec.name)`; it named no binding or line."""
  dup = in_order({n for n, k in collections.Counter(s.name for s in specs).items() if k > 1})
  if not dup:
    return
  bound = list(dict.fromkeys(b for s in specs if s.name == dup[0]
                             if (b := bound_field(s, "name"))))
  where = f"{bound[-1]}: " if bound else ""   # the later spec: the one likely copied
  also = f" (also bound by {', '.join(bound[:-1])})" if len(bound) > 1 else ""
  raise ConfigError(f"{where}duplicate {what} names: {dup}{also}")


def validate(tables: Sequence[TableSpec], features: Sequence[FeatureSpec]) -> None:
  """Checks names are unique and every feature names a known table."""
  _unique_names(tables, "table")
  _unique_names(features, "feature")
  names = [t.name for t in tables]
  known = set(names)
  for f in features:
    if f.table not in known:
      binding = bound_field(f, "table")   # None for a spec built in code
      raise ConfigError(f"{binding + ': ' if binding else ''}feature '{f.name}' names unknown "
                        f"table '{f.table}'{close_to(f.table, names)} (tables: "
                        f"{some(names, quote=False)})")
  if not features:
    raise ConfigError("no sparse features configured")


def feature_dims(tables: Sequence[TableSpec], features: Sequence[FeatureSpec]
                 ) -> tuple[int, ...]:
  """Each feature's table dim, in feature order (the `F` axis of pooled activations)."""
  dim = {t.name: t.dim for t in tables}
  return tuple(dim[f.table] for f in features)


def mixed_dims(tables: Sequence[TableSpec], features: Sequence[FeatureSpec]) -> str | None:
  """None when every feature reads a table of one dim; else which dims, each with its first
  feature and table, e.g. `dims [8, 16] (dim 8: feature 'f0' reads table 't0'; ...)`."""
  first = {}   # dim -> the first feature reading a table of it
  for f, d in zip(features, feature_dims(tables, features)):
    first.setdefault(d, f)
  if len(first) < 2:
    return None
  which = "; ".join(f"dim {d}: feature '{f.name}' reads table '{f.table}'"
                    for d, f in sorted(first.items()))
  return f"dims {sorted(first)} ({which})"


@gin.configurable
def uniform_tables(num_tables: int = gin.REQUIRED, rows: int | Sequence[int] = gin.REQUIRED,
                   dim: int | Sequence[int] = 16, prefix: str = "t",
                   max_len: int | Sequence[int] = 1,
                   pooling: str = "sum", dtype: str = "float32"
                   ) -> tuple[tuple[TableSpec, ...], tuple[FeatureSpec, ...]]:
  """`num_tables` tables (`t0..tN-1`), each read by one feature (`f0..fN-1`).

  `rows`, `dim` and `max_len` may be one value for all or one per table (features of mixed
  dims: models that concatenate their features take them, see `ExperimentConfig`); `dtype`
  is the tables' storage dtype (`TableSpec.dtype`).
  """
  n = _count(num_tables)
  rows_list, lens = _per_table(rows, n, "rows"), _per_table(max_len, n, "max_len")
  dims = _per_table(dim, n, "dim")
  _check_shared(prefix, pooling, dtype)
  try:
    tables = tuple(TableSpec(f"{prefix}{i}", r, d, dtype)
                   for i, (r, d) in enumerate(zip(rows_list, dims)))
    features = tuple(FeatureSpec(f"f{i}", f"{prefix}{i}", l, pooling)
                     for i, l in enumerate(lens))
  except ConfigError as e:   # e.g. dim or dtype: name the configurable, then the table
    if getattr(e, "binding", None):   # a `TableSpec.*` binding's value: `_checked` named it
      raise
    raise ConfigError(f"uniform_tables: {e}") from None
  return tables, features


def _check_shared(prefix, pooling, dtype) -> None:
  """`uniform_tables`' values shared by every table, each named as its binding (a bad one
  was reported as table 't0''s, so the error could not say which file or flag set it, and
  `prefix = 5` named the tables '50', '51', ...)."""
  if not isinstance(prefix, str):   # ('' is fine: tables '0', '1', ...)
    raise ConfigError(f"uniform_tables.prefix must be a string, got {prefix!r}")
  if pooling not in POOLINGS:
    raise ConfigError(f"uniform_tables.pooling must be one of {POOLINGS}, got {pooling!r}")
  if dtype_name(dtype) not in TABLE_DTYPES:
    raise ConfigError(f"uniform_tables.dtype must be one of {TABLE_DTYPES} (or bf16/fp16), "
                      f"got {dtype!r}")


def _count(num_tables) -> int:
  if not is_whole(num_tables):
    raise ConfigError(f"uniform_tables.num_tables must be a positive integer, got "
                      f"{num_tables!r}")
  return int(num_tables)


def _per_table(value, n: int, field: str) -> list[int]:
  """`uniform_tables.<field>`: one positive whole number for all tables or `n` of them
  (gin writes `1e6` as a float: kept when whole, never truncated)."""
  values = list(value) if isinstance(value, (list, tuple)) else [value] * n
  if len(values) != n:
    raise ConfigError(f"uniform_tables.{field} must have {n} entries (num_tables), got "
                      f"{len(values)}")
  if not all(is_whole(v) for v in values):
    raise ConfigError(f"uniform_tables.{field} must be positive integers, got {value!r}")
  return [int(v) for v in values]
