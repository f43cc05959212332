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
from jaxrec.offload import store as storage
from jaxrec.offload.store import TableStore, init_rows
from tests import fake_futures

SPEC = TableSpec("big", 1000, 8)
ADAGRAD = optimizers.Adagrad(initial_accumulator=0.25)


def _store(tmp_path, spec=SPEC, opt=ADAGRAD, **kw):
  off = offload.OffloadTable(spec.name, cache_rows=100, **{"chunk_rows": 64, **kw})
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


def test_file_rows_default_and_cut_to_the_table():
  t = lambda **kw: offload.OffloadTable("t", cache_rows=1, **kw)
  assert t().file_rows(10**6) == (256, 4096)                # zarr3: 16 chunks per file
  assert t(driver="zarr").file_rows(10**6) == (256, None)   # zarr: a file per chunk
  assert t(chunk_rows=64, shard_rows=64).file_rows(10**6) == (64, 64)
  assert t(chunk_rows=64).file_rows(1000) == (64, 1000 // 64 * 64 + 64)   # whole chunks
  assert t(chunk_rows=5000).file_rows(1000) == (1000, 1000)


def test_zarr3_files_hold_chunks_and_rows_are_read_and_written_alone(tmp_path):
  """16-row chunks in 256-row files: 4 files per array, each read or write of scattered
  rows gives the values of a plain numpy table."""
  store = _store(tmp_path, chunk_rows=16)
  store.create(jax.random.key(0))
  assert store.readers["table"].chunk_layout.read_chunk.shape == (16, 8)
  assert store.readers["table"].chunk_layout.write_chunk.shape == (256, 8)
  want = np.array(init_table(jax.random.key(0), SPEC))
  rng = np.random.default_rng(0)
  for _ in range(3):
    rows = rng.choice(1000, 50, replace=False)
    new = rng.normal(size=(50, 8)).astype(np.float32)
    store.write(rows, {"table": new, "opt.accum": np.abs(new)})
    want[rows] = new
    probe = np.sort(rng.choice(1000, 100, replace=False))
    np.testing.assert_array_equal(store.read(probe).result()["table"], want[probe])
  # one directory per array, its files flat in it (no directory per file: `c/<i>/0`)
  assert sorted(p.name for p in (tmp_path / "big" / "table").iterdir()) == [
      "c.0.0", "c.1.0", "c.2.0", "c.3.0", "zarr.json"]
  np.testing.assert_array_equal(store.read_all("table", 0, 1000), want)


def test_an_existing_store_opens_in_the_format_it_was_written_in(tmp_path):
  """A store (or snapshot) written with `zarr`, one file per chunk, by an earlier run,
  opens under today's default (`zarr3`, sharded): resumes and `init='existing'` keep
  working, and its snapshots record the driver they hold."""
  old = _store(tmp_path, driver="zarr")
  old.create(jax.random.key(0))
  old.write(np.array([5, 900]), {"table": np.ones((2, 8), np.float32),
                                 "opt.accum": np.ones((2, 8), np.float32)})
  assert storage.driver_on_disk(str(tmp_path / "big" / "table")) == "zarr"
  now = _store(tmp_path, init="existing")
  assert now.off.driver == "zarr3"
  now.open_existing()
  assert now.driver == "zarr"
  np.testing.assert_array_equal(now.read(np.array([5, 6])).result()["table"][0], np.ones(8))
  old.snapshot(str(tmp_path / "snap"))
  other = _store(tmp_path / "other")
  other.restore_snapshot(str(tmp_path / "snap"))
  assert other.driver == "zarr"
  np.testing.assert_array_equal(other.read_all("table", 900, 901), np.ones((1, 8)))
  other.create(None)      # a fresh store is written in the configured format
  assert other.driver == "zarr3"
  assert storage.driver_on_disk(str(tmp_path / "other" / "big" / "table")) == "zarr3"


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
  with pytest.raises(ConfigError, match=r"^OffloadConfig.tables: table 'q' has dtype 'int8', "
                     "which cannot be offloaded"):   # the binding first: gin_usage.locate's
    offload.device_tables([TableSpec("q", 100, 8, dtype="int8")],   # FILE:LINE goes in front
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


def test_a_write_back_goes_in_pieces_of_a_few_files(tmp_path, monkeypatch):
  """tensorstore rewrites a file it writes to whole: 2048 rows spread over a table touched
  up to 2048 files in one piece (a 2 GB table's write-back held the whole table in RAM).
  Pieces hold at most `_WRITE_PIECE_FILE_BYTES` of files; the values are those written."""
  store = _store(tmp_path, chunk_rows=16)             # files of 256 rows x (8 + 8) floats
  store.create(jax.random.key(0))
  monkeypatch.setattr(storage, "_WRITE_PIECE_FILE_BYTES", 2 * 256 * 16 * 4)   # two files
  rows = np.array([999, 3, 300, 5, 700, 600, 4])
  pieces = store._write_pieces(np.sort(rows))   # pylint: disable=protected-access
  assert [np.sort(rows)[p].tolist() for p in pieces] == [[3, 4, 5, 300], [600, 700, 999]]
  want = np.array(init_table(jax.random.key(0), SPEC))
  new = np.arange(7 * 8, dtype=np.float32).reshape(7, 8)
  store.write(rows, {"table": new, "opt.accum": new + 1})
  want[rows] = new
  np.testing.assert_array_equal(store.read_all("table", 0, 1000), want)
  np.testing.assert_array_equal(store.read_all("opt.accum", 0, 1000)[rows], new + 1)


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


def test_a_failed_initial_write_names_the_table_and_path(tmp_path):
  """Disk full while a fresh store's initial rows were written: a tensorstore ValueError
  traceback that named no table (write-backs already said which)."""
  store = _store(tmp_path)
  store.create(None)
  store.readers["table"] = _Array(ValueError("RESOURCE_EXHAUSTED: Error writing local file "
                                             '"x/c/0/0": No space left on device'), [])
  with pytest.raises(offload.OffloadError, match=r"^offloaded table 'big': writing its initial "
                     r"rows 0\.\.1000 of 1,000 \(8 x float32 each\) to '.*big/table/' "
                     r"\(zarr3 on file\) failed: RESOURCE_EXHAUSTED: .* No space left"):
    store._write_init(jax.random.key(0))   # pylint: disable=protected-access


def test_a_store_on_another_filesystem_than_the_snapshots_is_warned_about(tmp_path,
                                                                         monkeypatch):
  """A checkpoint hard-links a store's files into its snapshot, and copies them where it
  cannot: a store on a tmpfs left a whole copy of the table per checkpoint, unannounced."""
  import types  # pylint: disable=import-outside-toplevel
  from jaxrec.offload import hooks  # pylint: disable=import-outside-toplevel
  table = lambda path, kv="file": types.SimpleNamespace(spec=TableSpec("big", 2**20, 64),
      store=types.SimpleNamespace(path=path, off=types.SimpleNamespace(kvstore=kv)))
  tier = types.SimpleNamespace(tables={"big": table(str(tmp_path / "not_yet" / "big"))})
  assert hooks.warn_copied_snapshots(tier, str(tmp_path / "w" / "offload_snapshots")) == []
  monkeypatch.setattr(hooks, "filesystem", lambda path: path.startswith("/ssd"))
  tier.tables["big"] = table("/ssd/big")
  (warning,) = hooks.warn_copied_snapshots(tier, "/w/offload_snapshots")
  assert warning.startswith("offloaded table 'big': its store /ssd/big is on another "
                            "filesystem than the offload snapshots (/w/offload_snapshots), "
                            "so each checkpoint copies the whole store (the table alone is "
                            "256 MiB)"), warning
  tier.tables["big"] = table("/ssd/big", "memory")
  assert hooks.warn_copied_snapshots(tier, "/w/offload_snapshots") == []


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


def test_writing_a_large_tables_initial_rows_is_logged(tmp_path, monkeypatch, caplog):
  """A 3.2 GB table's initial rows took ~25 s with nothing logged between the plan and
  the first step. A table of `_PROGRESS_MIN_BYTES` or more is announced and its progress
  logged every `_PROGRESS_EVERY_S` seconds (here every block: 0 s)."""
  monkeypatch.setattr(storage, "_INIT_BLOCK_ROWS", 250)
  monkeypatch.setattr(storage, "_PROGRESS_EVERY_S", 0.0)
  monkeypatch.setattr(storage, "_PROGRESS_MIN_BYTES", 1000 * 8 * 4)   # SPEC's 32,000 bytes
  with caplog.at_level("INFO", logger=storage.__name__):
    _store(tmp_path).create(jax.random.key(0))
  assert caplog.messages[0].startswith(
      "offloaded table 'big': writing its 1,000 initial rows (31.2 KiB) to ")
  assert [m.split(": ")[1].split(" (")[0] for m in caplog.messages[1:]] == [
      "25% of its initial rows written", "50% of its initial rows written",
      "75% of its initial rows written"]
  caplog.clear()
  monkeypatch.setattr(storage, "_PROGRESS_MIN_BYTES", 1000 * 8 * 4 + 1)   # smaller: silent
  with caplog.at_level("INFO", logger=storage.__name__):
    _store(tmp_path / "2").create(jax.random.key(0))
  assert caplog.messages == []


def test_stores_and_snapshots_the_disk_may_not_hold_are_warned_about(tmp_path, monkeypatch):
  """A 1e8-row bf16 table (3.2 GB) with two checkpoints kept took 6.1 GB of a 9.8 GB
  disk, with no word: each snapshot is up to a whole copy. `warn_disk_space` compares
  what each disk needs with its free space and, when short, the files already there; a
  store on another disk than the snapshots, or in memory, is copied whole to theirs."""
  import types  # pylint: disable=import-outside-toplevel
  from jaxrec.offload import disk_space  # pylint: disable=import-outside-toplevel
  store = _store(tmp_path)             # 1000 x 8 float32 + Adagrad's 1000 x 8: 64,000 bytes
  tables = {"big": types.SimpleNamespace(spec=SPEC, store=store)}
  snaps = str(tmp_path / "offload_snapshots")
  free = lambda n: lambda path: n
  assert disk_space.warn_disk_space(tables, 3, snaps, free(4 * 64_000)) == []
  (warning,) = disk_space.warn_disk_space(tables, 3, snaps, free(4 * 64_000 - 1))
  assert warning == (
      f"offloaded table(s) 'big': the stores and --keep_checkpoints=3 snapshots of them "
      f"(each up to a whole copy when training touches rows all over a table) may need "
      f"250.0 KiB on the disk holding {store.path}, which has 250.0 KiB for them (free, and "
      f"their files already there). Free space or lower --keep_checkpoints")
  store.create(jax.random.key(0))       # files already there count as room, once each
  assert disk_space.warn_disk_space(tables, 3, snaps, free(4 * 64_000 - 1)) == []
  # the store on another disk: it needs itself there, the snapshots keep + 1 copies on theirs
  monkeypatch.setattr(disk_space, "filesystem", lambda path: 1 if path == snaps else 2)
  frees = {str(tmp_path): 4 * 64_000 - 1}   # the snapshots' disk (shown: its parent)
  warnings = disk_space.warn_disk_space(tables, 3, snaps, lambda p: frees.get(p, 64_000))
  assert [w.split(" on the disk holding ")[1].split(",")[0] for w in warnings] == [snaps]
  frees[str(tmp_path)] += 1   # 4 whole copies fit; the store's disk holds the store
  assert disk_space.warn_disk_space(tables, 3, snaps, lambda p: frees.get(p, 64_000)) == []
  # a memory store: its snapshots are whole zarr copies on the snapshots' disk
  store.off = offload.OffloadTable("big", cache_rows=100, kvstore="memory")
  assert len(disk_space.warn_disk_space(tables, 3, snaps, free(4 * 64_000 - 1))) == 1
  assert disk_space.warn_disk_space(tables, 3, snaps, free(4 * 64_000)) == []


def test_the_disk_warning_prices_the_checkpoints_a_run_can_keep():
  """It priced `--keep_checkpoints` (default 3) whole copies for a run of one save (h72:
  `--num_steps` <= `--checkpoint_every`): a false warning on a disk that holds two."""
  from jaxrec.train.config import RunOptions  # pylint: disable=import-outside-toplevel
  kept = lambda **kw: RunOptions(**kw).most_checkpoints_kept()
  assert kept(num_steps=20, checkpoint_every=0, keep_checkpoints=3) == 1     # the last only
  assert kept(num_steps=20, checkpoint_every=10, keep_checkpoints=3) == 2    # 10, 20
  assert kept(num_steps=21, checkpoint_every=10, keep_checkpoints=3) == 3    # 10, 20, 21
  assert kept(num_steps=5, checkpoint_every=10, keep_checkpoints=3) == 1
  assert kept(num_steps=1000, checkpoint_every=100, keep_checkpoints=3) == 3
