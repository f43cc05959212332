"""Sparse row-wise optimizers: update only the rows a batch touched.

Each optimizer is a frozen (hashable) dataclass with

  state_layout() -> {name: (per, initial)}   per = "element" ([rows, dim], sharded like the
                                             table) or "row" ([rows], split over rows only)
  update(rows, grads, state, step, dim_sum, lr=None) -> (new_rows, new_state)

where `rows`, `grads` are `[n, d]` (the unique rows seen, local columns), `state` holds the
matching `[n, d]` / `[n]` slices, `step` is the global step (int32 scalar), `lr` is None
(the optimizer's own `lr` at `step`) or f32 `[n]`, each row's own rate (a stack of tables
that differ only in `lr`, `family`: the optimizer's `lr` is then unused) and
`dim_sum(x[n, d]) -> [n]` sums over the *whole* embedding dim (it adds a psum over `col`
when columns are split, and leaves out a column-padded stack's padding columns). Gradients
arrive already summed over duplicate ids, so a row's update sees one gradient per step —
the semantics of a dense optimizer restricted to seen rows ("lazy" for Adam and FTRL:
unseen rows' moments do not decay).

`lr` is a number or a `jaxrec.schedules.Schedule` (`@lr_schedule()` in gin: the rate is
then a function of the global step; not for FTRL, whose accumulated sigma assumes one rate
for a row over its steps; a constant rate per row, each table its own, is fine).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from typing import Any, Callable, Mapping, Sequence

import gin
import jax.numpy as jnp

from jaxrec import gin_usage
from jaxrec.errors import ConfigError, close_to, some
from jaxrec.kernels.optim import NONNEG, POSITIVE, UNIT, check_hparams
from jaxrec.schedules import Schedule, logged_rate, rate_at

DimSum = Callable[[jnp.ndarray], jnp.ndarray]


def _check(opt, **rules) -> None:
  """`check_hparams`, with `lr` also a `Schedule` (`lr_schedule` checked it)."""
  if isinstance(opt.lr, Schedule):
    rules.pop("lr")
  elif callable(opt.lr):   # e.g. an optax schedule: not hashable by value, not checked
    raise ConfigError(f"{type(opt).__name__}.lr must be a number or @lr_schedule(), got "
                      f"{opt.lr!r}")
  check_hparams(opt, **rules)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SGD:
  lr: float | Schedule = 0.1

  def __post_init__(self):
    _check(self, lr=NONNEG)

  def state_layout(self):
    return {}

  def update(self, rows, grads, state, step, dim_sum, lr=None):
    del dim_sum
    return rows + self.delta(grads, step, lr), state

  def delta(self, grads, step, lr=None):
    """The change `update` makes to a row (linear in the gradient, so duplicate ids'
    deltas add up in a scatter-add: the `dedup=False` path, where `lr [n]` is per slot)."""
    return -_rate(self, step, lr) * grads


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Adagrad:
  """Per-element accumulator: `acc += g^2; w -= lr * g / (sqrt(acc) + eps)`."""
  lr: float | Schedule = 0.1
  initial_accumulator: float = 0.0
  eps: float = 1e-8

  def __post_init__(self):
    _check(self, lr=NONNEG, initial_accumulator=NONNEG, eps=POSITIVE)

  def state_layout(self):
    return {"accum": ("element", self.initial_accumulator)}

  def update(self, rows, grads, state, step, dim_sum, lr=None):
    del dim_sum
    acc = state["accum"] + grads * grads
    return rows - _rate(self, step, lr) * grads / (jnp.sqrt(acc) + self.eps), {"accum": acc}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RowWiseAdagrad:
  """One accumulator per row (FBGEMM's default): `acc += mean_d(g^2)`."""
  lr: float | Schedule = 0.1
  initial_accumulator: float = 0.0
  eps: float = 1e-8

  def __post_init__(self):
    _check(self, lr=NONNEG, initial_accumulator=NONNEG, eps=POSITIVE)

  def state_layout(self):
    return {"accum": ("row", self.initial_accumulator)}

  def update(self, rows, grads, state, step, dim_sum, lr=None):
    dim = grads.shape[-1]
    acc = state["accum"] + dim_sum(grads * grads) / dim_full(dim_sum, dim)
    scale = (rate_at(self.lr, step) if lr is None else lr) / (jnp.sqrt(acc) + self.eps)
    return rows - scale[:, None] * grads, {"accum": acc}


def _rate(opt, step, lr):
  """The rate `update` multiplies `[n, d]` by: `opt.lr` at `step` (a scalar), or the rows'
  own `lr [n]` as `[n, 1]`."""
  return rate_at(opt.lr, step) if lr is None else lr[:, None]


def dim_full(dim_sum: DimSum, local_dim: int) -> jnp.ndarray:
  """Full embedding dim seen by `dim_sum` (local dim times the col split)."""
  return dim_sum(jnp.ones((1, local_dim), jnp.float32))[0]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Adam:
  """Lazy Adam: moments of seen rows only; bias correction uses the global step."""
  lr: float | Schedule = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def __post_init__(self):
    _check(self, lr=NONNEG, b1=UNIT, b2=UNIT, eps=POSITIVE)

  def state_layout(self):
    return {"m": ("element", 0.0), "v": ("element", 0.0)}

  def update(self, rows, grads, state, step, dim_sum, lr=None):
    del dim_sum
    t = (step + 1).astype(jnp.float32)
    m = self.b1 * state["m"] + (1 - self.b1) * grads
    v = self.b2 * state["v"] + (1 - self.b2) * grads * grads
    m_hat = m / (1 - self.b1 ** t)
    v_hat = v / (1 - self.b2 ** t)
    return rows - _rate(self, step, lr) * m_hat / (jnp.sqrt(v_hat) + self.eps), {"m": m, "v": v}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FTRL:
  """FTRL-proximal (McMahan et al. 2013), learning-rate power -1/2, per element. `l2` is
  TensorFlow's (`tf.keras.optimizers.Ftrl`'s l2_regularization_strength): the update's
  denominator adds `2 * l2`, where the paper's λ2 adds `l2`, so `l2` here is half its λ2.

  A row starts from its current value: at its first update (state as initialised: `z` 0,
  `n` `initial_accumulator`) `z` is set to the value whose weight is the row's, so a zero
  gradient leaves it as it is. TensorFlow's and Keras's FTRL start `z` at 0, which sets
  every element to 0 at its row's first update: the random initial values, or a table
  imported from TorchRec or resumed with fresh optimizer state, were wiped."""
  lr: float = 0.1
  l1: float = 0.0
  l2: float = 0.0
  beta: float = 1.0
  initial_accumulator: float = 0.1

  def __post_init__(self):   # lr divides
    if isinstance(self.lr, Schedule):
      raise ConfigError(f"FTRL.lr must be a number, got {self.lr}: FTRL's accumulated "
                        "per-coordinate rates (sigma, z) assume one learning rate; use a "
                        "schedule with SGD, Adagrad, RowWiseAdagrad or Adam")
    _check(self, lr=POSITIVE, l1=NONNEG, l2=NONNEG, beta=NONNEG,
                  initial_accumulator=NONNEG)
    if self.beta == 0 and self.initial_accumulator == 0 and self.l2 == 0:
      # TF's allowed edge: a row's first denominator (beta + sqrt(n)) / lr + 2 * l2 is 0,
      # no `z` gives its value, and a zero gradient set every seen row to 0
      raise ConfigError("FTRL.beta = 0 with FTRL.initial_accumulator = 0 and FTRL.l2 = 0: a "
                        "row's first update could not keep its value (its denominator is 0: "
                        "a zero gradient set it to 0); give beta > 0 (default 1.0), "
                        "initial_accumulator > 0 (default 0.1) or l2 > 0")

  def state_layout(self):
    return {"z": ("element", 0.0), "n": ("element", self.initial_accumulator)}

  def update(self, rows, grads, state, step, dim_sum, lr=None):
    del dim_sum   # a row's rate is its table's, the same every step (`lr` [n] per row)
    lr = _rate(self, step, lr)
    n, z = state["n"], state["z"]
    fresh = (z == 0) & (n == self.initial_accumulator)   # never updated: start from `rows`
    w0 = rows.astype(z.dtype)
    z = jnp.where(fresh, -w0 * ((self.beta + jnp.sqrt(n)) / lr + 2 * self.l2)
                  - jnp.sign(w0) * self.l1, z)
    n_new = n + grads * grads
    sigma = (jnp.sqrt(n_new) - jnp.sqrt(n)) / lr
    z_new = z + grads - sigma * rows
    denom = (self.beta + jnp.sqrt(n_new)) / lr + 2 * self.l2
    w = jnp.where(jnp.abs(z_new) <= self.l1, 0.0,
                  -(z_new - jnp.sign(z_new) * self.l1) / denom)
    return w.astype(rows.dtype), {"z": z_new, "n": n_new}


OPTIMIZERS = {"sgd": SGD, "adagrad": Adagrad, "rowwise_adagrad": RowWiseAdagrad,
              "adam": Adam, "ftrl": FTRL}


@gin.configurable
def sparse_optimizer(name: str = "sgd", **kwargs):
  """Factory by name (`sgd`, `adagrad`, `rowwise_adagrad`, `adam`, `ftrl`); `kwargs` are
  the optimizer's fields."""
  if not isinstance(name, str) or name not in OPTIMIZERS:
    raise ConfigError(f"sparse_optimizer.name: unknown '{name}' (known: {', '.join(OPTIMIZERS)})")
  cls = OPTIMIZERS[name]
  fields = [f.name for f in dataclasses.fields(cls)]
  unknown = [f"sparse_optimizer.{k}" for k in kwargs if k not in fields]
  if unknown:
    raise ConfigError(f"{', '.join(unknown)}: {name} takes no such field (its fields: "
                      f"{', '.join(fields)})")
  try:
    return cls(**kwargs)
  except ConfigError as e:   # its kwargs are bound as sparse_optimizer.<field>: named so
    text, own = str(e).splitlines()[0], f"{cls.__name__}."   # first (it said 'Adam.b2'),
    field = text[len(own):].split(" ")[0]   # gin_usage.locate adds the FILE:LINE
    if text.startswith(own) and field in kwargs:
      raise ConfigError(f"{gin_usage.calling_name('sparse_optimizer', field)}"
                        f"{text[len(own) + len(field):]} (name='{name}')") from None
    raise ConfigError(f"sparse_optimizer(name='{name}'): {e}") from None


def is_sparse_optimizer(x) -> bool:
  """Whether `x` is a sparse optimizer instance (has `state_layout` and `update`)."""
  return not isinstance(x, type) and all(callable(getattr(x, m, None))
                                         for m in ("state_layout", "update"))


def family(opt):
  """What stacks `opt`'s tables with others (`TableOptimizers.group`): its class and every
  hyperparameter but `lr`. Tables whose optimizers differ only in `lr` share stacks, each
  row updated at its own table's rate (`StackLayout.rates`). A spec without `lr` (the
  planner's names and factors) is its own family."""
  if not (dataclasses.is_dataclass(opt) and not isinstance(opt, type) and hasattr(opt, "lr")):
    return opt
  return (type(opt), tuple((f.name, getattr(opt, f.name)) for f in dataclasses.fields(opt)
                           if f.name != "lr"))


@dataclasses.dataclass(frozen=True)
class TableOptimizers:
  """Each table's sparse optimizer: `default` for every table but those `overrides` names
  (`(table, optimizer)` pairs, sorted by table). Tables of one optimizer *family* (`family`:
  the same class and hyperparameters but `lr`) share stacks, each row stepped at its own
  table's rate; a stack never mixes families (`layout.build_layouts` groups by `group`).
  TorchRec runs one fused TBE per optimizer configuration, learning rate included. Hashable,
  so layouts and jitted functions can close over it. Build it with `per_table`."""

  default: Any
  overrides: tuple[tuple[str, Any], ...] = ()

  def of(self, table: str):
    """The optimizer of table `table`."""
    return self._by_name.get(table, self.default)

  @functools.cached_property
  def _by_name(self) -> dict[str, Any]:
    return dict(self.overrides)

  @functools.cached_property
  def distinct(self) -> tuple[Any, ...]:
    """The different optimizers, `default` first, then in `overrides` order."""
    out = [self.default]
    for _, opt in self.overrides:
      if opt not in out:
        out.append(opt)
    return tuple(out)

  @functools.cached_property
  def families(self) -> tuple[Any, ...]:
    """The first optimizer of each different `family` in `distinct` (the default first)."""
    out = {}
    for opt in self.distinct:
      out.setdefault(family(opt), opt)
    return tuple(out.values())

  @functools.cached_property
  def _group_of(self) -> dict[Any, int]:
    return {family(opt): g for g, opt in enumerate(self.families)}

  def group(self, table: str) -> int:
    """Index of table `table`'s optimizer family in `families` (0: the default's): its
    stacks' suffix `_o<group>` (none for 0)."""
    return self._group_of[family(self.of(table))]

  def overrides_by_group(self) -> dict[int, list[tuple[str, Any]]]:
    """`{group: [(table, optimizer)]}` of the `overrides`, by family (`group`, ascending;
    group 0: overrides of the default's family, e.g. its optimizer at another rate)."""
    out: dict[int, list[tuple[str, Any]]] = {}
    for t, opt in self.overrides:
      out.setdefault(self.group(t), []).append((t, opt))
    return dict(sorted(out.items()))


def per_table(default, overrides: Mapping[str, Any] | None = None,
              what: str = "ExperimentConfig.table_optimizers",
              tables: Sequence[str] | None = None):
  """`default` alone when `overrides` (`{table: optimizer}`) is empty, else the
  `TableOptimizers`; `overrides` as `checked_overrides` checks (and, with `tables`,
  expands) them."""
  if isinstance(default, TableOptimizers):
    if overrides:
      raise ConfigError(f"{what}: the default is already per table ({default})")
    return default
  overrides = checked_overrides(overrides, what, tables)
  if not overrides:
    return default
  return TableOptimizers(default, tuple(sorted(overrides.items())))


def checked_overrides(overrides: Mapping[str, Any] | None,
                      what: str = "ExperimentConfig.table_optimizers",
                      tables: Sequence[str] | None = None) -> dict[str, Any] | None:
  """`overrides` (`{table: optimizer}`, None: none) as a dict, checked: `ConfigError`
  naming `what[key]` for a key that is not a string or a value that is not a sparse
  optimizer. With the table names `tables`, a key may also be a pattern (`fnmatch`:
  `'user_*'`, `'t[0-3]'`) standing for every table it matches; a key that matches no
  table, or a table that two keys match, is then an error naming them. Without `tables`
  the keys are table names (checked by `check_tables`)."""
  if overrides is None:
    return None
  if not isinstance(overrides, Mapping):
    raise ConfigError(f"{what} must be a dict {{table name: sparse optimizer}}, e.g. "
                      f"{{'t0': @RowWiseAdagrad()}}, got {overrides!r}")
  for name, opt in overrides.items():
    if not isinstance(name, str):
      raise ConfigError(f"{what}: key {name!r} is not a table name (a string)")
    if not is_sparse_optimizer(opt):
      hint = (f" (the class: write @{opt.__name__}() with parentheses)"
              if isinstance(opt, type) and hasattr(opt, "state_layout") else "")
      raise ConfigError(f"{what}['{name}'] must be a sparse optimizer, e.g. @Adagrad() or "
                        f"@sparse_optimizer(), got {opt!r}{hint}")
  if tables is not None:
    return _expanded(overrides, list(tables), what)
  return dict(overrides)


def _expanded(overrides: Mapping[str, Any], tables: list[str], what: str) -> dict[str, Any]:
  """`overrides` with each key replaced by the `tables` it names (itself, or the tables
  its pattern matches)."""
  out, key_of, known = {}, {}, set(tables)   # (a key looked up in the list: quadratic)
  for key, opt in overrides.items():
    matched = ([key] if key in known else
               [t for t in tables if fnmatch.fnmatchcase(t, key)])
    if not matched:
      raise ConfigError(f"{what}['{key}'] names no table{close_to(key, tables)} (tables: "
                        f"{some(tables, 20, quote=False)})")
    for t in matched:
      if t in key_of:
        raise ConfigError(f"{what}: table '{t}' is named by both '{key_of[t]}' and '{key}'")
      key_of[t], out[t] = key, opt
  return out


def of(optimizer, table: str):
  """Table `table`'s optimizer: `optimizer` itself, or its entry when it is per table."""
  return optimizer.of(table) if isinstance(optimizer, TableOptimizers) else optimizer


def distinct(optimizer) -> tuple[Any, ...]:
  """Every different optimizer in `optimizer` (one, or a `TableOptimizers`' `distinct`)."""
  return optimizer.distinct if isinstance(optimizer, TableOptimizers) else (optimizer,)


def group(optimizer, table: str) -> int:
  """Table `table`'s stacking group: 0 unless its optimizer's `family` is not the
  default's."""
  return optimizer.group(table) if isinstance(optimizer, TableOptimizers) else 0


def slot_rates(optimizer, tables: Sequence[str]) -> tuple | None:
  """The `lr` of each of `tables` (one stack's, one family), or None where they have one
  rate (the stack's optimizer's own: the scalar update, as with one optimizer)."""
  if not isinstance(optimizer, TableOptimizers):
    return None
  rates = tuple(getattr(optimizer.of(t), "lr", None) for t in tables)
  return rates if len(set(rates)) > 1 else None


def check_tables(optimizer, tables: Sequence[str], where: str = "ExperimentConfig."
                 "table_optimizers") -> None:
  """`ConfigError` naming each `overrides` key that is not one of `tables`."""
  if not isinstance(optimizer, TableOptimizers):
    return
  known = set(tables)   # (once: a set per key made 10,000 keys over 10,000 tables take 4 s)
  unknown = [n for n, _ in optimizer.overrides if n not in known]
  if unknown:
    raise ConfigError(f"{where} names unknown tables {unknown} (tables: "
                      f"{some(tables, 20, quote=False)})")


def logged_rates(optimizer, step: int, tables: Sequence[str] | None = None
                 ) -> dict[str, float]:
  """A metrics line's scheduled sparse rates after `step` steps (`schedules.logged_rate`),
  each only where that `lr` is a `Schedule`:
    `sparse_lr`          the default optimizer's (its tables'; not when `tables`, the run's
                         table names, are all overridden: it was logged for no table);
    `sparse_lr_o<g>`     family `g`'s (the stacks named `..._o<g>`) where all its tables
                         share one rate;
    `sparse_lr/<table>`  each other table of a family of several rates (the default's
                         family: each override whose rate is not the default's), as the
                         rates of one family's stacks are per table; tables sharing one
                         rate (one schedule) once, `sparse_lr/<first>(+<more>)` (3,000
                         tables matched by one `table_optimizers` pattern logged 3,000
                         keys of one value: 119 KB a line)."""
  if not isinstance(optimizer, TableOptimizers):
    return logged_rate(optimizer.lr, step, "sparse_lr")
  overridden = {t for t, _ in optimizer.overrides}
  out = ({} if tables is not None and set(tables) <= overridden else
         logged_rate(optimizer.default.lr, step, "sparse_lr"))
  for g, members in optimizer.overrides_by_group().items():
    if g and len({opt.lr for _, opt in members}) == 1:
      out.update(logged_rate(members[0][1].lr, step, f"sparse_lr_o{g}"))
      continue
    by_rate: dict[Any, list[str]] = {}
    for t, opt in members:
      if opt != optimizer.default:
        by_rate.setdefault(opt.lr, []).append(t)
    for lr, named in by_rate.items():
      more = f"(+{len(named) - 1})" if len(named) > 1 else ""
      out.update(logged_rate(lr, step, f"sparse_lr/{named[0]}{more}"))
  return out
