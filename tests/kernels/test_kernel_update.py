"""Fused backward + optimizer: Pallas (interpret mode) vs XLA vs a dense numpy update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.errors import ConfigError
from jaxrec.kernels.optim import coerce
from jaxrec.kernels import (SGD, Adagrad, RowWiseAdagrad, init_opt_state, lookup_pool,
                            lookup_pool_csr, padded_to_csr, segments, sparse_update,
                            sparse_update_csr)
from tests.kernels.kernel_helpers import (DTYPES, INTERPRET, ULP, as_f32, make_bags, make_table,
                                         raw_bits)

R, D = 50, 24
OPTIMIZERS = [SGD(lr=0.3), Adagrad(lr=0.2, initial_accumulator=0.1, eps=1e-6),
              RowWiseAdagrad(lr=0.2, initial_accumulator=0.0, eps=1e-6)]


def np_update(values, state, idx, w, grad, opt, row_lr=None):
  """Dense f64 reference: full gradient, then the optimizer on every seen row (at `row_lr
  [R]`, each row's own rate, where given)."""
  g = np.zeros(values.shape)
  seen = np.zeros(values.shape[0], bool)
  for n, l in zip(*np.nonzero((idx >= 0) & (idx < values.shape[0]))):
    g[idx[n, l]] += w[n, l] * grad[n].astype(np.float64)
    seen[idx[n, l]] = True
  new = values.astype(np.float64).copy()
  st = {k: np.asarray(v, np.float64).copy() for k, v in state.items()}
  lr = opt.lr if row_lr is None else np.asarray(row_lr, np.float64)[seen][:, None]
  if isinstance(opt, SGD):
    new[seen] -= lr * g[seen]
  elif isinstance(opt, Adagrad):
    st["accum"][seen] += g[seen] ** 2
    new[seen] -= lr * g[seen] / (np.sqrt(st["accum"][seen]) + opt.eps)
  else:
    st["accum"][seen] += np.mean(g[seen] ** 2, axis=1)
    new[seen] -= lr * g[seen] / (np.sqrt(st["accum"][seen])[:, None] + opt.eps)
  return new, st, seen


def _data(seed, dtype, opt, n=40, l=3, state_dtype=jnp.float32, pooling="weighted"):
  rng = np.random.default_rng(seed)
  table, values = make_table(rng, R, D, dtype)
  idx, w = make_bags(rng, n, l, R, pooling, id_range=20)  # many duplicates; rows 20+ unseen
  grad = rng.normal(size=(n, D)).astype(np.float32)
  state = init_opt_state(opt, R, D, state_dtype)
  if "accum" in state:  # non-uniform state, so unseen rows are distinguishable
    state = {"accum": (state["accum"].astype(jnp.float32)
                       + jnp.asarray(rng.uniform(0, 0.5, state["accum"].shape), jnp.float32)
                       ).astype(state_dtype)}
  return table, values, state, idx, w, grad


def _check_unseen_bit_identical(old_table, new_table, old_state, new_state, seen):
  for a, b in zip(raw_bits(old_table), raw_bits(new_table)):
    np.testing.assert_array_equal(a[~seen], b[~seen])
  for k in old_state:
    np.testing.assert_array_equal(np.asarray(old_state[k])[~seen], np.asarray(new_state[k])[~seen])


def _storage_tol(dtype, values):
  if dtype == "int8":  # one quantisation step of the widest updated row
    return dict(rtol=0, atol=float(np.max(np.ptp(values, axis=1))) / 255 * 1.01 + 1e-6)
  return dict(rtol=ULP[dtype] * 1.01, atol=1e-6)


# (pooling, bag length): multi-hot in every pooling mode, and one-hot. Every dtype x
# optimizer on weighted multi-hot bags; every other bag kind with every dtype, the
# optimizer rotating so that each kind also meets each optimizer (interpret mode is slow).
BAGS = [("weighted", 3), ("sum", 3), ("mean", 3), ("sum", 1), ("weighted", 1)]
UPDATE_CASES = [pytest.param(dtype, opt, pooling, bag,
                             id=f"{dtype}-{type(opt).__name__}-{pooling}-{bag}")
                for b, (pooling, bag) in enumerate(BAGS)
                for d, dtype in enumerate(DTYPES)
                for o, opt in enumerate(OPTIMIZERS) if b == 0 or o == (d + b) % 3]


@pytest.mark.parametrize("dtype,opt,pooling,bag", UPDATE_CASES)
def test_update_matches_dense_reference(dtype, opt, pooling, bag):
  # bf16/f16 tables keep their optimizer state in the same dtype; f32 and int8 in f32.
  state_dtype = dtype if dtype in ("bfloat16", "float16") else "float32"
  state_tol = dict(rtol=ULP[state_dtype] * 1.01 + 1e-6, atol=1e-6)
  table, values, state, idx, w, grad = _data(11 + bag, dtype, opt, l=bag,
                                             state_dtype=state_dtype, pooling=pooling)
  want, want_state, seen = np_update(values, state, idx, w, grad, opt)
  assert seen.sum() > 5 and (~seen).sum() > 20
  xla = sparse_update(table, state, idx, w, grad, opt, kernel="xla")
  pal = sparse_update(table, state, idx, w, grad, opt, kernel="pallas", interpret=INTERPRET)
  for new_table, new_state in (xla, pal):
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_table) == jax.tree.map(
        lambda x: (x.shape, x.dtype), table)
    _check_unseen_bit_identical(table, new_table, state, new_state, seen)
    np.testing.assert_allclose(as_f32(new_table)[seen], want[seen],
                               **_storage_tol(dtype, want[seen]))
    for k in want_state:
      np.testing.assert_allclose(np.asarray(new_state[k], np.float64)[seen], want_state[k][seen],
                                 **state_tol)
  # Pallas vs XLA: same math, summation order may move a value by one storage ulp.
  np.testing.assert_allclose(as_f32(pal[0]), as_f32(xla[0]), **_storage_tol(dtype, want))
  for k in want_state:
    np.testing.assert_allclose(np.asarray(pal[1][k], np.float32), np.asarray(xla[1][k], np.float32),
                               **state_tol)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: type(o).__name__)
def test_per_row_rates_match_dense_reference(opt):
  """`lr_rows`: each slot's rate, its row's (a stack of tables of different rates, each
  row its table's); `opt.lr` unused. Rows 0-9 at 0.05, 10-19 at 0.5 (ids below 20)."""
  table, values, state, idx, w, grad = _data(5, "float32", opt)
  row_lr = np.where(np.arange(R) < 10, 0.05, 0.5).astype(np.float32)
  lr_rows = row_lr[np.clip(idx, 0, R - 1)]
  want, want_state, seen = np_update(values, state, idx, w, grad, opt, row_lr)
  assert seen[:10].any() and seen[10:20].any()
  unused = dataclasses.replace(opt, lr=7.0)
  for kernel in ("xla", "pallas"):
    new_table, new_state = sparse_update(table, state, idx, w, grad, unused, kernel=kernel,
                                         interpret=INTERPRET, lr_rows=jnp.asarray(lr_rows))
    _check_unseen_bit_identical(table, new_table, state, new_state, seen)
    np.testing.assert_allclose(as_f32(new_table)[seen], want[seen], rtol=1e-5, atol=1e-6,
                               err_msg=kernel)
    for k in want_state:
      np.testing.assert_allclose(np.asarray(new_state[k])[seen], want_state[k][seen],
                                 rtol=1e-5, atol=1e-6, err_msg=kernel)
  with pytest.raises(ConfigError, match=r"lr_rows must be \[N, L\] like idx"):
    sparse_update(table, state, idx, w, grad, opt, lr_rows=jnp.asarray(lr_rows[:, 0]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_stochastic_rounding_pallas_matches_xla(dtype):
  opt = Adagrad(lr=0.05, initial_accumulator=0.1)
  table, values, state, idx, w, grad = _data(12, dtype, opt, state_dtype=jnp.bfloat16)
  key = jax.random.key(3)
  xla = sparse_update(table, state, idx, w, grad, opt, 5, key=key, kernel="xla")
  pal = sparse_update(table, state, idx, w, grad, opt, 5, key=key, kernel="pallas",
                      interpret=INTERPRET)
  want, _, seen = np_update(values, state, idx, w, grad, opt)
  _check_unseen_bit_identical(table, pal[0], state, pal[1], seen)
  # Same counter-based random bits in both: results agree to a storage ulp.
  np.testing.assert_allclose(as_f32(pal[0]), as_f32(xla[0]), **_storage_tol(dtype, want))
  np.testing.assert_allclose(as_f32(pal[0])[seen], want[seen],
                             **_storage_tol(dtype, want[seen]) if dtype == "int8" else
                             dict(rtol=2 * ULP[dtype], atol=1e-6))
  other = sparse_update(table, state, idx, w, grad, opt, 6, key=key, kernel="xla")
  assert not np.array_equal(as_f32(other[0]), as_f32(xla[0]))  # a new stream each step


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_a_shard_with_global_bit_keys_rounds_as_the_whole_table(kernel):
  """Rows [10, 30) and columns [8, 24) of the table, updated with `bit_rows` (the global
  rows) and `col_offset=8`, store bitwise what the whole table's update stores there."""
  opt = SGD(lr=0.05)
  table, _, state, idx, w, grad = _data(15, "bfloat16", opt)
  run = lambda *a, **k: sparse_update(*a, opt, 2, key=jax.random.key(1), kernel=kernel,
                                      interpret=INTERPRET, **k)[0]
  whole = run(table, state, idx, w, grad)
  shard = run(table[10:30, 8:], init_opt_state(opt, 20, 16, jnp.float32), idx - 10, w,
              grad[:, 8:], bit_rows=jnp.asarray(idx, jnp.uint32), col_offset=8)
  np.testing.assert_array_equal(raw_bits(shard)[0], raw_bits(whole[10:30, 8:])[0])
  local = run(table[10:30, 8:], init_opt_state(opt, 20, 16, jnp.float32), idx - 10, w,
              grad[:, 8:])   # local keys: other bits, so the test can tell
  assert not np.array_equal(raw_bits(local)[0], raw_bits(shard)[0])


def test_one_hot_and_csr_updates_agree():
  opt = RowWiseAdagrad(lr=0.1)
  table, values, state, idx, w, grad = _data(13, "float32", opt, n=9, l=1)
  pal = sparse_update(table, state, idx, w, grad, opt, kernel="pallas", interpret=INTERPRET)
  want, want_state, seen = np_update(values, state, idx, w, grad, opt)
  np.testing.assert_allclose(np.asarray(pal[0]), want, rtol=1e-5, atol=1e-6)
  table, values, state, idx, w, grad = _data(14, "float32", opt)
  vals, offsets, wts = padded_to_csr(jnp.asarray(idx), jnp.asarray(w))
  ref = sparse_update(table, state, idx, w, grad, opt, kernel="xla")
  for kernel in ("xla", "pallas"):
    out = sparse_update_csr(table, state, vals, offsets, wts, grad, opt, kernel=kernel,
                            interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out[1]["accum"]), np.asarray(ref[1]["accum"]),
                               rtol=1e-6)


def test_csr_values_outside_the_bags_are_skipped():
  """offsets [1, 2, 3]: value 0 sits before bag 0. The lookup skips it; the update gave its
  row the last bag's gradient (bag index -1)."""
  values, offsets, w = jnp.array([0, 1, 2], jnp.int32), jnp.array([1, 2, 3]), jnp.ones((3,))
  grad = jnp.array([[1.0, 1.0], [10.0, 10.0]])
  pooled = lookup_pool_csr(jnp.arange(8.0).reshape(4, 2), values, offsets, w)
  np.testing.assert_array_equal(np.asarray(pooled), [[2, 3], [4, 5]])
  for kernel in ("xla", "pallas"):
    new, _ = sparse_update_csr(jnp.zeros((4, 2)), {}, values, offsets, w, grad, SGD(1.0),
                               kernel=kernel, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(new), [[0, 0], [-1, -1], [-10, -10], [0, 0]])


def test_segments_describe_distinct_rows():
  ids = jnp.array([5, -1, 2, 5, 9, 2, 5, 70], jnp.int32)  # 70 is outside R=10
  seg = segments(ids, jnp.arange(8, dtype=jnp.int32), jnp.ones(8), 10)
  n = 3
  np.testing.assert_array_equal(seg["row"][:n], [2, 5, 9])
  np.testing.assert_array_equal(seg["len"][:n], [2, 3, 1])
  np.testing.assert_array_equal(seg["row"][n:], 10)
  np.testing.assert_array_equal(seg["len"][n:], 0)
  np.testing.assert_array_equal(seg["bag"][:6], [2, 5, 0, 3, 6, 4])  # stable within a row


def test_optimizers_are_static_and_validated():
  assert hash(SGD(0.1)) == hash(SGD(0.1)) and Adagrad(0.1) != RowWiseAdagrad(0.1)
  assert init_opt_state(SGD(0.1), 4, 8) == {}
  st = init_opt_state(Adagrad(0.1, initial_accumulator=0.1), 4, 8, jnp.bfloat16)
  assert st["accum"].shape == (4, 8) and st["accum"].dtype == jnp.bfloat16
  assert init_opt_state(RowWiseAdagrad(0.1), 4, 8)["accum"].shape == (4,)
  with pytest.raises(ConfigError, match="state must be"):
    sparse_update(jnp.zeros((4, 8)), {}, jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1)),
                  jnp.zeros((2, 8)), Adagrad(0.1))
  with pytest.raises(ConfigError, match="unsupported sparse optimizer"):
    init_opt_state("adam", 4, 8)
  with pytest.raises(ConfigError, match="lr must be"):
    init_opt_state(SGD(-1.0), 4, 8)
  with pytest.raises(ConfigError, match="dtype must be one of"):
    init_opt_state(Adagrad(0.1), 4, 8, jnp.int8)
  with pytest.raises(ConfigError, match="'accum': dtype must be one of"):
    sparse_update(jnp.zeros((4, 8)), {"accum": jnp.zeros((4,), jnp.int32)},
                  jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1)), jnp.zeros((2, 8)),
                  RowWiseAdagrad(0.1))
  # One gradient row per bag: a [3, 8] gradient for 2 bags is not silently clamped.
  with pytest.raises(ConfigError, match=r"grad_pooled must be \[N, D\] = \[2, 8\]"):
    sparse_update(jnp.zeros((4, 8)), {}, jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1)),
                  jnp.zeros((3, 8)), SGD(0.1))
  with pytest.raises(ConfigError, match=r"grad_pooled must be \[N, D\] = \[1, 8\]"):
    sparse_update_csr(jnp.zeros((4, 8)), {}, jnp.zeros((3,), jnp.int32),
                      jnp.array([0, 3], jnp.int32), jnp.ones((3,)), jnp.zeros((2, 8)), SGD(0.1))
  with pytest.raises(ConfigError, match="CSR update wants"):
    sparse_update_csr(jnp.zeros((4, 8)), {}, jnp.zeros((3,), jnp.int32),
                      jnp.array([0, 3], jnp.int32), jnp.ones((2,)), jnp.zeros((1, 8)), SGD(0.1))

  # A look-alike from another module (e.g. jaxrec.embedding) converts by name and fields.
  fields = [("lr", float, 0.5), ("initial_accumulator", float, 0.0), ("eps", float, 1e-8),
            ("extra", int, 3)]
  other = dataclasses.make_dataclass("RowWiseAdagrad", fields, frozen=True)
  assert coerce(other()) == RowWiseAdagrad(lr=0.5)


def test_empty_batch_updates_nothing():
  opt = RowWiseAdagrad(0.1)
  table, _ = make_table(np.random.default_rng(15), 4, 8, "int8")
  state = init_opt_state(opt, 4, 8)
  for kernel in ("xla", "pallas"):
    new_table, new_state = sparse_update(table, state, jnp.zeros((0, 2), jnp.int32),
                                         jnp.zeros((0, 2)), jnp.zeros((0, 8)), opt,
                                         kernel=kernel, interpret=INTERPRET)
    for a, b in zip(raw_bits(table), raw_bits(new_table)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(new_state["accum"]), np.asarray(state["accum"]))


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_a_non_finite_gradient_changes_only_the_rows_of_its_bag(kernel):
  """Bag 0 reads row 0 three times, bags 1 and 2 one row each: Pallas's past-the-end
  slots multiplied bag 0's inf by a 0 weight, so rows 1 and 2 became NaN."""
  table = np.zeros((4, 8), np.float32)
  idx = np.array([[0, 0, 0], [1, -1, -1], [2, -1, -1]], np.int32)
  grad = np.ones((3, 8), np.float32)
  grad[0] = np.inf
  new, _ = sparse_update(table, {}, idx, (idx >= 0).astype(np.float32), grad, SGD(0.1),
                         kernel=kernel, interpret=INTERPRET)
  new = np.asarray(new)
  assert np.all(new[0] == -np.inf)
  np.testing.assert_allclose(new[1:3], -0.1)
  np.testing.assert_array_equal(new[3], 0.0)


# Shapes off the common path: a single-row table, dims that are no power of two (1- and
# 4-wide column chunks), batches not a multiple of the row block, all ids absent.
EDGE_CASES = [pytest.param(opt, dtype, r, d, n, l, id=f"{type(opt).__name__}-{dtype}-{r}x{d}-{n}x{l}")
              for opt, dtype, r, d, n, l in [(OPTIMIZERS[0], "int8", 1, 5, 65, 2),
                                             (OPTIMIZERS[1], "float16", 3, 12, 1, 1),
                                             (OPTIMIZERS[2], "float32", 7, 20, 33, 3)]]


@pytest.mark.parametrize("opt,dtype,r,d,n,l", EDGE_CASES)
def test_edge_shapes_pallas_matches_xla(opt, dtype, r, d, n, l):
  rng = np.random.default_rng(r * 100 + d)
  table, values = make_table(rng, r, d, dtype)
  idx = rng.integers(-1, r, size=(n, l)).astype(np.int32)
  idx[-1] = -1  # an empty bag
  w = (idx >= 0) * rng.uniform(0.5, 1.5, size=(n, l)).astype(np.float32)
  grad = rng.normal(size=(n, d)).astype(np.float32)
  out = lookup_pool(table, idx, w, kernel="pallas", interpret=INTERPRET)
  np.testing.assert_allclose(np.asarray(out), np.asarray(lookup_pool(table, idx, w, kernel="xla")),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out[-1]), 0.0)
  state_dtype = "float16" if dtype == "float16" else "float32"
  state = init_opt_state(opt, r, d, state_dtype)
  xla = sparse_update(table, state, idx, w, grad, opt, kernel="xla")
  pal = sparse_update(table, state, idx, w, grad, opt, kernel="pallas", interpret=INTERPRET)
  want, want_state, seen = np_update(values, state, idx, w, grad, opt)
  np.testing.assert_allclose(as_f32(pal[0]), as_f32(xla[0]), **_storage_tol(dtype, want))
  np.testing.assert_allclose(as_f32(pal[0])[seen], want[seen], **_storage_tol(dtype, want[seen]))
  for k in state:
    np.testing.assert_allclose(np.asarray(pal[1][k], np.float32),
                               np.asarray(xla[1][k], np.float32), rtol=2 * ULP[state_dtype],
                               atol=1e-6)
