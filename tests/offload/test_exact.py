"""S=0: training with an offloaded table equals training with it on the device."""

import dataclasses

import numpy as np
import pytest

from jaxrec.embedding.specs import EmbeddingOptions
from jaxrec.models import DLRM

from jaxrec.train import state as state_lib
from jaxrec.train import step as step_lib
from tests.offload.offload_helpers import (SMALL_DLRM, SNAPSHOT_OFFLOAD, CountedStream, Run,
                                          experiment, logged_losses, mesh_of, offload_config,
                                          train_synthetic)


def _compare(ref, off, atol=1e-6):
  np.testing.assert_allclose(off.losses, ref.losses, rtol=0, atol=atol)
  (ta, oa), (tb, ob) = ref.full_tables(), off.full_tables()
  for name in ta:
    np.testing.assert_allclose(tb[name], ta[name], rtol=0, atol=atol, err_msg=name)
    for k in oa.get(name, {}):
      np.testing.assert_allclose(ob[name][k], oa[name][k], rtol=0, atol=atol,
                                 err_msg=f"{name}/{k}")


@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
def test_exact_over_50_steps_with_prefetch(tmp_path, opt):
  cfg = experiment(opt)
  ref = Run(cfg, mesh_of()).train(50)
  off = Run(cfg, mesh_of(), offload_config(tmp_path, prefetch_depth=3)).train(50)
  try:
    stats = off.tier.stats()
    assert stats["written_rows"] > 0 and stats["store_reads"] > 1000   # rows did move
    assert off.tier.step_args() == ()   # float32 tables: no slot-to-row map
    assert 0 < stats["hit_rate"] < 1
    _compare(ref, off)
  finally:
    off.close()


def test_exact_when_the_planner_must_wait_for_evictions(tmp_path):
  """With one device copy per install, rows whose newest value is in older evictions still
  on the device make the planner wait for their copies back (`fetch_waits`), while the
  training thread goes on installing the batches already queued: no deadlock, same
  tables."""
  cfg = experiment("adagrad")
  ref = Run(cfg, mesh_of()).train(40)
  off = Run(cfg, mesh_of(), offload_config(tmp_path, prefetch_depth=3))
  assert off.tier.bounce_sources == 8       # K + 5 by default: waits are rare
  off.tier.bounce_sources = 1
  off.train(40)
  try:
    stats = off.tier.stats()
    assert stats["fetch_waits"] > 0 and stats["device_bounces"] > 0
    _compare(ref, off)
  finally:
    off.close()


def test_exact_prefetch_off_rowwise_state_on_sharded_cache(tmp_path):
  """Synchronous planning (K=0), per-row optimizer state, cache split over `row`."""
  cfg = experiment("rowwise_adagrad")
  ref = Run(cfg, mesh_of("row=2"), plan="rw").train(15)
  off = Run(cfg, mesh_of("row=2"), offload_config(tmp_path, prefetch_depth=0),
            plan="rw").train(15)
  try:
    _compare(ref, off)
  finally:
    off.close()


@pytest.mark.slow
def test_exact_on_a_column_padded_cache(tmp_path):
  """cw on col=4 with dim 6: the cache is stored as 8 columns; rows and per-element
  optimizer state move between the store and the padded stack with their real 6 columns."""
  cfg = experiment("adagrad")
  cfg = dataclasses.replace(cfg, model=DLRM((16, 6), (16, 1)), embedding=(
      tuple(dataclasses.replace(t, dim=6) for t in cfg.tables), cfg.features))
  ref = Run(cfg, mesh_of("col=4"), plan="cw").train(12)
  off = Run(cfg, mesh_of("col=4"), offload_config(tmp_path, prefetch_depth=2),
            plan="cw").train(12)
  try:
    assert off.collection.layouts[0].shape[1] == 8
    _compare(ref, off)
  finally:
    off.close()


def test_eval_view_reads_newest_rows(tmp_path):
  cfg = experiment("sgd")
  ref = Run(cfg, mesh_of()).train(12)
  off = Run(cfg, mesh_of(), offload_config(tmp_path, prefetch_depth=2)).train(12)
  try:
    eval_ref = step_lib.make_eval_step(
        cfg, ref.collection, state_lib.shardings(ref.state, ref.collection))
    eval_off = step_lib.make_eval_step(
        cfg, off.collection, state_lib.shardings(off.state, off.collection))
    batch = ref.it.batch_at(10**6)                  # unseen examples, many uncached rows
    want = np.asarray(eval_ref(ref.state, ref.put(batch))["logits"])
    off.state, got = off.tier.eval_logits(
        off.state, batch, lambda st, b: np.asarray(eval_off(st, off.put(b))["logits"]))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    off.train(3)                                    # the view left training untouched
    ref.train(3)
    np.testing.assert_allclose(off.losses, ref.losses, rtol=0, atol=1e-6)
  finally:
    off.close()


class _Finite(CountedStream):
  """The first `n` batches of the training stream, then StopIteration (one epoch)."""

  def __init__(self, n):
    super().__init__()
    self.n = n

  def __next__(self):
    if self.i >= self.n:
      raise StopIteration
    return super().__next__()


def _epoch(run):
  for batch in run.it:
    if run.tier is not None:
      run.state = run.tier.before_step(run.state, batch)
    run.state, metrics = run.step_fn(run.state, run.put(batch))
    run.losses.append(float(metrics["loss"]))
  return run


@pytest.mark.parametrize("kw", [dict(prefetch_depth=3), dict(prefetch_depth=0, protect_ahead=2)])
def test_finite_source_trains_every_batch_and_flushes_at_the_end(tmp_path, kw):
  """The batches read ahead when the source ends are still handed out, then StopIteration;
  the tier stays usable (flush) after the end."""
  cfg = experiment("adagrad")
  ref = _epoch(Run(cfg, mesh_of(), iterator=_Finite(12)))
  off = _epoch(Run(cfg, mesh_of(), offload_config(tmp_path, cache_rows=300, **kw),
                   iterator=_Finite(12)))
  try:
    assert len(off.losses) == len(ref.losses) == 12
    with pytest.raises(StopIteration):
      next(off.it)
    _compare(ref, off)
  finally:
    off.close()


class _BadId(_Finite):
  """Batch 3 of the stream has id -2 (malformed data) in the multi-hot feature."""

  def __next__(self):
    batch = super().__next__()
    if self.i == 3:
      ids = np.array(batch.ids["f_big2"])
      ids[5, 1] = -2
      batch = batch.replace(ids=dict(batch.ids, f_big2=ids))
    return batch


@pytest.mark.parametrize("depth", [0, 2])
def test_malformed_id_is_a_data_error_as_on_the_device(tmp_path, depth):
  """Ids below -1 are rejected (`check_ids` sees only cache slots), not read as absent."""
  from jaxrec.errors import DataError
  run = Run(experiment("sgd"), mesh_of(), offload_config(tmp_path, prefetch_depth=depth),
            iterator=_BadId(10))
  try:
    with pytest.raises(DataError, match=r"feature 'f_big2' \(offloaded table 'big', 10000 "
                       r"rows\): id -2 is out of range"):
      _epoch(run)
    assert len(run.losses) <= 2          # with look-ahead the error comes earlier
  finally:
    run.close()


@pytest.mark.parametrize("opt,mesh,plan,depth", [
    ("sgd", "single", "dp", 2), ("rowwise_adagrad", "row=2", "rw", 0),
    ("adagrad", "table=2", "tw", 2)])
def test_stochastic_rounding_keys_cached_rows_by_their_table_row(tmp_path, opt, mesh, plan,
                                                                  depth):
  """A bf16 offloaded table with stochastic rounding stores the values it stores on the
  device: each row's bits are keyed by its row of the table, not by the cache slot it
  happens to sit in (a 300-row cache: rows move between slots, are evicted and come back).
  Keyed by slot, 1,279 of the 10,000 rows differed after 12 SGD steps."""
  cfg = experiment(opt)
  cfg = dataclasses.replace(cfg, embedding=(
      tuple(dataclasses.replace(t, dtype="bfloat16") for t in cfg.tables), cfg.features))
  sr = EmbeddingOptions(stochastic_rounding=True)
  ref = Run(cfg, mesh_of(mesh), plan=plan, options=sr).train(12)
  off = Run(cfg, mesh_of(mesh), offload_config(tmp_path, cache_rows=300, prefetch_depth=depth),
            plan=plan, options=sr).train(12)
  try:
    assert off.tier.keyed == ("big",) and off.tier.stats()["store_reads"] > 300
    # bitwise, but on a row-split stack, where (as without stochastic rounding) optimizer
    # state may differ by an ulp: the stacks differ in size
    _compare(ref, off, atol=1e-6 if plan == "rw" else 0)
  finally:
    off.close()


def test_stochastic_rounding_through_the_trainer(tmp_path):
  """The trainer builds and calls the step with the tier's slot-to-row maps (and compiles
  it so for `step_memory`): bf16 tables, t0 offloaded on data=8, the losses of the run with
  its tables on the device (keyed by slot: 1e-6 apart at step 5, 3e-4 at step 10)."""
  sr = ["uniform_tables.dtype='bfloat16'", "EmbeddingOptions.stochastic_rounding=True"]
  train_synthetic(tmp_path / "mem", 5, SMALL_DLRM + sr)
  train_synthetic(tmp_path / "off", 5, SMALL_DLRM + sr + SNAPSHOT_OFFLOAD)
  assert logged_losses(tmp_path / "off") == logged_losses(tmp_path / "mem")
