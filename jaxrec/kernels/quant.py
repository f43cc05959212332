"""Reduced-precision storage: int8 rows, stochastic rounding, compressed communication.

Every function here is plain `jnp` built only from ops the Pallas Triton lowering supports
(no `round`, no float division by non-constants where exactness matters), so the XLA
reference and the kernels share one definition (results differ only by f32 summation
order of duplicate-id gradients).

- int8 table: `QuantizedTable(q int8 [R, D], scale f32 [R], bias f32 [R])`, row
  `r = q[r] * scale[r] + bias[r]`; `q` spans [-128, 127] between the row's min and max.
- Stochastic rounding: counter-based random bits `hash(seed, row, col)` (no state, the
  same bits in a kernel chunk and in the reference); `cast_store` rounds f32 to the storage
  dtype up or down with probability given by the distance.
- Communication: `comm_cast` / `comm_uncast` compress pooled activations `[..., D]` to
  bf16, fp16 (per-row power-of-two scale: no overflow past 65504) or fp8 (e4m3, per-row
  scale) around the all-to-all; `all_to_all_compressed` does cast + all-to-all + uncast
  with a custom VJP that compresses the backward all-to-all the same way (each direction
  computes its own scales).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.errors import ConfigError

FLOAT_TABLE_DTYPES = ("float32", "bfloat16", "float16")
TABLE_DTYPES = FLOAT_TABLE_DTYPES + ("int8",)
COMM_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "f16": "float16", "fp8": "float8_e4m3fn", "float8": "float8_e4m3fn"}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP16_TOP_EXP = 14  # a float16 row is scaled so its max lies in [2**14, 2**15) (max 65504)
SCALED_COMM_DTYPES = ("float16", "float8_e4m3fn")   # sent with a per-row f32 scale
F32_TINY = np.float32(np.finfo(np.float32).tiny)  # smallest normal f32
_SCALE_CAP = np.float32(np.finfo(np.float32).max / 128)  # int8: 128 * scale is finite


class QuantizedTable(NamedTuple):
  """An int8 table with a per-row affine dequantisation (a pytree).

  Attributes:
    q: int8 `[R, D]`.
    scale: float32 `[R]`.
    bias: float32 `[R]`; row r is `q[r] * scale[r] + bias[r]`.
  """

  q: jax.Array
  scale: jax.Array
  bias: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.q.shape)

  @property
  def dtype(self):
    return jnp.dtype(jnp.int8)


def table_dtype(table) -> str:
  """Storage dtype name of a dense table or `'int8'` for a `QuantizedTable`; ConfigError
  for an unsupported dtype or a malformed table (not `[rows, dim]`)."""
  name = jnp.dtype(table.dtype).name
  if name not in TABLE_DTYPES:
    raise ConfigError(f"table dtype must be one of {TABLE_DTYPES}, got '{name}'")
  if name == "int8" and not isinstance(table, QuantizedTable):
    raise ConfigError("an int8 table must be a QuantizedTable (q, scale, bias)")
  if not isinstance(table, QuantizedTable) and len(table.shape) != 2:
    raise ConfigError(f"table must be [rows, dim], got shape {tuple(table.shape)}")
  if isinstance(table, QuantizedTable):
    rows = table.q.shape[:1]
    if (table.q.ndim != 2 or jnp.dtype(table.q.dtype) != jnp.int8
        or tuple(table.scale.shape) != rows or tuple(table.bias.shape) != rows
        or jnp.dtype(table.scale.dtype) != jnp.float32
        or jnp.dtype(table.bias.dtype) != jnp.float32):
      raise ConfigError(f"QuantizedTable wants q int8 [R, D], scale and bias [R] float32; got q "
                        f"{table.q.dtype}{list(table.q.shape)}, scale {table.scale.dtype}"
                        f"{list(table.scale.shape)}, bias {table.bias.dtype}"
                        f"{list(table.bias.shape)}")
  return name


def check_ids(*ids) -> None:
  """ConfigError unless every array of ids (or CSR offsets) has an integer dtype: a float
  id would be truncated to a row silently."""
  for x in ids:
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ConfigError(f"ids must be integers, got {jnp.dtype(x.dtype).name}")


def check_offsets(offsets, where: str) -> None:
  """ConfigError if concrete 1-D CSR `offsets` decrease somewhere (bag n is
  `values[offsets[n]:offsets[n + 1]]`: a decreasing pair has no meaning, and the slot →
  bag search over unsorted offsets is undefined). Traced offsets cannot be checked: the
  kernels then only keep every read in bounds."""
  if isinstance(offsets, jax.core.Tracer) or np.ndim(offsets) != 1:
    return
  o = np.asarray(offsets)
  bad = np.flatnonzero(o[1:] < o[:-1])
  if bad.size:
    i = int(bad[0])
    raise ConfigError(f"{where}: CSR offsets must be non-decreasing, but offsets[{i + 1}] = "
                      f"{o[i + 1]} < offsets[{i}] = {o[i]}")


# ---------------------------------------------------------------------------------- int8

def quantize_rows(x: jax.Array, u: jax.Array | float = 0.5):
  """Quantises f32 rows `[S, D]` to `(q int8 [S, D], scale [S], bias [S])`.

  `u` in [0, 1) is the rounding offset: 0.5 rounds to nearest (ties up), uniform random
  `u` rounds stochastically. Constant rows get scale 0 and reproduce exactly.
  """
  lo = jnp.min(x, axis=-1)
  hi = jnp.max(x, axis=-1)
  return quantize_with_range(x, lo, hi, u)


def quantize_with_range(x, lo, hi, u=0.5):
  """`quantize_rows` given precomputed row `lo`/`hi` `[S]` (kernels reduce over chunks)."""
  # hi - lo overflows f32 when |lo|, |hi| ~ 3e38: then each end is scaled first. Not
  # always that way, since the compiler may fuse one product into the difference (FMA)
  # in one kernel and not in another; (hi - lo) * c leaves it nothing to fuse.
  step = np.float32(1.0 / 255.0)
  span = hi - lo
  scale = jnp.where(jnp.isfinite(span), span * step, hi * step - lo * step)
  # Code -128 reads `-128 * scale + bias` and the bias is `lo + 128 * scale`: past
  # float32's max / 128 (a row spanning nearly all of float32, e.g. +-3.4e38) these were inf
  # and the row read back inf and NaN. Capped there, the row's top end reads up to one step
  # low. (Only such rows: a finite span gives at most max / 255; inf and NaN stay as they are.)
  scale = jnp.where((scale > _SCALE_CAP) & jnp.isfinite(scale), _SCALE_CAP, scale)
  # A subnormal scale (span under ~3e-36) is 0 on every backend: XLA:CPU flushes it, a GPU
  # keeping it would divide by it (inf, NaN codes). The row then reads back as its `lo`.
  scale = jnp.where(scale >= F32_TINY, scale, np.float32(0.0))
  bias = lo + np.float32(128.0) * scale
  inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
  v = (x - bias[..., None]) * inv[..., None]
  fl = jnp.floor(v)   # (up when frac(v) >= 1 - u, on the exact fraction: see cast_store)
  q = jnp.clip(fl + (v - fl >= 1.0 - u).astype(jnp.float32), -128.0, 127.0)
  return q.astype(jnp.int8), scale, bias


def quantize(table: jax.Array) -> QuantizedTable:
  """Row-wise int8 quantisation of a dense `[R, D]` table (round to nearest)."""
  q, scale, bias = quantize_rows(jnp.asarray(table, jnp.float32))
  return QuantizedTable(q, scale, bias)


def dequantize(table) -> jax.Array:
  """Dense f32 `[R, D]` view of a table of any supported storage dtype."""
  if isinstance(table, QuantizedTable):
    return table.q.astype(jnp.float32) * table.scale[:, None] + table.bias[:, None]
  return jnp.asarray(table).astype(jnp.float32)


# ------------------------------------------------------------------ stochastic rounding

def _mix(x):
  """lowbias32 integer hash on uint32 (shifts, xors, multiplies only)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def random_bits(seed, rows, cols, salt: int = 0):
  """uint32 bits `[S, C]` for rows `[S]` and columns `[C]`; `seed` a uint32 scalar."""
  r = _mix(rows.astype(jnp.uint32) ^ seed)
  c = cols.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + jnp.uint32(salt)
  return _mix(r[:, None] ^ c[None, :])


def uniform(bits):
  """Uniform floats in [0, 1) from uint32 bits (24 bits of precision)."""
  return (bits >> 8).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0 ** -24)


def seed_from(key, step) -> jax.Array:
  """uint32 seed for a PRNG `key` and training `step` (a new stream each step)."""
  base = jax.random.bits(key, (), jnp.uint32)
  return _mix(base ^ (jnp.asarray(step).astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)))


def cast_store(x, dtype, bits=None):
  """Rounds f32 `x` to storage `dtype`: to nearest, or stochastically given uint32 `bits`.

  bf16 adds 16 random low bits before truncating; fp16 floors `x / ulp + u` with the
  fp16 ulp of `|x|` (subnormals included). float32 is returned unchanged. Values at or
  beyond the dtype's largest finite value (and inf/nan) round to nearest, as a cast does,
  so stochastic rounding never overflows where rounding to nearest would not.
  """
  dtype = jnp.dtype(dtype)
  if bits is None or dtype == jnp.float32:
    return x.astype(dtype)
  if dtype not in (jnp.bfloat16, jnp.float16):
    raise ConfigError(f"stochastic rounding supports bfloat16/float16, not {dtype.name}")
  xb = jax.lax.bitcast_convert_type(x, jnp.uint32)
  if dtype == jnp.bfloat16:
    xb = (xb + (bits & jnp.uint32(0xFFFF))) & jnp.uint32(0xFFFF0000)
    y = jax.lax.bitcast_convert_type(xb, jnp.float32)
  else:
    e = ((xb >> 23) & jnp.uint32(0xFF)).astype(jnp.int32) - 127
    ulp_e = jnp.maximum(e - 10, -24)
    ulp = jax.lax.bitcast_convert_type(((ulp_e + 127) << 23).astype(jnp.uint32), jnp.float32)
    inv = jax.lax.bitcast_convert_type(((127 - ulp_e) << 23).astype(jnp.uint32), jnp.float32)
    # up with probability frac(v), on the exact fraction: `floor(v + u)` rounded v + u in
    # float32 first (v in [1024, 2048) has spacing 2**-13), and u > 1 - 2**-14 moved
    # exactly representable values up one ulp
    v = x * inv
    fl = jnp.floor(v)
    y = (fl + (uniform(bits) < v - fl).astype(jnp.float32)) * ulp
  in_range = jnp.abs(x) < np.float32(jnp.finfo(dtype).max)
  return jnp.where(in_range, y, x).astype(dtype)


# ------------------------------------------------------------------------ communication

def dtype_name(dtype) -> str:
  """`bf16`, `'bfloat16'`, `jnp.bfloat16` -> `'bfloat16'` (the input as a string if it is no
  dtype: the caller's check names it)."""
  name = DTYPE_ALIASES.get(str(dtype))
  if name is None:
    try:
      name = jnp.dtype(dtype).name
    except TypeError:
      name = str(dtype)
  return name


def canonical_comm_dtype(comm_dtype) -> str:
  """Normalises `comm_dtype` (e.g. `bf16`, `fp8`, `jnp.bfloat16`) to a dtype name."""
  name = dtype_name(comm_dtype)
  if name not in COMM_DTYPES:
    raise ConfigError(f"comm_dtype must be one of {COMM_DTYPES} (or bf16/fp16/fp8), "
                      f"got '{comm_dtype}'")
  return name


def comm_cast(x: jax.Array, comm_dtype="bfloat16", *, per_row: bool = True):
  """Compresses activations `x [..., D]` for an all-to-all.

  Returns `(payload, scale)`: `payload` in `comm_dtype`; `scale` is None for bf16/f32, and
  for fp8/fp16 f32 `[..., 1]` (per row, moves with the rows through the all-to-all) or,
  with `per_row=False`, one f32 scalar for the whole tensor. Scales are computed under
  `stop_gradient` from the finite values: fp8 maps the row's max to 448; fp16 divides by a
  power of two putting the max in `[2**14, 2**15)`, which is exact, so values past 65504
  (or under float16's normal range) keep its relative precision and the rest arrive as a
  plain cast gives them. An inf stays inf in fp16 and arrives as NaN in fp8 (which has
  none); the rest of its row keeps its precision. Plain autodiff through the cast rounds
  cotangents to `comm_dtype` with the forward's scale: use `all_to_all_compressed` for
  training (each direction computes its own scales). Empty inputs (D = 0, or no rows)
  work: an empty row's scale is 1, as for a row of zeros; a scalar `x` is a ConfigError.
  """
  if jnp.ndim(x) == 0:
    raise ConfigError(f"comm_cast wants activations [..., D], got a {jnp.dtype(x.dtype)} scalar")
  name = canonical_comm_dtype(comm_dtype)
  if name not in SCALED_COMM_DTYPES:
    return x.astype(name), None
  xf = x.astype(jnp.float32)
  # Over finite values only: an inf (or a NaN) in the max made its row NaN (scale inf), or
  # (NaN: scale 1) every value over 448; now only that element is lost.
  mag = jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0.0)
  # initial=0 (the identity of a max of magnitudes): D = 0 or no rows have an amax of 0.
  amax = jnp.max(mag, axis=-1 if per_row else None, keepdims=per_row, initial=0.0)
  if name == "float16":
    scale = _pow2_scale(amax, FP16_TOP_EXP)
  else:
    # At least the smallest normal f32: below 448x that, amax / FP8_MAX is subnormal, which
    # XLA flushes to zero, and the row divided by it became NaN.
    scale = jnp.where(amax > 0, jnp.maximum(amax / FP8_MAX, F32_TINY), 1.0)
  scale = jax.lax.stop_gradient(scale)
  return (xf / scale).astype(name), scale


def _pow2_scale(amax, top_exp: int):
  """f32 power of two `2**(e - top_exp)` for `amax` in `[2**e, 2**(e+1))` (1 for 0; at
  least the smallest normal f32, for a subnormal `amax`), built from the exponent bits."""
  biased = (jax.lax.bitcast_convert_type(amax, jnp.uint32) >> 23).astype(jnp.int32) & 0xFF
  biased = jnp.maximum(biased - top_exp, 1)
  scale = jax.lax.bitcast_convert_type((biased << 23).astype(jnp.uint32), jnp.float32)
  return jnp.where(amax > 0, scale, np.float32(1.0))


def comm_uncast(payload: jax.Array, scale=None, dtype=jnp.float32) -> jax.Array:
  """Inverse of `comm_cast`: `payload * scale` in `dtype`."""
  y = payload.astype(jnp.float32)
  if scale is not None:
    y = y * scale
  return y.astype(dtype)


def _a2a(x, axis_name, split_axis, concat_axis, comm_dtype, tiled):
  last = x.ndim - 1
  name = canonical_comm_dtype(comm_dtype)
  if name in SCALED_COMM_DTYPES and last in (split_axis % x.ndim, concat_axis % x.ndim):
    raise ConfigError(f"a {name} all-to-all moves whole rows with their scales: split/"
                      "concat axes cannot be the last (embedding) axis")
  payload, scale = comm_cast(x, comm_dtype)
  move = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=split_axis,
                           concat_axis=concat_axis, tiled=tiled)
  return comm_uncast(move(payload), None if scale is None else move(scale), x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def all_to_all_compressed(x, axis_name, split_axis: int, concat_axis: int,
                          comm_dtype="bfloat16", tiled: bool = True):
  """`lax.all_to_all` of `x [..., D]` sent in `comm_dtype` (inside `shard_map`).

  fp8 and fp16 use per-row scales that travel with the rows, so neither `split_axis` nor
  `concat_axis` may be the last (D) axis. The backward pass all-to-alls the cotangent back
  (axes swapped), compressed the same way with its own scales. Returns `x.dtype`.
  """
  return _a2a(x, axis_name, split_axis, concat_axis, comm_dtype, tiled)


def _a2a_fwd(x, axis_name, split_axis, concat_axis, comm_dtype, tiled):
  return _a2a(x, axis_name, split_axis, concat_axis, comm_dtype, tiled), None


def _a2a_bwd(axis_name, split_axis, concat_axis, comm_dtype, tiled, _, g):
  return (_a2a(g, axis_name, concat_axis, split_axis, comm_dtype, tiled),)


all_to_all_compressed.defvjp(_a2a_fwd, _a2a_bwd)
