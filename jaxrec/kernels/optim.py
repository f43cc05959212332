"""Row-wise sparse optimizers for embedding tables.

Each optimizer is a frozen (hashable) dataclass, so it can be a static `jit` argument. Its
state is a dict of arrays (`init_opt_state`); the update is written once, in `update_rows`,
over the rows a batch touched, as lists of column chunks `[S, C]`, so the XLA reference
(one chunk of width D) and the Pallas kernel (D/C chunks held in registers) share it.

- `SGD(lr)`: `w -= lr * g`. No state.
- `Adagrad(lr, initial_accumulator, eps)`: per element `a += g^2; w -= lr * g / (sqrt(a) + eps)`;
  state `{'accum': [R, D]}`.
- `RowWiseAdagrad(lr, initial_accumulator, eps)`: per row `a += mean_D(g^2)`, same step
  with the row's `a`; state `{'accum': [R]}` (the FBGEMM/TorchRec default, D times smaller).

`update_rows` also takes each row's own rate (`lr [S]`) in place of `opt.lr`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import gin_usage
from jaxrec.errors import ConfigError


# Hyperparameter rules (test, wording) for `hparam`, which also wants a finite real number.
NONNEG = (lambda v: v >= 0, "a number >= 0")
POSITIVE = (lambda v: v > 0, "a number > 0")
UNIT = (lambda v: 0 <= v < 1, "a number in [0, 1)")
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)


def hparam(binding: str, value, rule) -> float:
  """`value` as a float; ConfigError naming `binding` (e.g. `Adam.b1`) unless it is a
  finite real number (not a bool or string) passing `rule` (`NONNEG`, `POSITIVE`, `UNIT`)."""
  ok, wording = rule
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or not ok(value)):
    raise ConfigError(f"{binding} must be {wording}, got {value!r}")
  if abs(value) > _F32_MAX:   # the update computes in float32: 1e39 is inf there
    raise ConfigError(f"{binding} = {value!r} is past float32's range (largest "
                      f"{_F32_MAX:.4g}), in which the update computes")
  # ... and 1e-40 is 0 there (a subnormal, flushed), and 1 - 1e-8 is 1.0: eps, lr or a
  # beta that passed the rule above made NaN or inf rows
  if 0 < abs(value) < _F32_TINY:
    raise ConfigError(f"{binding} = {value!r} is 0 in float32 (smallest normal "
                      f"{_F32_TINY:.4g}), in which it is used")
  if rule is UNIT and np.float32(value) >= 1:
    raise ConfigError(f"{binding} = {value!r} is 1.0 in float32, in which it is used: it "
                      f"must be at most {float(np.nextafter(np.float32(1), 0))!r}")
  return float(value)


def check_hparams(obj, **rules) -> None:
  """`hparam` for each named field of the frozen dataclass `obj` (binding `Class.field`),
  stored back as a float; e.g. `check_hparams(self, lr=NONNEG)`."""
  for field, rule in rules.items():   # (`big/SGD.lr` when `@big/SGD()` bound it)
    value = hparam(gin_usage.calling_name(type(obj).__name__, field), getattr(obj, field), rule)
    object.__setattr__(obj, field, value)


@dataclasses.dataclass(frozen=True)
class SGD:
  """Plain SGD on the rows seen."""

  lr: float = 0.01

  def __post_init__(self):
    check_hparams(self, lr=NONNEG)

  def state_shapes(self, rows: int, dim: int) -> dict[str, tuple[int, ...]]:
    return {}


@dataclasses.dataclass(frozen=True)
class Adagrad:
  """Per-element Adagrad; `accum [R, D]` starts at `initial_accumulator`."""

  lr: float = 0.01
  initial_accumulator: float = 0.0
  eps: float = 1e-8

  def __post_init__(self):
    check_hparams(self, lr=NONNEG, initial_accumulator=NONNEG, eps=POSITIVE)

  def state_shapes(self, rows: int, dim: int) -> dict[str, tuple[int, ...]]:
    return {"accum": (rows, dim)}


@dataclasses.dataclass(frozen=True)
class RowWiseAdagrad:
  """Row-wise Adagrad; `accum [R]` gains the row's mean squared gradient."""

  lr: float = 0.01
  initial_accumulator: float = 0.0
  eps: float = 1e-8

  def __post_init__(self):
    check_hparams(self, lr=NONNEG, initial_accumulator=NONNEG, eps=POSITIVE)

  def state_shapes(self, rows: int, dim: int) -> dict[str, tuple[int, ...]]:
    return {"accum": (rows,)}


Optimizer = Union[SGD, Adagrad, RowWiseAdagrad]
OPTIMIZERS = (SGD, Adagrad, RowWiseAdagrad)


def coerce(opt) -> Optimizer:
  """The kernel optimizer for `opt`: one of ours, or any dataclass of the same class name
  and fields (e.g. `jaxrec.embedding.optimizers.SGD`); raises ConfigError otherwise."""
  if isinstance(opt, OPTIMIZERS):
    cls = type(opt)
  else:
    cls = {o.__name__: o for o in OPTIMIZERS}.get(type(opt).__name__)
    if cls is None or not dataclasses.is_dataclass(opt):
      raise ConfigError(f"unsupported sparse optimizer {opt!r} for the fused kernels; use one "
                        f"of {[o.__name__ for o in OPTIMIZERS]}")
    names = [f.name for f in dataclasses.fields(cls)]
    opt = cls(**{k: getattr(opt, k) for k in names if hasattr(opt, k)})
  return opt


STATE_DTYPES = ("float32", "bfloat16", "float16")


def check_state_dtype(dtype, what: str = "optimizer state") -> None:
  """Raises ConfigError unless `dtype` is a float storage dtype for optimizer state."""
  name = jnp.dtype(dtype).name
  if name not in STATE_DTYPES:
    raise ConfigError(f"{what}: dtype must be one of {STATE_DTYPES}, got '{name}'")


def init_opt_state(optimizer: Optimizer, rows: int, dim: int,
                   dtype=jnp.float32) -> dict[str, jax.Array]:
  """Optimizer state for a `[rows, dim]` table, stored in `dtype` (f32, bf16 or f16)."""
  optimizer = coerce(optimizer)
  check_state_dtype(dtype)
  init = float(getattr(optimizer, "initial_accumulator", 0.0))
  return {name: jnp.full(shape, init, dtype)
          for name, shape in optimizer.state_shapes(rows, dim).items()}


def per_row_state(optimizer: Optimizer) -> frozenset[str]:
  """Names of state entries shaped `[R]` (one value per row) rather than `[R, D]`."""
  return frozenset(k for k, s in optimizer.state_shapes(1, 2).items() if len(s) == 1)


def update_rows(opt: Optimizer, w: list, g: list, state: dict, dim: int, lr=None):
  """Applies one optimizer step to S rows held as column chunks.

  Args:
    opt: the optimizer.
    w: f32 row chunks, each `[S, C]` (chunks concatenate to `[S, D]`).
    g: f32 gradient chunks, same shapes (already summed over duplicate ids).
    state: f32 state per name: a list of `[S, C]` chunks, or one `[S]` for per-row state.
    dim: D, the full row width (for row-wise means).
    lr: None (`opt.lr`), or f32 `[S]`, each row's own rate (`opt.lr` unused).

  Returns:
    `(new_w, new_state)` in the same layout, f32.
  """
  row_lr = lr
  lr = np.float32(opt.lr) if row_lr is None else row_lr[:, None]
  if isinstance(opt, SGD):
    return [wc - lr * gc for wc, gc in zip(w, g)], {}
  eps = np.float32(opt.eps)
  if isinstance(opt, Adagrad):
    acc = [ac + gc * gc for ac, gc in zip(state["accum"], g)]
    new_w = [wc - lr * gc / (jnp.sqrt(ac) + eps) for wc, gc, ac in zip(w, g, acc)]
    return new_w, {"accum": acc}
  if isinstance(opt, RowWiseAdagrad):
    sq = sum(jnp.sum(gc * gc, axis=-1) for gc in g) * np.float32(1.0 / dim)
    acc = state["accum"] + sq
    step = (lr if row_lr is None else row_lr) / (jnp.sqrt(acc) + eps)
    return [wc - step[:, None] * gc for wc, gc in zip(w, g)], {"accum": acc}
  raise ConfigError(f"unsupported sparse optimizer {opt!r}")
