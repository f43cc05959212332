"""CheckpointManager: a save that fails on the filesystem is one clear error."""

import asyncio
import errno
import threading
import types

import pytest
import tensorstore as ts
from etils import epath

from jaxrec.checkpoint import CheckpointError, CheckpointManager
from jaxrec.checkpoint import tables as tables_lib
from tests import fake_futures
from tests.checkpoint import ckpt_helpers as h


@pytest.fixture(scope="module")
def coll():
  return h.collection("rw", 1)


def test_disk_full_during_save_names_step_file_and_kept_checkpoint(tmp_path, coll, monkeypatch):
  """Disk full while the tables are written (in orbax's background threads) raised
  tensorstore's or orbax's exception with a long traceback; now a `CheckpointError` naming
  the step, the file and the checkpoint still intact, which then restores."""
  state = h.train_state(coll, step=1)
  with CheckpointManager(tmp_path, max_to_keep=3) as mgr:
    mgr.save(1, state, coll)
    mgr.wait()
    real = tables_lib.write_pieces

    async def full(directory, arrays, pieces, chunk_bytes=tables_lib.CHUNK_BYTES):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory / "t0"))

    monkeypatch.setattr(tables_lib, "write_pieces", full)
    mgr.save(2, state, coll)
    with pytest.raises(CheckpointError) as e:
      mgr.wait()
    monkeypatch.setattr(tables_lib, "write_pieces", real)
    assert mgr.all_steps() == [1]
    assert int(mgr.restore(state, coll).state["step"]) == 1
  message = str(e.value)
  assert "saving checkpoint 2 in" in message and "No space left on device" in message
  assert "embeddings" in message and "t0" in message   # the file
  assert "the last checkpoint (step 1) is intact" in message


def test_other_save_errors_pass_unchanged(tmp_path, coll, monkeypatch):
  """Only filesystem errors are rewritten: a bug keeps its own exception and traceback.
  Orbax raised at the failed item while its threads of the other items (the dense state's
  shardings and metadata) still ran after close(), into the next test's monkeypatches."""
  state = h.train_state(coll, step=1)
  before = set(threading.enumerate())

  async def broken(directory, arrays, pieces, chunk_bytes=tables_lib.CHUNK_BYTES):
    raise KeyError("a bug")

  monkeypatch.setattr(tables_lib, "write_pieces", broken)
  with pytest.raises(KeyError):
    with CheckpointManager(tmp_path) as mgr:
      mgr.save(1, state, coll)
      mgr.wait()
  assert not [t.name for t in threading.enumerate()
              if t not in before and type(t).__module__.startswith("orbax.")]


def test_a_failed_create_leaves_no_other_create_running(tmp_path, monkeypatch):
  """The first table's create-open failing raised at once: the other tables' opens went on
  creating their files in the step's tmp directory after the save had failed, and could
  finish after a clean-up of that directory (as an un-waited open did in an export test)."""
  log = []
  full = ValueError("UNKNOWN: Error writing local file: No space left on device")
  # tables.py's `ts` only: orbax threads of earlier tests may still open arrays themselves
  monkeypatch.setattr(tables_lib, "ts", types.SimpleNamespace(
      Transaction=ts.Transaction, Context=ts.Context, open=lambda spec, **kw:
      fake_futures.Future(log, full if spec["kvstore"]["path"].endswith("t0/") else None)))
  arrays = {name: ((8, 4), "float32") for name in ("t0", "t1", "t2")}
  with pytest.raises(ValueError, match="No space left"):
    asyncio.run(tables_lib.write_pieces(epath.Path(tmp_path), arrays, []))
  assert len(log) == 3 and all(f.waited for f in log)


def test_close_after_a_reported_failure_does_not_raise_it_again(tmp_path, coll, monkeypatch):
  """Orbax keeps a failed save's error and raises it again from its close(): a run on a
  full disk ended with that OSError's traceback (4 runs of 10) where the one-line
  `error: saving checkpoint N ... failed` was due. Raised once, as the CheckpointError."""
  state = h.train_state(coll, step=1)

  async def full(directory, arrays, pieces, chunk_bytes=tables_lib.CHUNK_BYTES):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory / "t0"))

  def close_again():
    raise OSError(errno.ENOSPC, "No space left on device")

  mgr = CheckpointManager(tmp_path, max_to_keep=3)
  monkeypatch.setattr(tables_lib, "write_pieces", full)
  mgr.save(2, state, coll)
  with pytest.raises(CheckpointError, match="saving checkpoint 2 in"):
    mgr.wait()
  real_close = mgr._mgr.close   # pylint: disable=protected-access
  monkeypatch.setattr(mgr._mgr, "close", lambda: (real_close(), close_again()))
  mgr.close()
  # without a failure told first, close's error is its own (not hidden)
  other = CheckpointManager(tmp_path / "other", max_to_keep=3)
  real_other = other._mgr.close   # pylint: disable=protected-access
  monkeypatch.setattr(other._mgr, "close", lambda: (real_other(), close_again()))
  with pytest.raises(OSError, match="No space left"):
    other.close()


def test_a_tensorstore_disk_full_is_the_reason_and_the_file(tmp_path, coll, monkeypatch):
  """Tensorstore's ENOSPC gave its whole text (RESOURCE_EXHAUSTED: Error opening "zarr"
  driver: ...: Failed writing ...: Failed to write 176 bytes to file 30: ...), 300-600
  characters in the one-line error; now the reason and the file, as for an OSError."""
  state = h.train_state(coll, step=1)
  target = f"{tmp_path}/2.orbax-checkpoint-tmp/embeddings/tables/t0/.zarray"

  async def full(directory, arrays, pieces, chunk_bytes=tables_lib.CHUNK_BYTES):
    raise ValueError(f'RESOURCE_EXHAUSTED: Error opening "zarr" driver: Error writing local '
                     f'file "{target}": Failed writing: "{target}.__lock": Failed to write 176 '
                     "bytes to file 30: No space left on device [os_error_code='28'] "
                     "[tensorstore_spec='{\"driver\":\"zarr\"}']")

  monkeypatch.setattr(tables_lib, "write_pieces", full)
  with CheckpointManager(tmp_path, max_to_keep=3) as mgr:
    mgr.save(2, state, coll)
    with pytest.raises(CheckpointError) as e:
      mgr.wait()
  assert str(e.value) == (f"saving checkpoint 2 in {tmp_path} failed: No space left on "
                          f"device: {target}; no earlier checkpoint exists")
