"""Fused embedding kernels: pooled-lookup bandwidth against the device's memcpy bandwidth.

Prints JSON lines `{"benchmark": "kernels", ...}`:
- GPU: the Pallas lookup's bytes/s (rows gathered + ids/weights + output) divided by the
  measured device-to-device copy bandwidth (`"ratio"`, `"goal": 0.8`), and the XLA
  reference for comparison; then the fused backward + optimizer update.
- elsewhere: the XLA path's bytes/s with `"platform": "cpu"` (Pallas only runs in
  interpret mode there, so no ratio is reported).

  .venv/bin/python benchmarks/kernels.py [--rows=1000000 --dim=128 --bags=65536 --bag_len=8
                                          --dtype=float32 --iters=20 --reps=10]
                                         [--sweep | --launch=num_warps=8,unroll_slots=false]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import HelpFormatter, check_at_least, emit, interruptible
from jaxrec.errors import ConfigError
from jaxrec.kernels import RowWiseAdagrad, init_opt_state, lookup_pool, quantize, sparse_update
from jaxrec.kernels import platform


def _time(fn, *args, iters: int, reps: int = 1) -> float:
  """Median seconds per call after one compile-and-warm-up call: `iters` rounds of `reps`
  calls issued back to back (then one wait), so on a GPU a round measures the kernels, not
  the host's launch-and-wait latency of each call (tens of microseconds)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(reps)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) / reps)
  return float(np.median(times))


def memcpy_bandwidth(nbytes: int, iters: int, reps: int) -> float:
  """Device copy bandwidth in bytes/s (read + write) of an `nbytes` buffer."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  copy = jax.jit(lambda v: v + 1.0)  # forces a real read and write of every element
  return 2 * x.nbytes / _time(copy, x, iters=iters, reps=reps)


def update_fn(opt, kernel: str, dtype: str):
  """The jitted `sparse_update` of a train step: table and state donated (updated in
  place), compiled with the options the trainer uses for `dtype` tables (on CPU, bfloat16
  without XLA's bf16 normalization, which converts the whole table to f32 per update)."""
  options = platform.table_compiler_options(jax.default_backend(), [dtype])
  return jax.jit(lambda t, s, i, v, g: sparse_update(t, s, i, v, g, opt, kernel=kernel),
                 donate_argnums=(0, 1), compiler_options=options)


def lookup_bytes(table, n, l, d) -> int:
  """Bytes a pooled lookup must move: gathered rows, ids, weights and the f32 output."""
  row = d * (1 if hasattr(table, "q") else jnp.dtype(table.dtype).itemsize)
  row += 8 if hasattr(table, "q") else 0  # scale + bias
  return n * l * (row + 4 + 4) + n * d * 4


SIZE_FLAGS = ("rows", "dim", "bags", "bag_len", "iters", "reps")

# `--sweep`: Triton launch parameters tried for each kernel (one JSON line each).
SWEEP_WARPS, SWEEP_STAGES = (2, 4, 8), (1, 2, 3)
SWEEP_LOOKUP_BLOCKS, SWEEP_UPDATE_BLOCKS = (1024, 2048, 4096, 8192), (1024, 2048, 4096)


def _check_sizes(p: argparse.ArgumentParser, args) -> None:
  """Usage error (exit 2) for a size or count below 1: `--iters=0` timed nothing and
  printed NaN (not JSON), `--rows=0` failed with a numpy traceback."""
  check_at_least(p.error, vars(args), SIZE_FLAGS)
  for flag in ("sweep", "launch"):
    if getattr(args, flag) and not args.on_gpu:
      p.error(f"--{flag} tunes the Triton kernels: it needs a GPU (jax's default backend is "
              f"{jax.default_backend()})")
  if args.sweep and args.launch:
    p.error("--sweep tries every launch setting: leave out --launch")


def parse_launch(error, text: str) -> platform.GpuTuning:
  """`--launch=num_warps=8,unroll_slots=false`: `platform.GpuTuning` with those fields
  replaced (the others keep their defaults); `error(message)` on a bad field or value."""
  fields = {f.name: f for f in dataclasses.fields(platform.GpuTuning)}
  changes = {}
  for item in filter(None, text.split(",")):
    name, sep, value = item.partition("=")
    if name not in fields or not sep:
      error(f"--launch: {item!r} is not NAME=VALUE with NAME one of {', '.join(fields)}")
    if fields[name].type in ("bool", bool):
      if value.lower() not in ("true", "false", "1", "0"):
        error(f"--launch: {name} takes true or false, got {value!r}")
      changes[name] = value.lower() in ("true", "1")
    elif not value.isdigit() or int(value) < 1:
      error(f"--launch: {name} takes a positive integer, got {value!r}")
    else:
      changes[name] = int(value)
  try:
    return dataclasses.replace(platform.GpuTuning(), **changes)
  except ConfigError as e:   # e.g. num_warps=3 (not a power of two)
    error(f"--launch: {str(e).splitlines()[0]}")


def _parser() -> argparse.ArgumentParser:
  """Flags, with GPU-sized defaults on any GPU backend (`gpu`, `cuda`, `rocm`)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=HelpFormatter)
  on_gpu = platform.is_gpu()
  p.set_defaults(on_gpu=on_gpu)
  p.add_argument("--rows", type=int, default=1_000_000 if on_gpu else 100_000,
                 help='table rows (GPU default 1,000,000)')
  p.add_argument("--dim", type=int, default=128 if on_gpu else 64,
                 help='embedding dimension (GPU default 128)')
  p.add_argument("--bags", type=int, default=65_536 if on_gpu else 4_096,
                 help='bags per lookup (GPU default 65,536)')
  p.add_argument("--bag_len", type=int, default=8,
                 help='ids per bag')
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                 help='table storage dtype')
  p.add_argument("--iters", type=int, default=20 if on_gpu else 5,
                 help='timed rounds per kernel (GPU default 20)')
  p.add_argument("--reps", type=int, default=10 if on_gpu else 1,
                 help='calls issued back to back per timed round (GPU default 10)')
  p.add_argument("--sweep", action="store_true",
                 help="GPU only: time the Pallas kernels under every launch setting of "
                      "SWEEP_* (warps, stages, elements per program, lookup slots unrolled "
                      "or looped); one line each")
  p.add_argument("--launch", default="",
                 help="GPU only: time the kernels under these launch settings instead of "
                      "platform.GpuTuning's defaults, e.g. num_warps=8,unroll_slots=false "
                      "(fields: num_warps, num_stages, lookup_block, update_block, "
                      "unroll_slots)")
  return p


def kernels_timed(args) -> list[str]:
  """XLA, and on a GPU Pallas too (elsewhere it would only be interpreted)."""
  return ["xla", "pallas"] if args.on_gpu else ["xla"]


def bench_lookup(args, table, idx, w, base, nbytes) -> None:
  """One line per kernel; the Pallas line carries the ratio to the copy bandwidth."""
  for kernel in kernels_timed(args):
    f = jax.jit(lambda t, i, v, k=kernel: lookup_pool(t, i, v, kernel=k))
    sec = _time(f, table, idx, w, iters=args.iters, reps=args.reps)
    line = dict(base, op="lookup_pool", kernel=kernel, seconds=sec, bytes_per_sec=nbytes / sec)
    if kernel == "pallas":
      bw = memcpy_bandwidth(max(nbytes, 256 << 20), args.iters, args.reps)
      line.update(memcpy_bytes_per_sec=bw, ratio=nbytes / sec / bw, goal=0.8,
                  goal_op=">=")
    emit(**line)


def time_update(f, table, state, idx, w, grad, iters: int, reps: int):
  """Median seconds per update (`reps` chained updates per round); the updated tables."""
  table, state = jax.block_until_ready(f(table, state, idx, w, grad))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    for _ in range(reps):
      table, state = f(table, state, idx, w, grad)
    jax.block_until_ready((table, state))
    times.append((time.perf_counter() - t0) / reps)
  return float(np.median(times)), table, state


def sweep(args, table, idx, w, grad, opt, state, base, nbytes):
  """Pallas lookup and update under each launch setting (`platform.tuned`; jit caches are
  cleared for each, since the setting is read when a kernel is traced)."""
  for warps, stages in itertools.product(SWEEP_WARPS, SWEEP_STAGES):
    for block, unroll in itertools.product(SWEEP_LOOKUP_BLOCKS, (False, True)):
      with platform.tuned(platform.GpuTuning(warps, stages, lookup_block=block,
                                             unroll_slots=unroll)):
        jax.clear_caches()
        f = jax.jit(lambda t, i, v: lookup_pool(t, i, v, kernel="pallas"))
        sec = _time(f, table, idx, w, iters=args.iters, reps=args.reps)
      emit(**dict(base, op="lookup_pool", sweep=True, num_warps=warps, num_stages=stages,
                  block=block, unroll_slots=unroll, seconds=sec, bytes_per_sec=nbytes / sec))
    for block in SWEEP_UPDATE_BLOCKS:
      with platform.tuned(platform.GpuTuning(warps, stages, update_block=block)):
        jax.clear_caches()
        f = update_fn(opt, "pallas", args.dtype)
        sec, table, state = time_update(f, table, state, idx, w, grad, args.iters, args.reps)
      emit(**dict(base, op="sparse_update", sweep=True, num_warps=warps, num_stages=stages,
                  block=block, seconds=sec, slots_per_sec=idx.size / sec))


def main(argv=None):
  p = _parser()
  args = p.parse_args(argv)
  _check_sizes(p, args)

  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.normal(size=(args.rows, args.dim)), jnp.float32)
  table = quantize(values) if args.dtype == "int8" else values.astype(args.dtype)
  del values
  n, l, d = args.bags, args.bag_len, args.dim
  idx = jnp.asarray(rng.integers(0, args.rows, size=(n, l)), jnp.int32)
  w = jnp.ones((n, l), jnp.float32)
  nbytes = lookup_bytes(table, n, l, d)
  base = {"benchmark": "kernels", "platform": jax.default_backend(), "rows": args.rows,
          "dim": d, "bags": n, "bag_len": l, "dtype": args.dtype,
          "device": jax.devices()[0].device_kind}
  opt = RowWiseAdagrad(lr=0.01)
  state = init_opt_state(opt, args.rows, d)
  grad = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  if args.sweep:
    sweep(args, table, idx, w, grad, opt, state, base, nbytes)
    return

  launch = parse_launch(p.error, args.launch)
  base["launch"] = dataclasses.asdict(launch) if args.on_gpu else None
  with platform.tuned(launch):
    bench_lookup(args, table, idx, w, base, nbytes)
    for kernel in kernels_timed(args):
      sec, table, state = time_update(update_fn(opt, kernel, args.dtype), table, state, idx,
                                      w, grad, args.iters, args.reps)
      emit(**dict(base, op="sparse_update", optimizer="RowWiseAdagrad", kernel=kernel,
                  seconds=sec, slots_per_sec=n * l / sec))


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
