"""Offload snapshots record their format version (`snapshots.FORMAT_VERSION`): one written by
a newer jaxrec is refused by name, leaving every file as it is, while those written before
the version existed still load; a missing array of a snapshot is named as such."""

import json
import os
import shutil

import pytest

import jaxrec
from jaxrec.checkpoint import convert
from jaxrec.embedding.specs import TableSpec
from jaxrec.errors import ConfigError, OffloadError
from jaxrec.offload import snapshots
from tests.offload.offload_helpers import (SMALL_DLRM, SNAPSHOT_OFFLOAD, logged_lines,
                                           train_synthetic, two_snapshots)

OFFLOAD = SNAPSHOT_OFFLOAD


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A workdir with t0 offloaded and checkpoints (and offload snapshots) of steps 10, 20."""
  return two_snapshots(tmp_path_factory, "format")


def _edit_meta(snapshot, edit):
  """Rewrites `<snapshot>/offload.json` with `edit(meta)` applied."""
  path = snapshot / snapshots.META
  meta = json.loads(path.read_text())
  edit(meta)
  path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def _file_bytes(root):
  """`{relative path: bytes}` of every file under `root`."""
  out = {}
  for here, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(here, name), "rb") as f:
        out[os.path.relpath(os.path.join(here, name), root)] = f.read()
  return out


def _spec(snaps):
  meta = snapshots.read_meta(f"{snaps}/20")["tables"]["t0"]
  return {"t0": TableSpec("t0", meta["rows"], meta["dim"])}


def test_every_snapshot_records_its_format_version(two_checkpoints):
  for step in (10, 20):
    meta = json.loads((two_checkpoints / "offload_snapshots" / str(step) /
                       snapshots.META).read_text())
    assert meta["format_version"] == snapshots.FORMAT_VERSION == 1


def test_a_snapshot_without_a_format_version_still_loads(two_checkpoints, tmp_path):
  """Snapshots written before the field existed (on users' disks) are read as version 1:
  opened directly, and resumed from."""
  w = shutil.copytree(two_checkpoints, tmp_path / "w")
  for step in (10, 20):
    _edit_meta(w / "offload_snapshots" / str(step), lambda m: m.pop("format_version"))
  snaps = str(w / "offload_snapshots")
  assert "format_version" not in snapshots.read_meta(f"{snaps}/20")
  assert sorted(snapshots.open_table(f"{snaps}/20", "t0")) == ["opt.accum", "table"]
  assert snapshots.locate(snaps, 20, _spec(snaps)) == f"{snaps}/20"
  train_synthetic(w, 25, SMALL_DLRM + OFFLOAD)
  resumes = [l for l in logged_lines(w) if l.get("event") == "resume"]
  assert [r["checkpoint_step"] for r in resumes] == [20]
  assert not (w / "checkpoints" / "rejected").exists()


def test_a_snapshot_of_a_newer_format_is_refused_and_left_as_it_is(two_checkpoints, tmp_path):
  """A newer jaxrec's snapshot (say, a new store format) used to fail in tensorstore
  ("... does not exist"), or make the restore fall back to an older step and move the newer
  checkpoints aside. Now the resume, the tier and conversion refuse it, naming the file
  and both versions, and no file changes."""
  w = shutil.copytree(two_checkpoints, tmp_path / "w")
  newer = snapshots.FORMAT_VERSION + 1
  _edit_meta(w / "offload_snapshots" / "20", lambda m: m.update(format_version=newer))
  meta_path = w / "offload_snapshots" / "20" / snapshots.META
  message = (rf"^{meta_path} was written by a newer jaxrec: offload snapshot format version "
             rf"{newer}, this jaxrec \({jaxrec.__version__}\) reads versions up to "
             rf"{snapshots.FORMAT_VERSION}\. Upgrade jaxrec to restore or convert its "
             r"checkpoint; the snapshot and the checkpoint are left as they are$")
  before = _file_bytes(w)
  with pytest.raises(ConfigError, match=message):
    train_synthetic(w, 30, SMALL_DLRM + OFFLOAD)
  snaps = str(w / "offload_snapshots")
  with pytest.raises(ConfigError, match=message):
    snapshots.locate(snaps, 20, _spec(snaps))
  with pytest.raises(ConfigError, match=message):
    snapshots.open_table(f"{snaps}/20", "t0")
  with pytest.raises(ConfigError, match=message):
    convert.export_npz(w / "checkpoints", tmp_path / "a.npz")
  assert not (tmp_path / "a.npz").exists()
  assert not (w / "checkpoints" / "rejected").exists()
  assert _file_bytes(w) == before
  # the older step's snapshot is still read, and is the one a save takes CRCs from
  assert sorted(snapshots.open_table(f"{snaps}/10", "t0")) == ["opt.accum", "table"]
  assert snapshots._newest_meta(snaps)["step"] == 10   # pylint: disable=protected-access


@pytest.mark.parametrize("version", ["2", 1.5, None])
def test_a_malformed_format_version_is_a_damaged_snapshot(two_checkpoints, tmp_path, version):
  w = shutil.copytree(two_checkpoints, tmp_path / "w")
  _edit_meta(w / "offload_snapshots" / "20", lambda m: m.update(format_version=version))
  with pytest.raises(OffloadError, match=rf"offload.json: format_version {version!r} is not a "
                     r"whole number: the snapshot is damaged"):
    snapshots.open_table(str(w / "offload_snapshots" / "20"), "t0")


@pytest.mark.parametrize("damage", ["array removed", "metadata removed"])
def test_a_missing_array_is_named(two_checkpoints, tmp_path, damage):
  """A snapshot without file lists (written before they existed) whose array directory,
  or its metadata, is gone: the error names the directory and what it is, where tensorstore
  said that `.../zarr.json` "does not exist"."""
  w = shutil.copytree(two_checkpoints, tmp_path / "w")
  snap = w / "offload_snapshots" / "20"
  _edit_meta(snap, lambda m: m["tables"]["t0"].pop("files"))
  array = snap / "t0" / "opt.accum"
  if damage == "array removed":
    shutil.rmtree(array)
    what = "is missing"
  else:
    os.remove(array / "zarr.json")
    what = r"has no array metadata \(\.zarray or zarr\.json\)"
  message = (rf"^offload snapshot {snap}: {array}, the tensorstore array 'opt.accum' of table "
             rf"'t0', {what}, though its offload.json lists it: the snapshot is damaged$")
  with pytest.raises(OffloadError, match=message):
    snapshots.open_table(str(snap), "t0")
  snaps = str(w / "offload_snapshots")
  with pytest.raises(OffloadError, match=message):
    snapshots.locate(snaps, 20, _spec(snaps))
