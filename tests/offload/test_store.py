"""Tensorstore arrays of an offloaded table: exact init, bad paths/shapes, cache sizing."""

import os

import jax
import numpy as np
import pytest

from jaxrec import offload
from jaxrec.embedding import optimizers
from jaxrec.embedding.layout import init_table
from jaxrec.embedding.specs import TableSpec
from jaxrec.errors import ConfigError
from jaxrec.offload.store import TableStore, init_rows
from tests import fake_futures

SPEC = TableSpec("big", 1000, 8)
ADAGRAD = optimizers.Adagrad(initial_accumulator=0.25)


def _store(tmp_path, spec=SPEC, opt=ADAGRAD, **kw):
  off = offload.OffloadTable(spec.name, cache_rows=100, chunk_rows=64, **kw)
  return TableStore(spec, off, opt, str(tmp_path / spec.name))


def test_init_rows_equals_on_device_init_for_any_row_range():
  key = jax.random.key(3)
  full = np.asarray(init_table(key, SPEC))
  for start, stop in [(0, 1000), (17, 18), (333, 901)]:
    np.testing.assert_array_equal(init_rows(key, SPEC, start, stop), full[start:stop])


def test_bfloat16_init_rounds_like_the_device_table():
  spec = TableSpec("bf", 300, 8, dtype="bfloat16")
  key = jax.random.key(1)
  np.testing.assert_array_equal(init_rows(key, spec, 10, 200).astype(np.float32),
                                np.asarray(init_table(key, spec)[10:200]).astype(np.float32))


@pytest.mark.parametrize("driver", ["zarr", "zarr3"])
def test_create_read_write_and_reopen(tmp_path, driver):
  key = jax.random.key(0)
  store = _store(tmp_path, driver=driver)
  store.create(key)
  rows = np.array([999, 3, 500])
  vals = store.read(np.sort(rows)).result()
  np.testing.assert_array_equal(vals["table"], np.asarray(init_table(key, SPEC))[np.sort(rows)])
  np.testing.assert_array_equal(vals["opt.accum"], np.full((3, 8), 0.25, np.float32))
  new = {"table": np.arange(24, dtype=np.float32).reshape(3, 8),
         "opt.accum": np.ones((3, 8), np.float32)}
  store.write(rows, new)                         # unsorted rows are fine
  again = _store(tmp_path, driver=driver)
  again.open_existing()
  got = again.read(np.sort(rows)).result()
  order = np.argsort(rows)
  np.testing.assert_array_equal(got["table"], new["table"][order])
  np.testing.assert_array_equal(got["opt.accum"], new["opt.accum"][order])


@pytest.mark.parametrize("kvstore", ["file", "memory"])
def test_chunks_larger_than_the_table_are_cut_to_it(tmp_path, kvstore):
  """chunk_rows=2**40 on a 1000-row table: tensorstore allocated the whole chunk and the
  process aborted (std::bad_alloc) at the first write."""
  off = offload.OffloadTable("big", cache_rows=100, chunk_rows=2**40, kvstore=kvstore)
  store = TableStore(SPEC, off, ADAGRAD, str(tmp_path / "big"))
  store.create(None)
  assert store.readers["table"].chunk_layout.read_chunk.shape == (1000, 8)
  store.create(jax.random.key(0))
  store.write(np.array([7]), {"table": np.ones((1, 8), np.float32),
                              "opt.accum": np.ones((1, 8), np.float32)})
  np.testing.assert_array_equal(store.read(np.array([7])).result()["table"], np.ones((1, 8)))
  store.snapshot(str(tmp_path / "snap"))


def test_snapshot_is_unchanged_by_later_writes(tmp_path):
  store = _store(tmp_path)
  store.create(jax.random.key(0))
  before = store.read_all("table", 0, SPEC.rows).copy()
  store.snapshot(str(tmp_path / "snap"))
  store.write(np.arange(0, 1000, 7), {"table": np.zeros((143, 8), np.float32),
                                      "opt.accum": np.zeros((143, 8), np.float32)})
  other = _store(tmp_path / "other")
  other.restore_snapshot(str(tmp_path / "snap"))
  np.testing.assert_array_equal(other.read_all("table", 0, SPEC.rows), before)


def test_existing_path_missing_or_wrong_shape_or_dtype(tmp_path):
  with pytest.raises(ConfigError, match="cannot open tensorstore array"):
    _store(tmp_path / "nothing", init="existing").open_existing()
  _store(tmp_path, spec=TableSpec("big", 999, 8)).create(None)
  with pytest.raises(ConfigError, match=r"shape \[999, 8\].*expected \[1000, 8\]"):
    _store(tmp_path).open_existing()
  _store(tmp_path, spec=TableSpec("big", 1000, 8, dtype="float16")).create(None)
  with pytest.raises(ConfigError, match="dtype float16.*expected.*float32"):
    _store(tmp_path).open_existing()


def test_path_that_cannot_be_created(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  store = TableStore(SPEC, offload.OffloadTable("big", cache_rows=10), ADAGRAD,
                     str(blocker / "big"))
  with pytest.raises(ConfigError, match="cannot create tensorstore array.*file/big"):
    store.create(None)


def test_cache_sizing_and_config_errors():
  sgd = optimizers.SGD()
  assert offload.OffloadTable("big", cache_bytes=32 * 10).resolve_cache_rows(SPEC, sgd) == 10
  # Adagrad doubles the bytes of a cached row.
  assert offload.OffloadTable("big", cache_bytes=64 * 10).resolve_cache_rows(SPEC, ADAGRAD) == 10
  with pytest.raises(ConfigError, match="larger than the table"):
    offload.OffloadTable("big", cache_rows=1001).resolve_cache_rows(SPEC, sgd)
  with pytest.raises(ConfigError, match="exactly one of cache_rows and cache_bytes"):
    offload.OffloadTable("big")
  with pytest.raises(ConfigError, match="driver"):
    offload.OffloadTable("big", cache_rows=5, driver="n5")
  with pytest.raises(ConfigError, match="not a configured table"):
    offload.device_tables([SPEC], offload.OffloadConfig({"nope": {"cache_rows": 5}}), sgd)
  with pytest.raises(ConfigError, match="cannot be offloaded"):
    offload.device_tables([TableSpec("q", 100, 8, dtype="int8")],
                          offload.OffloadConfig({"q": {"cache_rows": 5}}), sgd)
  cfg = offload.OffloadConfig({"big": {"cache_rows": 100}})
  (dev,) = offload.device_tables([SPEC], cfg, sgd)
  assert (dev.rows, dev.dim, dev.name) == (100, 8, "big")
  assert not os.path.isabs(cfg.tables[0].path or "")


def test_bfloat16_store_round_trip(tmp_path):
  spec = TableSpec("bf", 300, 8, dtype="bfloat16")
  store = _store(tmp_path, spec=spec, opt=optimizers.SGD())
  key = jax.random.key(2)
  store.create(key)
  rows = np.array([1, 7, 299])
  got = store.read(rows).result()["table"]
  assert got.dtype == np.dtype(jax.numpy.bfloat16)
  np.testing.assert_array_equal(got.astype(np.float32),
                                np.asarray(init_table(key, spec))[rows].astype(np.float32))


def test_snapshot_and_restore_into_unusable_paths_are_clear_errors(tmp_path):
  store = _store(tmp_path)
  store.create(jax.random.key(0))
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(offload.OffloadError, match=r"offload snapshot of step 3 in .*file/snaps "
                     "failed"):
    offload.snapshots.save(str(blocker / "snaps"), 3, {"big": store}, keep=None)
  offload.snapshots.save(str(tmp_path / "snaps"), 3, {"big": store}, keep=None)
  other = TableStore(SPEC, offload.OffloadTable("big", cache_rows=10), ADAGRAD,
                     str(blocker / "big"))
  with pytest.raises(offload.OffloadError, match="offloaded table 'big': cannot restore snapshot"
                     r" .*snaps/3/big into '.*file/big'"):
    other.restore_snapshot(str(tmp_path / "snaps" / "3" / "big"))
  assert offload.snapshots.steps(str(tmp_path / "snaps")) == [3]


def test_a_fresh_run_warns_before_replacing_arrays_already_at_its_path(tmp_path, caplog):
  """A second fresh run on the same `path` (another run's store) replaces its arrays with
  initial values: the first write says so once; restarts of its own store do not."""
  import logging  # pylint: disable=import-outside-toplevel
  from tests.offload.offload_helpers import Run, experiment, mesh_of, offload_config
  off = offload_config(tmp_path)
  with caplog.at_level(logging.WARNING):
    Run(experiment(), mesh_of(), off).train(1).close()
    assert "replaces the arrays" not in caplog.text
    run = Run(experiment(), mesh_of(), off).train(1)
    assert caplog.text.count("replaces the arrays") == 1
    assert (f"offloaded table 'big': a fresh run replaces the arrays already at "
            f"{tmp_path / 'big'} (table)") in caplog.text    # SGD: no optimizer arrays
    run.tier.reset()
    run.train(1).close()
  assert caplog.text.count("replaces the arrays") == 1


class _Array:
  """A stored array whose writes fail with `error` (None: succeed), logged in `log`."""

  def __init__(self, error, log):
    self.error, self.log = error, log

  def __getitem__(self, index):
    return self

  def write(self, values):
    return fake_futures.Future(self.log, self.error)


def test_a_failed_write_back_leaves_no_write_running(tmp_path):
  """The table's write failing (disk full) raised at once: the optimizer state's write of
  the same rows still ran after the `OffloadError`, and could land after a restart in the
  same process had restored the store from its snapshot."""
  store, log = _store(tmp_path), []
  full = ValueError("UNKNOWN: Error writing local file: No space left on device")
  store.arrays = {name: _Array(full if name == "table" else None, log) for name in store.names}
  with pytest.raises(offload.OffloadError, match="write-back of 3 rows .* No space left"):
    store.write(np.arange(3), {name: np.zeros((3, SPEC.dim), np.float32)
                               for name in store.names})
  assert len(log) == len(store.names) > 1 and all(w.waited for w in log)


def test_a_failed_read_leaves_no_read_running(tmp_path):
  """The table's read failing raised at once while the optimizer state's read of the same
  rows still filled its buffer after the `OffloadError`."""
  store, log = _store(tmp_path), []
  gone = ValueError("NOT_FOUND: Error reading local file")
  pending = offload.store.PendingRead(store, np.arange(3), {
      name: fake_futures.Future(log, gone if i == 0 else None)
      for i, name in enumerate(store.names)})
  with pytest.raises(offload.OffloadError, match="reading 3 rows .* Error reading"):
    pending.result()
  assert len(log) == len(store.names) > 1 and all(f.waited for f in log)
