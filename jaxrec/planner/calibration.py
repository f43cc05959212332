"""Cost coefficients: seconds per unit of each cost term, from defaults, a calibration run
on this machine, or a fit to measured profiles (`profile.fit_coefficients`).

`calibrate()` times, on every device at once under `shard_map` (so devices that share a
host's cores contend as they do in a step): a row gather (`jnp.take`), pooling (weighted
bag sums through an index and their scatter-add backward; and, without dedup, as a reshape
and a sum whose backward is a broadcast), a scatter-add update, the dedup of int32 ids
(`local_ops.unique_inverse`), and psum / all_gather / psum_scatter / all_to_all over all
devices. Each is timed at two sizes;
the slope is seconds per byte. The collectives' intercepts, less the time to call a trivial
program on every device, give seconds per collective; a program of 1 + k tiny stacks
(gather, pooling, update) against one of 1 gives seconds per stack. Results are cached as
JSON (`default_cache_path()`)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import numbers
import os
import pathlib
import sys
import time
from typing import Any, Mapping

import numpy as np

from jaxrec import signals
from jaxrec.errors import ConfigError
from jaxrec.files import user_cache_dir, write_text_atomic
from jaxrec.planner.cost_model import COST_TERMS

# What `calibrate` times, recorded in its meta (`version`): a calibration of another
# version timed operations the step no longer runs, or no longer as it runs them. 2
# (2026-12-06): `sort_bytes` times the collection's dedup (`local_ops.unique_inverse`;
# a bare sort before), and the step stopped paying a per-stack reorder's scatter-adds.
VERSION = 2

# A generic accelerator: ~1 TB/s memory, ~200 GB/s random row gather, ~100 GB/s links,
# 20 us per collective, 10 us of kernel launches per stack. Replace with
# `scripts/plan.py --calibrate` numbers, or fit them to a job's profile.
DEFAULT_COEFFICIENTS = {
    "const": 0.0,
    "collectives": 20e-6,
    "stacks": 10e-6,
    "sort_bytes": 2e-11,
    "gather_bytes": 5e-12,
    "pool_bytes": 1e-12,
    "stream_bytes": 1e-12,
    "update_bytes": 1e-12,
    "all_gather_bytes": 1e-11,
    "reduce_scatter_bytes": 1e-11,
    "all_to_all_bytes": 1e-11,
    "all_reduce_bytes": 1e-11,
}


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Seconds per unit of each of `COST_TERMS`.

  Attributes:
    coefficients: term name -> seconds per unit (missing terms take the defaults).
    source: where the numbers come from, shown in reports.
    meta: free-form details (platform, devices, date, fit residual).
  """

  coefficients: Mapping[str, float]
  source: str = "defaults"
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    unknown = sorted(set(self.coefficients) - set(COST_TERMS))
    if unknown:
      raise ConfigError(f"calibration: unknown cost terms {unknown} (known: {COST_TERMS})")
    for k, v in self.coefficients.items():   # inf priced every plan alike; true read as 1
      if (isinstance(v, bool) or not isinstance(v, numbers.Real)
          or not (math.isfinite(v) and v >= 0)):
        raise ConfigError(f"calibration: coefficient '{k}' must be a finite number >= 0 "
                          f"(seconds per unit), got {v!r}")

  def vector(self) -> np.ndarray:
    """float64 `[len(COST_TERMS)]` seconds per unit."""
    return np.array([float(self.coefficients.get(k, DEFAULT_COEFFICIENTS[k]))
                     for k in COST_TERMS])

  def to_json(self) -> dict:
    return {"coefficients": {k: float(v) for k, v in zip(COST_TERMS, self.vector())},
            "source": self.source, "meta": dict(self.meta)}

  @classmethod
  def from_json(cls, obj: Mapping) -> "Calibration":
    if not isinstance(obj, Mapping):
      raise ConfigError(f"expected a JSON object, got {type(obj).__name__}")
    for key, kind, need in (("coefficients", Mapping, True), ("meta", Mapping, False),
                            ("source", str, False)):
      if (need or key in obj) and not isinstance(obj.get(key), kind):
        raise ConfigError(f"\"{key}\" must be {'a string' if kind is str else 'an object'}, "
                          f"got {obj.get(key)!r}")
    return cls(dict(obj["coefficients"]), obj.get("source", "file"), dict(obj.get("meta", {})))


DEFAULT = Calibration(DEFAULT_COEFFICIENTS, "defaults (no calibration; run scripts/plan.py "
                      "--calibrate)")


def default_cache_path() -> pathlib.Path:
  """`$JAXREC_CACHE_DIR/calibration.json`, else `$XDG_CACHE_HOME/jaxrec/...`, else
  `~/.cache/jaxrec/calibration.json`."""
  return pathlib.Path(user_cache_dir()) / "calibration.json"


def load_calibration(path: str | os.PathLike | None = None) -> Calibration | None:
  """The cached calibration, or None if there is none."""
  path = pathlib.Path(path) if path else default_cache_path()
  if not path.exists():
    return None
  if path.is_dir():
    raise ConfigError(f"calibration file {path} is a directory, not a calibration file")
  try:
    text = path.read_text()
  except OSError as e:
    raise ConfigError(f"cannot read calibration file {path}: {e.strerror or e}") from None
  try:
    return Calibration.from_json(json.loads(text))
  except (ValueError, KeyError, TypeError) as e:
    why = str(e).removeprefix("calibration: ")
    raise ConfigError(f"calibration file {path} is malformed ({why}); delete it or rerun "
                      "scripts/plan.py --calibrate") from None


def is_current(cal: Calibration, path) -> bool:
  """Whether `cal` (read from `path`) was measured by this version of `calibrate`; logs a
  warning naming the file when it was not."""
  version = cal.meta.get("version", 1)
  if version == VERSION:
    return True
  logging.warning("calibration file %s was measured by an older jaxrec (calibration "
                  "version %s, now %s: the step's operations changed since); rerun "
                  "scripts/plan.py --calibrate", path, version, VERSION)
  return False


def save_calibration(cal: Calibration, path: str | os.PathLike | None = None) -> pathlib.Path:
  """Writes `cal` to `path` (default `default_cache_path()`) whole or not at all: through
  a temporary file of this process, removed if the write fails."""
  path = pathlib.Path(path) if path else default_cache_path()
  path.parent.mkdir(parents=True, exist_ok=True)
  write_text_atomic(path, json.dumps(cal.to_json(), indent=2, sort_keys=True))
  return path


def _backend_started() -> bool:
  """Whether a JAX backend is up (XLA reads `XLA_FLAGS` when it starts; importing jax, as
  `jaxrec.planner` does through the collection, does not start one)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):   # another jax: assume the worst
    return True


def request_cpu_devices(n: int) -> None:
  """Asks XLA for `n` host CPU devices; effective only before a JAX backend starts."""
  if n <= 1 or _backend_started():
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _median_time(fn, *args, reps: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  signals.check()   # SIGINT / SIGTERM deferred by scripts/plan.py: between measurements
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _line(units: list[float], times: list[float]) -> tuple[float, float]:
  """(intercept, slope) >= 0 of a least-squares line through (units, times); when noise
  makes the slope non-positive, the largest size's time / units stands in for it."""
  slope, intercept = np.polyfit(np.asarray(units, float), np.asarray(times, float), 1)
  if not slope > 0:
    slope = times[-1] / units[-1]
  return max(float(intercept), 0.0), float(slope)


def _primitives(lax, jnp, dim: int, bag: int):
  """Per-device programs of the step's operations, `name -> (fn, arrays(m), bytes(m))` for
  `m` rows or ids per device (see `cost_model` for the byte counts they stand for)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxrec.embedding import local_ops  # pylint: disable=g-import-not-at-top
  table_rows = 1 << 14

  def pool(rows, idx, w):  # stage 2 forward (weighted bag sums) and its backward
    def fwd(r):
      return (jnp.take(r, idx, axis=0) * w[..., None]).sum(axis=-2)
    out, vjp = jax.vjp(fwd, rows)
    return vjp(out)[0]

  def stream(rows, w):  # the same without dedup: the slots in order, a reshape and a sum
    def fwd(r):
      return (r.reshape(w.shape + r.shape[-1:]) * w[..., None]).sum(axis=-2)
    out, vjp = jax.vjp(fwd, rows)
    return vjp(out)[0]

  def ids(m, hi):
    return jax.random.randint(jax.random.PRNGKey(m), (m,), 0, hi)

  return {
      "gather_bytes": (lambda t, i: jnp.take(t, i, axis=0),
                       lambda m: (jnp.ones((table_rows, dim), jnp.float32),
                                  ids(m, table_rows)),
                       lambda m: m * dim * 4),
      "pool_bytes": (pool,
                     lambda m: (jnp.ones((m, dim), jnp.float32),
                                ids(m, m).reshape(m // bag, bag),
                                jnp.ones((m // bag, bag), jnp.float32)),
                     lambda m: 2 * m * dim * 4),
      "stream_bytes": (stream,
                       lambda m: (jnp.ones((m, dim), jnp.float32),
                                  jnp.ones((m // bag, bag), jnp.float32)),
                       lambda m: 2 * m * dim * 4),
      "update_bytes": (lambda t, i, d: t.at[i].add(d),
                       lambda m: (jnp.ones((m, dim), jnp.float32), ids(m, m),
                                  jnp.ones((m, dim), jnp.float32)),
                       lambda m: 2 * m * dim * 4),
      # the dedup the collection runs (a sort, and each id's index in the sorted values)
      "sort_bytes": (lambda i: jnp.concatenate(local_ops.unique_inverse(i, i.shape[0], 1 << 30)),
                     lambda m: (ids(m, 1 << 30),), lambda m: m * 4),
  }


def calibrate(num_cpu_devices: int | None = 8, quick: bool = False, reps: int = 5
              ) -> Calibration:
  """Times the primitives on the available devices (see module docstring).

  Args:
    num_cpu_devices: host CPU devices to time on: requested when jax is not imported yet,
      else the first that many (an `XLA_FLAGS` device count set more or fewer: it was used
      whatever this said); ConfigError when the process has fewer. None: 8 requested, and
      what the process has used (scripts/plan.py without --calibration_devices).
    quick: small sizes (for tests); numbers are noisier.
    reps: timed repetitions per measurement (median taken).
  """
  request_cpu_devices(8 if num_cpu_devices is None else num_cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  scale = 1 if quick else 8  # sizes: rows / ids / elements per device
  coef = dict(DEFAULT_COEFFICIENTS)
  raw = {}
  devices = jax.devices()
  if devices[0].platform == "cpu" and num_cpu_devices is not None:
    if len(devices) < num_cpu_devices:
      raise ConfigError(f"--calibration_devices={num_cpu_devices}: this process has "
                        f"{len(devices)} CPU devices (XLA_FLAGS="
                        f"{os.environ.get('XLA_FLAGS', '')!r} sets how many)")
    devices = devices[:num_cpu_devices]
  n = len(devices)
  mesh = Mesh(np.array(devices), ("x",))
  spec = PartitionSpec("x")
  lax = jax.lax

  def on_every_device(fn, arrays):
    """`fn` run by every device on its own copy of `arrays` (stacked on a leading axis)."""
    f = jax.jit(jax.shard_map(lambda *xs: fn(*(x[0] for x in xs))[None], mesh=mesh,
                              in_specs=spec, out_specs=spec))
    placed = [jax.device_put(jnp.broadcast_to(x, (n,) + x.shape), NamedSharding(mesh, spec))
              for x in arrays]
    return f, placed

  # Compute: each device runs the operation at once, as in a step (they share the host's
  # cores on CPU).
  prims = _primitives(lax, jnp, 16, 4)
  for name, (fn, make, nbytes) in prims.items():
    sizes = [256 * scale, 2048 * scale]  # rows or ids per device, as in a step's buffers
    ts = []
    for m in sizes:
      f, args = on_every_device(fn, make(m))
      ts.append(_median_time(f, *args, reps=reps))
    raw[name] = ts
    coef[name] = _line([nbytes(m) for m in sizes], ts)[1]
  # `stacks`: what one more tiny stack (gather, pooling, update of 64 rows) adds to a
  # program, from programs of 1 and 1 + k such stacks.
  k = 4 if quick else 16

  def stacks_program(count):
    def fn(t, i, w, d):
      out = []
      for j in range(count):
        rows = prims["gather_bytes"][0](t[j], i[j])
        grads = prims["pool_bytes"][0](rows, i[j].reshape(-1, 4) % rows.shape[0], w[j])
        out.append(prims["update_bytes"][0](t[j], i[j], grads + d[j]))
      return jnp.stack(out)
    return fn

  m = 64
  ts = []
  for count in (1, 1 + k):
    arrays = (jnp.ones((count, 1024, 16), jnp.float32),
              jax.random.randint(jax.random.PRNGKey(count), (count, m), 0, 1024),
              jnp.ones((count, m // 4, 4), jnp.float32), jnp.ones((count, m, 16), jnp.float32))
    f, args = on_every_device(stacks_program(count), arrays)
    ts.append(_median_time(f, *args, reps=reps))
  raw["stacks"] = ts
  coef["stacks"] = max((ts[1] - ts[0]) / k, 0.0)
  f, args = on_every_device(lambda x: x + 1, (jnp.ones((8,), jnp.float32),))
  call = _median_time(f, *args, reps=reps)  # calling a trivial program on every device
  raw["call"] = call

  meta = {"version": VERSION, "platform": devices[0].platform,
          "device_kind": devices[0].device_kind, "num_devices": n, "quick": quick,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  if n > 1:
    collectives = {  # name -> (fn, bytes moved per device for a per-device buffer of s bytes)
        "all_reduce_bytes": (lambda x: lax.psum(x, "x"), lambda s: 2 * (n - 1) / n * s),
        "all_gather_bytes": (lambda x: lax.all_gather(x, "x", tiled=True),
                             lambda s: (n - 1) * s),
        "reduce_scatter_bytes": (lambda x: lax.psum_scatter(x, "x", scatter_dimension=0,
                                                            tiled=True),
                                 lambda s: (n - 1) / n * s),
        "all_to_all_bytes": (lambda x: lax.all_to_all(x, "x", 0, 0, tiled=True),
                             lambda s: (n - 1) / n * s),
    }
    per_device = [n * 256, n * 16384 * scale]  # float32 elements, divisible by n
    intercepts = []
    for name, (fn, moved) in collectives.items():
      f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))
      ts = [_median_time(f, jax.device_put(jnp.ones((n * m,), jnp.float32),
                                           NamedSharding(mesh, spec)), reps=reps)
            for m in per_device]
      raw[name] = ts
      intercept, coef[name] = _line([moved(m * 4) for m in per_device], ts)
      intercepts.append(max(intercept - call, 0.0))
    coef["collectives"] = float(np.mean(intercepts))
  else:
    meta["note"] = "one device: collective coefficients are defaults"
  meta["raw_times_s"] = raw
  return Calibration(coef, f"calibration on {n} {meta['platform']} device(s)", meta)


def load_or_calibrate(path: str | os.PathLike | None = None, force: bool = False,
                      num_cpu_devices: int = 8) -> Calibration:
  """The cached calibration; runs `calibrate()` and caches it if absent, older than this
  `calibrate` (`is_current`) or `force`."""
  cal = None if force else load_calibration(path)
  if cal is None or not is_current(cal, path or default_cache_path()):
    cal = calibrate(num_cpu_devices)
    save_calibration(cal, path)
  return cal
