"""Forward kernels: Pallas (interpret mode) vs the XLA reference vs dense numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.errors import ConfigError
from jaxrec.kernels import platform
from jaxrec.kernels.lookup import MAX_UNROLLED_SLOTS
from jaxrec.kernels import (SGD, RowWiseAdagrad, csr_to_padded, init_opt_state, lookup_pool,
                            lookup_pool_csr, padded_to_csr, resolve_kernel, sparse_update,
                            sparse_update_csr)
from tests.kernels.kernel_helpers import DTYPES, INTERPRET, make_bags, make_table, np_pool

R, D = 50, 24  # D = 3 chunks of 8 columns: exercises the column grid


def _tol(dtype):
  # Kernels accumulate in f32 in a different order than numpy's f64.
  return dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pooling", ["sum", "mean", "weighted"])
def test_multi_hot_matches_reference(dtype, pooling):
  rng = np.random.default_rng(DTYPES.index(dtype) * 10 + len(pooling))
  table, values = make_table(rng, R, D, dtype)
  idx, w = make_bags(rng, 70, 4, R, pooling, id_range=20)  # 70 bags: 2 programs of 64
  ref = lookup_pool(table, idx, w, kernel="xla")
  out = lookup_pool(table, idx, w, kernel="pallas", interpret=INTERPRET)
  assert out.shape == (70, D) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ref), np_pool(values, idx, w), **_tol(dtype))
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)  # empty bag pools to zeros


def _has_loop(jaxpr_text: str) -> bool:
  return "while[" in jaxpr_text or "scan[" in jaxpr_text


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_unrolled_slots_match_the_loop(dtype):
  """`GpuTuning.unroll_slots` (the default, picked by a `benchmarks/kernels.py --sweep`): the
  padded kernel walks its slots in straight-line code, with no loop left in the kernel, and
  pools the same sums as the loop, empty and out-of-shard slots included."""
  rng = np.random.default_rng(11)
  table, _ = make_table(rng, R, D, dtype)
  idx, w = make_bags(rng, 70, 5, R, "weighted", id_range=20)
  idx[5, 2] = R + 3   # out of the local shard
  pallas = lambda t, i, v: lookup_pool(t, i, v, kernel="pallas", interpret=INTERPRET)
  runs = {}
  for unroll in (False, True):
    with platform.tuned(platform.GpuTuning(unroll_slots=unroll)):
      jax.clear_caches()
      runs[unroll] = (pallas(table, idx, w), str(jax.make_jaxpr(pallas)(table, idx, w)))
  jax.clear_caches()
  (looped, looped_text), (unrolled, kernel_text) = runs[False], runs[True]
  assert _has_loop(looped_text)
  assert not _has_loop(kernel_text)
  np.testing.assert_allclose(np.asarray(unrolled), np.asarray(looped), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(unrolled),
                             np.asarray(lookup_pool(table, idx, w, kernel="xla")),
                             rtol=1e-6, atol=1e-6)


def test_bags_longer_than_the_unroll_limit_keep_the_loop():
  """Bags of more than `MAX_UNROLLED_SLOTS` ids are pooled by the loop (an unrolled body of
  hundreds of gathers would swell the kernel), with the same sums."""
  rng = np.random.default_rng(12)
  table, _ = make_table(rng, R, D, "float32")
  idx, w = make_bags(rng, 6, MAX_UNROLLED_SLOTS + 1, R, "weighted")
  pallas = lambda t, i, v: lookup_pool(t, i, v, kernel="pallas", interpret=INTERPRET)
  assert platform.tuning().unroll_slots
  assert _has_loop(str(jax.make_jaxpr(pallas)(table, idx, w)))
  assert not _has_loop(str(jax.make_jaxpr(pallas)(table, idx[:, :MAX_UNROLLED_SLOTS],
                                                   w[:, :MAX_UNROLLED_SLOTS])))
  np.testing.assert_allclose(np.asarray(pallas(table, idx, w)),
                             np.asarray(lookup_pool(table, idx, w, kernel="xla")),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pooling", ["sum", "mean", "weighted"])
def test_one_hot_matches_reference(dtype, pooling):
  rng = np.random.default_rng(7)
  table, values = make_table(rng, R, 16, dtype)
  idx, w = make_bags(rng, 9, 1, R, pooling)
  idx[3, 0] = -1  # absent (its weight must be ignored)
  idx[4, 0] = R + 5  # out of the local shard: treated as absent, never read
  w[4, 0] = 1.0
  out = lookup_pool(table, idx, w, kernel="pallas", interpret=INTERPRET)
  np.testing.assert_allclose(np.asarray(out), np.asarray(lookup_pool(table, idx, w, kernel="xla")),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out), np_pool(values, idx, w), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[3:5]), 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pooling", ["sum", "mean", "weighted"])
def test_csr_kernel_matches_padded(dtype, pooling):
  rng = np.random.default_rng(3)
  table, values = make_table(rng, R, 8, dtype)
  lens = np.array([0, 1, 5, 2, 0, 3, 1, 4, 2, 1, 6])
  offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
  vals = rng.integers(0, 12, size=offsets[-1]).astype(np.int32)
  vals[2] = -1
  bag_len = np.repeat(lens, lens).astype(np.float32)   # length of each slot's bag
  wts = {"sum": np.ones(offsets[-1], np.float32), "mean": 1.0 / np.maximum(bag_len, 1),
         "weighted": rng.uniform(0.5, 1.5, size=offsets[-1])}[pooling].astype(np.float32)
  out = lookup_pool_csr(table, vals, offsets, wts, kernel="pallas", interpret=INTERPRET)
  ref = lookup_pool_csr(table, vals, offsets, wts, kernel="xla")
  idx, w = csr_to_padded(jnp.asarray(vals), jnp.asarray(offsets), jnp.asarray(wts), 6)
  padded = lookup_pool(table, idx, w, kernel="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(padded), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ref), np_pool(values, np.asarray(idx), np.asarray(w)),
                             rtol=1e-5, atol=1e-5)


def test_csr_padded_round_trip():
  rng = np.random.default_rng(4)
  idx, w = make_bags(rng, 6, 3, R, "weighted")
  values, offsets, weights = padded_to_csr(jnp.asarray(idx), jnp.asarray(w))
  nnz = int(offsets[-1])
  assert nnz == int((idx >= 0).sum()) and np.all(np.asarray(values[nnz:]) == -1)
  idx2, w2 = csr_to_padded(values, offsets, weights, 3)
  # Present ids move to the front of each bag; pooled results are unchanged.
  table = jnp.asarray(rng.normal(size=(R, 8)), jnp.float32)
  np.testing.assert_allclose(np.asarray(lookup_pool(table, idx2, w2, kernel="xla")),
                             np.asarray(lookup_pool(table, idx, w, kernel="xla")), rtol=1e-6)
  np.testing.assert_array_equal(np.sort(np.asarray(idx2), 1), np.sort(idx, 1))


def test_xla_lookup_gradient_is_the_sparse_slot_gradient():
  rng = np.random.default_rng(5)
  table = jnp.asarray(rng.normal(size=(R, 8)), jnp.float32)
  idx, w = make_bags(rng, 5, 3, R, "weighted", id_range=6)
  g = rng.normal(size=(5, 8)).astype(np.float32)
  dense = jax.grad(lambda t: jnp.sum(lookup_pool(t, idx, w, kernel="xla") * g))(table)
  want = np.zeros((R, 8), np.float32)
  for n, l in zip(*np.nonzero(idx >= 0)):
    want[idx[n, l]] += w[n, l] * g[n]
  np.testing.assert_allclose(np.asarray(dense), want, rtol=1e-5, atol=1e-6)


def test_kernel_selection_and_errors():
  assert resolve_kernel("auto", "cpu") == "xla"
  assert resolve_kernel("auto", "gpu") == "pallas"
  assert resolve_kernel("xla", "gpu") == "xla"
  with pytest.raises(ConfigError, match="kernel must be one of"):
    resolve_kernel("triton")
  table = jnp.zeros((4, 8))
  with pytest.raises(ConfigError, match=r"\[N, L\]"):
    lookup_pool(table, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 2)))
  with pytest.raises(ConfigError, match="QuantizedTable"):
    lookup_pool(jnp.zeros((4, 8), jnp.int8), jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1)))
  with pytest.raises(ConfigError, match="dtype"):
    lookup_pool(jnp.zeros((4, 8), jnp.int32), jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1)))
  # A table that is not [rows, dim]: the CSR lookup returned a [1, 1] array, the update
  # failed with "not enough values to unpack".
  flat, idx, w = jnp.zeros((4,)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1))
  for call in (lambda: lookup_pool(flat, idx, w),
               lambda: lookup_pool_csr(flat, idx[:, 0], jnp.array([0, 1, 2]), w[:, 0]),
               lambda: sparse_update(flat, {}, idx, w, jnp.zeros((2, 4)), SGD(0.1))):
    with pytest.raises(ConfigError, match=r"table must be \[rows, dim\], got shape \(4,\)"):
      call()


def test_empty_batches_pool_to_nothing():
  table, _ = make_table(np.random.default_rng(6), 4, 8, "int8")
  for kernel in ("xla", "pallas"):
    for n, l in ((0, 3), (3, 0)):
      out = lookup_pool(table, jnp.zeros((n, l), jnp.int32), jnp.zeros((n, l)), kernel=kernel,
                        interpret=INTERPRET)
      assert out.shape == (n, 8)
      np.testing.assert_array_equal(np.asarray(out), 0.0)
    out = lookup_pool_csr(table, jnp.zeros((0,), jnp.int32), jnp.zeros((1,), jnp.int32),
                          jnp.zeros((0,)), kernel=kernel, interpret=INTERPRET)
    assert out.shape == (0, 8)


def test_malformed_quantized_table_is_a_clear_error():
  qt, _ = make_table(np.random.default_rng(8), 4, 8, "int8")
  bad = qt._replace(scale=qt.scale[:, None])  # [R, 1] instead of [R]
  idx, w = jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1))
  for kernel in ("xla", "pallas"):
    with pytest.raises(ConfigError, match=r"scale and bias \[R\]"):
      lookup_pool(bad, idx, w, kernel=kernel, interpret=INTERPRET)


def test_empty_tables_and_malformed_inputs_on_both_kernels():
  """Empty tables pool to zeros and update nothing; malformed inputs are ConfigErrors. Each
  used to fail with an unrelated error (TypeError from a gather, division by zero, an MLIR
  error) or, for float ids, to truncate them silently; an f16 scale came back f32."""
  table, idx, w = jnp.zeros((4, 8)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1))
  qt, _ = make_table(np.random.default_rng(9), 4, 8, "int8")
  for kernel in ("xla", "pallas"):
    kw = dict(kernel=kernel, interpret=INTERPRET)
    for empty in (jnp.zeros((0, 8)), jnp.zeros((4, 0))):  # every id absent / no columns
      d = empty.shape[1]
      np.testing.assert_array_equal(np.asarray(lookup_pool(empty, idx, w, **kw)),
                                    np.zeros((2, d)))
      np.testing.assert_array_equal(np.asarray(lookup_pool_csr(
          empty, idx[:, 0], jnp.array([0, 1, 2]), w[:, 0], **kw)), np.zeros((2, d)))
      opt = RowWiseAdagrad(0.1)
      new, state = sparse_update(empty, init_opt_state(opt, *empty.shape), idx, w,
                                 jnp.ones((2, d)), opt, **kw)
      assert new.shape == empty.shape and state["accum"].shape == (empty.shape[0],)
    with pytest.raises(ConfigError, match="ids must be integers, got float32"):
      lookup_pool(table, jnp.full((2, 1), 1.7), w, **kw)
    with pytest.raises(ConfigError, match="ids must be integers, got float32"):
      sparse_update(table, {}, jnp.full((2, 1), 1.7), w, jnp.zeros((2, 8)), SGD(0.1), **kw)
    with pytest.raises(ConfigError, match="ids must be integers, got float32"):
      lookup_pool_csr(table, jnp.ones((2,)), jnp.array([0, 1, 2]), jnp.ones((2,)), **kw)
    for call in (lookup_pool_csr, functools.partial(sparse_update_csr, opt_state={},
                                                    grad_pooled=jnp.zeros((0, 8)),
                                                    optimizer=SGD(0.1))):
      with pytest.raises(ConfigError, match=r"offsets \[N\+1\]"):
        call(table, values=jnp.zeros((0,), jnp.int32), offsets=jnp.zeros((0,), jnp.int32),
             weights=jnp.zeros((0,)), **kw)
    f16 = qt._replace(scale=qt.scale.astype(jnp.float16))
    with pytest.raises(ConfigError, match=r"scale and bias \[R\] float32"):
      lookup_pool(f16, idx, w, **kw)
    with pytest.raises(ConfigError, match=r"scale and bias \[R\] float32"):
      sparse_update(f16, {}, idx, w, jnp.zeros((2, 8)), SGD(0.1), **kw)


def test_csr_offsets_past_the_values_cut_the_bags_on_both_kernels():
  """Offsets beyond `[0, nnz]` made the Pallas kernel read values out of bounds (clamped in
  interpret mode: wrong sums; on GPU, stray memory), and `csr_to_padded` repeat the last
  (or first) value; XLA cuts such bags at the ends."""
  table, values = make_table(np.random.default_rng(10), 6, 8, "float32")
  ids, w = jnp.array([1, 2, 3]), jnp.ones((3,))
  for offsets, bags in (([0, 2, 5], [[1, 2], [3]]), ([-2, 1, 3], [[1], [2, 3]])):
    want = np.stack([values[b].sum(0) for b in bags])
    for kernel in ("xla", "pallas"):
      out = lookup_pool_csr(table, ids, jnp.array(offsets), w, kernel=kernel, interpret=INTERPRET)
      np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6, atol=1e-6, err_msg=kernel)
    idx, pw = csr_to_padded(ids, jnp.array(offsets), w, 4)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), axis=1)[:, ::-1],
                                  [sorted(b, reverse=True) + [-1] * (4 - len(b)) for b in bags])
    np.testing.assert_array_equal(np.asarray(pw), np.asarray(idx) >= 0)


def test_decreasing_csr_offsets_are_refused_when_concrete():
  """Decreasing offsets (no meaning as bags) were pooled and updated differently by the two
  kernels (XLA and Pallas sums differed); concrete ones now name the pair, traced ones
  still run (in bounds: nothing to check them against)."""
  table, _ = make_table(np.random.default_rng(11), 6, 8, "float32")
  values, w = jnp.arange(5, dtype=jnp.int32), jnp.ones((5,))
  grad = jnp.ones((3, 8))
  for offsets in (np.array([0, 3, 1, 5], np.int32), jnp.array([0, 3, 1, 5])):
    with pytest.raises(ConfigError, match=r"lookup_pool_csr: CSR offsets must be "
                       r"non-decreasing, but offsets\[2\] = 1 < offsets\[1\] = 3"):
      lookup_pool_csr(table, values, offsets, w)
    with pytest.raises(ConfigError, match=r"sparse_update_csr: CSR offsets must be "
                       r"non-decreasing, but offsets\[2\] = 1 < offsets\[1\] = 3"):
      sparse_update_csr(table, {}, values, offsets, w, grad, SGD(0.1))
  traced = jax.jit(lambda o: sparse_update_csr(table, {}, values, o, w, grad, SGD(0.1))[0])
  assert np.isfinite(np.asarray(traced(jnp.array([0, 3, 1, 5])))).all()
  lookup_pool_csr(table, values, jnp.array([-2, 0, 0, 5]), w)   # flat runs, a negative start
