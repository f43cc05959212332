"""A checkpoint step whose files the filesystem fails to read (EIO) stops the restore:
falling back, as for a corrupt step, would train from an older step and set the newer one
aside although it may be intact."""

import errno
import logging

import pytest

from jaxrec.checkpoint import CheckpointError, CheckpointManager, storage
from jaxrec.checkpoint import tables as tables_lib
from tests.checkpoint import ckpt_helpers as h


@pytest.fixture(scope="module")
def coll():
  return h.collection("rw", 4)


def _two_steps(path, coll):
  with CheckpointManager(path) as mgr:
    for step in (1, 2):
      mgr.save(step, h.train_state(coll, seed=step, step=step), coll, force=True)


def _failing_on_step_2(monkeypatch, module, name, error):
  """`module.name(path, ...)` raises `error` for paths inside step directory 2."""
  real = getattr(module, name)

  def failing(path, *args, **kwargs):
    if "/2/" in f"{path}/":
      raise error
    return real(path, *args, **kwargs)
  monkeypatch.setattr(module, name, failing)


EIO = OSError(errno.EIO, "Input/output error", "/disk/2/manifest/metadata")
TS_EIO = ValueError('UNKNOWN: Error reading local file "/disk/2/embeddings/index.json": '
                    "Input/output error [os_error_code='5']")


@pytest.mark.parametrize("module,name,error,file", [
    (storage, "read_json", EIO, "/disk/2/manifest/metadata"),
    (tables_lib, "read_index", TS_EIO, "/disk/2/embeddings/index.json")])
def test_restore_stops_on_a_read_error_and_keeps_the_step(tmp_path, coll, monkeypatch, caplog,
                                                         module, name, error, file):
  _two_steps(tmp_path, coll)
  _failing_on_step_2(monkeypatch, module, name, error)
  mgr = CheckpointManager(tmp_path)
  with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as e:
    mgr.restore(h.dense(coll.mesh), coll)
  assert str(e.value).startswith(f"cannot read checkpoint {tmp_path}/2: {file}: "
                                 "Input/output error. The filesystem failed"), str(e.value)
  assert "corrupt" not in caplog.text
  assert mgr.all_steps() == [1, 2] and not (tmp_path / "rejected").exists()
  mgr.close()


def test_latest_valid_step_stops_on_a_read_error(tmp_path, coll, monkeypatch):
  _two_steps(tmp_path, coll)
  _failing_on_step_2(monkeypatch, storage, "read_json", EIO)
  with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*/2: /disk/2/manifest"):
    CheckpointManager(tmp_path, read_only=True).latest_valid_step()


def test_a_missing_file_is_still_a_corrupt_step(tmp_path, coll, monkeypatch):
  """ENOENT is damage (a file lost), not a failing disk: the restore falls back."""
  _two_steps(tmp_path, coll)
  _failing_on_step_2(monkeypatch, storage, "read_json",
                     FileNotFoundError(errno.ENOENT, "No such file", "/disk/2/meta/metadata"))
  with CheckpointManager(tmp_path) as mgr:
    assert int(mgr.restore(h.dense(coll.mesh), coll).state["step"]) == 1


def test_a_missing_orbax_metadata_file_is_a_corrupt_step(tmp_path, coll):
  """orbax raises `FileNotFoundError(message)` for a step whose `state/_METADATA` is gone:
  no errno, so it was read as a failing disk, and `latest_valid_step` (the conversions'
  step) stopped where a training restore falls back to the step before."""
  _two_steps(tmp_path, coll)
  (tmp_path / "2" / "state" / "_METADATA").unlink()
  assert CheckpointManager(tmp_path, read_only=True).latest_valid_step() == 1
  assert storage.read_failure(FileNotFoundError("Metadata file does not exist"), "x") is None


def test_a_step_without_its_ocdbt_data_falls_back_quietly(tmp_path, coll, monkeypatch):
  """orbax's metadata read of a step whose `state/d` is gone closed its event loop under
  tensorstore's pending futures: 20-40 'Event loop is closed' tracebacks (unraisable
  exceptions) came before the one-line warning."""
  import gc  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
  _two_steps(tmp_path, coll)
  shutil.rmtree(tmp_path / "2" / "state" / "d")
  assert CheckpointManager(tmp_path, read_only=True).latest_valid_step() == 1
  time.sleep(0.2)   # the futures' callbacks run on tensorstore's threads
  gc.collect()
  assert not unraisable, unraisable[:2]


def test_orbax_reads_left_by_a_failed_restore_are_not_printed():
  """A corrupt latest step's restore failed on one array; orbax's other reads of it were
  left pending, and closing them at exit printed 3-13 `Exception ignored in: <coroutine
  object _read_array_index_and_device_put>` tracebacks after `results in` (4 runs in 10)."""
  import os  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  seen = []
  hook = storage._closed_loop_noise(seen.append)   # pylint: disable=protected-access
  where = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
  namespace = {}
  exec(compile("async def _read_array_index_and_device_put(): pass", where, "exec"), namespace)
  read = namespace["_read_array_index_and_device_put"]()
  error = Exception("Encountered error while reading array index: (). See full TensorStore")
  hook(types.SimpleNamespace(object=read, exc_value=error))
  assert not seen
  mine = types.SimpleNamespace(object=read, exc_value=ValueError("another error"))
  hook(mine)   # anything else still reaches the hook
  read.close()
  assert seen == [mine]


def test_an_unreadable_database_file_is_named_not_its_database():
  """An OCDBT read's error names the database's directory, then the data file that failed:
  a chmod 000 data file was reported as `.../embeddings/: Permission denied`."""
  error = ValueError(
      'PERMISSION_DENIED: Error opening "zarr" driver: Error reading "tables/t0/.zarray" in '
      'OCDBT database at local file "/disk/2/embeddings/": Error reading Byte range [0, 9) '
      'of local file "/disk/2/embeddings/d/72c1" [os_error_code=\'13\']')
  assert storage.read_failure(error, "x") == ("/disk/2/embeddings/d/72c1", "Permission denied")
  assert storage.io_failure(error) == "Permission denied: /disk/2/embeddings/d/72c1"


def test_a_failed_write_of_a_database_file_is_named():
  """A save's full disk (or file size limit) in the tables database named its directory."""
  error = ValueError(
      'OUT_OF_RANGE: Error writing "tables/t1/0" in OCDBT database at local file '
      '"/disk/2.tmp/embeddings.tmp/": Failed writing: "/disk/2.tmp/embeddings.tmp/d/9f59.__lock":'
      " Failed to write 3981312 bytes to file 11: File too large [os_error_code='27']")
  assert storage.io_failure(error) == "File too large: /disk/2.tmp/embeddings.tmp/d/9f59"
