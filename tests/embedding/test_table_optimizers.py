"""Per-table sparse optimizers (`ExperimentConfig.table_optimizers`,
`optimizers.TableOptimizers`): each table trains with its own optimizer, on every plan."""

import numpy as np
import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.errors import ConfigError
from jaxrec.sharding.mesh import make_mesh, parse_mesh_spec
from jaxrec.sharding.plan import uniform_plan
from tests.embedding.test_collection import FEATURES, TABLES, reference, run
from tests.embedding.test_collection_inputs import assert_runs_match

# `b` keeps the default; `a` and `c` have their own (and Adam's state differs from Adagrad's)
MIXED_OPT = optimizers.per_table(optimizers.SGD(0.1), {
    "a": optimizers.RowWiseAdagrad(0.1, 0.1), "c": optimizers.Adam(0.01)})
_SLOW = pytest.mark.slow   # one-axis plans and twcw in the slow target (~5 s each)
ISSUE_PLANS = [pytest.param("dp", "data=8", marks=_SLOW), ("tw", "table=8"),
               pytest.param("rw", "row=8", marks=_SLOW), pytest.param("cw", "col=8", marks=_SLOW),
               ("twrw", "data=2,table=2,row=2"),
               pytest.param("twcw", "data=2,table=2,col=2", marks=_SLOW),
               ("grid", "table=2,row=2,col=2")]


def _collection(opt, kind="dp", mesh_spec="data=8", tables=TABLES):
  mesh = make_mesh(parse_mesh_spec(mesh_spec, 8))
  return EmbeddingCollection.create(tables, FEATURES, uniform_plan(kind, tables,
                                                                   mesh.shape["table"]),
                                    mesh, opt)


def test_each_table_matches_the_dense_reference_of_its_own_optimizer():
  pooled, tables, opt_state = run("dp", "single", MIXED_OPT, steps=3)
  ref_pooled, ref_tables, ref_state = reference(MIXED_OPT, steps=3)
  for a, b in zip(pooled, ref_pooled):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ref_tables:
    np.testing.assert_allclose(tables[name], ref_tables[name], rtol=1e-5, atol=1e-6)
    assert set(opt_state.get(name, {})) == set(ref_state[name]), name
    for k in ref_state[name]:
      np.testing.assert_allclose(np.asarray(opt_state[name][k]), ref_state[name][k],
                                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,mesh_spec", ISSUE_PLANS)
def test_sharded_matches_single_device(kind, mesh_spec):
  assert_runs_match(run(kind, mesh_spec, MIXED_OPT), run("dp", "single", MIXED_OPT))


def test_tables_of_different_optimizers_never_share_a_stack():
  coll = _collection(MIXED_OPT)
  stacks = {tuple(s.name for s in l.slots): (l.name, l.optimizer) for l in coll.layouts}
  assert stacks == {("a",): ("dp_d8_float32_L4_o1", optimizers.RowWiseAdagrad(0.1, 0.1)),
                    ("b",): ("dp_d8_float32_L1", optimizers.SGD(0.1)),
                    ("c",): ("dp_d8_float32_L4_o2", optimizers.Adam(0.01))}
  assert coll.optimizer_of("b") == optimizers.SGD(0.1)
  assert coll.optimizer_of("c") == optimizers.Adam(0.01)
  assert set(coll.shardings()["opt"]["dp_d8_float32_L4_o2"]) == {"m", "v"}


def test_an_override_equal_to_the_default_stacks_with_the_default():
  same = optimizers.per_table(optimizers.SGD(0.1), {"a": optimizers.SGD(0.1)})
  assert [l.name for l in _collection(same, "tw", "table=8").layouts] == \
      [l.name for l in _collection(optimizers.SGD(0.1), "tw", "table=8").layouts]


def test_no_overrides_is_the_plain_optimizer():
  assert optimizers.per_table(optimizers.SGD(), {}) == optimizers.SGD()
  assert optimizers.per_table(optimizers.SGD(), None) == optimizers.SGD()


@pytest.mark.parametrize("overrides,match", [
    ({"zz": optimizers.SGD()}, r"names unknown tables \['zz'\] \(tables: a, b, c\)"),
    ({"a": optimizers.Adagrad}, r"\['a'\] must be a sparse optimizer.*with parentheses"),
    ({"a": "adagrad"}, r"\['a'\] must be a sparse optimizer"),
    ({1: optimizers.SGD()}, r"key 1 is not a table name"),
    ([("a", optimizers.SGD())], r"must be a dict"),
])
def test_bad_overrides_are_named(overrides, match):
  with pytest.raises(ConfigError, match=match):
    _collection(optimizers.per_table(optimizers.SGD(), overrides))


def test_pallas_fuses_the_update_of_each_stack_its_optimizer_allows(caplog):
  """The fused update kernel takes SGD and row-wise Adagrad (stacks b, a) but not Adam
  (stack c, updated on XLA after the kernel's pooling): 2 + 2 + 1 kernel calls."""
  from tests.embedding import test_collection_kernels as kernels_test  # pylint: disable=import-outside-toplevel
  coll = kernels_test.make_collection("twrw", "data=2,table=2,row=2", MIXED_OPT,
                                      kernel="pallas", interpret=True)
  assert [l.name for l in coll.layouts if type(l.optimizer).__name__ == "Adam"] == [
      "twrw_d8_float32_L4_o2"]
  assert "stacks ['twrw_d8_float32_L4_o2'] update on XLA" in caplog.text
  out = kernels_test.run(coll)
  assert out["jaxpr"].count("pallas_call") == 5
  kernels_test.assert_matches_reference(out, MIXED_OPT, atol_pooled=1e-6, atol_tables=1e-6)
