"""Initial table values: uniform in `[-scale, scale)`, a pure function of (key, table name,
row, column).

Element `(r, c)` of table `T` comes from `threefry2x32(key_T, counter = r * dim + c)`:
23 random bits make a float `f` in `[0, 1)`, and the value is `(f - 1/2) * (2 * scale)`.
Every step is exact except that one multiplication, so no compiler contraction (FMA) can
make two kernels disagree. `key_T = fold_in(key, crc32(T))` (`key_words`), so a table's
values depend neither on the plan nor on the other tables.

Because a value is a function of its coordinates, every consumer computes exactly the values
it needs with one elementwise kernel:
- `stack_values` builds a whole stack `[num_slices * slice_rows, padded_dim]` in its stacked
  layout (zero padding rows and columns included; rows numbered per `table` slice,
  `slice_values`). XLA
  compiles one random-number kernel per stack instead of one per table shape, and under
  `out_shardings` each device computes only its own shard.
- `table_values` builds one table `[rows, dim]`.
- `row_values` builds rows `[start, stop)` of one table: the offload store fills a table
  larger than device memory chunk by chunk.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry2x32_p

from jaxrec.errors import ConfigError

_MAX_DIM = 1 << 16   # `_counter` splits rows into 16-bit halves
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_COMPARE_ALL_WIDTH = 32   # `slice_values`: at most this many tables on a slice


def key_words(key: jax.Array, names: Sequence[str]) -> jax.Array:
  """uint32 `[len(names), 2]`: each table's key `fold_in(key, crc32(name))`, as threefry
  key words (for another key implementation, its first two words)."""
  crcs = jnp.asarray([zlib.crc32(n.encode()) & 0x7FFFFFFF for n in names], jnp.uint32)
  keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(crcs)
  return jax.random.key_data(keys).reshape(len(names), -1)[:, :2]


def _counter(row: jax.Array, col: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
  """(hi, lo) uint32 words of the 64-bit `row * dim + col` (row < 2**32, dim < 2**16)."""
  row = row.astype(jnp.uint32)
  a = (row >> 16) * jnp.uint32(dim)                 # < 2**32; the counter holds a * 2**16
  a_hi, a_lo = a >> 16, a << 16
  b = (row & 0xFFFF) * jnp.uint32(dim) + col.astype(jnp.uint32)   # < 2**32
  lo = a_lo + b
  return a_hi + (lo < a_lo).astype(jnp.uint32), lo


def threefry2x32(k0, k1, x0, x1) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 (20 rounds), as `jax.extend.random.threefry2x32_p` computes it, on uint32
  arrays that broadcast together. jax's primitive wants keys of the counters' full shape;
  here a per-row key `[R, 1]` stays per row. On XLA:CPU, 41.6M values: 0.14 s, against
  1.46 s for the primitive with broadcast keys and 0.71 s for `jax.random.uniform`."""
  def rotl(v, d):
    return (v << jnp.uint32(d)) | (v >> jnp.uint32(32 - d))
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = rotl(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x0, x1


def _uniform(words: jax.Array, row: jax.Array, col: jax.Array, dim: int,
             scale: jax.Array) -> jax.Array:
  """f32 values of elements `(row, col)` (broadcast together) of tables with key `words`
  `[..., 2]` and half-width `scale` (both broadcast against `row`)."""
  if dim >= _MAX_DIM:
    raise ConfigError(f"table dim {dim} is too large to initialise (at most {_MAX_DIM - 1})")
  hi, lo = _counter(row, col, dim)
  b1, b2 = threefry2x32(words[..., 0], words[..., 1], hi, lo)
  bits = lax.shift_right_logical(b1 ^ b2, jnp.uint32(9)) | jnp.uint32(0x3F800000)
  f = lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(1)      # k * 2**-23, exact
  return (f - jnp.float32(0.5)) * (jnp.float32(2) * scale.astype(jnp.float32))


def row_values(words: jax.Array, start, rows: int, dim: int, scale: float) -> jax.Array:
  """f32 `[rows, dim]`: rows `[start, start + rows)` of the table with key `words` `[2]`."""
  row = (jnp.asarray(start, jnp.uint32) + jnp.arange(rows, dtype=jnp.uint32))[:, None]
  col = jnp.arange(dim, dtype=jnp.uint32)[None, :]
  return _uniform(words[None, :], row, col, dim, jnp.asarray(scale, jnp.float32))


def table_values(key: jax.Array, name: str, rows: int, dim: int, scale: float) -> jax.Array:
  """f32 `[rows, dim]`: the whole table `name`."""
  return row_values(key_words(key, [name])[0], 0, rows, dim, scale)


def stack_values(key: jax.Array, layout, scales: Sequence[float]) -> jax.Array:
  """f32 `layout.shape`: the stack's tables (`scales[i]` for `layout.slots[i]`) at their
  rows of the stacked array, zeros in the padding rows."""
  return slice_values(key, layout, scales, lax.iota(jnp.uint32, layout.slice_rows)
                      ).reshape(layout.shape)


def slice_values(key: jax.Array, layout, scales: Sequence[float], row: jax.Array
                 ) -> jax.Array:
  """f32 `[num_slices, R, padded_dim]`: rows `row` (uint32 `[R]`, numbered within a `table`
  slice) of every slice of the stack, as `stack_values` holds them (padding columns zero).
  Rows are numbered per slice (each under 2**32), never across the stack: a stack of slices
  holding more than 2**31 rows in all (up to 2**31 - 1 each) gets its tables' values, not
  wrapped int32 rows."""
  slots, nt, dim = layout.slots, layout.num_slices, layout.dim
  col = jnp.arange(layout.padded_dim, dtype=jnp.uint32)[None, :]   # columns >= dim: zeros
  per_slice = [sorted((i for i, s in enumerate(slots) if s.table_slice == t),
                      key=lambda i: slots[i].row_offset) for t in range(nt)]
  # Per slice, a row belongs to the last entry starting at or before it: first a sentinel of
  # no rows (index len(slots): zero key and scale), then the slice's tables by offset, then
  # padding that starts past every row.
  width = 1 + max(len(p) for p in per_slice)
  first = np.full((nt, width), layout.slice_rows, np.uint32)
  count = np.zeros((nt, width), np.uint32)
  which = np.full((nt, width), len(slots), np.int32)
  first[:, 0] = 0
  for t, members in enumerate(per_slice):
    for j, i in enumerate(members, 1):
      first[t, j], count[t, j], which[t, j] = slots[i].row_offset, slots[i].rows, i
  words = jnp.concatenate([key_words(key, [s.name for s in slots]), jnp.zeros((1, 2), jnp.uint32)])
  scale = jnp.asarray(np.concatenate([np.asarray(scales, np.float32), [0.0]]), jnp.float32)
  row = jnp.asarray(row, jnp.uint32)

  # (a few tables: one compare per table and row, no loop to compile; the init program
  # of a 3-table stack compiled in ~0.6 s instead of ~0.9)
  method = "compare_all" if width <= _COMPARE_ALL_WIDTH else "scan"

  def one_slice(first, count, which):
    k = jnp.searchsorted(first, row, side="right", method=method) - 1
    within, table = row - first[k], which[k]
    values = _uniform(words[table][:, None, :], within[:, None], col, dim,
                      scale[table][:, None])
    return jnp.where((within < count[k])[:, None] & (col < dim), values, jnp.float32(0))

  return jax.vmap(one_slice)(jnp.asarray(first), jnp.asarray(count), jnp.asarray(which))
