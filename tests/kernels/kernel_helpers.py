"""Shared tiny fixtures for the kernel tests (sizes small: Pallas runs in interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from jaxrec.kernels import platform, quantize

# Pallas runs compiled (Triton) on a GPU and in interpret mode elsewhere: on a GPU machine
# (`JAX_PLATFORMS=cuda`, benchmarks/gpu_checks.sh) these tests check the compiled kernels.
INTERPRET = not platform.is_gpu()

# The GPU that `lower_for_gpu` compiles for when the host has none: jax 0.10 assumed
# compute capability 9.0 then; jax 0.11 refuses ("No supported GPU devices found") unless
# an abstract mesh names the device.
_GPU = AbstractMesh((1,), ("gpu",), abstract_device=AbstractDevice(
    device_kind="NVIDIA H100", num_cores=None, platform="gpu"))

DTYPES = ("float32", "bfloat16", "float16", "int8")
# Relative spacing of each storage dtype: one ulp of slack between kernels.
ULP = {"float32": 2.0 ** -22, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}


def make_table(rng, rows, dim, dtype):
  """A `[rows, dim]` table in `dtype` (int8: a QuantizedTable) and its f32 values."""
  t = rng.normal(size=(rows, dim)).astype(np.float32)
  if dtype == "int8":
    qt = quantize(jnp.asarray(t))
    return qt, np.asarray(qt.q, np.float32) * np.asarray(qt.scale)[:, None] + np.asarray(
        qt.bias)[:, None]
  table = jnp.asarray(t).astype(dtype)
  return table, np.asarray(table.astype(jnp.float32))


def make_bags(rng, n, l, rows, pooling, id_range=None, absent=0.3):
  """Bags `idx [n, l]` (-1 padding, duplicates) and weights `w` for a pooling mode."""
  hi = rows if id_range is None else id_range
  idx = rng.integers(0, hi, size=(n, l)).astype(np.int32)
  if l > 1:
    idx[rng.random((n, l)) < absent] = -1
    idx[0, :] = -1  # an empty bag
    idx[1, :] = idx[1, 0] if idx[1, 0] >= 0 else 3  # one id repeated within a bag
  present = idx >= 0
  if pooling == "sum":
    w = present.astype(np.float32)
  elif pooling == "mean":
    w = present / np.maximum(present.sum(1, keepdims=True), 1)
  elif pooling == "weighted":
    w = rng.uniform(0.1, 2.0, size=(n, l)) * present
  else:
    raise ValueError(pooling)
  return idx, w.astype(np.float32)


def np_pool(values, idx, w):
  """Dense numpy reference of weighted-sum pooling."""
  out = np.zeros((idx.shape[0], values.shape[1]), np.float64)
  for n in range(idx.shape[0]):
    for l in range(idx.shape[1]):
      if 0 <= idx[n, l] < values.shape[0]:
        out[n] += w[n, l] * values[idx[n, l]].astype(np.float64)
  return out


def as_f32(x):
  """f32 numpy values of a dense array or a QuantizedTable."""
  if hasattr(x, "q"):
    return np.asarray(x.q, np.float32) * np.asarray(x.scale)[:, None] + np.asarray(x.bias)[:, None]
  return np.asarray(jnp.asarray(x).astype(jnp.float32))


def raw_bits(x):
  """The stored bytes of a table (all parts of a QuantizedTable) for bit-exact checks."""
  parts = (x.q, x.scale, x.bias) if hasattr(x, "q") else (x,)
  return [np.asarray(p).view(np.uint8).reshape(np.asarray(p).shape[0], -1) for p in parts]


def lower_for_gpu(fn, *args) -> str:
  """The StableHLO text of `jax.jit(fn)(*args)` lowered for CUDA (Pallas kernels: Triton
  IR), on any host: an H100 when there is no GPU."""
  with use_abstract_mesh(_GPU):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
