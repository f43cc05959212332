"""Exporting a rejected checkpoint (`W/checkpoints/rejected/<step>.<reason>.<ns>`): a step
rolled back past or superseded is kept so it can still be read, so conversion reads it."""

import shutil

import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointError, CheckpointManager, convert
from jaxrec.errors import ConfigError
from tests.checkpoint import ckpt_helpers as h
from tests.scripts.in_process import run_script


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory):
  """Checkpoints 2 and 4, then a restore of step 2, which moves 4 to rejected/ as
  superseded; returns (checkpoint dir, rejected step dir, collection, state of step 4)."""
  coll = h.collection("grid", 8)
  path = tmp_path_factory.mktemp("ckpt")
  state2, state4 = h.train_state(coll, seed=2, step=2), h.train_state(coll, seed=4, step=4)
  with CheckpointManager(path) as mgr:
    mgr.save(2, state2, coll, force=True)
    mgr.save(4, state4, coll, force=True)
    mgr.restore(state2, coll, step=2)
    assert mgr.all_steps() == [2]
  (rejected,) = (path / "rejected").iterdir()
  assert rejected.name.startswith("4.superseded.")
  return path, rejected, coll, state4


def test_a_rejected_step_exports_like_a_kept_one(rolled_back, tmp_path):
  path, rejected, coll, state4 = rolled_back
  assert convert.export_npz(rejected, tmp_path / "a.npz") == 4
  with np.load(tmp_path / "a.npz") as z:
    assert int(z["step"]) == 4
    got = {k: z[k] for k in z.files if k.startswith("tables/")}
  want, _ = coll.unstack_tables(state4["emb"])
  assert sorted(got) == sorted(f"tables/{n}" for n in want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[f"tables/{name}"], np.asarray(value))
  assert convert.export_zarr(rejected, tmp_path / "z", step=4) == 4
  # copied back as a checkpoint, it restores (e.g. to undo a rollback)
  step, _ = convert.export_checkpoint(rejected, tmp_path / "w2" / "checkpoints")
  assert step == 4
  with CheckpointManager(tmp_path / "w2" / "checkpoints") as mgr:
    restored = mgr.restore(h.train_state(coll), coll)
  assert int(restored.state["step"]) == 4
  for name, value in coll.unstack_tables(restored.state["emb"])[0].items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]))


def test_the_errors_point_at_the_rejected_checkpoints(rolled_back, tmp_path):
  path, rejected, _, _ = rolled_back
  with pytest.raises(CheckpointError, match=rf"no checkpoint for step 4 in .* \(steps: \[2\]\); "
                     rf"rejected checkpoints of step 4 are kept in .*rejected \(1\): export one "
                     rf"with --checkpoint_dir=<its directory>, e.g. .*{rejected.name}"):
    convert.export_npz(path, tmp_path / "a.npz", step=4)
  with pytest.raises(CheckpointError, match=rf"no checkpoint in .*rejected; rejected "
                     rf"checkpoints are kept in .*rejected \(1\).*{rejected.name}"):
    convert.export_npz(path / "rejected", tmp_path / "a.npz")
  with pytest.raises(ConfigError, match=r"--step=2: --checkpoint_dir .* is the rejected "
                     r"checkpoint of step 4"):
    convert.export_npz(rejected, tmp_path / "a.npz", step=2)
  with pytest.raises(CheckpointError, match=r"no checkpoint for step 3 .*\(steps: \[2\]\)$"):
    convert.export_npz(path, tmp_path / "a.npz", step=3)
  assert not (tmp_path / "a.npz").exists()


def test_the_script_exports_a_rejected_step(rolled_back, tmp_path):
  _, rejected, _, _ = rolled_back
  out = run_script("convert_checkpoint.py", f"--checkpoint_dir={rejected}",
                   f"--output={tmp_path / 'a.npz'}", "--format=npz")
  assert out.returncode == 0, out.stderr
  assert f"wrote step 4 of {rejected}" in out.stdout


def test_a_rejected_step_given_by_a_relative_path_exports(rolled_back, tmp_path,
                                                          monkeypatch):
  """As the manager's warning names it, relative to the run's directory: orbax refused the
  relative path ('Checkpoint path should be absolute'), reported as a corrupt step."""
  path, rejected, _, _ = rolled_back
  monkeypatch.chdir(path)
  relative = f"rejected/{rejected.name}"
  assert convert.export_npz(relative, tmp_path / "a.npz") == 4
  assert convert.export_zarr(relative, tmp_path / "z", step=4) == 4
  step, _ = convert.export_checkpoint(relative, tmp_path / "w2" / "checkpoints")
  assert step == 4


def test_a_rejected_offloaded_step_reads_its_set_aside_snapshot(tmp_path):
  """An offloaded run's rejected checkpoint exports its whole table from the snapshot the
  manager set aside with it (`offload_snapshots/rejected/<name>`)."""
  from tests.checkpoint.test_convert import _offloaded_run
  snaps, _, _, want = _offloaded_run(tmp_path)
  checkpoints = tmp_path / "w" / "checkpoints"
  name = "5.superseded.1"
  (checkpoints / "rejected").mkdir()
  (checkpoints / "5").rename(checkpoints / "rejected" / name)   # as `_reject` moves them
  (snaps / "rejected").mkdir()
  (snaps / "5").rename(snaps / "rejected" / name)
  convert.export_npz(checkpoints / "rejected" / name, tmp_path / "a.npz")
  with np.load(tmp_path / "a.npz") as z:
    np.testing.assert_array_equal(z["tables/t0"], want["table"])
    np.testing.assert_array_equal(z["table_opt/t0/accum"], want["opt.accum"])
  shutil.rmtree(snaps / "rejected")
  with pytest.raises(CheckpointError, match=rf"no offload snapshot 'rejected/{name}' \(looked "
                     rf"in .*offload_snapshots"):
    convert.export_npz(checkpoints / "rejected" / name, tmp_path / "b.npz")


def test_a_step_directory_holding_another_step_is_not_exported_under_its_name(rolled_back,
                                                                              tmp_path):
  """A step directory copied by hand (`cp -r 2 6`) holds step 2: exporting "step 6" would
  record the wrong step (and a copied-back checkpoint would then be rejected). The latest
  valid step falls back past it, `--step=6` is refused, and once the restore has moved it
  to rejected/ it exports as the step it holds."""
  path, _, coll, _ = rolled_back
  work = tmp_path / "checkpoints"
  shutil.copytree(path, work, ignore=shutil.ignore_patterns("rejected"))
  shutil.copytree(work / "2", work / "6")
  assert convert.export_npz(work, tmp_path / "a.npz") == 2
  with pytest.raises(CheckpointError, match=r"checkpoint .*6 is corrupt: .*6 holds step 2, "
                     r"not step 6; pick another --step"):
    convert.export_npz(work, tmp_path / "b.npz", step=6)
  assert not (tmp_path / "b.npz").exists()
  with CheckpointManager(work) as mgr:
    mgr.restore(h.train_state(coll), coll)
  (rejected,) = (work / "rejected").iterdir()
  assert rejected.name.startswith("6.corrupt.")
  assert convert.export_npz(rejected, tmp_path / "c.npz") == 2
  with np.load(tmp_path / "c.npz") as z:
    assert int(z["step"]) == 2
  with pytest.raises(ConfigError, match=r"--step=6: .* is the rejected checkpoint of step 2"):
    convert.export_npz(rejected, tmp_path / "d.npz", step=6)


def test_a_corrupt_rejected_checkpoint_names_the_kept_steps_not_another_step(rolled_back,
                                                                            tmp_path):
  """A rejected directory holds one step: its fingerprint error may not end in a bare
  "pick another --step" (there is none there), but names the kept steps to export."""
  path, rejected, _, _ = rolled_back
  work = tmp_path / "checkpoints"
  shutil.copytree(path, work)
  copy = work / "rejected" / rejected.name
  (chunk, *_) = sorted(p for p in (copy / "embeddings" / "tables").rglob("*")
                       if p.is_file() and not p.name.startswith("."))
  data = bytearray(chunk.read_bytes())
  data[len(data) // 2] ^= 0xFF
  chunk.write_bytes(bytes(data))
  with pytest.raises(CheckpointError) as info:
    convert.export_npz(copy, tmp_path / "a.npz")
  message = str(info.value)
  assert "fails its fingerprint check" in message and not message.endswith("--step"), message
  assert message.endswith(f"{copy} is a rejected checkpoint (one step only); kept steps in "
                          f"{work}: 2"), message
  (copy / "meta" / "metadata").unlink()   # a file missing: found by the step check, which
  with pytest.raises(CheckpointError) as info:   # ran before the kept steps were named
    convert.export_npz(copy, tmp_path / "b.npz")
  assert str(info.value).endswith(f"{copy} is a rejected checkpoint (one step only); kept "
                                  f"steps in {work}: 2"), info.value
