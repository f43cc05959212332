"""Conversions of the latest step while a run still saves into the directory."""

import shutil

import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointError, CheckpointManager, convert, offloaded
from tests.checkpoint import ckpt_helpers as h


@pytest.fixture(params=[1, 2])
def running(tmp_path, monkeypatch, request):
  """Steps 2 and 4 saved; the first (or second) offload-snapshot lookup of step 4 happens
  just as the run commits step 6 and rotates 4 out (keep 1): the gaps between picking the
  latest valid step and reading it."""
  coll = h.collection("rw", 8)
  path = tmp_path / "ckpt"
  with CheckpointManager(path) as mgr:
    for step in (2, 4):
      mgr.save(step, h.train_state(coll, seed=step, step=step), coll, force=True)
  real, calls = offloaded.snapshot_of, []

  def rotating(step_dir, *args, **kwargs):
    calls.extend([step_dir.name] if step_dir.name == "4" else [])
    if len(calls) == request.param and step_dir.name == "4" and step_dir.exists():
      with CheckpointManager(path, max_to_keep=1, async_save=False) as mgr:
        mgr.save(6, h.train_state(coll, seed=6, step=6), coll, force=True)
      shutil.rmtree(step_dir, ignore_errors=True)
    return real(step_dir, *args, **kwargs)

  monkeypatch.setattr(offloaded, "snapshot_of", rotating)
  return path


@pytest.mark.parametrize("fmt", ["npz", "zarr", "checkpoint"])
def test_the_latest_rotated_out_meanwhile_exports_the_new_latest(running, tmp_path, fmt):
  """Gave a FileNotFoundError traceback ('.../4/meta/metadata') every time a run saving
  often (`--checkpoint_every=2 --keep_checkpoints=1`) rotated the picked step out."""
  out = tmp_path / ("out" if fmt != "checkpoint" else "w2/checkpoints")
  step = {"npz": convert.export_npz, "zarr": convert.export_zarr,
          "checkpoint": lambda s, o: convert.export_checkpoint(s, o)[0]}[fmt](running, out)
  assert step == 6
  if fmt == "npz":
    with np.load(out) as z:
      assert int(z["step"]) == 6


def test_an_explicit_step_rotated_out_meanwhile_says_so(running, tmp_path):
  with pytest.raises(CheckpointError, match=r"ckpt/4 was deleted while it was being read"):
    convert.export_npz(running, tmp_path / "o.npz", step=4)
  assert not (tmp_path / "o.npz").exists()
