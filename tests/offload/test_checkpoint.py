"""Offloaded tables in checkpoints: consistent snapshots, restore on another device count,
write-back failures that leave the last snapshot valid."""

import re
import threading

import jax
import numpy as np
import pytest

from jaxrec import offload
from jaxrec.offload.store import TableStore
from tests.offload.offload_helpers import (Run, experiment, mesh_of, offload_config,
                                          train_iterator)


def _host_state(run):
  """The train state minus the tables as host arrays, and the per-table arrays."""
  dense = jax.device_get({k: v for k, v in run.state.items() if k != "emb"})
  tables, opt = run.collection.unstack_tables(run.state["emb"])
  return dense, jax.device_get(tables), jax.device_get(opt)


def _load(run, dense, tables, opt):
  """Puts a saved state into `run` (another mesh/plan): dense replicated, tables stacked."""
  shardings = jax.tree.map(lambda x: x.sharding, run.state)
  emb = run.collection.stack_tables(tables, opt if any(opt.values()) else None)
  run.state = jax.device_put(dict(dense, emb=emb), shardings)


def _snapshot_arrays(path, opt="adagrad"):
  store = TableStore(experiment(opt).tables[0], offload.OffloadTable("big", cache_rows=1),
                     experiment(opt).sparse_tx(), str(path))
  store.open_existing()
  return {n: store.read_all(n, 0, 10_000) for n in store.names}


def test_snapshot_holds_the_tables_of_its_step(tmp_path):
  cfg = experiment("adagrad")
  ref = Run(cfg, mesh_of()).train(12)
  off = Run(cfg, mesh_of(), offload_config(tmp_path / "store", prefetch_depth=3)).train(12)
  try:
    off.tier.save(off.state, 12, str(tmp_path / "snaps"))
    off.train(5)                                   # keeps writing to the live store
    tables, opt = ref.full_tables()
    snap = _snapshot_arrays(tmp_path / "snaps" / "12" / "big")
    opened = offload.snapshots.open_table(str(tmp_path / "snaps" / "12"), "big")
    np.testing.assert_array_equal(opened["table"].read().result(), snap["table"])
    np.testing.assert_allclose(snap["table"], tables["big"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(snap["opt.accum"], opt["big"]["accum"], rtol=0, atol=1e-6)
  finally:
    off.close()


def test_a_flush_writes_only_the_rows_trained_since_the_last_one(tmp_path):
  """`flush` (each checkpoint) wrote every cached row: with a cache spread over the table
  it rewrote nearly every file of the store each time (a helper measured 14 s a checkpoint
  on a 20M-row table) and each hard-linked snapshot kept a copy of them. It writes the
  rows trained since the last flush; the store still equals the on-device tables."""
  cfg = experiment("adagrad")
  ref = Run(cfg, mesh_of())
  off = Run(cfg, mesh_of(), offload_config(tmp_path / "store", cache_rows=9000,
                                           prefetch_depth=2))
  try:
    for steps in (6, 0, 1, 4):
      ref.train(steps)
      trained = set()
      for _ in range(steps):   # Run.train, keeping the slots each batch reads
        batch = next(off.it)
        trained |= {int(s) for f in ("f_big", "f_big2") for s in np.unique(batch.ids[f])
                    if s >= 0}
        off.state = off.tier.before_step(off.state, batch)
        off.state, _ = off.step_fn(off.state, off.put(batch))
      before = off.tier.stats().get("flushed_rows", 0)
      off.tier.flush(off.state)
      assert off.tier.stats()["flushed_rows"] - before == len(trained), steps
      tables, opt = ref.full_tables()
      store = off.tier.tables["big"].store
      np.testing.assert_allclose(store.read_all("table", 0, 10_000), tables["big"], rtol=0,
                                 atol=1e-6)
      np.testing.assert_allclose(store.read_all("opt.accum", 0, 10_000), opt["big"]["accum"],
                                 rtol=0, atol=1e-6)
  finally:
    off.close()


def test_a_rollback_skips_a_checkpoint_whose_offloaded_rows_are_not_finite(
    tmp_path, monkeypatch, caplog):
  """A NaN rollback checked the offloaded table's device cache only: a row that went
  non-finite and was evicted before the save sat in the offload snapshot, and the rollback
  restored it (the on-device run skips that checkpoint). Its read of the snapshot is a
  logged phase (`phase_log`, over `MIN_BYTES`; it read a large table without a word): a
  line before with the size, one after with the seconds (none where it stopped at a NaN)."""
  from jaxrec import phase_log  # pylint: disable=import-outside-toplevel
  from jaxrec.checkpoint import CheckpointManager  # pylint: disable=import-outside-toplevel
  cfg = experiment("sgd")
  w = tmp_path / "w"
  run = Run(cfg, mesh_of(), offload_config(tmp_path / "store"))
  try:
    with CheckpointManager(str(w / "checkpoints"), async_save=False) as mgr:
      for step in (4, 8):
        run.train(4)
        t = run.tier.tables["big"]
        if step == 8:   # an evicted row that went NaN (here: written so into the store)
          row = np.setdiff1d(np.arange(t.spec.rows), t.resident)[:1]
          t.store.write(row, {n: np.full((1,) + t.store.array_shape(n)[1:], np.nan,
                                         np.float32) for n in t.store.names})
        run.tier.save(run.state, step, str(w / "offload_snapshots"))
        meta = {"offload": {"snapshots": str(w / "offload_snapshots"),
                            "tables": {"big": {"rows": t.spec.rows, "cache_rows": 1000,
                                               "auto": False, "path": t.store.path}}}}
        mgr.save(step, run.state, run.collection, meta=meta, force=True)
      offloaded = {"big": t.spec}
      assert int(mgr.restore(run.state, run.collection, offloaded=offloaded)
                 .state["step"]) == 8
      size = 10_000 * 8 * 4   # 'big' in the snapshot (SGD: no state); its cache is smaller
      monkeypatch.setattr(phase_log, "MIN_BYTES", size)
      with caplog.at_level("INFO", logger=phase_log.__name__):
        restored = mgr.restore(run.state, run.collection, require_finite=True,
                               offloaded=offloaded)
      assert int(restored.state["step"]) == 4
      checks = [f"checkpoint {w / 'checkpoints' / str(s)}: checking 'tables/big' (offload "
                "snapshot) for NaN/inf" for s in (8, 4)]
      assert [re.sub(r"[\d.]+ s$", "T s", r.getMessage()) for r in caplog.records
              if r.name == phase_log.__name__] == [
                  f"{checks[0]} (312.5 KiB)", f"{checks[1]} (312.5 KiB)",
                  f"{checks[1]}: done in T s"]
      caplog.clear()
      monkeypatch.setattr(phase_log, "MIN_BYTES", size + 1)
      with caplog.at_level("INFO", logger=phase_log.__name__):
        mgr.restore(run.state, run.collection, require_finite=True, offloaded=offloaded)
      assert not [r for r in caplog.records if r.name == phase_log.__name__]
  finally:
    run.close()


def test_restore_on_another_device_count_continues_the_run(tmp_path):
  cfg = experiment("sgd")
  a = Run(cfg, mesh_of(), offload_config(tmp_path / "a", prefetch_depth=2)).train(10)
  try:
    a.tier.save(a.state, 10, str(tmp_path / "snaps"))
    saved, data_state = _host_state(a), a.it.get_state()
    a.train(10)
  finally:
    a.close()
  b = Run(cfg, mesh_of("row=2"), offload_config(tmp_path / "b", prefetch_depth=1), plan="rw")
  try:
    b.tier.restore(10, str(tmp_path / "snaps"))
    b.it.set_state(data_state)
    _load(b, *saved)
    b.train(10)
    np.testing.assert_allclose(b.losses, a.losses[10:], rtol=0, atol=1e-5)
    with pytest.raises(offload.OffloadError, match="not yet in the stores"):
      b.it.set_state(data_state)                   # the cache holds unsaved rows
    with pytest.raises(offload.OffloadError, match="no offload snapshot for checkpoint step 7"):
      b.tier.restore(7, str(tmp_path / "snaps"))
  finally:
    b.close()


class _FailingWrites:
  """A tensorstore array whose writes fail as a full disk would."""

  def __init__(self, arr):
    self.arr = arr

  def __getitem__(self, index):
    sel = self.arr[index]

    class Sel:
      read = sel.read

      def write(self, values):
        raise ValueError("UNKNOWN: Error writing local file: No space left on device")
    return Sel()

  def __getattr__(self, name):
    return getattr(self.arr, name)


def test_write_back_failure_is_a_clear_error_and_the_snapshot_stays_valid(tmp_path):
  cfg = experiment("adagrad")
  off = Run(cfg, mesh_of(), offload_config(tmp_path / "store", prefetch_depth=2,
                                            host_buffer_rows=300)).train(8)
  try:
    off.tier.save(off.state, 8, str(tmp_path / "snaps"))
    before = _snapshot_arrays(tmp_path / "snaps" / "8" / "big")
    store = off.tier.tables["big"].store
    store.arrays["table"] = _FailingWrites(store.arrays["table"])
    with pytest.raises(offload.OffloadError, match="write-back of .* failed: .*No space left"):
      off.train(40)
    with pytest.raises(offload.OffloadError):
      off.tier.save(off.state, 9, str(tmp_path / "snaps"))
  finally:
    off.close()
  assert offload.snapshots.steps(str(tmp_path / "snaps")) == [8]
  after = _snapshot_arrays(tmp_path / "snaps" / "8" / "big")
  for name in before:
    np.testing.assert_array_equal(after[name], before[name])
  fresh = Run(cfg, mesh_of(), offload_config(tmp_path / "fresh"))
  try:
    fresh.tier.restore(8, str(tmp_path / "snaps"))
    np.testing.assert_array_equal(fresh.tier.tables["big"].store.read_all("table", 0, 10_000),
                                  before["table"])
  finally:
    fresh.close()


def test_rollback_reset_and_skipped_batches_as_the_trainer_does_them(tmp_path):
  """The loop's NaN rollback (restore, then set_state), restart from the initial state
  (`reset`) and skipped batches (installed, not trained) keep S=0 exact."""
  cfg = experiment("sgd")
  ref = Run(cfg, mesh_of()).train(6)
  next(ref.it)                                   # the reference skips batch 7
  ref.train(4)
  run = Run(cfg, mesh_of(), offload_config(tmp_path / "store", prefetch_depth=2))
  try:
    initial, initial_data = _host_state(run), run.it.get_state()
    run.train(6)
    run.tier.save(run.state, 6, str(tmp_path / "snaps"))
    saved, data_state = _host_state(run), run.it.get_state()
    run.train(5)                                 # then "a NaN": roll back to step 6
    run.tier.restore(6, str(tmp_path / "snaps"))
    run.it.set_state(data_state)
    _load(run, *saved)
    run.losses = run.losses[:6]
    batch = next(run.it)                         # skipped: installed, never trained
    run.state = run.tier.before_step(run.state, batch)
    run.train(4)
    np.testing.assert_allclose(run.losses, ref.losses, rtol=0, atol=1e-6)
    run.tier.reset()                             # start over from the initial state
    run.it.set_state(initial_data)
    _load(run, *initial)
    run.losses = []
    run.train(6)
    np.testing.assert_allclose(run.losses, ref.losses[:6], rtol=0, atol=1e-6)
  finally:
    run.close()


class _Repeat:
  """The stream's first batch, again and again: after the first step every row is cached."""

  def __init__(self):
    self.batch = next(train_iterator(0))

  def __iter__(self):
    return self

  def __next__(self):
    return self.batch

  def get_state(self):
    return {}

  def set_state(self, state):
    pass


def test_set_state_after_a_step_that_installs_nothing_is_refused(tmp_path):
  """A step whose rows are all cached updates the cache too: after a flush, such a step
  left the tier 'clean', so set_state dropped its updates instead of raising."""
  run = Run(experiment("sgd"), mesh_of(), offload_config(tmp_path / "store", prefetch_depth=0),
            iterator=_Repeat()).train(1)
  try:
    run.tier.flush(run.state)
    run.train(1)                                   # every row a hit: nothing to install
    # batch 1 misses every row, batch 2 and batch 3 (assigned ahead, its reads started
    # during step 2) hit every row
    assert run.tier.stats()["row_hits"] == run.tier.stats()["row_lookups"] * 2 / 3
    with pytest.raises(offload.OffloadError, match="not yet in the stores"):
      run.it.set_state({})
  finally:
    run.close()


def test_save_after_close_is_an_error_not_a_hang(tmp_path):
  """`close` stops the fetcher: evictions it had not copied back cannot be saved."""
  run = Run(experiment("sgd"), mesh_of(),
            offload_config(tmp_path / "store", cache_rows=300, prefetch_depth=2)).train(6)
  run.tier._fetch_q.put(None)      # the fetcher stops: the next evictions stay on the device
  run.train(2)
  run.close()
  errors = []

  def save():
    try:
      run.tier.save(run.state, 8, str(tmp_path / "snaps"))
    except offload.OffloadError as e:
      errors.append(e)
  thread = threading.Thread(target=save, daemon=True)
  thread.start()
  thread.join(60)
  assert not thread.is_alive(), "save after close hangs"
  assert len(errors) == 1 and re.search("closed with [1-9][0-9]* evictions not yet",
                                        str(errors[0]))
  assert offload.snapshots.steps(str(tmp_path / "snaps")) == []


def test_reset_refuses_existing_arrays_trained_in_place(tmp_path):
  """`init='existing'` trains the arrays at `path` in place, so a restart from the initial
  state (`reset`, the loop's NaN rollback before any checkpoint) cannot give them back:
  a clear error, where it used to reopen the trained rows as if they were initial."""
  first = Run(experiment("sgd"), mesh_of(), offload_config(tmp_path / "store")).train(2)
  first.full_tables()               # flushed: the arrays at the path are complete
  first.close()
  run = Run(experiment("sgd"), mesh_of(),
            offload_config(tmp_path / "store", table={"init": "existing"})).train(3)
  try:
    with pytest.raises(offload.OffloadError, match=r"table 'big' started from the existing "
                       r"arrays at .*store.* updated in place"):
      run.tier.reset()
  finally:
    run.close()
  fresh = Run(experiment("sgd"), mesh_of(), offload_config(tmp_path / "other")).train(2)
  try:
    fresh.tier.reset()              # random init: written afresh on the next batch
    fresh.train(1)
  finally:
    fresh.close()


def test_saving_and_restoring_large_stores_is_logged(tmp_path, monkeypatch, caplog):
  """A 6e7 x 16 table's checkpoint took ~50 s and its restore ~60 s with nothing logged.
  Stores of `snapshots.LOG_MIN_BYTES` or more are logged before and after; smaller ones
  are not."""
  run = Run(experiment(), mesh_of(), offload_config(tmp_path / "store")).train(3)
  try:
    size = 10_000 * 8 * 4   # the 'big' table's store (SGD: no optimizer state)
    monkeypatch.setattr(offload.snapshots, "LOG_MIN_BYTES", size)
    with caplog.at_level("INFO", logger=offload.snapshots.__name__):
      run.tier.save(run.state, 3, str(tmp_path / "snaps"))
      run.tier.restore(3, str(tmp_path / "snaps"))
    assert [re.sub(r"[\d.]+ s$", "T s", m) for m in caplog.messages] == [
        "checkpoint 3: writing back and snapshotting offloaded tables 'big' (312.5 KiB in "
        "their stores)",
        "checkpoint 3: writing back and snapshotting offloaded tables 'big': done in T s",
        "checkpoint 3: restoring offloaded tables 'big' (312.5 KiB in their stores)",
        "checkpoint 3: restoring offloaded tables 'big': done in T s"]
    caplog.clear()
    monkeypatch.setattr(offload.snapshots, "LOG_MIN_BYTES", size + 1)
    with caplog.at_level("INFO", logger=offload.snapshots.__name__):
      run.tier.save(run.state.copy(), 4, str(tmp_path / "snaps"))
    assert caplog.messages == []
  finally:
    run.close()


def test_a_snapshot_rotated_out_is_gone_before_the_next_one_is_written(tmp_path, monkeypatch):
  """Snapshots were pruned right after each save was started, before its commit rotated
  the oldest checkpoint out: that one's snapshot stayed through the next snapshot, and the
  disk held keep + 2 copies of the table at its peak (3 at keep=1: 1.8 GB for a 10M x 16
  table) where the start-up check counts keep + 1."""
  from tests.offload.offload_helpers import (SMALL_DLRM,  # pylint: disable=import-outside-toplevel
                                             SNAPSHOT_OFFLOAD, train_synthetic)
  seen, real = [], offload.OffloadTier.save

  def save(self, state, step, path):
    seen.append((step, offload.snapshots.steps(path)))
    return real(self, state, step, path)
  monkeypatch.setattr(offload.OffloadTier, "save", save)
  w = tmp_path / "w"
  train_synthetic(w, 30, SMALL_DLRM + SNAPSHOT_OFFLOAD, keep_checkpoints=1)
  assert seen == [(10, []), (20, [10]), (30, [20])], seen
  assert offload.snapshots.steps(str(w / "offload_snapshots")) == [30]
