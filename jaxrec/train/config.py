"""Experiment configuration (gin) and run options (launcher flags).

`ExperimentConfig` is what a `configs/*.gin` file binds: tables and features, the dense
model, batch sizes, optimizers and data sources. `RunOptions` carries the per-run launcher
flags (`scripts/train.py`); the library never reads flags itself.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import inspect
import math
import numbers
import os
import reprlib
import stat
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.embedding import optimizers as sparse_optimizers
from jaxrec.embedding.specs import (FeatureSpec, TableSpec, bound_field, feature_dims, flag,
                                   is_whole, mixed_dims, validate)
from jaxrec import gin_usage
from jaxrec.train import early_stop
from jaxrec.errors import ConfigError
from jaxrec.kernels import quant
from jaxrec.kernels.optim import NONNEG, POSITIVE, UNIT, hparam
from jaxrec.train import predictions

# The data sources: `ExperimentConfig` fields and the `RunOptions` flags over them.
DATA_FIELDS = ("train_data", "eval_data")

# Rules for the dense optimizer's numeric options, where its optax maker takes them.
_DENSE_RULES = {"learning_rate": NONNEG, "b1": UNIT, "b2": UNIT, "eps": POSITIVE,
                "eps_root": NONNEG, "weight_decay": NONNEG, "momentum": UNIT,
                "initial_accumulator_value": NONNEG}


# Upper bounds of ExperimentConfig's counts, and how a message writes them: a batch's
# ids and positions are int32; an eval set past 2**40 examples would take days (2**63 ran
# "forever", 1e30 overflowed grain's range after the training).
_COUNT_LIMITS = {"batch_size": (2**31 - 1, "2**31 - 1"),
                 "eval_batch_size": (2**31 - 1, "2**31 - 1"),
                 "num_eval_examples": (2**40, "2**40 (1.1e12)")}


@gin.configurable
def dense_optimizer(name: str = "sgd", learning_rate: float = 0.1,
                    clip_norm: float | None = None, **kwargs) -> DenseOptimizer:
  """optax optimizer for the dense network, by name (`sgd`, `adam`, `adagrad`, `adamw`).

  `clip_norm`: scale the dense gradients down to this global norm when it is larger
  (`optax.clip_by_global_norm`, before the optimizer; the embedding tables' sparse updates
  are not clipped). None: no clipping."""
  makers = {"sgd": optax.sgd, "adam": optax.adam, "adagrad": optax.adagrad,
            "adamw": optax.adamw}
  if not isinstance(name, str) or name not in makers:
    raise ConfigError(f"dense_optimizer.name: unknown '{name}' (known: {', '.join(makers)})")
  params = inspect.signature(makers[name]).parameters
  unknown = [f"dense_optimizer.{k}" for k in kwargs if k not in params]
  if unknown:
    raise ConfigError(f"{', '.join(unknown)}: optax.{name} takes no such option (it takes: "
                      f"{', '.join(params)})")
  for key, value in dict(kwargs, learning_rate=learning_rate).items():
    if key in _DENSE_RULES and not callable(value) and not (key == "momentum" and value is None):
      hparam(f"dense_optimizer.{key}", value, _DENSE_RULES[key])   # schedules pass as is
  if clip_norm is not None:
    clip_norm = hparam("dense_optimizer.clip_norm", clip_norm, POSITIVE)
  return DenseOptimizer(makers[name](learning_rate, **_checked_kinds(name, kwargs)),
                        learning_rate, clip_norm, (("name", name), *kwargs.items()))


@dataclasses.dataclass(frozen=True)
class DenseOptimizer:
  """The dense params' optax transformation and the learning rate it was built with (a
  number or a `Schedule`): the metrics lines log a scheduled rate, which optax keeps out of
  sight inside `update`. `init` and `update` are optax's, and it unpacks as optax's
  transformations do (`init, update = tx`). With `clip_norm`, `update` first scales the
  gradients to that global norm; the clipping keeps no state, so the optimizer state (and
  a checkpoint's) is the same with and without it."""

  tx: optax.GradientTransformation
  learning_rate: Any
  clip_norm: float | None = None
  # `dense_optimizer`'s other arguments `(("name", name), (option, value), ...)`:
  # W/config.gin writes the call for a config given in Python (`config_gin`); None for one
  # built by hand
  call: tuple | None = dataclasses.field(default=None, compare=False)

  def init(self, params):
    return self.tx.init(params)

  def update(self, updates, state, params=None, **extra_args):
    if self.clip_norm is not None:
      updates, _ = optax.clip_by_global_norm(self.clip_norm).update(updates,
                                                                     optax.EmptyState())
    return self.tx.update(updates, state, params, **extra_args)

  def __iter__(self):
    return iter((self.init, self.update))


def _checked_kinds(name: str, kwargs: dict) -> dict:
  """`kwargs` with the dense optimizer's bool and dtype options checked (dtypes resolved);
  sgd's momentum-only options refused without a momentum (optax ignores them then)."""
  kwargs = dict(kwargs)
  if "nesterov" in kwargs:   # 'False' is truthy
    flag(kwargs["nesterov"], "dense_optimizer.nesterov")
  for key in ("mu_dtype", "accumulator_dtype"):
    if kwargs.get(key) is not None:
      kwargs[key] = _float_dtype(f"dense_optimizer.{key}", kwargs[key])
  if kwargs.get("mask") is not None:
    kwargs["mask"] = _checked_mask(kwargs["mask"])
  unused = [k for k in ("nesterov", "accumulator_dtype") if kwargs.get(k)]
  if name == "sgd" and kwargs.get("momentum") is None and unused:
    raise ConfigError(f"{', '.join(f'dense_optimizer.{k}' for k in unused)}: applies only "
                      f"with dense_optimizer.momentum (optax.sgd ignores it without); bind "
                      f"a momentum, e.g. dense_optimizer.momentum = 0.9")
  return kwargs


def _checked_mask(mask) -> Any:
  """adamw's `mask` (which parameters decay) as a callable that checks, when the optimizer
  is initialised (traced, before compiling), that the mask is a pytree of bools whose
  structure is a prefix of the params'. optax took e.g. `'kernel'` or `1` as a leaf that is
  true (decaying everything); a mask of other keys was a pytree traceback at init."""
  if isinstance(mask, type) or not (callable(mask) or _bool_leaves(mask)):
    raise ConfigError(f"dense_optimizer.mask must be a pytree of True/False (a prefix of the "
                      f"dense params, e.g. {{'bottom_mlp': True, 'top_mlp': False}}) or "
                      f"a function of the params returning one, got {reprlib.repr(mask)}")

  def checked(params):
    what = "dense_optimizer.mask" + ("'s result" if callable(mask) else "")
    try:
      tree = mask(params) if callable(mask) else mask
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"dense_optimizer.mask: calling {reprlib.repr(mask)} on the dense "
                        f"params failed: {type(e).__name__}: {e}") from None
    if not _bool_leaves(tree):
      raise ConfigError(f"{what} must be a pytree of True/False, got {reprlib.repr(tree)}")
    wrong = _mismatch(tree, params, "")
    if wrong:
      raise ConfigError(f"{what} does not match the dense params (its tree must be a prefix "
                        f"of theirs): {wrong}")
    return tree
  return checked


def _mismatch(mask, params, path: str) -> str | None:
  """Where `mask` is not a prefix of the `params` tree (`path` as `['a']['b']`), or None."""
  if not isinstance(mask, (dict, list, tuple)):
    return None   # a bool: it covers the whole subtree
  at = path or "the top level"
  if isinstance(mask, dict):
    if not isinstance(params, dict):
      return f"{at} is a dict, the params have a {type(params).__name__} there"
    if set(mask) != set(params):
      return (f"at {at} the mask has keys {sorted(map(str, mask))}, the params "
              f"{sorted(map(str, params))}")
    pairs = [(f"[{k!r}]", mask[k], params[k]) for k in mask]
  else:
    if not isinstance(params, (list, tuple)) or len(params) != len(mask):
      return (f"{at} is a sequence of {len(mask)}, the params have "
              f"{reprlib.repr(params) if not isinstance(params, dict) else 'a dict'} there")
    pairs = [(f"[{i}]", m, p) for i, (m, p) in enumerate(zip(mask, params))]
  for key, m, p in pairs:
    wrong = _mismatch(m, p, path + key)
    if wrong:
      return wrong
  return None


def _bool_leaves(tree) -> bool:
  """`tree` is a pytree (dicts, lists, tuples) with only bool leaves (or bool arrays)."""
  leaves = jax.tree.leaves(tree)
  return bool(leaves) and all(isinstance(x, (bool, np.bool_)) or getattr(x, "dtype", None)
                              == np.bool_ for x in leaves)


def _float_dtype(binding: str, value) -> Any:
  """`value` as a float dtype (`'bfloat16'`, `'bf16'`, `jnp.float32`, ...), or a ConfigError."""
  if isinstance(value, str):
    value = quant.DTYPE_ALIASES.get(value.strip().lower(), value.strip().lower())
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ConfigError(f"{binding} must be a float dtype such as 'float32' or 'bfloat16', got "
                      f"{value!r}")
  return dtype


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything a config file decides.

  Attributes:
    embedding: `(tables, features)`, e.g. `@uniform_tables()`.
    model: flax module (`@build_model()`); takes dense `[B, num_dense]` and pooled
      embeddings `[B, features, dim]`, returns logits `[B]`. Features of tables of mixed
      dims arrive padded to the widest: only models with a `feature_dims` field take them
      (DCNv2, TwoTower), and the config sets it from the tables.
    batch_size: global train batch (split over every device).
    eval_batch_size: global eval batch.
    num_eval_examples: size of the fixed eval set drawn from synthetic sources (file
      sources are read whole, once).
    dense_optimizer: optax transformation for the dense params.
    sparse_optimizer: row-wise optimizer for the tables (`jaxrec.embedding.optimizers`).
    table_optimizers: `{table name or pattern: sparse optimizer}` for tables that train
      with another optimizer than `sparse_optimizer` (e.g. `{'user_*':
      @user/RowWiseAdagrad()}`, `fnmatch` patterns); each such table is stacked apart, with
      its own optimizer state.
    train_data, eval_data: `synthetic` or a path (TSV file/glob/dir or preprocessed dir);
      `--train_data` / `--eval_data` override them.
    num_dense: dense features per example.
  """

  embedding: tuple[tuple[TableSpec, ...], tuple[FeatureSpec, ...]] = gin.REQUIRED
  model: Any = gin.REQUIRED
  batch_size: int = 512
  eval_batch_size: int = 4096
  num_eval_examples: int = 32768
  dense_optimizer: Any = None
  sparse_optimizer: Any = None
  table_optimizers: Any = None
  train_data: str = "synthetic"
  eval_data: str = "synthetic"
  num_dense: int = 13

  @property
  def tables(self) -> tuple[TableSpec, ...]:
    return tuple(self.embedding[0])

  @property
  def features(self) -> tuple[FeatureSpec, ...]:
    return tuple(self.embedding[1])

  def dense_tx(self) -> DenseOptimizer | optax.GradientTransformation:
    return self.dense_optimizer if self.dense_optimizer is not None else dense_optimizer()

  def __post_init__(self):
    for name in ("batch_size", "eval_batch_size", "num_eval_examples"):
      value = getattr(self, name)   # gin writes `1e6` as a float: a whole one is a count
      if is_whole(value, -math.inf):   # anything else is left for `validate` to refuse
        object.__setattr__(self, name, int(value))
    if _takes_feature_dims(self.model):
      dims = self._mixed_feature_dims()
      if dims != self.model.feature_dims:
        object.__setattr__(self, "model", self.model.clone(feature_dims=dims))

  def _mixed_feature_dims(self) -> tuple[int, ...] | None:
    """Each feature's dim when the features' tables have mixed dims; None for one dim, or
    when the embedding is malformed (`validate` names what is wrong)."""
    try:
      check_embedding(self.embedding)
      validate(self.tables, self.features)
    except ConfigError:
      return None
    return (feature_dims(self.tables, self.features)
            if mixed_dims(self.tables, self.features) else None)

  def sparse_tx(self):
    """The tables' sparse optimizer: `sparse_optimizer` (SGD when unbound), or a
    `TableOptimizers` when `table_optimizers` names some tables."""
    return sparse_tx(self.sparse_optimizer, self.table_optimizers,
                     [t.name for t in self.tables])

  def validate(self, num_devices: int, train: bool = True) -> None:
    """`ConfigError` naming the first bad binding. `train=False` (a run that only
    evaluates, e.g. a finished run resumed on new --eval_data) builds no training batch:
    `batch_size` need not divide the `num_devices` devices then (`check_batch` later if
    it trains after all)."""
    self._check_parts()
    validate(self.tables, self.features)
    self.sparse_tx()   # `table_optimizers` against the tables (once they are valid: two
    # tables of one name read as a pattern that names no table)
    mixed = mixed_dims(self.tables, self.features)
    if mixed and not _takes_feature_dims(self.model):
      # not led by a binding's name: `launch.user_message` would put the model's line in
      # front, where the dims may come from a flag
      where = [f"{n} at {gin_usage.bound_at(n)}"
               for n in (*_dim_bindings(self.tables), "ExperimentConfig.model",
                         "build_model.name")   # (a --gin_bindings that chose the model)
               if gin_usage.bound_at(n)]
      raise ConfigError(
          f"the model {type(self.model).__name__} takes features of one embedding dim (it "
          "has no feature_dims field: DLRM's and DeepFM's interactions pair every two "
          f"features), but the features read tables of {mixed}"
          + (f" ({'; '.join(where)})" if where else "")
          + "; give every table one dim (uniform_tables.dim, each TableSpec.dim or each "
          "embedding_tables.tables entry's), or use "
          "a model that concatenates its features (dcnv2, two_tower)")
    for name in ("batch_size", "eval_batch_size", "num_eval_examples"):
      value = getattr(self, name)
      if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ConfigError(f"ExperimentConfig.{name} must be an integer, got {value!r}")
      if value <= 0:
        raise ConfigError(f"ExperimentConfig.{name} must be positive, got {getattr(self, name)}")
      limit = _COUNT_LIMITS[name]   # 1e30 passed, trained, then was a traceback in the eval
      if value > limit[0]:
        shown = f"{value:,}" if value < 10**15 else f"{float(value):.3g}"
        raise ConfigError(f"ExperimentConfig.{name} must be at most {limit[1]}, got {shown}")
    for name in ("batch_size", "eval_batch_size") if train else ("eval_batch_size",):
      self.check_batch(name, num_devices)
    for name in DATA_FIELDS:
      if not isinstance(getattr(self, name), str) or not getattr(self, name):
        raise ConfigError(f"ExperimentConfig.{name} must be 'synthetic' or a path, got "
                          f"{getattr(self, name)!r}")

  def check_batch(self, name: str, num_devices: int, why: str = "") -> None:
    """`ConfigError` unless batch size `name` (`batch_size`, `eval_batch_size`) divides
    over the `num_devices` devices of the mesh; `why` is added to the message."""
    if int(getattr(self, name)) % num_devices:
      raise ConfigError(f"ExperimentConfig.{name}={getattr(self, name)} is not divisible by "
                        f"the {num_devices} devices of the mesh{why}")

  def _check_parts(self) -> None:
    """The bound objects are of the right kind (e.g. `@SGD()`, not `'sgd'` or `@SGD`)."""
    check_embedding(self.embedding)
    if not isinstance(self.model, nn.Module):
      raise ConfigError(f"ExperimentConfig.model must be a model, e.g. @build_model(), got "
                        f"{reprlib.repr(self.model)}")
    if not isinstance(self.num_dense, numbers.Integral) or isinstance(self.num_dense, bool) \
        or self.num_dense < 0:
      raise ConfigError(f"ExperimentConfig.num_dense must be an integer >= 0, got "
                        f"{self.num_dense!r}")
    dense, sparse = self.dense_optimizer, self.sparse_optimizer
    if dense is not None and not _has_methods(dense, "init", "update"):
      raise ConfigError(f"ExperimentConfig.dense_optimizer must be an optax transformation, "
                        f"e.g. @dense_optimizer(), got {dense!r}")
    check_sparse_optimizer(sparse)


def sparse_tx(sparse_optimizer, table_optimizers, tables):
  """`ExperimentConfig.sparse_tx` of these two fields, for the table names `tables`
  (also for a checkpoint copy's printed stacks: `checkpoint.copy_optimizer`)."""
  default = sparse_optimizer if sparse_optimizer is not None else sparse_optimizers.SGD()
  return sparse_optimizers.per_table(default, table_optimizers, tables=list(tables))


def _dim_bindings(tables) -> list[str]:
  """The bindings that gave `tables` their dims, for a mixed-dims error: each spec of its own
  (`cat/TableSpec.dim`) whose dim is not the most common one, or `uniform_tables.dim` when
  no spec has its own (an include's unused `uniform_tables.dim` was named beside them)."""
  own = {t.name: b for t in tables if (b := bound_field(t, "dim"))}
  if not own:
    return ["uniform_tables.dim"]
  common = collections.Counter(t.dim for t in tables).most_common(1)[0][0]
  return list(dict.fromkeys(own[t.name] for t in tables if t.name in own and t.dim != common))


def _takes_feature_dims(model) -> bool:
  """Whether `model` is a flax module that takes features of mixed dims (a `feature_dims`
  field, e.g. DCNv2, TwoTower)."""
  return isinstance(model, nn.Module) and "feature_dims" in getattr(
      type(model), "__dataclass_fields__", {})


def check_sparse_optimizer(sparse) -> None:
  """`ConfigError` unless `sparse` (`ExperimentConfig.sparse_optimizer`) is None or a sparse
  optimizer instance (`@Adagrad`, the class, and text are refused)."""
  if sparse is not None and not _has_methods(sparse, "state_layout", "update"):
    hint = (f" (@{sparse.__name__} names the class: write @{sparse.__name__}() for an "
            "optimizer)" if isinstance(sparse, type) and hasattr(sparse, "state_layout")
            else "")
    # (their reprs dumped function objects)
    if isinstance(sparse, (DenseOptimizer, optax.GradientTransformation)):
      got = "an optax (dense) optimizer, e.g. @dense_optimizer()"
    else:
      got = reprlib.repr(sparse)
    raise ConfigError(f"ExperimentConfig.sparse_optimizer must be a sparse optimizer, "
                      f"e.g. @RowWiseAdagrad() or @sparse_optimizer(), got {got}{hint}")


def check_embedding(emb) -> None:
  """`ConfigError` unless `emb` (`ExperimentConfig.embedding`) is `(tables, features)`."""
  if (not isinstance(emb, (tuple, list)) or len(emb) != 2
      or not all(isinstance(x, (tuple, list)) for x in emb)
      or not all(isinstance(t, TableSpec) for t in emb[0])
      or not all(isinstance(f, FeatureSpec) for f in emb[1])):
    raise ConfigError(f"ExperimentConfig.embedding must be (tables, features), e.g. "
                      f"@uniform_tables(), got {reprlib.repr(emb)}")


def _has_methods(obj, *names: str) -> bool:
  """An instance (not a class: `@SGD` where `@SGD()` was meant) with these methods."""
  return not isinstance(obj, type) and all(callable(getattr(obj, n, None)) for n in names)


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """Per-run settings from the launcher (see `scripts/train.py` for the flags)."""

  num_steps: int = 1000
  mesh: str = "auto"
  plan: str = "auto"
  train_data: str | None = None
  eval_data: str | None = None
  log_every: int = 100
  eval_every: int = 0
  checkpoint_every: int = 0
  keep_checkpoints: int = 3
  seed: int = 0
  on_nan: str = "stop"
  bad_rows: str = "error"
  memory_per_device: int | None = None
  progress: bool = True
  predictions: str | None = None   # the final eval's per-example scores (`predictions.py`)
  eval_labels: bool = True   # False: eval TSV files without labels, scored (--predictions) only
  early_stop_metric: str | None = None   # `early_stop`: None or "" is off
  early_stop_patience: int = 3
  early_stop_min_delta: float = 0.0

  def most_checkpoints_kept(self) -> int:
    """The most checkpoints this run can keep at once: `keep_checkpoints` (+ 1, early
    stopping's best), or the saves `num_steps` allows, when fewer (every `checkpoint_every`
    steps, every eval with early stopping, and the last; a resume saves fewer). What the
    offload tier's disk-space warning prices snapshots for."""
    every = self.checkpoint_every or self.num_steps
    if self.early_stop_metric:   # each eval step saves too, and the best one is kept
      every = min(every, self.eval_every)
    kept = self.keep_checkpoints + bool(self.early_stop_metric)
    return min(kept, -(-self.num_steps // every))

  def validate(self) -> None:
    if self.num_steps <= 0:
      raise ConfigError(f"--num_steps must be positive, got {self.num_steps}")
    if self.log_every <= 0:   # before the >= 0 check below: -1 must not read as "0 is fine"
      raise ConfigError(f"--log_every must be positive, got {self.log_every}")
    for name in ("eval_every", "checkpoint_every"):
      if getattr(self, name) < 0:
        raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
    for name in DATA_FIELDS:   # `--train_data=$UNSET` fell back to the config's
      if getattr(self, name) is not None and not getattr(self, name).strip():
        raise ConfigError(f"--{name}: empty; give 'synthetic' or a path (or leave the flag out "
                          f"to use ExperimentConfig.{name})")
    if self.keep_checkpoints < 1:   # before planning and compiling (the manager checks too)
      raise ConfigError(f"--keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
    # jax.random.key keeps 32 bits of the seed (x64 off): S and S + 2**32 (or -1 and
    # 2**32 - 1) initialised the same model, and a seed past int64 was a traceback.
    if not 0 <= self.seed < 2**32:
      raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
    if self.on_nan not in ("stop", "rollback"):
      raise ConfigError(f"--on_nan must be stop or rollback, got '{self.on_nan}'")
    if self.bad_rows not in ("error", "skip"):
      raise ConfigError(f"--bad_rows must be error or skip, got '{self.bad_rows}'")
    predictions.check_path(self.predictions)
    if not self.eval_labels and self.predictions is None:
      raise ConfigError("--noeval_labels: eval data without labels gives no metrics, only "
                        "each example's score: add --predictions=PATH to write them")
    early_stop.check_options(self)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | None, flag: str) -> int | None:
  """`16GiB`, `512MB`, `1e9` → bytes; None (the flag left out) stays None."""
  if text is None:
    return None
  if not text.strip():   # `--memory_per_device=$UNSET` planned for the default budget
    raise ConfigError(f"{flag}: empty; give a size like 16GiB or 512MB (or leave the flag out "
                      "for the default)")
  s = text.strip().lower()
  num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
  unit = s[len(num):]
  if unit in ("k", "m", "g", "t"):   # docker and the JVM read `16g` as GiB, Kubernetes as GB
    big, power = unit.upper(), " KMGT".index(unit.upper())
    raise ConfigError(f"{flag}: '{text}' could mean {num}{big}B ({num} x 10^{3 * power} bytes) "
                      f"or {num}{big}iB ({num} x 2^{10 * power}): write one of them")
  if unit in ("ki", "mi", "gi", "ti"):   # Kubernetes' spelling of KiB ... TiB
    unit += "b"
  try:
    value = float(num) * _UNITS[unit]
  except (ValueError, KeyError):
    raise ConfigError(f"{flag}: '{text}' is not a size like 16GiB or 512MB") from None
  if value <= 0:
    raise ConfigError(f"{flag}: must be positive, got '{text}'")
  if not math.isfinite(value) or value < 1:   # 1e999 overflows int(); 1e-3 is 0 bytes
    raise ConfigError(f"{flag}: '{text}' is not a size from 1 byte up")
  if not unit and value < 2**20:   # `1.5` meant GiB: planned for 1 byte, "fits nothing"
    raise ConfigError(f"{flag}: '{text}' is {int(value):,} bytes, too small to be meant; give a "
                      f"unit, e.g. {num}GiB or {num}MiB (a `b` for bytes)")
  return int(value)



def absolute_data_paths() -> None:
  """Rebinds `ExperimentConfig.train_data` / `eval_data` bound to a relative path that
  names something here (a file, directory or a glob's matches) to its absolute path, so
  that `W/config.gin` names the data wherever it is rerun from (it recorded the path as
  typed: rerun from another directory, it read no file or another one). `synthetic` and
  paths naming nothing (the run reports those) stay as given. Call after `launch.parse_gin`.
  `open_source.vocab` likewise: a relative one made a rerun of config.gin elsewhere read
  no vocabulary directory or another."""
  for binding in [f"ExperimentConfig.{name}" for name in DATA_FIELDS] + ["open_source.vocab"]:
    try:
      binding, bound = gin_usage.through_macros(binding, gin.query_parameter(binding))
    except ValueError:   # not bound: the default, 'synthetic'
      continue
    value = bound
    if isinstance(value, str) and value.startswith("~"):   # gin's strings are not expanded
      value = os.path.expanduser(value)                     # by a shell
    if (isinstance(value, str) and value != "synthetic" and not os.path.isabs(value)
        and (os.path.exists(value) or glob.glob(value))):
      joined = os.path.join(os.getcwd(), value)
      folded = os.path.abspath(value)   # `a/../b` folded as text: another file when `a`
      same = os.path.realpath(folded) == os.path.realpath(joined)   # is a symlink
      value = folded if same else joined
    if value is not bound:   # the macro the path came through, if any, holds it
      with gin.unlock_config():
        gin.bind_parameter(binding, value)


def config_gin_header(options: RunOptions, unwritten: Sequence[str] = ()) -> str:
  """The comment `W/config.gin` starts with: the run's flags that change what it trains
  and that no gin binding records (a rerun of the file alone used seed 0, 1000 steps), and
  the `ExperimentConfig` fields given in Python that gin cannot write (`unwritten`,
  `config_gin.recorded`): then the file does not rerun the run, and says so."""
  flags = (f"--seed={options.seed} --num_steps={options.num_steps} "
           f"--bad_rows={options.bad_rows} --on_nan={options.on_nan}")
  if options.early_stop_metric:   # where it stopped: the evals it watched decided
    flags += (f" --eval_every={options.eval_every} "
              f"--early_stop_metric={options.early_stop_metric} "
              f"--early_stop_patience={options.early_stop_patience} "
              f"--early_stop_min_delta={options.early_stop_min_delta:g}")
  if unwritten:
    return (f"# The operative config of a jaxrec run, which had {flags}.\n"
            "# Its ExperimentConfig was given in Python, and this file lacks what gin cannot "
            "write:\n" + "".join(f"#   {u}\n" for u in unwritten) +
            "# so a rerun of it alone fails or trains another model.\n\n")
  piped = [f"--{n}={p}" for n in DATA_FIELDS if (p := getattr(options, n)) and _is_pipe(p)]
  if piped:   # `<(zcat ...)` recorded as /dev/fd/63: a rerun of this file read no data
    return (f"# The operative config of a jaxrec run, which had {flags}.\n"
            f"# It read {' and '.join(piped)}, a pipe that is gone: to rerun it, bind "
            "ExperimentConfig's data to files (or give the flags) with --gin_file=<this file> "
            f"{flags}.\n\n")
  return (f"# The operative config of a jaxrec run, which had {flags}.\n"
          f"# Rerun it with --gin_file=<this file> {flags}\n"
          "# (and --plan=<its workdir>/plan.json for its placement).\n\n")


def _is_pipe(path: str) -> bool:
  """Whether a data path is a pipe (a shell's `<(...)`, `/dev/fd/N`, a named pipe)."""
  try:
    return stat.S_ISFIFO(os.stat(path).st_mode) or path.startswith(_FD_PATHS)
  except OSError:
    return path.startswith(_FD_PATHS)


_FD_PATHS = ("/dev/fd/", "/proc/self/fd/")
