"""steps.latest_valid: a step deleted meanwhile (rotated out) is not reported as corrupt."""

import logging
import shutil
import threading
import time

import pytest

from jaxrec.checkpoint import CheckpointManager, rotation, steps, storage
from tests.checkpoint import ckpt_helpers as h


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Checkpoint directory with steps 1 and 2."""
  coll = h.collection("rw", 8)
  path = tmp_path_factory.mktemp("ckpt")
  with CheckpointManager(path) as mgr:
    for step in (1, 2):
      mgr.save(step, h.train_state(coll, seed=step, step=step), coll, force=True)
  return path


def _deleting(monkeypatch, deleted):
  """`storage.check_step` deletes the step directories in `deleted` first, as a run saving
  into the directory rotates them out (orbax lists steps once: they are still listed)."""
  real = storage.check_step

  def check_step(step_dir, *args, **kwargs):
    if step_dir.name in deleted:
      shutil.rmtree(step_dir, ignore_errors=True)
    return real(step_dir, *args, **kwargs)
  monkeypatch.setattr(storage, "check_step", check_step)


def test_a_step_deleted_meanwhile_is_skipped_quietly(saved, tmp_path, monkeypatch, caplog):
  """It was logged as 'corrupt or unreadable' at warning level."""
  path = shutil.copytree(saved, tmp_path / "c")
  mgr = CheckpointManager(path, read_only=True)
  _deleting(monkeypatch, {"2"})
  with caplog.at_level(logging.DEBUG):
    assert mgr.latest_valid_step() == 1
  assert not [r for r in caplog.records if "corrupt" in r.getMessage()], caplog.text
  (skipped,) = [r for r in caplog.records if "was deleted while it was checked" in r.getMessage()]
  assert skipped.levelno == logging.DEBUG and f"{path}/2 " in skipped.getMessage()


def test_every_step_deleted_meanwhile_is_rotated_not_corrupt(saved, tmp_path, monkeypatch):
  path = shutil.copytree(saved, tmp_path / "c")
  mgr = CheckpointManager(path, read_only=True)
  _deleting(monkeypatch, {"1", "2"})
  with pytest.raises(rotation.Rotated, match=r"c/2 was deleted while it was being read"):
    mgr.latest_valid_step()


def test_a_corrupt_step_keeps_its_warning(saved, tmp_path, caplog):
  path = shutil.copytree(saved, tmp_path / "c")
  (path / "2" / "manifest" / "metadata").write_text("{")
  with caplog.at_level(logging.WARNING):
    assert CheckpointManager(path, read_only=True).latest_valid_step() == 1
  (warning,) = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
  assert warning.startswith(f"checkpoint {path}/2 is corrupt or unreadable (")


def test_step_dirs_lists_committed_step_directories(tmp_path):
  for name in ("3", "10", "4.orbax-checkpoint-tmp-1", "rejected"):
    (tmp_path / name).mkdir()
  assert steps.step_dirs(tmp_path) == [3, 10] and steps.step_dirs(tmp_path / "none") == []


def test_a_zero_padded_copy_is_not_a_step(tmp_path):
  """`cp -r 300 0350` listed as step 350, which orbax never restores: the mesh choice
  read the records of `checkpoints/350`, not there, and warned about it ('No such file')."""
  for name in ("300", "0350", "00"):
    (tmp_path / name).mkdir()
  assert steps.step_dirs(tmp_path) == [300]


def test_a_step_being_deleted_is_told_from_one_that_stays_without_waiting_long(tmp_path):
  """A failed read waited 2 s on every error to tell a rotation from damage; a step whose
  entries do not change for `settle` s is not being deleted."""
  step = tmp_path / "2"
  for i in range(6):
    (step / f"d{i}").mkdir(parents=True)
    (step / f"d{i}" / "f").write_text("x")
  start = time.monotonic()
  assert not rotation._gone(step, wait=5.0, settle=0.2)  # pylint: disable=protected-access
  assert time.monotonic() - start < 1.0
  deleter = threading.Thread(target=_delete_slowly, args=(step, 0.1))
  deleter.start()
  try:   # entries disappear every 0.1 s for 0.7 s in all, longer than `settle`
    assert rotation._gone(step, wait=5.0, settle=0.2)  # pylint: disable=protected-access
  finally:
    deleter.join()


def _delete_slowly(step, pause):
  for d in sorted(step.iterdir()):
    time.sleep(pause)
    shutil.rmtree(d)
  time.sleep(pause)
  step.rmdir()


def _orbax_read_failure() -> Exception:
  """What orbax raises for an array whose data file was truncated (its message as seen on a
  `dlrm_synthetic` checkpoint), chained to tensorstore's error."""
  try:
    raise ValueError('OUT_OF_RANGE: Error reading "params.bottom_mlp.layer_0.kernel/0.0" in '
                     'OCDBT database at local file "/w/checkpoints/20/state/": Requested byte '
                     'range [0, 6208) is not valid for value of size 100')
  except ValueError as cause:
    wrapper = Exception("Encountered error while reading array index: (slice(0, 13, 1), "
                        "slice(0, 128, 1)). See full TensorStore details: <bound method "
                        "pybind11_detail_function_record_v1.spec of TensorStore({\n  'base': {")
    wrapper.__cause__ = cause
    return wrapper


def test_an_unreadable_array_is_named_not_orbax_wrapper(caplog):
  """The warning and the no-valid-checkpoint error quoted orbax's wrapper (`See full
  TensorStore details: <bound method ...spec of TensorStore({`), naming no array or file."""
  error = _orbax_read_failure()
  with caplog.at_level(logging.WARNING):
    steps.warn_corrupt("/w/checkpoints/20", error)
  assert ('checkpoint /w/checkpoints/20 is corrupt or unreadable (ValueError: OUT_OF_RANGE: '
          'Error reading "params.bottom_mlp.layer_0.kernel/0.0" in OCDBT database at local '
          'file "/w/checkpoints/20/state/": Requested byte range') in caplog.text
  assert "bound method" not in caplog.text
  message = str(steps.none_valid("/w/checkpoints", [(20, error)]))
  assert 'step 20: ValueError: OUT_OF_RANGE: Error reading "params.bottom_mlp' in message
  assert "bound method" not in message
  assert steps.shown(ValueError("plain")).args == ("plain",)


def test_a_rejected_step_says_what_rejected_holds(saved, tmp_path, caplog):
  """Rejected steps are never deleted: over rollbacks they add up without a word."""
  path = shutil.copytree(saved, tmp_path / "c")
  (path / "2" / "manifest" / "metadata").write_text("{")
  coll = h.collection("rw", 8)
  with caplog.at_level(logging.WARNING), CheckpointManager(path) as mgr:
    assert int(mgr.restore(h.dense(coll.mesh), coll).state["step"]) == 1
  (moved,) = [r.getMessage() for r in caplog.records if "moved checkpoint" in r.getMessage()]
  size = sum(f.stat().st_size for f in (path / "rejected").rglob("*") if f.is_file())
  assert moved.endswith(f"(it holds 1 rejected step(s), {size / 2**10:.1f} KiB: nothing "
                        "there is deleted; remove them once inspected)"), moved


def test_a_file_linked_twice_counts_once(tmp_path):
  (tmp_path / "a").write_bytes(b"x" * 100)
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "a").hardlink_to(tmp_path / "a")
  assert steps.rejected_note(tmp_path).startswith("it holds 2 rejected step(s), 100 B:")


def test_a_directory_of_only_unfinished_saves_warns_of_the_fresh_start(tmp_path, caplog):
  """A `--restart_data` copy killed midway left `480.orbax-checkpoint-tmp-<ns>` and no step:
  a run there removed it and trained fresh tables from step 0 without a word."""
  (tmp_path / "480.orbax-checkpoint-tmp-123").mkdir()
  with caplog.at_level(logging.WARNING):
    with CheckpointManager(tmp_path):
      pass
  assert (f"warning: {tmp_path} holds no checkpoint, only unfinished saves "
          "(480.orbax-checkpoint-tmp-123: a run or a convert_checkpoint.py copy killed while "
          "writing it), removed now; this run starts from fresh tables at step 0"
          ) in caplog.text
  assert not (tmp_path / "480.orbax-checkpoint-tmp-123").exists()
  caplog.clear()
  (tmp_path / "7").mkdir()   # not a committed orbax step, but a step directory: no warning
  (tmp_path / "8.orbax-checkpoint-tmp-1").mkdir()
  with caplog.at_level(logging.WARNING):
    steps.warn_only_unfinished(tmp_path)
  assert "holds no checkpoint" not in caplog.text
