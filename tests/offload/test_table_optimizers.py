"""An offloaded table with a sparse optimizer of its own (`ExperimentConfig.table_optimizers`):
its cache is sized and its store shaped by that optimizer's state, it trains as it does on
the device, and a checkpoint restores it (its state fresh where its optimizer gained one)."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from jaxrec import offload
from jaxrec.checkpoint import CheckpointManager
from jaxrec.embedding import optimizers
from tests.offload.offload_helpers import Run, experiment, mesh_of, offload_config
from tests.offload.test_exact import _compare

CACHE_BYTES = 28_800   # 300 rows of dim 8 with Adam's two moments: 300 * (32 + 64)


def _config(**overrides):
  """`experiment()` (SGD for every table) with `overrides` (`{table: optimizer}`)."""
  return dataclasses.replace(experiment("sgd"), table_optimizers=overrides)


@pytest.mark.parametrize("big,rows,names", [
    (optimizers.Adam(0.01), 300, ("table", "opt.m", "opt.v")),
    (optimizers.RowWiseAdagrad(0.1), 800, ("table", "opt.accum")),   # 32 + 4 bytes a row
])
def test_offloaded_table_with_its_own_optimizer_matches_the_device(tmp_path, big, rows, names):
  cfg = _config(big=big)
  off_config = offload_config(tmp_path, cache_rows=None, prefetch_depth=2,
                              table={"cache_bytes": CACHE_BYTES})
  spec = cfg.tables[0]
  assert offload.row_bytes(spec, cfg.sparse_tx()) == CACHE_BYTES // rows
  assert offload.row_bytes(spec, optimizers.SGD()) == 32   # the default's: 900 rows
  assert offload.host_bytes(cfg.tables, off_config, cfg.sparse_tx()) == offload.host_bytes(
      cfg.tables, off_config, big)
  ref = Run(cfg, mesh_of()).train(12)
  off = Run(cfg, mesh_of(), off_config).train(12)
  try:
    t = off.tier.tables["big"]
    assert t.cache.cache_rows == rows and t.store.names == names
    assert off.collection.optimizer_of("small") == optimizers.SGD(0.05)
    assert 0 < off.tier.stats()["hit_rate"] < 1   # rows did move
    _compare(ref, off)
  finally:
    off.close()


def test_offloaded_table_sharing_a_stack_at_its_own_rate_matches_the_device(tmp_path,
                                                                            monkeypatch):
  """`big` (offloaded: its cache rows in the stack) and `small` have row-wise Adagrad at
  different rates, one family: on tw over table=2 their bag buckets merge into one stack,
  each table on its slice, each row stepped at its own table's rate (cache slots too). The
  reference: on the device, a stack per rate (as before tables differing in `lr` shared)."""
  cfg = _config(big=optimizers.RowWiseAdagrad(0.1, 0.1),
                small=optimizers.RowWiseAdagrad(0.02, 0.1))
  with monkeypatch.context() as m:
    m.setattr(optimizers, "family", lambda opt: opt)
    ref = Run(cfg, mesh_of("table=2"), plan="tw")
  assert len(ref.collection.layouts) == 2
  ref.train(12)
  off = Run(cfg, mesh_of("table=2"), offload_config(tmp_path, prefetch_depth=2),
            plan="tw").train(12)
  try:
    assert [(l.name, [s.name for s in l.slots], l.rates) for l in off.collection.layouts] == [
        ("tw_d8_float32_L4_o1", ["big", "small"], (0.1, 0.02))]
    assert off.tier.tables["big"].cache.cache_rows == 1000
    assert 0 < off.tier.stats()["hit_rate"] < 1   # rows did move
    _compare(ref, off)
  finally:
    off.close()


def _save(tmp_path):
  """Trains `big` offloaded with SGD (no state) and `small` with Adagrad for 6 steps,
  saves checkpoint 6 and its offload snapshot; returns `(workdir, per-table arrays,
  per-table optimizer state)` of that step."""
  cfg = _config(small=optimizers.Adagrad(0.05))
  w = tmp_path / "w"
  run = Run(cfg, mesh_of(), offload_config(tmp_path / "a", prefetch_depth=2)).train(6)
  try:
    run.tier.save(run.state, 6, str(w / "offload_snapshots"))
    t = run.tier.tables["big"]
    meta = {"offload": {"snapshots": str(w / "offload_snapshots"),
                        "tables": {"big": {"rows": t.spec.rows, "cache_rows": 1000,
                                           "auto": False, "path": t.store.path}}}}
    with CheckpointManager(str(w / "checkpoints"), async_save=False) as mgr:
      mgr.save(6, run.state, run.collection, data_state=run.it.get_state(), meta=meta,
               force=True)
    tables, opt = run.full_tables()
  finally:
    run.close()
  return w, tables, opt


@pytest.mark.parametrize("offloaded_now", [True, False], ids=["offloaded", "on_device"])
def test_resume_where_the_offloaded_table_gained_optimizer_state(tmp_path, caplog,
                                                                 offloaded_now):
  """`big` (offloaded, SGD when saved) resumes with row-wise Adagrad, offloaded again or
  on the device now: its rows restore from the snapshot, its state starts at the initial
  accumulator with a warning naming it, and `small` restores its Adagrad state."""
  w, tables, opt = _save(tmp_path)
  big = optimizers.RowWiseAdagrad(0.05, initial_accumulator=0.1)
  cfg = _config(small=optimizers.Adagrad(0.05), big=big)
  off = offload_config(tmp_path / "b", prefetch_depth=1) if offloaded_now else None
  run = Run(cfg, mesh_of("row=2"), off, plan="rw")
  try:
    with caplog.at_level(logging.WARNING):
      with CheckpointManager(str(w / "checkpoints"), read_only=True) as mgr:
        restored = mgr.restore(run.state, run.collection, offloaded={
            n: t.spec for n, t in (run.tier.tables if run.tier else {}).items()})
    assert any("table(s) 'big' (RowWiseAdagrad)" in r.getMessage() for r in caplog.records)
    got_tables, got_opt = jax.device_get(run.collection.unstack_tables(restored.state["emb"]))
    np.testing.assert_array_equal(got_opt["small"]["accum"], opt["small"]["accum"])
    if offloaded_now:
      assert sorted(restored.host_tables) == ["big"]   # no state to link: written afresh
      run.tier.restore(6, str(w / "offload_snapshots"), restored.host_tables)
      store = run.tier.tables["big"].store
      got_tables["big"] = store.read_all("table", 0, 10_000)
      got_opt["big"] = {"accum": store.read_all("opt.accum", 0, 10_000)}
    np.testing.assert_array_equal(got_tables["big"], tables["big"])
    np.testing.assert_array_equal(got_opt["big"]["accum"], np.full(10_000, 0.1, np.float32))
    run.it.set_state(restored.data_state)
    run.state = restored.state
    run.train(3)   # the restored state trains (the cache refills from the written store)
    assert np.isfinite(run.losses).all()
  finally:
    run.close()
