"""Fused embedding kernels: pooled-lookup bandwidth against the device's memcpy bandwidth.

Prints JSON lines `{"benchmark": "kernels", ...}`:
- GPU: the Pallas lookup's bytes/s (rows gathered + ids/weights + output) divided by the
  measured device-to-device copy bandwidth (`"ratio"`, `"goal": 0.8`), and the XLA
  reference for comparison; then the fused backward + optimizer update.
- elsewhere: the XLA path's bytes/s with `"platform": "cpu"` (Pallas only runs in
  interpret mode there, so no ratio is reported).

  python benchmarks/kernels.py [--rows=1000000 --dim=128 --bags=65536 --bag_len=8
                                --dtype=float32 --iters=20]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import check_at_least
from jaxrec.kernels import RowWiseAdagrad, init_opt_state, lookup_pool, quantize, sparse_update
from jaxrec.kernels import platform


def _time(fn, *args, iters: int) -> float:
  """Median seconds per call after one compile-and-warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def memcpy_bandwidth(nbytes: int, iters: int) -> float:
  """Device copy bandwidth in bytes/s (read + write) of an `nbytes` buffer."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  copy = jax.jit(lambda v: v + 1.0)  # forces a real read and write of every element
  return 2 * x.nbytes / _time(copy, x, iters=iters)


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


SIZE_FLAGS = ("rows", "dim", "bags", "bag_len", "iters")


def _check_sizes(p: argparse.ArgumentParser, args) -> None:
  """Usage error (exit 2) for a size or count below 1: `--iters=0` timed nothing and
  printed NaN (not JSON), `--rows=0` failed with a numpy traceback."""
  check_at_least(p.error, vars(args), SIZE_FLAGS)


def _parser() -> argparse.ArgumentParser:
  """Flags, with GPU-sized defaults on any GPU backend (`gpu`, `cuda`, `rocm`)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
                 help='timed calls per kernel (GPU default 20)')
  return p


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

  kernels = ["xla", "pallas"] if args.on_gpu else ["xla"]
  results = {}
  for kernel in kernels:
    f = jax.jit(lambda t, i, v, k=kernel: lookup_pool(t, i, v, kernel=k))
    sec = _time(f, table, idx, w, iters=args.iters)
    results[kernel] = nbytes / sec
    line = dict(base, op="lookup_pool", kernel=kernel, seconds=sec, bytes_per_sec=nbytes / sec)
    if kernel == "pallas":
      bw = memcpy_bandwidth(max(nbytes, 256 << 20), args.iters)
      line.update(memcpy_bytes_per_sec=bw, ratio=results["pallas"] / bw, goal=0.8)
    print(json.dumps(line), flush=True)

  opt = RowWiseAdagrad(lr=0.01)
  state = init_opt_state(opt, args.rows, d)
  grad = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  for kernel in kernels:
    f = update_fn(opt, kernel, args.dtype)
    table, state = jax.block_until_ready(f(table, state, idx, w, grad))
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      table, state = jax.block_until_ready(f(table, state, idx, w, grad))
      times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    print(json.dumps(dict(base, op="sparse_update", optimizer="RowWiseAdagrad", kernel=kernel,
                          seconds=sec, slots_per_sec=n * l / sec)), flush=True)


if __name__ == "__main__":
  main()
