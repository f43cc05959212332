"""Fused sparse backward + row-wise optimizer update on one device's shard.

The gradient of slot (n, l) is `w[n, l] * grad_pooled[n]`; slots naming the same row are
summed, then the optimizer updates exactly those rows (and their state). Rows not seen
are never read or written, and no dense `[R, D]` gradient exists.

Duplicates are handled by sorting, not atomics: `(id, bag, weight)` triples are sorted by
id outside the kernel (`lax.sort`) and cut into segments, one per distinct row. A program
of the Pallas kernel owns BS whole segments: it walks each segment's slots, summing
`w * grad_pooled[bag]` into f32 registers (D in power-of-two column chunks), then loads
the row and its state, applies `optim.update_rows`, rounds back to the storage dtype and
stores with a mask. Segments are distinct rows, so programs never write the same row and
the result is deterministic. Table and state are aliased in place (`input_output_aliases`):
donate them in the caller's `jit` or XLA copies them first.

The XLA reference (and CPU path) shares the segmentation and the update math; it sums
segments with `segment_sum`, gathers the touched rows and scatters them back.

Per-row rates (`lr_rows`, a stack of tables that differ only in learning rate): each slot's
rate is sorted along with it, a segment takes its first slot's, and the update uses it in
place of the optimizer's `lr` (one more `[BS]` block per program in the kernel).

Storage: tables f32/bf16/f16 or int8 (`QuantizedTable`: the row is dequantised, updated
in f32 and re-quantised with a fresh scale/bias); state f32/bf16/f16. With a PRNG `key`,
bf16/f16 values and int8 codes are rounded stochastically (`quant.cast_store`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxrec.errors import ConfigError
from jaxrec.kernels import optim, platform, quant
from jaxrec.kernels.quant import QuantizedTable

_SALT_TABLE, _SALT_STATE, _SALT_ROW_STATE = 0, 0x51ED, 0x2545


def segments(ids, bags, wts, num_rows: int, bit_rows=None, rates=None):
  """Sorts flat slots by row and describes the distinct rows (segments).

  Args:
    ids: int32 `[M]` rows; outside `[0, num_rows)` means absent.
    bags: int32 `[M]` bag (row of `grad_pooled`) of each slot.
    wts: f32 `[M]` slot weights.
    num_rows: R.
    bit_rows: uint32 `[M]` row keys of the random bits (`sparse_update`); None: `ids`.
    rates: f32 `[M]` each slot's learning rate (`sparse_update`'s `lr_rows`), or None.

  Returns:
    dict of `[M]` arrays: `bag`, `w` (slots in sorted order); `row` (segment's row, R for
    the unused tail), `bit_row` (its row key), `start`, `len` (slot range of segment s; len
    0 in the tail), `seg` (segment of each sorted slot, M for absent ones); with `rates`,
    `lr` (the segment's first slot's rate).
  """
  m = ids.shape[0]
  key = jnp.where((ids >= 0) & (ids < num_rows), ids, num_rows).astype(jnp.int32)
  bit_rows = (key if bit_rows is None else bit_rows).astype(jnp.uint32)
  extra = () if rates is None else (rates.astype(jnp.float32),)
  key, bag, w, bit_rows, *extra = jax.lax.sort(
      (key, bags.astype(jnp.int32), wts.astype(jnp.float32), bit_rows, *extra), num_keys=1,
      is_stable=True)
  present = key < num_rows
  first = jnp.concatenate([jnp.ones((1,), bool), key[1:] != key[:-1]])
  is_start = present & first
  n_seg = jnp.sum(is_start)
  starts = jnp.nonzero(is_start, size=m, fill_value=m)[0].astype(jnp.int32)
  ends = jnp.minimum(jnp.concatenate([starts[1:], jnp.full((1,), m, jnp.int32)]),
                     jnp.sum(present))
  used = jnp.arange(m) < n_seg
  out = {
      "bag": bag, "w": w,
      "row": jnp.where(used, key[jnp.minimum(starts, m - 1)], num_rows).astype(jnp.int32),
      "bit_row": bit_rows[jnp.minimum(starts, m - 1)],
      "start": jnp.where(used, starts, 0).astype(jnp.int32),
      "len": jnp.where(used, ends - starts, 0).astype(jnp.int32),
      "seg": jnp.where(present, jnp.cumsum(is_start) - 1, m).astype(jnp.int32),
  }
  if extra:
    out["lr"] = extra[0][jnp.minimum(starts, m - 1)]
  return out


def _apply(opt, rows, w, g, state, *, dim, col0, table_kind, table_dt, state_dts, seed,
           col_offset=0, lr=None):
  """Shared update of S rows given f32 chunks; returns what to store, per chunk.

  Args:
    rows: uint32 `[S]` row keys of the random bits.
    w, g: lists of f32 `[S, C]` chunks (row values and summed gradients).
    state: name -> list of f32 chunks, or f32 `[S]` for per-row state.
    col0: first column of each chunk; `col_offset` (int32 scalar) is added for the bits.
    table_kind: `'dense'` or `'int8'`; table_dt / state_dts: storage dtypes.
    seed: uint32 scalar for stochastic rounding, or None for round-to-nearest.
    lr: f32 `[S]` the rows' own rates, or None (`opt.lr`).

  Returns:
    `(table_out, state_out)`: dense: list of chunks in `table_dt`; int8: `(q chunks,
    scale [S], bias [S])`; state: name -> chunks or `[S]` in the state dtype.
  """
  new_w, new_state = optim.update_rows(opt, w, g, state, dim, lr)
  width = w[0].shape[1]
  bits = lambda c, salt: (None if seed is None else quant.random_bits(
      seed, rows, col_offset + c + jnp.arange(width, dtype=jnp.int32), salt))
  if table_kind == "int8":
    lo = functools.reduce(jnp.minimum, [jnp.min(x, axis=1) for x in new_w])
    hi = functools.reduce(jnp.maximum, [jnp.max(x, axis=1) for x in new_w])
    q, scale, bias = [], None, None
    for x, c in zip(new_w, col0):
      b = bits(c, _SALT_TABLE)
      u = 0.5 if b is None else quant.uniform(b)
      qc, scale, bias = quant.quantize_with_range(x, lo, hi, u)
      q.append(qc)
    table_out = (q, scale, bias)
  else:
    table_out = [quant.cast_store(x, table_dt, bits(c, _SALT_TABLE))
                 for x, c in zip(new_w, col0)]
  state_out = {}
  for name, v in new_state.items():
    if isinstance(v, list):
      state_out[name] = [quant.cast_store(x, state_dts[name], bits(c, _SALT_STATE))
                         for x, c in zip(v, col0)]
    else:
      b = None if seed is None else quant.random_bits(
          seed, rows, jnp.zeros((1,), jnp.int32), _SALT_ROW_STATE)[:, 0]
      state_out[name] = quant.cast_store(v, state_dts[name], b)
  return table_out, state_out


def _table_parts(table):
  if isinstance(table, QuantizedTable):
    return "int8", [table.q, table.scale.astype(jnp.float32), table.bias.astype(jnp.float32)]
  return "dense", [table]


# ------------------------------------------------------------------------ XLA reference

def _update_xla(table, opt_state, seg, grad, opt, seed, col_offset):
  r, d = table.shape
  m = seg["row"].shape[0]
  kind, parts = _table_parts(table)
  rows = seg["row"]
  safe = jnp.minimum(rows, r - 1)
  g = jax.ops.segment_sum(seg["w"][:, None] * grad[seg["bag"]], seg["seg"], num_segments=m)
  if kind == "int8":
    q, s, b = parts
    w = q[safe].astype(jnp.float32) * s[safe][:, None] + b[safe][:, None]
  else:
    w = table[safe].astype(jnp.float32)
  row_state = optim.per_row_state(opt)
  state = {k: (v[safe].astype(jnp.float32) if k in row_state
               else [v[safe].astype(jnp.float32)]) for k, v in opt_state.items()}
  t_out, s_out = _apply(opt, seg["bit_row"], [w], [g], state, dim=d, col0=[0],
                        table_kind=kind, table_dt=table.dtype,
                        state_dts={k: v.dtype for k, v in opt_state.items()}, seed=seed,
                        col_offset=col_offset, lr=seg.get("lr"))
  put = lambda arr, val: arr.at[rows].set(val, mode="drop")
  if kind == "int8":
    q_out, s_new, b_new = t_out
    new_table = QuantizedTable(put(table.q, q_out[0]), put(parts[1], s_new), put(parts[2], b_new))
  else:
    new_table = put(table, t_out[0])
  new_state = {k: put(opt_state[k], v if k in row_state else v[0]) for k, v in s_out.items()}
  return new_table, new_state


# ------------------------------------------------------------------------------- Pallas

def _update_kernel(row_ref, bit_row_ref, start_ref, len_ref, bag_ref, w_ref, grad_ref, seed_ref,
                   *refs,
                   opt, kind, state_names, row_state, dim, bd, table_dt, state_dts, sr,
                   has_lr):
  lr = None
  if has_lr:   # the block's rows' own rates
    lr, refs = refs[0][...], refs[1:]
  n_table = 3 if kind == "int8" else 1
  n_in = n_table + len(state_names)
  t_in, s_in = refs[:n_table], refs[n_table:n_in]
  t_out, s_out = refs[n_in:n_in + n_table], refs[n_in + n_table:]
  num_rows = t_in[0].shape[0]
  rows, starts, lens = row_ref[...], start_ref[...], len_ref[...]
  valid = lens > 0
  safe = jnp.where(valid, rows, 0)
  dest = jnp.where(valid, rows, num_rows)  # out of bounds and masked for unused segments
  col0 = list(range(0, dim, bd))
  bs = rows.shape[0]

  def body(k, gs):
    more = k < lens
    pos = jnp.where(more, starts + k, 0)
    bag = bag_ref[pos]
    wk = w_ref[pos][:, None]
    # `where`, not a 0 weight: a past-the-end slot reads some bag's row, and 0 x inf (a
    # non-finite gradient of that bag) made other rows NaN where XLA's update left them
    return tuple(gc + jnp.where(more[:, None], wk * grad_ref[bag, pl.ds(c, bd)], 0.0)
                 for gc, c in zip(gs, col0))

  zeros = tuple(jnp.zeros((bs, bd), jnp.float32) for _ in col0)
  g = list(jax.lax.fori_loop(0, jnp.max(lens), body, zeros))

  if kind == "int8":
    q_ref, s_ref, b_ref = t_in
    scale, bias = s_ref[safe][:, None], b_ref[safe][:, None]
    w = [q_ref[safe, pl.ds(c, bd)].astype(jnp.float32) * scale + bias for c in col0]
  else:
    w = [t_in[0][safe, pl.ds(c, bd)].astype(jnp.float32) for c in col0]
  state = {}
  for name, ref in zip(state_names, s_in):
    state[name] = (ref[safe].astype(jnp.float32) if name in row_state
                   else [ref[safe, pl.ds(c, bd)].astype(jnp.float32) for c in col0])
  seed = seed_ref[0].astype(jnp.uint32) if sr else None
  t_new, s_new = _apply(opt, bit_row_ref[...].astype(jnp.uint32), w, g, state, dim=dim,
                        col0=col0, table_kind=kind, table_dt=table_dt, state_dts=state_dts,
                        seed=seed, col_offset=seed_ref[1], lr=lr)

  mask2 = valid[:, None]
  cols = lambda c: (c + jnp.arange(bd, dtype=jnp.int32))[None, :]
  store2 = lambda ref, c, x: plgpu.store(ref.at[dest[:, None], cols(c)], x, mask=mask2)
  store1 = lambda ref, x: plgpu.store(ref.at[dest], x, mask=valid)
  if kind == "int8":
    q_new, scale_new, bias_new = t_new
    for c, x in zip(col0, q_new):
      store2(t_out[0], c, x)
    store1(t_out[1], scale_new)
    store1(t_out[2], bias_new)
  else:
    for c, x in zip(col0, t_new):
      store2(t_out[0], c, x)
  for name, ref in zip(state_names, s_out):
    if name in row_state:
      store1(ref, s_new[name])
    else:
      for c, x in zip(col0, s_new[name]):
        store2(ref, c, x)


def _update_pallas(table, opt_state, seg, grad, opt, seed, col_offset, interpret):
  r, d = table.shape
  m = seg["row"].shape[0]
  if m == 0:  # no slots: nothing to update
    return table, dict(opt_state)
  kind, parts = _table_parts(table)
  names = tuple(sorted(opt_state))
  states = [opt_state[k] for k in names]
  bd = platform.col_block(d)
  bs = platform.row_block(m, d, target=platform.tuning().update_block)
  m_pad = pl.cdiv(m, bs) * bs
  pad = lambda x, v: jnp.pad(x, (0, m_pad - m), constant_values=v)
  blk = pl.BlockSpec((bs,), lambda i: (i,))
  full = lambda x: pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)
  as_i32 = lambda x: jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.uint32), jnp.int32)
  scalars = jnp.stack([as_i32(seed if seed is not None else 0), jnp.asarray(col_offset, jnp.int32)])
  operands = [pad(seg["row"], r), pad(as_i32(seg["bit_row"]), 0), pad(seg["start"], 0),
              pad(seg["len"], 0), seg["bag"], seg["w"], grad, scalars]
  in_specs = [blk, blk, blk, blk] + [full(x) for x in operands[4:]]
  if "lr" in seg:
    operands.append(pad(seg["lr"], 0))
    in_specs.append(blk)
  mutable = parts + states
  kernel = functools.partial(
      _update_kernel, opt=opt, kind=kind, state_names=names,
      row_state=optim.per_row_state(opt), dim=d, bd=bd, table_dt=jnp.dtype(table.dtype),
      state_dts={k: jnp.dtype(opt_state[k].dtype) for k in names}, sr=seed is not None,
      has_lr="lr" in seg)
  outs = pl.pallas_call(
      kernel,
      grid=(m_pad // bs,),
      in_specs=in_specs + [full(x) for x in mutable],
      out_specs=[full(x) for x in mutable],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in mutable],
      input_output_aliases={len(operands) + i: i for i in range(len(mutable))},
      interpret=interpret,
      compiler_params=platform.compiler_params(),
      name="jaxrec_sparse_update",
  )(*operands, *mutable)
  n_table = len(parts)
  new_table = QuantizedTable(*outs[:3]) if kind == "int8" else outs[0]
  return new_table, dict(zip(names, outs[n_table:]))


# ------------------------------------------------------------------------------- public

def _check(table, opt_state, grad, optimizer, num_bags):
  quant.table_dtype(table)
  r, d = table.shape
  want = optimizer.state_shapes(r, d)
  got = {k: tuple(v.shape) for k, v in opt_state.items()}
  if got != {k: tuple(s) for k, s in want.items()}:
    raise ConfigError(f"{type(optimizer).__name__} state must be {want}, got {got} "
                      "(use init_opt_state)")
  for k, v in opt_state.items():
    optim.check_state_dtype(v.dtype, f"{type(optimizer).__name__} state '{k}'")
  if grad.ndim != 2 or tuple(grad.shape) != (num_bags, d):
    raise ConfigError(f"grad_pooled must be [N, D] = [{num_bags}, {d}] (one row per bag), "
                      f"got {tuple(grad.shape)}")


def _run(table, opt_state, ids, bags, wts, grad, optimizer, step, key, kernel, interpret,
         num_bags, bit_rows, col_offset, rates=None):
  optimizer = optim.coerce(optimizer)
  _check(table, opt_state, grad, optimizer, num_bags)
  if 0 in table.shape:  # no rows or no columns: nothing to update
    return table, dict(opt_state)
  seg = segments(ids, bags, wts, table.shape[0], bit_rows, rates)
  grad = grad.astype(jnp.float32)
  seed = None if key is None else quant.seed_from(key, step)
  if platform.resolve_kernel(kernel) == "xla":
    return _update_xla(table, opt_state, seg, grad, optimizer, seed, col_offset)
  return _update_pallas(table, opt_state, seg, grad, optimizer, seed, col_offset,
                        platform.resolve_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("optimizer", "kernel", "interpret"))
def sparse_update(table, opt_state, idx, w, grad_pooled, optimizer, step=0, *, key=None,
                  kernel: str = "auto", interpret: bool | None = None, bit_rows=None,
                  col_offset=0, lr_rows=None):
  """Backward of `lookup_pool` fused with the optimizer step on the rows seen.

  Args:
    table: `[R, D]` f32/bf16/f16 or `QuantizedTable`.
    opt_state: dict from `init_opt_state(optimizer, R, D, dtype)`.
    idx: int32 `[N, L]` local rows, -1 (or any id outside `[0, R)`) = absent.
    w: f32 `[N, L]` slot weights used in the forward.
    grad_pooled: f32 `[N, D]` gradient of the pooled output.
    optimizer: `SGD`, `Adagrad` or `RowWiseAdagrad` (static; `optim.coerce` also accepts
      same-named dataclasses, e.g. from `jaxrec.embedding.optimizers`).
    step: training step (int scalar); only seeds stochastic rounding.
    key: PRNG key enabling stochastic rounding of bf16/f16/int8 stores; None rounds to
      nearest.
    kernel, interpret: as in `lookup_pool`.
    bit_rows: uint32 `[N, L]`, the row key of each slot's random bits (None: `idx`), and
    col_offset: int scalar added to the column for them. A shard of a bigger table passes
      its rows' and columns' global keys, so it draws the bits the whole table would.
    lr_rows: f32 `[N, L]`, each slot's learning rate, used instead of `optimizer.lr` (a
      stack of tables of different rates: slots of one row must have the same rate, its
      table's); None: `optimizer.lr` for every row.

  Returns:
    `(new_table, new_opt_state)`, same structure, shapes and dtypes.
  """
  if idx.ndim != 2 or w.shape != idx.shape:
    raise ConfigError(f"idx and w must both be [N, L]; got {idx.shape} and {w.shape}")
  quant.check_ids(idx)
  n, l = idx.shape
  for name, x in (("bit_rows", bit_rows), ("lr_rows", lr_rows)):
    if x is not None and x.shape != idx.shape:
      raise ConfigError(f"{name} must be [N, L] like idx {idx.shape}, got {x.shape}")
  bags = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, l))
  return _run(table, opt_state, idx.reshape(-1), bags.reshape(-1), w.reshape(-1),
              grad_pooled, optimizer, step, key, kernel, interpret, n,
              None if bit_rows is None else bit_rows.reshape(-1), col_offset,
              None if lr_rows is None else lr_rows.reshape(-1))


def sparse_update_csr(table, opt_state, values, offsets, weights, grad_pooled, optimizer,
                      step=0, *, key=None, kernel: str = "auto", interpret: bool | None = None):
  """`sparse_update` for CSR bags (`values/weights [nnz]`, `offsets [N + 1]` non-decreasing:
  concrete decreasing offsets are a ConfigError); values outside `[offsets[0], offsets[-1])`
  belong to no bag and are skipped, as in `lookup_pool_csr`."""
  quant.check_offsets(offsets, "sparse_update_csr")
  return _sparse_update_csr(table, opt_state, values, offsets, weights, grad_pooled, optimizer,
                            step, key=key, kernel=kernel, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("optimizer", "kernel", "interpret"))
def _sparse_update_csr(table, opt_state, values, offsets, weights, grad_pooled, optimizer,
                       step, *, key, kernel, interpret):
  if (values.ndim != 1 or weights.shape != values.shape or offsets.ndim != 1
      or offsets.shape[0] < 1):
    raise ConfigError(f"CSR update wants values/weights [nnz] and offsets [N+1]; got "
                      f"{values.shape}, {weights.shape}, {offsets.shape}")
  quant.check_ids(values, offsets)
  pos = jnp.arange(values.shape[0])
  bags = (jnp.searchsorted(offsets, pos, side="right") - 1).astype(jnp.int32)
  # In no bag: absent. This also keeps every bag in [0, N) for unsorted (traced) offsets:
  # the search gives 0 only for pos < offsets[0], and N + 1 only for pos >= offsets[-1].
  ids = jnp.where((pos >= offsets[0]) & (pos < offsets[-1]), values, -1)
  return _run(table, opt_state, ids, bags, weights, grad_pooled, optimizer, step, key,
              kernel, interpret, offsets.shape[0] - 1, None, 0)
