"""Memory and cost arithmetic of one placement, checked against hand-computed numbers."""

import numpy as np
import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError
from jaxrec.planner import cost_model as cm

MESH16 = {"data": 2, "table": 2, "row": 2, "col": 2}


def load(rows=1000, dim=16, max_len=2, stats=None):
  t = TableSpec("t", rows, dim)
  return cm.table_loads([t], [FeatureSpec("f", "t", max_len)], stats)[0]


def terms(est, which):
  vec = est.holder_terms if which == "hold" else est.all_terms
  return dict(zip(cm.COST_TERMS, vec))


def test_memory_dp_adagrad():
  # B=64 over 16 devices: b=4; L=2, F=1; n = min(B*L, rows) = 128.
  est = cm.estimate(load(), "dp", MESH16, 64, cm.optimizer_state("adagrad"))
  assert (est.holders, est.shard_rows, est.shard_cols) == (16, 1000, 16)
  assert est.memory["table"] == 1000 * 16 * 4
  assert est.memory["optimizer"] == 1000 * 16 * 4
  # n*(4 + cols*(e+4)) + 4*B*L + b*G*(4L + 8*F*cols)
  assert est.memory["buffers"] == 128 * (4 + 16 * 8) + 4 * 128 + 4 * 1 * (4 * 2 + 8 * 16)
  assert est.ids_memory == 64 * 2 * 4


def test_memory_grid():
  est = cm.estimate(load(), "grid", MESH16, 64, cm.optimizer_state(1.0))
  assert (est.holders, est.shard_rows, est.shard_cols) == (8, 500, 8)
  assert est.memory["table"] == 500 * 8 * 4
  assert est.memory["optimizer"] == 500 * 8 * 4
  assert est.memory["buffers"] == 128 * (4 + 8 * 8) + 4 * 128 + 4 * 8 * (4 * 2 + 8 * 8)


def test_memory_rowwise_state_and_odd_rows():
  est = cm.estimate(load(rows=1001), "rw", MESH16, 64, cm.optimizer_state("rowwise_adagrad"))
  assert est.shard_rows == 501  # ceil(1001 / 2)
  assert est.memory["table"] == 501 * 16 * 4
  assert est.memory["optimizer"] == 501 * 4
  assert est.holder_memory == sum(est.memory.values())


def test_buffer_capped_by_owned_rows():
  est = cm.estimate(load(rows=10), "dp", MESH16, 64, cm.optimizer_state(0))
  assert terms(est, "hold")["gather_bytes"] == 10 * 16 * 4  # not B*L = 128 rows
  assert est.memory["buffers"] == 10 * (4 + 16 * 8) + 4 * 128 + 4 * (4 * 2 + 8 * 16)


def test_tw_terms():
  mesh = {"data": 2, "table": 4}  # N=8; B=64, b=8; tw: T=4, G=4, holders 2, rep 2
  est = cm.estimate(load(max_len=1), "tw", mesh, 64, cm.optimizer_state(0))
  h, a = terms(est, "hold"), terms(est, "all")
  assert est.holders == 2
  assert h["all_to_all_bytes"] == 2 * 8 * 3 * 1 * 16 * 4
  assert h["all_reduce_bytes"] == 2 * (2 - 1) / 2 * 64 * 16 * 4
  assert h["pool_bytes"] == 2 * 8 * 4 * 1 * 16 * 4
  assert h["reduce_scatter_bytes"] == 0 and a["all_to_all_bytes"] == 0
  assert a["all_gather_bytes"] == pytest.approx(64 * 4 * 7 / 8 + 8 * 4 * 3)
  assert a["sort_bytes"] == 0 and h["sort_bytes"] == 64 * 4


def test_rw_and_cw_collectives():
  est = cm.estimate(load(max_len=1, dim=8), "rw", {"row": 4}, 16, cm.optimizer_state(0))
  h = terms(est, "hold")
  act = 4 * 1 * 4 * 1 * 8 * 4  # b*T*R*F*d*4
  assert h["reduce_scatter_bytes"] == act * 3 / 4
  assert h["all_gather_bytes"] == act * 3 / 4
  assert h["all_reduce_bytes"] == 0  # no replicas
  est = cm.estimate(load(max_len=1, dim=8), "cw", {"col": 4}, 16, cm.optimizer_state(0))
  assert terms(est, "all")["all_to_all_bytes"] == 2 * 4 * 1 * 8 * 4 * 3 / 4
  assert est.shard_cols == 2


def test_update_bytes_follow_unique_rows():
  uniform = cm.estimate(load(rows=10**6), "dp", {"data": 4}, 4096, cm.optimizer_state(0))
  skewed = cm.estimate(load(rows=10**6, stats={"t": cm.TableStats(2.0, 1.2)}), "dp",
                       {"data": 4}, 4096, cm.optimizer_state(0))
  assert terms(skewed, "hold")["update_bytes"] < 0.5 * terms(uniform, "hold")["update_bytes"]


def test_expected_unique_rows():
  assert cm.expected_unique_rows(1000, 10**9) == pytest.approx(1000, rel=1e-3)
  assert cm.expected_unique_rows(10**6, 100) == pytest.approx(100)
  assert cm.expected_unique_rows(100, 100) == pytest.approx(100 * (1 - (1 - 1 / 100) ** 100))
  # Zipf: bucketed sum vs the exact sum over 50,000 ranks.
  rows, alpha, draws = 50_000, 1.1, 20_000
  p = np.arange(1, rows + 1, dtype=float) ** -alpha
  p /= p.sum()
  exact = np.sum(1 - (1 - p) ** draws)
  assert cm.expected_unique_rows(draws, rows, alpha) == pytest.approx(exact, rel=0.01)
  assert cm.expected_unique_rows(draws, rows, alpha) < cm.expected_unique_rows(draws, rows)


def test_optimizer_state():
  assert cm.optimizer_state("sgd") == cm.OptimizerState(0, 0)
  assert cm.optimizer_state("Adam") == cm.OptimizerState(2, 0)
  assert cm.optimizer_state(1.5) == cm.OptimizerState(1.5, 0)
  assert cm.optimizer_state(optimizers.RowWiseAdagrad()) == cm.OptimizerState(0, 1)
  assert cm.optimizer_state(optimizers.Adagrad()) == cm.OptimizerState(1, 0)
  with pytest.raises(ConfigError, match="unknown optimizer"):
    cm.optimizer_state("lion")


def test_allowed_kinds_and_launches():
  assert cm.allowed_kinds(load(dim=16), {"col": 3}) == ["dp"]
  assert cm.allowed_kinds(load(dim=18), {"col": 3}) == ["dp", "cw"]
  assert set(cm.allowed_kinds(load(), MESH16)) == set(cm.KINDS)
  assert cm.kind_problem(load(dim=16), "twcw", {"col": 3, "table": 2})
  # ids all_gather + fwd/bwd per split axis + replica psum (data=2).
  assert cm.stack_launches("dp", MESH16) == 2
  assert cm.stack_launches("grid", MESH16) == 1 + 6 + 1
  assert cm.stack_launches("grid", {"table": 2, "row": 2, "col": 2}) == 7


def test_bad_inputs():
  with pytest.raises(ConfigError, match="unknown axes"):
    cm.normalize_mesh({"model": 2})
  with pytest.raises(ConfigError, match="pooling factor"):
    load(max_len=2, stats={"t": cm.TableStats(pooling_factor=3.0)})
  with pytest.raises(ConfigError, match="unknown tables"):
    load(stats={"nope": cm.TableStats()})
