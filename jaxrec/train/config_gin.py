"""`W/config.gin` of a run whose `ExperimentConfig` was given in Python (the library API).

gin's operative config records the values gin supplied, defaults included, but not the
arguments a caller passed itself: a config built as `ExperimentConfig(embedding=...,
model=..., batch_size=64)` left its tables, features, model and batch size out of
`W/config.gin`, whose header still said to rerun it. `recorded` writes such fields as gin
bindings (`ExperimentConfig.embedding = ((@embedding_0/TableSpec(), ...), (...))`, with
scoped bindings for each configurable: `embedding_0/TableSpec.rows = 101`), checks that
the text builds the same config, and names the fields it cannot write (a model class gin
does not know, a hand-built optax transformation), so the header can say the file does
not rerun the run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import gin
import numpy as np

from jaxrec import gin_usage
from jaxrec.schedules import Schedule
from jaxrec.train.config import DenseOptimizer, ExperimentConfig

SECTION = "# Given in Python (not by gin), written by jaxrec:"


class _Unwritable(Exception):
  """A value gin cannot express (its text says what it is)."""


def given_in_code(operative: str) -> list[str]:
  """The `ExperimentConfig` fields its caller passed (absent from the operative config
  `operative`, which holds every other field, a default included)."""
  return [f.name for f in dataclasses.fields(ExperimentConfig)
          if not re.search(rf"^ExperimentConfig\.{f.name} = ", operative, re.M)]


def recorded(config: ExperimentConfig, operative: str) -> tuple[str, list[str]]:
  """`(text, unwritten)`: `operative` with the fields given in code appended as bindings,
  and `ExperimentConfig.<field> (why)` for each field it could not write (left out)."""
  operative = _without(operative, _flax_module_fields(operative))
  fields = given_in_code(operative)
  if not fields:
    return operative, []
  writer = _Writer()
  unwritten, lines = [], []
  for name in fields:
    try:
      lines.append(f"ExperimentConfig.{name} = {writer.value(getattr(config, name), name)}")
    except _Unwritable as e:
      unwritten.append(f"ExperimentConfig.{name} ({e})")
  text = "\n".join([SECTION, *lines, *writer.bindings]) + "\n"
  if unwritten:   # with a field missing, gin builds no config at all: not checked
    return operative.rstrip("\n") + "\n\n" + text, unwritten
  mismatch, idle = _rebuilt(config, operative + "\n" + text, fields, writer.makers)
  if mismatch:   # written, but gin builds something else: none of them is claimed
    return operative, [f"ExperimentConfig.{n} (not rebuilt from gin: {mismatch})"
                       for n in fields]
  return _without(operative, idle).rstrip("\n") + "\n\n" + text, unwritten


def _flax_module_fields(operative: str) -> set[str]:
  """The bindings of a model's own flax fields at their default (`DLRM.name = None`,
  `scope/DCNv2.parent = None`), which gin's operative config lists for every flax module
  configurable: every run's config.gin carried them. (Left bindable: an older config.gin
  that binds them still reruns.)"""
  from jaxrec.models import MODELS  # pylint: disable=import-outside-toplevel
  models = "|".join(cls.__name__ for cls in MODELS.values())
  return set(re.findall(rf"^((?:[\w.]+/)*(?:{models})\.(?:name|parent)) = None$", operative,
                        re.M))


def _without(operative: str, names: set[str]) -> str:
  """`operative` without the bindings `names` (`Adam.b1`; a value's continuation lines go
  with it); a section left empty says `# None.`, as gin writes one."""
  out, skip = [], False
  for line in operative.splitlines(keepends=True):
    m = re.match(r"^([\w./]+) = ", line)
    if m:
      skip = m.group(1) in names
    elif not line.strip() or not line[:1].isspace():   # a blank line or a comment
      skip = False
    if not skip:
      out.append(line)
  return re.sub(r"^(# Parameters for .*:\n# =+\n)(?=\n|\Z)", r"\1# None.\n", "".join(out),
                flags=re.M)


class _Writer:
  """Turns values into gin text; configurable instances become scoped references whose
  bindings collect in `bindings`."""

  def __init__(self):
    self.bindings: list[str] = []
    self.makers: set[str] = set()   # the configurables written (scoped)
    self._scopes: dict[str, int] = {}

  def value(self, v: Any, hint: str) -> str:
    if v is None or isinstance(v, (bool, str)):
      return repr(v)
    if isinstance(v, (int, np.integer)):
      return repr(int(v))
    if isinstance(v, (float, np.floating)):
      if not math.isfinite(v):
        raise _Unwritable(f"{v} is not a gin literal")
      return repr(float(v))
    if _is_dtype(v):   # e.g. a model's jnp.float32: gin writes dtypes by name
      return repr(np.dtype(v).name)
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
      items = [self.value(x, hint) for x in v]
      return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(v, list):
      return "[" + ", ".join(self.value(x, hint) for x in v) + "]"
    if isinstance(v, dict):
      return "{" + ", ".join(f"{self.value(k, hint)}: {self.value(x, hint)}"
                             for k, x in v.items()) + "}"
    maker, kwargs = _call_of(v)
    self.makers.add(maker)
    scope = self._scope(hint)
    for key, x in kwargs.items():
      self.bindings.append(f"{scope}/{maker}.{key} = {self.value(x, scope)}")
    return f"@{scope}/{maker}()"

  def _scope(self, hint: str) -> str:
    base = re.sub(r"\W", "_", hint)
    n = self._scopes.get(base, 0)
    self._scopes[base] = n + 1
    return f"{base}_{n}"


def _call_of(v: Any) -> tuple[str, dict[str, Any]]:
  """`(gin name, arguments)` of the configurable call that builds `v`."""
  if isinstance(v, Schedule):
    return "lr_schedule", {"name": v.name, **dict(v.kwargs)}
  if isinstance(v, DenseOptimizer):
    if v.call is None:
      raise _Unwritable("a DenseOptimizer not made by dense_optimizer()")
    return "dense_optimizer", dict(v.call, learning_rate=v.learning_rate,
                                   clip_norm=v.clip_norm)
  registered = _registered(type(v))
  if registered is None or not dataclasses.is_dataclass(v):
    raise _Unwritable(f"a {type(v).__module__}.{type(v).__qualname__}, which gin does not "
                      "know: register its class with @gin.configurable")
  name, denied = registered
  skip = set(denied) | ({"parent", "name"} if isinstance(v, nn.Module) else set())
  return name, {f.name: getattr(v, f.name) for f in dataclasses.fields(v)
                if f.init and f.name not in skip}


def _registered(cls) -> tuple[str, tuple[str, ...]] | None:
  """gin's shortest unambiguous name of class `cls` and the parameters it denies gin, or
  None (gin has no public lookup by class)."""
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  for selector, configurable in registry.items():
    if cls in (configurable.wrapper, configurable.wrapped):
      return registry.minimal_selector(selector), tuple(configurable.denylist or ())
  return None


def _rebuilt(config: ExperimentConfig, text: str, fields: list[str], makers: set[str]
             ) -> tuple[str | None, set[str]]:
  """`(why text does not build config's fields, or None; the unscoped bindings of the
  written configurables `makers` the build did not use)`. Those are the defaults gin
  recorded of the calls made in Python (`Adam.b1 = 0.9`), which the scoped references now
  stand for: left in, a rerun of the file warned that they had no effect."""
  try:
    with gin_usage.isolated():
      import jaxrec.configurables  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      gin.parse_config(text)
      gin_usage.record_bindings(text, "config.gin")
      rebuilt = ExperimentConfig()
      idle = {u.split(" (")[0] for u in gin_usage.unused()}
  except Exception as e:  # pylint: disable=broad-except  (any gin or configurable error)
    return " ".join(str(e).split())[:200] or type(e).__name__, set()
  for name in fields:
    if not _same(getattr(rebuilt, name), getattr(config, name)):
      return f"ExperimentConfig.{name} differs", set()
  return None, {n for n in idle if "/" not in n and n.rsplit(".", 1)[0] in makers}


def _same(a: Any, b: Any) -> bool:
  """Equal values, field by field: dtypes by name (gin writes them so), `DenseOptimizer`s
  by how they were made (their optax closures differ)."""
  if _is_dtype(a) or _is_dtype(b):   # one may be its name, as gin rebuilt it
    return _dtype_name(a) is not None and _dtype_name(a) == _dtype_name(b)
  if isinstance(a, DenseOptimizer) and isinstance(b, DenseOptimizer):
    return a.call is not None and b.call is not None and _same(_call_of(a), _call_of(b))
  if type(a) is not type(b):
    return False
  if isinstance(a, (tuple, list)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  if dataclasses.is_dataclass(a) and not isinstance(a, type):
    return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
               if f.compare and f.name != "parent")
  return a == b


def _is_dtype(v: Any) -> bool:
  """A numpy/jax dtype or scalar type (`np.float32`, `jnp.bfloat16`, `np.dtype('int8')`)."""
  if isinstance(v, np.dtype):
    return True
  try:
    return isinstance(v, type) and np.dtype(v).kind != "O"   # (bfloat16: "V")
  except TypeError:
    return False


def _dtype_name(v: Any) -> str | None:
  """`v`'s dtype name, a dtype or its name as text (None for anything else)."""
  try:
    return np.dtype(v).name if _is_dtype(v) or isinstance(v, str) else None
  except TypeError:
    return None
