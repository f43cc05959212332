"""Learning-rate schedules for the sparse and the dense optimizers: optax's, by name.

In gin, `@lr_schedule()` goes wherever a learning rate does, e.g.

    SGD.lr = @sparse/lr_schedule()
    sparse/lr_schedule.name = 'warmup_cosine_decay'
    sparse/lr_schedule.init_value = 0.0
    sparse/lr_schedule.peak_value = 1.0
    sparse/lr_schedule.warmup_steps = 500
    sparse/lr_schedule.decay_steps = 10000
    dense_optimizer.learning_rate = @dense/lr_schedule()

The result is a `Schedule`: a frozen, hashable value (the sparse optimizers are static jit
arguments: two equal schedules compile once) that maps the global step to the rate with
optax's function. The step is the train state's: a resumed or resharded run continues the
schedule where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec import gin_usage
from jaxrec.errors import ConfigError
from jaxrec.kernels.optim import NONNEG, POSITIVE, hparam

SCHEDULES: dict[str, Callable] = {
    "constant": optax.constant_schedule,
    "linear": optax.linear_schedule,
    "polynomial": optax.polynomial_schedule,
    "cosine_decay": optax.cosine_decay_schedule,
    "exponential_decay": optax.exponential_decay,
    "piecewise_constant": optax.piecewise_constant_schedule,
    "warmup_constant": optax.warmup_constant_schedule,
    "warmup_cosine_decay": optax.warmup_cosine_decay_schedule,
    "warmup_exponential_decay": optax.warmup_exponential_decay_schedule,
}
# Rules for the schedules' numeric arguments, by name (steps: the least whole number).
_VALUES = {"value": NONNEG, "init_value": NONNEG, "peak_value": NONNEG, "end_value": NONNEG,
           "alpha": NONNEG, "exponent": POSITIVE, "power": POSITIVE, "decay_rate": POSITIVE}
_STEPS = {"transition_steps": 1, "decay_steps": 1, "warmup_steps": 0, "transition_begin": 0}
MAX_STEP = 2**31 - 1   # the train state's step is int32


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Learning rate as a function of the global step: optax's `SCHEDULES[name]` over
  `kwargs` (sorted `(name, value)` pairs; `boundaries_and_scales` as sorted pairs too, so
  the value is hashable). Build it with `lr_schedule`, which checks the arguments."""

  name: str
  kwargs: tuple[tuple[str, Any], ...]

  @functools.cached_property
  def _fn(self) -> Callable:
    kwargs = dict(self.kwargs)
    if "boundaries_and_scales" in kwargs:
      kwargs["boundaries_and_scales"] = dict(kwargs["boundaries_and_scales"])
    return SCHEDULES[self.name](**kwargs)

  def __call__(self, step):
    """The rate at `step` (an int, or a traced int32 scalar inside the train step), never
    below 0: a decay to `end_value=0` ends in f32 arithmetic that XLA's default
    optimisation may round below it (`linear` from 0.1 over 1,000 steps, compiled: -4.7e-9
    at step 1,000), which `lr_schedule` refused as a negative rate (and a step would have
    ascended by it). Only rounding goes below 0: the arguments' rules keep every schedule's
    values >= 0."""
    return jnp.maximum(self._fn(step), 0)

  def __getstate__(self):   # optax's schedule is a closure: rebuilt after unpickling
    return {k: v for k, v in self.__dict__.items() if k != "_fn"}

  def __str__(self) -> str:
    return f"lr_schedule('{self.name}', {', '.join(f'{k}={v!r}' for k, v in self.kwargs)})"


def rate_at(lr, step):
  """`lr` at `step`: a number as is, a `Schedule` evaluated (float32 when traced)."""
  return lr(step) if isinstance(lr, Schedule) else lr


@gin.configurable
def lr_schedule(name: str = gin.REQUIRED, **kwargs) -> Schedule:
  """The optax schedule `name` (one of `SCHEDULES`, e.g. `warmup_cosine_decay` for
  `optax.warmup_cosine_decay_schedule`) over `kwargs`, its arguments. `ConfigError` naming
  `lr_schedule.<argument>` for an unknown or missing argument, a rate below 0, a step count
  that is not a whole number, and for a schedule that is negative or not finite anywhere
  (with gin's scope, e.g. `sparse/lr_schedule.peak_value`, so the error names the line)."""
  scope = gin.current_scope_str()
  prefix = f"{scope}/lr_schedule" if scope else "lr_schedule"   # where to bind a missing one

  def named(arg: str) -> str:   # the binding that gave `arg`: `outer/lr_schedule.value` for
    return gin_usage.calling_name("lr_schedule", arg)   # an unscoped one, nobody wrote
  if not isinstance(name, str) or name not in SCHEDULES:
    raise ConfigError(f"{named('name')}: unknown '{name}' (known: {', '.join(SCHEDULES)})")
  params = inspect.signature(SCHEDULES[name]).parameters
  unknown = [named(k) for k in kwargs if k not in params]
  if unknown:
    raise ConfigError(f"{', '.join(unknown)}: the '{name}' schedule takes no such argument "
                      f"(it takes: {', '.join(params)})")
  missing = [f"{prefix}.{k}" for k, p in params.items()
             if p.default is inspect.Parameter.empty and k not in kwargs]
  if missing:
    raise ConfigError(f"{', '.join(missing)} not bound: the '{name}' schedule needs "
                      f"{'them' if len(missing) > 1 else 'it'}")
  checked = {k: _checked(named(k), k, v) for k, v in kwargs.items()}
  if name.startswith("warmup_") and checked.get("warmup_steps", 0) >= checked.get(
      "decay_steps", math.inf):   # optax's error quoted its own decay_steps - warmup_steps
    raise ConfigError(f"{named('warmup_steps')} = {checked['warmup_steps']} is not below "
                      f"{named('decay_steps')} = {checked['decay_steps']}: in optax's "
                      f"{name}, decay_steps counts the warmup's steps too")
  schedule = Schedule(name, tuple(sorted(checked.items())))
  _check_values(schedule, checked, named)
  return schedule


def _checked(binding: str, key: str, value):
  """Argument `key` (bound as `binding`), checked by its rule; `boundaries_and_scales` as
  sorted pairs."""
  if key in _VALUES:
    if key == "end_value" and value is None:   # exponential decay's "no floor"
      return None
    return hparam(binding, value, _VALUES[key])
  if key in _STEPS:   # the train step counts in int32
    if (isinstance(value, bool) or not _whole(value)
        or not _STEPS[key] <= value <= MAX_STEP):
      raise ConfigError(f"{binding} must be a whole number of steps in [{_STEPS[key]}, "
                        f"{MAX_STEP}], got {value!r}")
    return int(value)
  if key == "staircase":
    if not isinstance(value, bool):
      raise ConfigError(f"{binding} must be True or False, got {value!r}")
    return value
  if key == "boundaries_and_scales":
    if not isinstance(value, dict) or not all(
        not isinstance(s, bool) and _whole(s) and 0 <= s <= MAX_STEP for s in value):
      raise ConfigError(f"{binding} must be a dict of step (a whole number in [0, {MAX_STEP}]) "
                        "-> scale, "
                        f"e.g. {{1000: 0.1, 2000: 0.1}}, got {value!r}")
    return tuple(sorted((int(s), hparam(f"{binding}[{s}]", v, NONNEG))
                        for s, v in value.items()))
  raise ConfigError(f"{binding}: no rule for this argument")   # a new optax argument


def _whole(value) -> bool:
  return isinstance(value, numbers.Real) and float(value).is_integer()


def _check_values(schedule: Schedule, kwargs: dict, named: Callable[[str], str]) -> None:
  """The rate is finite (and >= 0, as `Schedule.__call__` keeps it) at step 0, at each
  step the arguments name, one past each, and far past the end (a rate computed from valid
  arguments can still be NaN, e.g. a cosine decay over 0 steps in some optax versions). One
  compiled evaluation of all of them (one at a time, eagerly, took ~0.7 s of start-up).
  The error starts with the binding (`named(argument)`) that named the step, or
  `named('name')` for steps 0 and 10^9, so that `gin_usage.locate` puts its line in front."""
  marks = {0: "name", 10**9: "name"}   # step -> the argument that named it
  for key in _STEPS:
    if key in kwargs:
      for step in (kwargs[key], min(kwargs[key] + 1, MAX_STEP)):
        marks.setdefault(step, key)
  for pair in kwargs.get("boundaries_and_scales", ()):
    for step in (pair[0], pair[0] + 1):
      marks.setdefault(min(step, MAX_STEP), "boundaries_and_scales")
  steps = sorted(marks)
  try:
    values = np.asarray(jax.jit(jax.vmap(schedule))(np.asarray(steps, np.int32)), np.float64)
  except (ValueError, TypeError) as e:   # e.g. warmup_steps past decay_steps (which has them)
    raise ConfigError(f"{schedule}: optax.{SCHEDULES[schedule.name].__name__} refuses these "
                      f"arguments: {e}") from None
  for step, value in zip(steps, values.tolist()):
    if not np.isfinite(value) or value < 0:
      raise ConfigError(f"{named(marks[step])}: {schedule} gives the rate {value!r} at step "
                        f"{step}: a learning rate must be finite and >= 0")


def logged_rate(lr, step: int, key: str = "sparse_lr") -> dict[str, float]:
  """`{key: rate}` for a metrics line at `step` (steps done) when `lr` is a `Schedule`: the
  rate the last of those steps applied (that update ran at step - 1; for the dense rate,
  give optax's count of the updates: `dense_steps_behind`). `{}` for a constant rate (it is
  in config.gin)."""
  if not isinstance(lr, Schedule) or step < 1:
    return {}
  return {key: float(np.asarray(lr(step - 1)))}


def dense_steps_behind(state) -> int:
  """How far optax's count of the dense updates, which its schedule reads
  (`ScaleByScheduleState`), is behind the train state's step (the sparse schedule's): a
  tables-only checkpoint (a TorchRec import at step N) starts the dense state afresh, at 0.
  0 without a scheduled dense rate."""
  found = [s.count for s in jax.tree.leaves(
      state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
           if isinstance(s, optax.ScaleByScheduleState)]
  return int(state["step"]) - int(found[0]) if found else 0
