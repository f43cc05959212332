"""convert_checkpoint --format=checkpoint and --torchrec_npz into a run's directory; a copy
that cannot be written."""

import os
import re
import shutil

import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointManager, convert
from jaxrec.errors import ConfigError, DataError
from tests.checkpoint import ckpt_helpers as h


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  coll = h.collection("rw", 4)
  path = tmp_path_factory.mktemp("w") / "checkpoints"
  with CheckpointManager(path) as mgr:
    mgr.save(4, h.train_state(coll, seed=2, step=4), coll, force=True)
  return path, coll


def _workdir(tmp_path):
  """Another run's directory W2 (its checkpoints/ and a file it wrote)."""
  w2 = tmp_path / "w2"
  (w2 / "checkpoints").mkdir(parents=True)
  (w2 / "metrics.jsonl").write_text("")
  return w2


def test_a_copy_into_a_runs_directory_is_refused(saved, tmp_path):
  """`--output=W2` (not W2/checkpoints) wrote W2/4 beside W2/checkpoints: no run read it,
  and train.py refused W2 as a checkpoint directory from then on."""
  path, _ = saved
  w2 = _workdir(tmp_path)
  with pytest.raises(ConfigError, match=rf"is a run's directory .* --output={w2}/checkpoints"):
    convert.export_checkpoint(path, w2)
  assert sorted(p.name for p in w2.iterdir()) == ["checkpoints", "metrics.jsonl"]
  assert convert.export_checkpoint(path, w2 / "checkpoints")[0] == 4


def test_an_import_into_a_runs_directory_is_refused(saved, tmp_path):
  """As for a copy: the import wrote W2/<step> beside W2/checkpoints."""
  _, coll = saved
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{t.name}.weight": np.zeros((t.rows, t.dim), np.float32)
                   for t in coll.tables})
  w2 = _workdir(tmp_path)
  with pytest.raises(ConfigError, match=rf"is a run's directory .* --output={w2}/checkpoints"):
    convert.import_torchrec(npz, w2, step=20)
  assert sorted(p.name for p in w2.iterdir()) == ["checkpoints", "metrics.jsonl"]
  assert convert.import_torchrec(npz, w2 / "checkpoints", step=20) == sorted(
      t.name for t in coll.tables)


def test_a_copy_onto_a_full_disk_is_one_line(saved, tmp_path, monkeypatch):
  """shutil.copytree gathers every file's error: the message was a list of ~20 (source,
  destination, reason) triples."""
  path, _ = saved

  def full(src, dst, **kwargs):
    raise OSError(28, "No space left on device", dst)
  monkeypatch.setattr(shutil, "copyfile", full)
  out = tmp_path / "w2" / "checkpoints"
  with pytest.raises(DataError) as e:
    convert.export_checkpoint(path, out)
  assert re.fullmatch(rf"--output: cannot write {out}/4: No space left on device \(copying "
                      rf"{path}/4/\S+, and \d+ more files\)", str(e.value)), str(e.value)
  assert not os.path.exists(tmp_path / "w2")
