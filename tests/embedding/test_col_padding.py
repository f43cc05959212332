"""Column-split plans on dims the `col` axis does not divide: padded stacks, real results."""

import numpy as np
import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.layout import build_layouts, describe
from jaxrec.embedding.specs import TableSpec
from jaxrec.sharding.plan import uniform_plan
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.sharding.mesh import make_mesh, parse_mesh_spec
from tests.embedding.test_collection import FEATURES, OPTS, reference, run, run_collection


def tables(dim, dtype="float32"):
  return (TableSpec("a", 37, dim, dtype), TableSpec("b", 50, dim, dtype),
          TableSpec("c", 11, dim, dtype))


# (kind, mesh, dim): col=8 with dims 12 (1.5 columns a device) and 20, and odd dims on col=2.
# The default suite keeps cw-d12 and grid (table, row and col); the rest run in `make
# test-slow`.
_SLOW = pytest.mark.slow
CASES = [("cw", "col=8", 12), pytest.param("cw", "col=8", 20, marks=_SLOW),
         pytest.param("twcw", "data=2,table=2,col=2", 7, marks=_SLOW),
         ("grid", "table=2,row=2,col=2", 5)]


def assert_close(out, ref, atol=1e-6):
  for a, b in zip(out[0], ref[0]):
    assert a.shape == b.shape   # the real dim, never the padded one
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
  for name in ref[1]:
    assert out[1][name].shape == ref[1][name].shape
    np.testing.assert_allclose(out[1][name], ref[1][name], rtol=1e-5, atol=atol, err_msg=name)
  for name in ref[2]:
    for k in ref[2][name]:
      np.testing.assert_allclose(np.asarray(out[2][name][k]), np.asarray(ref[2][name][k]),
                                 rtol=1e-5, atol=atol, err_msg=f"{name}/{k}")


def test_padded_layout():
  specs = tables(12)
  layouts = build_layouts(specs, FEATURES, uniform_plan("cw", specs, 1), {"col": 8})
  assert {(l.dim, l.padded_dim, l.local_dim, l.shape[1]) for l in layouts} == {(12, 16, 2, 16)}
  assert "dim 12 padded to 16 for col=8" in describe(layouts)
  layouts = build_layouts(specs, FEATURES, uniform_plan("cw", specs, 1), {"col": 4})
  assert {(l.padded_dim, l.local_dim) for l in layouts} == {(12, 3)}   # divisible: no padding


@pytest.mark.parametrize("kind,mesh,dim", CASES)
def test_padded_col_split_matches_one_device(kind, mesh, dim):
  """Pooled `[batch, features, dim]`, tables and row-wise Adagrad state (whose mean over
  the dim must not count padding) as on one device."""
  opt = optimizers.RowWiseAdagrad(0.1, 0.1)
  specs = tables(dim)
  assert_close(run(kind, mesh, opt, tables=specs), run("dp", "single", opt, tables=specs))


@pytest.mark.parametrize("opt", [o if isinstance(o, optimizers.FTRL) else pytest.param(o, marks=_SLOW)
                                 for o in OPTS], ids=lambda o: type(o).__name__)
def test_every_optimizer_on_padded_columns_matches_the_dense_reference(opt):
  """dim 12 on col=8: two of the eight devices hold padding only."""
  specs = tables(12)
  assert_close(run("cw", "col=8", opt, steps=3, tables=specs), reference(opt, 3, specs),
               atol=2e-6)


def test_int8_padded_rows_quantise_over_their_real_columns():
  """An int8 row's scale and bias come from its real columns: zeros in the padding would
  widen the range of an all-positive row."""
  specs = tables(5, "int8")
  opt = optimizers.Adagrad(0.1, 0.1)
  out = run("cw", "col=8", opt, tables=specs)
  ref = run("dp", "single", opt, tables=specs)
  assert_close(out, ref, atol=1e-5)


@_SLOW
def test_pallas_kernels_on_padded_columns():
  """The Pallas pooling and fused Adagrad update (interpret mode) on padded shards."""
  specs, opt = tables(12), optimizers.Adagrad(0.1, 0.1)
  coll = EmbeddingCollection.create(specs, FEATURES, uniform_plan("cw", specs, 1),
                                    make_mesh(parse_mesh_spec("col=8", 8)), opt,
                                    kernel="pallas", interpret=True)
  assert_close(run_collection(coll), reference(opt, 2, specs), atol=2e-6)
