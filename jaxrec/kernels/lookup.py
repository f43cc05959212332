"""Fused multi-table lookup + pooling on one device's shard.

The local shard stacks several tables row-wise into `table [R, D]` (callers add per-table
row offsets, so ids are local rows). All (example, feature) bags of all tables are pooled
in one kernel launch: `out[n] = sum_l w[n, l] * table[idx[n, l]]`, accumulated in f32, with
`idx = -1` for absent slots (padding, or rows owned by another shard); ids outside
`[0, R)` count as absent too (never read out of bounds). Mean pooling and
per-id weights are both folded into `w` by the caller, so pooling is always a weighted sum.

Two input layouts:
- padded `idx/w [N, L]` (`lookup_pool`): one-hot is `L = 1`; multi-hot pads to `L`;
- CSR `values/weights [nnz]`, `offsets [N + 1]` (`lookup_pool_csr`): bags of any length;
  the kernel loops to the longest bag of its block, not of the batch, so skewed bag
  lengths cost less than padding. `csr_to_padded` / `padded_to_csr` convert.

Pallas kernel (Triton): grid `(N / BN, D / BD)`; a program owns BN bags x BD columns,
loops over slots, gathers `[BN, BD]` rows per slot and writes its output block once.
Tables may be f32, bf16, f16 or int8 (`QuantizedTable`, dequantised in the kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxrec.errors import ConfigError
from jaxrec.kernels import platform
from jaxrec.kernels.quant import QuantizedTable, check_ids, check_offsets, table_dtype


def _table_refs_specs(table, bd: int):
  """Operands and BlockSpecs of a dense or int8 table for grid `(i, j)`.

  The block is every row of column block j: kernels gather rows by id from it (on GPU
  these are pointer gathers; nothing is copied wholesale).
  """
  r = table.shape[0]
  col, vec = pl.BlockSpec((r, bd), lambda i, j: (0, j)), pl.BlockSpec((r,), lambda i, j: (0,))
  if isinstance(table, QuantizedTable):
    return ([table.q, table.scale.astype(jnp.float32), table.bias.astype(jnp.float32)],
            [col, vec, vec])
  return [table], [col]


def gather_rows(table_refs, rows):
  """f32 rows `[S, C]` of the (column block of the) table for int32 `rows [S]` (in range)."""
  if len(table_refs) == 3:
    q_ref, s_ref, b_ref = table_refs
    return (q_ref[rows, :].astype(jnp.float32) * s_ref[rows][:, None] + b_ref[rows][:, None])
  return table_refs[0][rows, :].astype(jnp.float32)


def _check(table, idx, w):
  table_dtype(table)
  if idx.ndim != 2 or w.shape != idx.shape:
    raise ConfigError(f"idx and w must both be [N, L]; got {idx.shape} and {w.shape}")
  check_ids(idx)


# ------------------------------------------------------------------------ XLA reference

def _lookup_xla(table, idx, w):
  valid = (idx >= 0) & (idx < table.shape[0])
  safe = jnp.where(valid, idx, 0)
  if isinstance(table, QuantizedTable):
    rows = (table.q[safe].astype(jnp.float32) * table.scale[safe][..., None]
            + table.bias[safe][..., None])
  else:
    rows = table[safe].astype(jnp.float32)
  rows = jnp.where(valid[..., None], rows * w[..., None].astype(jnp.float32), 0.0)
  return jnp.sum(rows, axis=1)


# ---------------------------------------------------------------------- Pallas (padded)

MAX_UNROLLED_SLOTS = 32   # `GpuTuning.unroll_slots`: longer bags keep the loop


def _padded_kernel(idx_ref, w_ref, *refs):
  *table_refs, o_ref = refs
  bn, bd = o_ref.shape

  num_rows = table_refs[0].shape[0]

  def body(l, acc):
    ids = idx_ref[:, l]
    valid = (ids >= 0) & (ids < num_rows)
    rows = gather_rows(table_refs, jnp.where(valid, ids, 0))
    return acc + jnp.where(valid[:, None], rows * w_ref[:, l][:, None], 0.0)

  acc = jnp.zeros((bn, bd), jnp.float32)
  if platform.tuning().unroll_slots and idx_ref.shape[1] <= MAX_UNROLLED_SLOTS:
    for l in range(idx_ref.shape[1]):
      acc = body(l, acc)
    o_ref[...] = acc
  else:
    o_ref[...] = jax.lax.fori_loop(0, idx_ref.shape[1], body, acc)


def _lookup_pallas(table, idx, w, interpret):
  n, l = idx.shape
  d = table.shape[1]
  if n == 0 or l == 0:  # no bags or no slots: nothing to launch
    return jnp.zeros((n, d), jnp.float32)
  bd = platform.col_block(d)
  bn = platform.row_block(n, bd, target=platform.tuning().lookup_block)
  n_pad = pl.cdiv(n, bn) * bn
  idx = jnp.pad(idx, ((0, n_pad - n), (0, 0)), constant_values=-1)
  w = jnp.pad(w, ((0, n_pad - n), (0, 0)))
  operands, specs = _table_refs_specs(table, bd)
  out = pl.pallas_call(
      _padded_kernel,
      grid=(n_pad // bn, d // bd),
      in_specs=[pl.BlockSpec((bn, l), lambda i, j: (i, 0)),
                pl.BlockSpec((bn, l), lambda i, j: (i, 0))] + specs,
      out_specs=pl.BlockSpec((bn, bd), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((n_pad, d), jnp.float32),
      interpret=interpret,
      compiler_params=platform.compiler_params(),
      name="jaxrec_lookup_pool",
  )(idx, w, *operands)
  return out[:n]


@functools.partial(jax.jit, static_argnames=("kernel", "interpret"))
def lookup_pool(table, idx, w, *, kernel: str = "auto", interpret: bool | None = None):
  """Pooled lookup of N bags from the local stacked table.

  Args:
    table: `[R, D]` f32/bf16/f16, or a `QuantizedTable` (int8 rows, f32 scale/bias `[R]`).
    idx: int32 `[N, L]` local rows; -1 marks an absent slot.
    w: f32 `[N, L]` slot weights (mean normalisation and per-id weights folded in).
    kernel: `auto` (Pallas on GPU, XLA elsewhere), `xla` or `pallas`.
    interpret: run Pallas in interpret mode; None: interpret unless on GPU.

  Returns:
    f32 `[N, D]`: `sum_l w[n, l] * table[idx[n, l]]` over present slots.
  """
  _check(table, idx, w)
  idx = idx.astype(jnp.int32)
  w = w.astype(jnp.float32)
  if 0 in table.shape:  # no rows: every slot is absent (and no columns: nothing to pool)
    return jnp.zeros((idx.shape[0], table.shape[1]), jnp.float32)
  if platform.resolve_kernel(kernel) == "xla":
    return _lookup_xla(table, idx, w)
  return _lookup_pallas(table, idx, w, platform.resolve_interpret(interpret))


# ------------------------------------------------------------------------- Pallas (CSR)

def _csr_kernel(start_ref, len_ref, val_ref, wt_ref, *refs):
  *table_refs, o_ref = refs
  bn, bd = o_ref.shape
  starts = start_ref[...]
  lens = len_ref[...]
  num_rows = table_refs[0].shape[0]

  def body(k, acc):
    pos = jnp.where(k < lens, starts + k, 0)
    ids = val_ref[pos]
    valid = (k < lens) & (ids >= 0) & (ids < num_rows)
    rows = gather_rows(table_refs, jnp.where(valid, ids, 0))
    return acc + jnp.where(valid[:, None], rows * wt_ref[pos][:, None], 0.0)

  o_ref[...] = jax.lax.fori_loop(0, jnp.max(lens), body, jnp.zeros((bn, bd), jnp.float32))


def _lookup_csr_pallas(table, values, offsets, weights, interpret):
  n = offsets.shape[0] - 1
  d = table.shape[1]
  if n == 0:
    return jnp.zeros((0, d), jnp.float32)
  bd = platform.col_block(d)
  bn = platform.row_block(n, bd, target=platform.tuning().lookup_block)
  n_pad = pl.cdiv(n, bn) * bn
  # Offsets outside [0, nnz] would read values out of bounds: cut the bags there, as the
  # XLA path does (a decreasing pair is an empty bag).
  offsets = jnp.clip(offsets, 0, values.shape[0])
  starts = jnp.pad(offsets[:-1], (0, n_pad - n))
  lens = jnp.pad(offsets[1:] - offsets[:-1], (0, n_pad - n))
  if values.shape[0] == 0:  # keep the gathers in bounds for an empty batch
    values, weights = jnp.full((1,), -1, jnp.int32), jnp.zeros((1,), jnp.float32)
  nnz = values.shape[0]
  operands, specs = _table_refs_specs(table, bd)
  vec = pl.BlockSpec((bn,), lambda i, j: (i,))
  full = pl.BlockSpec((nnz,), lambda i, j: (0,))
  out = pl.pallas_call(
      _csr_kernel,
      grid=(n_pad // bn, d // bd),
      in_specs=[vec, vec, full, full] + specs,
      out_specs=pl.BlockSpec((bn, bd), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((n_pad, d), jnp.float32),
      interpret=interpret,
      compiler_params=platform.compiler_params(),
      name="jaxrec_lookup_pool_csr",
  )(starts, lens, values, weights, *operands)
  return out[:n]


def lookup_pool_csr(table, values, offsets, weights, *, kernel: str = "auto",
                    interpret: bool | None = None):
  """Pooled lookup of N bags given in CSR form.

  Args:
    table: as in `lookup_pool`.
    values: int32 `[nnz]` local rows (-1 allowed: skipped).
    offsets: int32 `[N + 1]`, non-decreasing, `offsets[0] = 0`; bag n is
      `values[offsets[n]:offsets[n + 1]]` (offsets outside `[0, nnz]` cut at the ends).
      Concrete decreasing offsets are a ConfigError; traced ones are not checked (the
      result is then undefined, but reads stay in bounds).
    weights: f32 `[nnz]` per-id weights (mean normalisation folded in).
    kernel, interpret: as in `lookup_pool`.

  Returns:
    f32 `[N, D]`.
  """
  check_offsets(offsets, "lookup_pool_csr")
  return _lookup_pool_csr(table, values, offsets, weights, kernel=kernel, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("kernel", "interpret"))
def _lookup_pool_csr(table, values, offsets, weights, *, kernel, interpret):
  table_dtype(table)
  if (values.ndim != 1 or weights.shape != values.shape or offsets.ndim != 1
      or offsets.shape[0] < 1):
    raise ConfigError(f"CSR lookup wants values/weights [nnz] and offsets [N+1]; got "
                      f"{values.shape}, {weights.shape}, {offsets.shape}")
  check_ids(values, offsets)
  values = values.astype(jnp.int32)
  offsets = offsets.astype(jnp.int32)
  weights = weights.astype(jnp.float32)
  if 0 in table.shape:
    return jnp.zeros((offsets.shape[0] - 1, table.shape[1]), jnp.float32)
  if platform.resolve_kernel(kernel) == "xla":
    seg = jnp.searchsorted(offsets, jnp.arange(values.shape[0]), side="right") - 1
    rows = _lookup_xla(table, values[:, None], weights[:, None])
    return jax.ops.segment_sum(rows, seg, num_segments=offsets.shape[0] - 1)
  return _lookup_csr_pallas(table, values, offsets, weights,
                            platform.resolve_interpret(interpret))


# --------------------------------------------------------------------------- conversion

def csr_to_padded(values, offsets, weights, max_len: int):
  """CSR bags to padded `(idx [N, max_len], w [N, max_len])`; -1/0 fill, longer bags cut
  (and, as in `lookup_pool_csr`, bags cut at `[0, nnz]`)."""
  starts = offsets[:-1, None]
  pos = starts + jnp.arange(max_len)[None, :]
  present = (pos < offsets[1:, None]) & (pos >= 0) & (pos < values.shape[0])
  safe = jnp.clip(pos, 0, max(values.shape[0] - 1, 0))
  if values.shape[0] == 0:
    return (jnp.full(pos.shape, -1, jnp.int32), jnp.zeros(pos.shape, jnp.float32))
  idx = jnp.where(present, values[safe], -1).astype(jnp.int32)
  w = jnp.where(present, weights[safe], 0.0).astype(jnp.float32)
  return idx, w


def padded_to_csr(idx, w):
  """Padded `[N, L]` bags to CSR `(values [N*L], offsets [N+1], weights [N*L])`.

  Absent slots (-1) are dropped; the tail `values[offsets[-1]:]` is -1 fill so shapes stay
  static under `jit`.
  """
  n, l = idx.shape
  present = (idx >= 0).reshape(-1)
  counts = jnp.sum(idx >= 0, axis=1).astype(jnp.int32)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
  dest = jnp.where(present, jnp.cumsum(present) - 1, n * l)
  values = jnp.full((n * l,), -1, jnp.int32).at[dest].set(idx.reshape(-1), mode="drop")
  weights = jnp.zeros((n * l,), jnp.float32).at[dest].set(
      w.reshape(-1).astype(jnp.float32), mode="drop")
  return values, offsets, weights
