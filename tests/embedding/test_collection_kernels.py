"""Collection options: Pallas kernels, reduced-precision tables and communication, each
against the dense numpy reference of `test_collection` (Pallas runs in interpret mode)."""

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import EmbeddingOptions, TableSpec
from jaxrec.errors import ConfigError
from jaxrec.kernels import QuantizedTable, dequantize
from jaxrec.sharding.mesh import make_mesh, parse_mesh_spec
from jaxrec.sharding.plan import uniform_plan
from tests.embedding import test_collection
from tests.embedding.test_collection import FEATURES, TABLES, make_inputs

SGD, ADAGRAD, ROWWISE = (optimizers.SGD(0.1), optimizers.Adagrad(0.1, 0.1),
                         optimizers.RowWiseAdagrad(0.1, 0.1))


reference = functools.lru_cache(test_collection.reference)   # numpy, f64; read-only here


def make_collection(kind, mesh_spec, opt, tables=TABLES, **options):
  if mesh_spec == "single":
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
  else:
    mesh = make_mesh(parse_mesh_spec(mesh_spec, 8))
  plan = uniform_plan(kind, tables, mesh.shape["table"])
  return EmbeddingCollection.create(tables, FEATURES, plan, mesh, opt, **options)


def run(coll, steps=2, ones_grad=False):
  """Runs `steps` train steps. Returns a dict: `pooled` (per step), `tables` (f32 values)
  and `opt` after them, `init` (f32 tables before), `state`, `jaxpr` (one step, as text).
  `ones_grad`: the gradient of the pooled outputs is all ones."""
  state = coll.init(jax.random.key(0))
  init = coll.unstack_tables(state)[0]
  init = {k: np.asarray(dequantize(v)) for k, v in init.items()}

  def step(state, ids, weights, gout, i):
    ctx = coll.lookup(state, ids, weights)
    pooled, vjp = jax.vjp(lambda r: coll.pool(r, ctx), ctx.rows)
    (grads,) = vjp(gout)
    return pooled, coll.apply_gradients(state, ctx, grads, i)

  pooled_all, jaxpr = [], str(jax.make_jaxpr(step)(state, *make_inputs(0), jnp.int32(0)))
  step = jax.jit(step)
  for i in range(steps):
    ids, weights, gout = make_inputs(i)
    pooled, state = step(state, ids, weights, np.ones_like(gout) if ones_grad else gout,
                         jnp.int32(i))
    pooled_all.append(np.asarray(pooled))
  tables, opt_state = coll.unstack_tables(state)
  return {"pooled": pooled_all, "tables": {k: np.asarray(dequantize(v)) for k, v in tables.items()},
          "opt": opt_state, "init": init, "state": state, "jaxpr": jaxpr}


def assert_matches_reference(out, opt, atol_pooled, atol_tables, rtol=1e-5):
  ref_pooled, ref_tables, ref_state = reference(opt)
  for a, b in zip(out["pooled"], ref_pooled):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol_pooled)
  for name in ref_tables:
    np.testing.assert_allclose(out["tables"][name], ref_tables[name], rtol=rtol,
                               atol=atol_tables)
    for k in ref_state[name]:
      np.testing.assert_allclose(np.asarray(out["opt"][name][k]), ref_state[name][k],
                                 rtol=1e-4, atol=1e-5)


# Pallas pooling everywhere; fused update except RowWiseAdagrad with split columns.
# Counts are per stack (the test tables form one stack per bag-size bucket).
PALLAS_CASES = [("dp", "single", SGD, 2), ("dp", "single", ADAGRAD, 2),
                ("dp", "single", ROWWISE, 2), ("twrw", "data=2,table=2,row=2", ADAGRAD, 2),
                ("grid", "table=2,row=2,col=2", ROWWISE, 1)]


@pytest.mark.parametrize("kind,mesh_spec,opt,pallas_calls", PALLAS_CASES,
                         ids=[f"{k}-{type(o).__name__}" for k, _, o, _ in PALLAS_CASES])
def test_pallas_matches_reference(kind, mesh_spec, opt, pallas_calls):
  coll = make_collection(kind, mesh_spec, opt, kernel="pallas", interpret=True)
  out = run(coll)
  assert out["jaxpr"].count("pallas_call") == pallas_calls * len(coll.layouts)
  assert_matches_reference(out, opt, atol_pooled=1e-6, atol_tables=1e-6)


@pytest.mark.parametrize("opt", test_collection.SCHEDULED[:3], ids=lambda o: type(o).__name__)
def test_pallas_fuses_the_update_of_a_scheduled_rate(opt, caplog):
  """A stack of one scheduled rate updated on XLA (the kernel took a constant `lr`): the
  rate at each step now goes to the fused kernel per row, as per-table rates do."""
  with caplog.at_level("WARNING"):
    coll = make_collection("twrw", "data=2,table=2,row=2", opt, kernel="pallas",
                           interpret=True)
  assert "update on XLA" not in caplog.text
  out = run(coll, steps=3)
  assert out["jaxpr"].count("pallas_call") == 2 * len(coll.layouts)
  ref_pooled, ref_tables, _ = reference(opt, steps=3)
  for name in ref_tables:
    np.testing.assert_allclose(out["tables"][name], ref_tables[name], rtol=1e-5, atol=1e-6)


# (dtype, kernel, plan, mesh, tolerance ~ a few ulps of values up to ~1)
DTYPE_CASES = [("bfloat16", "xla", "dp", "single", 1e-2), ("float16", "pallas", "grid",
               "table=2,row=2,col=2", 2e-3), ("int8", "xla", "twcw", "data=2,table=2,col=2", 2e-2)]


@pytest.mark.parametrize("dtype,kernel,kind,mesh_spec,tol", DTYPE_CASES,
                         ids=[c[0] for c in DTYPE_CASES])
def test_reduced_precision_tables(dtype, kernel, kind, mesh_spec, tol):
  tables = tuple(dataclasses.replace(t, dtype=dtype) for t in TABLES)
  out = run(make_collection(kind, mesh_spec, SGD, tables, kernel=kernel, interpret=True))
  for stored in out["state"]["tables"].values():
    if dtype == "int8":
      assert isinstance(stored, QuantizedTable) and stored.q.dtype == jnp.int8
    else:
      assert stored.dtype == jnp.dtype(dtype)
  assert_matches_reference(out, SGD, atol_pooled=tol, atol_tables=tol, rtol=0)


@pytest.mark.parametrize("comm,kind,mesh_spec,tol", [
    ("bfloat16", "grid", "table=2,row=2,col=2", 1e-2),
    ("float8_e4m3fn", "twrw", "data=2,table=2,row=2", 0.1)], ids=["bf16", "fp8"])
def test_reduced_precision_communication(comm, kind, mesh_spec, tol):
  out = run(make_collection(kind, mesh_spec, SGD, comm_dtype=comm), steps=1)
  ref_pooled, ref_tables, _ = reference(SGD, steps=1)
  scale = np.abs(ref_pooled[0]).max(axis=-1, keepdims=True)   # fp8 scales are per row
  err = np.abs(out["pooled"][0] - ref_pooled[0])
  assert err.max() > 0 and np.all(err <= tol * scale + 1e-6)     # compressed, within tol
  for name in ref_tables:   # the gradients travelled compressed too
    np.testing.assert_allclose(out["tables"][name], ref_tables[name], rtol=0, atol=tol)


def test_fp16_communication_of_pooled_values_past_65504():
  """comm_dtype='float16' sent the pooled sums unscaled: sums over 65504 arrived as inf.
  Now (per-row power-of-two scales) they match the one-device f32 lookup to float16
  precision, forward and backward (cotangents ~1e5 too)."""
  ref = make_collection("dp", "single", SGD)
  coll = make_collection("grid", "table=2,row=2,col=2", SGD, comm_dtype="fp16")   # every hop
  big = {k: np.asarray(v) * np.float32(1e6) for k, v in
         ref.unstack_tables(ref.init(jax.random.key(0)))[0].items()}
  ids, weights, gout = make_inputs(0)

  def pooled_and_tables(c):
    @jax.jit
    def step(state, gout):
      ctx = c.lookup(state, ids, weights)
      pooled, vjp = jax.vjp(lambda r: c.pool(r, ctx), ctx.rows)
      return pooled, c.apply_gradients(state, ctx, vjp(gout)[0], 0)
    pooled, state = step(c.stack_tables(big), gout * np.float32(1e6))
    return np.asarray(pooled), {k: np.asarray(v) for k, v in c.unstack_tables(state)[0].items()}

  want, want_tables = pooled_and_tables(ref)
  got, got_tables = pooled_and_tables(coll)
  assert np.abs(want).max() > 65504 and np.isfinite(got).all()
  amax = np.abs(want).max(axis=-1, keepdims=True)   # row partial sums each rounded once
  assert np.all(np.abs(got - want) <= 2.0 ** -9 * amax)
  for name, t in want_tables.items():   # the SGD steps, from fp16 cotangents
    assert np.isfinite(got_tables[name]).all()
    step = np.abs(t - big[name]).max()
    assert step > 65504 and np.abs(got_tables[name] - t).max() <= 2.0 ** -8 * step


def test_stochastic_rounding_keeps_small_updates():
  """bf16 tables, updates mostly below half an ulp: round-to-nearest loses most of them,
  stochastic rounding keeps them on average; XLA and Pallas draw the same bits."""
  tables = tuple(dataclasses.replace(t, dtype="bfloat16") for t in TABLES)
  opt = optimizers.SGD(3e-5)
  runs = {(kernel, sr): run(make_collection("dp", "single", opt, tables, kernel=kernel,
                                            interpret=True, stochastic_rounding=sr),
                            steps=1, ones_grad=True)
          for kernel, sr in [("xla", False), ("xla", True), ("pallas", True)]}
  init = runs["xla", False]["init"]
  for name in init:
    np.testing.assert_array_equal(runs["xla", True]["tables"][name],
                                  runs["pallas", True]["tables"][name])
  # All updates are negative (weights >= 0, gradient ones): compare the total drift with
  # the exact one, -lr * the total gradient.
  ids, weights, gout = make_inputs(0)
  grads, _ = test_collection.ref_grads(init, ids, weights, np.ones_like(gout))
  want = -opt.lr * sum(float(g.sum()) for g in grads.values())
  drift = lambda r: sum(float((r["tables"][k] - init[k]).sum()) for k in init)
  assert abs(drift(runs["xla", True]) - want) < 0.2 * abs(want)
  assert abs(drift(runs["xla", False]) - want) > 0.5 * abs(want)


def test_options_validation_and_gin():
  with pytest.raises(ConfigError, match="kernel must be one of"):
    EmbeddingOptions(kernel="cuda")
  with pytest.raises(ConfigError, match="comm_dtype must be one of"):
    EmbeddingOptions(comm_dtype="int4")
  with pytest.raises(ConfigError, match="table 'a': dtype 'float64' is not supported"):
    TableSpec("a", 37, 8, "float64")
  for alias, name in (("bf16", "bfloat16"), ("fp16", "float16"), (jnp.float16, "float16")):
    assert TableSpec("a", 37, 8, alias).dtype == name   # as comm_dtype takes them
  with pytest.raises(ConfigError, match="unexpected keyword"):
    make_collection("dp", "single", SGD, kernal="xla")
  assert make_collection("dp", "single", SGD).options == EmbeddingOptions("xla", None, True)
  # Pallas compiles only for GPUs: on CPU it must interpret (it failed at the first step
  # with a JAX traceback); the XLA kernel ignores the flag.
  with pytest.raises(ConfigError, match=r"EmbeddingOptions.interpret=False needs a GPU"):
    make_collection("dp", "single", SGD, kernel="pallas", interpret=False)
  assert make_collection("dp", "single", SGD, interpret=False).options.kernel == "xla"
  try:
    gin.parse_config("EmbeddingOptions.kernel = 'pallas'\n"
                     "EmbeddingOptions.comm_dtype = 'bf16'")
    coll = make_collection("dp", "single", SGD)
    assert (coll.options.kernel, coll.options.comm_dtype) == ("pallas", "bfloat16")
    assert make_collection("dp", "single", SGD, kernel="xla").options.kernel == "xla"
  finally:
    gin.clear_config()


def test_pallas_names_the_stacks_whose_update_falls_back_to_xla(caplog):
  """Adam has no fused update kernel: with kernel='pallas' its update runs on XLA, said once
  at creation; SGD updates in the kernel, so nothing is said."""
  with caplog.at_level("WARNING"):
    make_collection("rw", "row=8", optimizers.Adam(), kernel="pallas", interpret=True)
  assert "update on XLA" in caplog.text and "rw" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    make_collection("rw", "row=8", optimizers.SGD(0.1), kernel="pallas", interpret=True)
  assert "update on XLA" not in caplog.text


def test_pallas_on_cpu_warns_that_it_runs_interpreted(caplog):
  """kernel='pallas' off GPU runs the kernels in interpret mode: one warning at creation,
  on jaxrec's logger (which scripts/train.py shows), pointing at the fast path."""
  with caplog.at_level("WARNING"):
    make_collection("dp", "single", SGD, kernel="pallas")
  said = [r for r in caplog.records if "interpret mode" in r.getMessage()]
  assert len(said) == 1 and said[0].name.startswith("jaxrec."), caplog.text
  assert "kernel='pallas' on cpu" in said[0].getMessage()
  assert "kernel='xla' or 'auto' is the fast path" in said[0].getMessage()
  caplog.clear()
  with caplog.at_level("WARNING"):
    make_collection("dp", "single", SGD, kernel="auto")
    make_collection("dp", "single", SGD, kernel="xla")
  assert "interpret mode" not in caplog.text


def test_gpu_tuning_off_a_gpu_is_named(caplog):
  """`GpuTuning.num_warps = 8` on CPU or with kernel='xla' was taken without a word (the
  trainer reads `tuning()` at start-up, so gin never called it unused)."""
  import gin  # pylint: disable=import-outside-toplevel
  gin.bind_parameter("GpuTuning.num_warps", 8)
  with caplog.at_level("WARNING"):
    make_collection("dp", "single", SGD, kernel="xla")
  assert ("GpuTuning (num_warps=8) has no effect: it sets the Pallas kernels' Triton launches "
          "on a GPU; here the kernel is xla on cpu") in caplog.text
  gin.clear_config()
  caplog.clear()
  with caplog.at_level("WARNING"):
    make_collection("dp", "single", SGD, kernel="xla")
  assert "GpuTuning" not in caplog.text


def test_options_that_do_nothing_are_named(caplog):
  """stochastic_rounding with only float32 tables and interpret=True with the XLA kernel
  do nothing: a warning names the binding and why (not an error: shared configs)."""
  with caplog.at_level("WARNING"):
    make_collection("dp", "single", SGD, stochastic_rounding=True, interpret=True,
                    kernel="xla")
  assert ("EmbeddingOptions.stochastic_rounding=True has no effect: every table is float32"
          in caplog.text)
  assert "EmbeddingOptions.interpret=True has no effect: the kernel is XLA" in caplog.text
  caplog.clear()
  one_bf16 = (dataclasses.replace(TABLES[0], dtype="bfloat16"),) + TABLES[1:]
  with caplog.at_level("WARNING"):
    make_collection("dp", "single", SGD, tables=one_bf16, stochastic_rounding=True)
    make_collection("dp", "single", SGD, kernel="pallas", interpret=True)
    make_collection("rw", "row=8", SGD, comm_dtype="fp16")
  assert "has no effect" not in caplog.text
  with caplog.at_level("WARNING"):   # a dp plan moves no pooled activation: fp8 did nothing
    make_collection("dp", "data=8", SGD, comm_dtype="fp8")
  assert ("EmbeddingOptions.comm_dtype='fp8' has no effect: no stack is split over more than "
          "one device of table, row or col") in caplog.text


def test_dims_walked_in_many_narrow_chunks_are_warned_about():
  """The Pallas kernels walk a row in chunks of its dim's largest power-of-two factor: dim
  127 unrolled 127 one-column chunks (the fused update took 213 s to compile in interpret
  mode) and nothing said so."""
  from jaxrec.embedding import specs  # pylint: disable=import-outside-toplevel
  tables = [TableSpec("odd", 10, 127), TableSpec("wide", 10, 1000), TableSpec("ok", 10, 24),
            TableSpec("pow2", 10, 256)]
  warning = specs.narrow_chunks_warning("pallas", tables)
  assert ("tables 'odd' (dim 127: 127 chunks of 1), 'wide' (dim 1000: 125 chunks of 8) are "
          "walked in many narrow column chunks") in warning, warning
  assert "'ok'" not in warning and "'pow2'" not in warning   # 3 chunks of 8, 2 of 128
  assert specs.narrow_chunks_warning("xla", tables) is None
  assert specs.narrow_chunks_warning("pallas", tables[2:]) is None
