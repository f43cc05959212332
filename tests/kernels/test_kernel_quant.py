"""Reduced precision helpers, and a GPU (Triton) lowering check of every kernel on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.errors import ConfigError
from jaxrec.kernels import (SGD, Adagrad, RowWiseAdagrad, cast_store, comm_cast, comm_uncast,
                            dequantize, init_opt_state, lookup_pool, lookup_pool_csr,
                            padded_to_csr, quantize, sparse_update)
from jaxrec.kernels import quant
from tests import deprecations
from tests.kernels.kernel_helpers import DTYPES, lower_for_gpu, make_table


def test_int8_rows_round_trip_within_half_a_step():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 24)).astype(np.float32)
  x[3] = 1.25  # constant row: scale 0, exact
  qt = quantize(jnp.asarray(x))
  assert qt.q.dtype == jnp.int8 and qt.scale.shape == (16,) and qt.bias.shape == (16,)
  err = np.abs(np.asarray(dequantize(qt)) - x)
  assert np.all(err <= np.asarray(qt.scale)[:, None] * 0.5 + 1e-6)
  np.testing.assert_array_equal(np.asarray(dequantize(qt))[3], 1.25)
  assert np.asarray(qt.q).min() == -128 and np.asarray(qt.q).max() == 127


def test_int8_rows_spanning_the_whole_float32_range_stay_finite():
  x = np.array([[-3e38, 0.0, 3e38], [-1.0, 0.5, 1.0]], np.float32)   # hi - lo overflows f32
  qt = quantize(jnp.asarray(x))
  back = np.asarray(dequantize(qt))
  assert np.all(np.isfinite(np.asarray(qt.scale))) and np.all(np.isfinite(back))
  step = np.asarray(qt.scale, np.float64)[:, None]
  assert np.all(np.abs(back.astype(np.float64) - x) <= step * 0.5 * (1 + 1e-5) + 1e-6)


def test_int8_rows_spanning_float32s_largest_values_stay_finite():
  """A row spanning +-3.4e38 (float32's max): `128 * scale`, the bias's distance from the
  row's low end, overflowed, and the row read back inf and NaN (on both kernels' update
  too). The scale is capped at max / 128: its top end reads up to one step low."""
  big = np.finfo(np.float32).max
  x = np.array([[-big, big, 0.0, 1.0, -1.0], [-3.4e38, 3.39e38, 2e38, 0.0, 5.0]], np.float32)
  qt = quantize(jnp.asarray(x))
  back = np.asarray(dequantize(qt))
  assert np.all(np.isfinite(np.asarray(qt.bias))) and np.all(np.isfinite(back))
  step = np.asarray(qt.scale, np.float64)[:, None]
  assert np.all(np.abs(back.astype(np.float64) - x) <= step * (1 + 1e-5))
  idx, w = jnp.arange(2, dtype=jnp.int32)[:, None], jnp.ones((2, 1), jnp.float32)
  for kernel in ("xla", "pallas"):   # a zero gradient re-quantises the rows
    new, _ = sparse_update(qt, {}, idx, w, jnp.zeros((2, 5), jnp.float32),
                                   SGD(lr=0.1), kernel=kernel, interpret=True)
    again = np.asarray(dequantize(new), np.float64)
    assert np.all(np.isfinite(again)), kernel
    assert np.all(np.abs(again - x) <= 2 * step * (1 + 1e-5)), kernel


def test_int8_rows_of_a_subnormal_span_read_back_as_their_low_end():
  """A row spanning under ~3e-36 has a subnormal scale: 0 on every backend (XLA:CPU flushes
  it; a GPU that keeps subnormals divided by it, giving inf and NaN codes)."""
  x = np.array([[1e-37, 1.5e-37, 2e-37], [-1.0, 0.5, 1.0]], np.float32)
  qt = quantize(jnp.asarray(x))
  scale, q = np.asarray(qt.scale), np.asarray(qt.q)
  assert scale[0] == 0 and (q[0] == 0).all() and scale[1] > 0
  np.testing.assert_array_equal(np.asarray(dequantize(qt))[0], np.full(3, 1e-37, np.float32))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stochastic_rounding_is_unbiased_between_neighbours(dtype):
  x = jnp.array([1.0 + 2.0 ** -9, -3.3e-3, 7.77, 1e-6, 0.0, -65.1, 3e-7], jnp.float32)
  bits = quant.random_bits(jnp.uint32(12345), jnp.arange(4096), jnp.arange(x.shape[0]))
  y = np.asarray(cast_store(jnp.broadcast_to(x, bits.shape), dtype, bits).astype(jnp.float32))
  xs = np.asarray(x)
  for c in range(xs.shape[0]):
    vals = np.unique(y[:, c])  # at most the two neighbours of x, bracketing it
    assert len(vals) <= 2 and vals[0] <= xs[c] <= vals[-1], (c, vals)
  step = np.abs(y.max(0) - y.min(0))
  assert np.all(np.abs(y.mean(0) - xs) <= 0.05 * step + 1e-12)  # > 6 standard errors
  np.testing.assert_array_equal(np.asarray(cast_store(x, dtype)), np.asarray(x.astype(dtype)))


@pytest.mark.parametrize("dtype,values", [
    ("float16", [1.0 + 2.0 ** -10, 2047.0, -1.5 + 2.0 ** -9, 2.0 ** -20, 0.25]),
    ("bfloat16", [1.0 + 2.0 ** -7, 255.0, -1.5 + 2.0 ** -6, 2.0 ** -130, 0.25])])
def test_stochastic_rounding_keeps_representable_values(dtype, values):
  """fp16 floored `x / ulp + u` rounded in float32 first: with u > 1 - 2**-14 an exactly
  representable value went up one ulp (6 of 65,536 entries of an SGD step with a zero
  gradient), a small bias towards +inf that built up over steps."""
  x = jnp.array(values, jnp.float32)
  bits = jax.random.bits(jax.random.key(0), (65536, x.shape[0]), jnp.uint32)
  bits = bits.at[:8].set(jnp.uint32(0xFFFFFFFF))   # the largest offsets among them
  y = cast_store(jnp.broadcast_to(x, bits.shape), dtype, bits).astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(x), bits.shape))


def test_int8_rounds_on_the_exact_fraction():
  """`floor(v + 0.5)` rounded `v + 0.5` first: 0.49999997 + 0.5 is 1.0 in float32."""
  below_half = np.float32(np.nextafter(np.float32(0.5), np.float32(0)))
  q, scale, bias = quant.quantize_with_range(jnp.array([[below_half]]), jnp.array([-128.0]),
                                             jnp.array([127.0]))
  assert float(scale[0]) == 1.0 and float(bias[0]) == 0.0 and int(q[0, 0]) == 0


@pytest.mark.parametrize("comm", ["bf16", "float16", "fp8", "float32"])
def test_comm_cast_round_trip(comm):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(6, 32)) * np.array([1e-3, 1, 10, 100, 0, 5])[:, None],
                  jnp.float32)
  payload, scale = comm_cast(x, comm)
  y = np.asarray(comm_uncast(payload, scale))
  name = quant.canonical_comm_dtype(comm)
  assert payload.dtype == jnp.dtype(name)
  rel = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float8_e4m3fn": 2.0 ** -4,
         "float32": 0}[name]
  amax = np.abs(np.asarray(x)).max(1, keepdims=True)
  assert np.all(np.abs(y - np.asarray(x)) <= rel * amax + 1e-30)
  if name in quant.SCALED_COMM_DTYPES:
    assert scale.shape == (6, 1)
    p2, s2 = comm_cast(x, comm, per_row=False)
    assert s2.shape == () and np.isfinite(np.asarray(comm_uncast(p2, s2))).all()
  else:
    assert scale is None
  if name != "float8_e4m3fn":  # fp8 cotangents need their own scale: all_to_all_compressed
    grad = jax.grad(lambda v: jnp.sum(comm_uncast(*comm_cast(v, comm)) * 2.0))(x)
    np.testing.assert_allclose(np.asarray(grad), 2.0)
  with pytest.raises(ConfigError, match="comm_dtype"):
    comm_cast(x, "int4")


def wire_round_trip(x, comm, **kw):
  """`comm_uncast(comm_cast(x))` with the payload materialised in `comm`, as it crosses a
  collective: in one program XLA:GPU drops the convert pair (excess precision allowed), so
  an fp8 inf arrived as inf there and these tests checked nothing of fp8."""
  payload, scale = jax.jit(lambda v: comm_cast(v, comm, **kw))(x)
  return np.asarray(jax.jit(comm_uncast)(payload, scale))


@pytest.mark.parametrize("amax", [1.2e-38, 1e-37, 5e-36])
def test_fp8_rows_of_tiny_values_stay_finite(amax):
  """amax / 448 under the smallest normal f32 was flushed to a zero scale: NaN rows (tiny
  cotangents, e.g. of confidently right examples, then made every updated row NaN)."""
  x = jnp.array([[amax, amax / 2, -amax, 0.0]], jnp.float32)
  y = wire_round_trip(x, "fp8")
  tiny = np.finfo(np.float32).tiny   # results below it may flush to zero
  assert np.all(np.abs(y - np.asarray(x)) <= 2.0 ** -4 * amax + tiny), y


@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_keeps_finite_values_beside_an_inf_or_nan(per_row):
  """The scale came from amax over every value: one inf made its row (or, per tensor, a NaN
  made every value over 448) NaN, where bf16 keeps the finite values. Now only the
  non-finite element is lost (fp8 has no inf: it becomes NaN)."""
  x = jnp.array([[np.inf, 1.0, -2.0, 3.0], [np.nan, 1000.0, -5.0, 0.5],
                 [-np.inf, 0.0, 0.0, 0.0], [7.0, -300.0, 600.0, 0.25]], jnp.float32)
  y = wire_round_trip(x, "fp8", per_row=per_row)
  xs = np.asarray(x)
  finite = np.isfinite(xs)
  assert np.all(np.isnan(y[~finite]))
  amax = np.where(finite, np.abs(xs), 0).max(axis=1 if per_row else None, keepdims=per_row)
  assert np.all(np.abs(y - xs)[finite] <= (2.0 ** -4 * np.broadcast_to(amax, xs.shape))[finite])


@pytest.mark.parametrize("comm", ["bf16", "fp8"])   # fp16: test_collection_kernels
def test_all_to_all_compressed_forward_and_backward(comm):
  if jax.device_count() < 4:   # e.g. one GPU (benchmarks/gpu_checks.sh)
    pytest.skip(f"needs 4 devices, has {jax.device_count()}")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("x",))
  spec = jax.sharding.PartitionSpec("x")
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4 * 8, 3, 16)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(8, 12, 16)) * 1e-3, jnp.float32)

  def run(a2a):
    f = jax.shard_map(lambda v: a2a(v, "x", 0, 1), mesh=mesh, in_specs=spec, out_specs=spec)
    y, vjp = jax.vjp(f, x)
    return np.asarray(y), np.asarray(vjp(ct)[0])

  y_ref, g_ref = run(lambda v, n, s, c: jax.lax.all_to_all(v, n, s, c, tiled=True))
  y, g = run(lambda v, n, s, c: quant.all_to_all_compressed(v, n, s, c, comm))
  rel = 2.0 ** -8 if comm == "bf16" else 2.0 ** -4
  assert y.shape == y_ref.shape
  assert np.all(np.abs(y - y_ref) <= rel * np.abs(y_ref).max(-1, keepdims=True) + 1e-30)
  assert np.all(np.abs(g - g_ref) <= rel * np.abs(g_ref).max(-1, keepdims=True) + 1e-30)
  for scaled in quant.SCALED_COMM_DTYPES:   # per-row scales: whole rows only
    with pytest.raises(ConfigError, match=f"a {scaled} all-to-all .* the last .embedding"):
      jax.shard_map(lambda v: quant.all_to_all_compressed(v, "x", 2, 0, scaled), mesh=mesh,
                    in_specs=spec, out_specs=spec)(x)


@pytest.mark.parametrize("dtype", DTYPES)   # bfloat16, float16: slow (SLOW_CASES)
def test_lowers_to_triton_for_gpu(dtype):
  """Every kernel variant lowers to Triton IR (no GPU needed; catches unsupported ops),
  and no Pallas or jax call of the kernels' GPU path is deprecated (tests/deprecations.py)."""
  idx = jnp.zeros((10, 3), jnp.int32)
  w = jnp.ones((10, 3), jnp.float32)
  grad = jnp.zeros((10, 24), jnp.float32)
  with deprecations.none_from_jaxrec():
    _lower_every_kernel(idx, w, grad, dtype)


def _lower_every_kernel(idx, w, grad, dtype):
  """The Pallas lookups (padded, CSR) and updates of `dtype` tables, lowered for GPU."""
  table, _ = make_table(np.random.default_rng(0), 20, 24, dtype)
  text = lower_for_gpu(
      lambda t, i, v: lookup_pool(t, i, v, kernel="pallas", interpret=False), table, idx, w)
  assert "triton" in text
  csr = padded_to_csr(idx, w)
  lower_for_gpu(
      lambda t, a, b, c: lookup_pool_csr(t, a, b, c, kernel="pallas", interpret=False),
      table, *csr)
  for opt in (SGD(0.1), Adagrad(0.1), RowWiseAdagrad(0.1)):
    state = init_opt_state(opt, 20, 24, jnp.float16 if dtype == "bfloat16" else jnp.float32)
    for key in (None, jax.random.key(0)):
      text = lower_for_gpu(lambda t, s, k, o=opt: sparse_update(
          t, s, idx, w, grad, o, 1, key=k, kernel="pallas", interpret=False), table, state, key)
      assert "triton" in text
    # a shard's global row keys and (traced) first column, as the collection passes them
    lower_for_gpu(lambda t, s, r, c, o=opt: sparse_update(
        t, s, idx, w, grad, o, 1, key=jax.random.key(0), kernel="pallas", interpret=False,
        bit_rows=r, col_offset=c), table, state, idx.astype(jnp.uint32) + 7, jnp.int32(24))


@pytest.mark.parametrize("dtype,x", [("float16", 65519.0), ("float16", -65510.0),
                                     ("float16", 65504.0), ("bfloat16", 3.3900e38)])
def test_stochastic_rounding_does_not_overflow_near_the_max(dtype, x):
  """Above the largest finite value there is no neighbour to round up to: such values
  round to nearest (finite here), never to inf."""
  bits = quant.random_bits(jnp.uint32(7), jnp.arange(512), jnp.arange(4))
  xs = jnp.full(bits.shape, x, jnp.float32)
  y = np.asarray(cast_store(xs, dtype, bits).astype(jnp.float32))
  np.testing.assert_array_equal(y, np.asarray(cast_store(xs, dtype).astype(jnp.float32)))
  assert np.isfinite(y).all()
  assert not np.isfinite(np.asarray(cast_store(jnp.full((1, 4), 7e4), "float16", bits[:1])
                                    .astype(jnp.float32))).any()  # as a cast: inf


def test_fp16_comm_keeps_values_past_its_largest_finite_value():
  """float16 was sent unscaled: a pooled value over 65504 arrived as inf. Its per-row scale
  is a power of two, so each value keeps float16's relative precision at any magnitude."""
  x = jnp.array([[7e4, -1.5e5, 3.0, 0.0], [3e38, -1e30, 2.5e37, 1e34],
                 [1e-30, -3e-31, 0.0, 5e-33]], jnp.float32)
  payload, scale = jax.jit(lambda v: comm_cast(v, "fp16"))(x)
  y = np.asarray(comm_uncast(payload, scale))
  xs = np.asarray(x)
  assert payload.dtype == jnp.float16 and np.isfinite(y).all()
  assert np.all(np.abs(y - xs) <= 2.0 ** -11 * np.abs(xs)), y


def test_fp16_comm_leaves_ordinary_values_as_a_plain_cast_does():
  """A power-of-two scale is exact: values in float16's normal range arrive as they would
  cast unscaled (same bits); an inf still arrives as inf, beside intact finite values."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(8, 16)).astype(np.float32)
  x *= np.array([1e-3, 0.1, 1, 10, 300, 6e3, 1.0, 2.0], np.float32)[:, None]
  x[7, 3] = np.inf
  y = np.asarray(comm_uncast(*comm_cast(jnp.asarray(x), "float16")))
  np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("shape", [(4, 0), (0, 8), (0,), (2, 0, 3)])
@pytest.mark.parametrize("comm", ["float16", "float8_e4m3fn"])
@pytest.mark.parametrize("per_row", [True, False])
def test_comm_cast_of_empty_activations(shape, comm, per_row):
  """D = 0 or no rows: the max over an empty axis was a ValueError; empty rows now scale by
  1, like rows of zeros (also under jit)."""
  x = jnp.zeros(shape, jnp.float32)
  payload, scale = jax.jit(comm_cast, static_argnums=(1,), static_argnames="per_row")(
      x, comm, per_row=per_row)
  assert payload.shape == shape and payload.dtype == jnp.dtype(comm)
  assert scale.shape == ((shape[:-1] + (1,)) if per_row else ())
  np.testing.assert_array_equal(np.asarray(scale), 1.0)
  assert comm_uncast(payload, scale).shape == shape


def test_comm_cast_of_a_scalar_is_a_clear_error():
  with pytest.raises(ConfigError, match=r"comm_cast wants activations \[\.\.\., D\], got a "
                                        "float32 scalar"):
    comm_cast(jnp.float32(1.0), "fp8")
