"""Offload snapshots carry file lists (sizes, CRC32s); a damaged snapshot is refused at
restore, so the run falls back to the previous checkpoint instead of failing mid-training."""

import logging
import os
import shutil

import numpy as np
import pytest

from jaxrec.checkpoint import convert
from jaxrec.errors import CheckpointError, ConfigError, OffloadError
from jaxrec.offload import integrity, snapshots
from jaxrec.offload.store import TableStore
from tests.offload.offload_helpers import (SMALL_DLRM, SNAPSHOT_OFFLOAD, logged_lines,
                                           train_synthetic, two_snapshots)

OFFLOAD = SNAPSHOT_OFFLOAD


def _tree(root, files):
  for rel, data in files.items():
    os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
    with open(os.path.join(root, rel), "wb") as f:
      f.write(data)


def _replace(path, data):
  """Writes `data` to a new file renamed over `path` (a new inode: the damage stays in
  this snapshot, not in the others that hard-link the old file)."""
  with open(f"{path}.new", "wb") as f:
    f.write(data)
  os.replace(f"{path}.new", path)


def test_file_list_and_verify_find_every_kind_of_damage(tmp_path):
  root = str(tmp_path / "t")
  _tree(root, {"table/.zarray": b"{}", "table/0.0": b"a" * 100, "table/1.0": b"b" * 100})
  files = integrity.file_list(root)
  assert sorted(files) == ["table/.zarray", "table/0.0", "table/1.0"]
  assert files["table/0.0"]["size"] == 100
  integrity.verify(root, files, full=True)
  cases = {
      "truncated": (lambda p: _replace(p, b"a" * 60), r"0\.0 has 60 bytes, 100 when saved"),
      "changed": (lambda p: _replace(p, b"c" * 100), r"0\.0 differs from what was saved"),
      "missing": (os.remove, r"0\.0 is missing"),
  }
  for name, (damage, message) in cases.items():
    copy = str(tmp_path / name)
    shutil.copytree(root, copy)
    damage(os.path.join(copy, "table", "0.0"))
    with pytest.raises(OffloadError, match=message):
      integrity.verify(copy, files, full=True)
  # a same-size change passes the cheap check (sizes only), not the full one
  integrity.verify(str(tmp_path / "changed"), files, full=False)
  _tree(root, {"table/2.0": b"x"})
  with pytest.raises(OffloadError, match=r"2\.0 was not part of the snapshot"):
    integrity.verify(root, files, full=False)
  _tree(root, {"table/3.0.__lock": b""})   # lock files are never listed nor refused
  os.remove(os.path.join(root, "table", "2.0"))
  integrity.verify(root, files, full=True)


def test_an_unchanged_file_keeps_the_previous_crc(tmp_path, monkeypatch):
  """A file hard-linked from the previous snapshot (same inode, size, mtime) is not read
  again; a replaced one is."""
  old, new = str(tmp_path / "old"), str(tmp_path / "new")
  _tree(old, {"a": b"1" * 10, "b": b"2" * 10})
  before = integrity.file_list(old)
  os.makedirs(new)
  os.link(os.path.join(old, "a"), os.path.join(new, "a"))
  _tree(new, {"b": b"3" * 10})
  read = []
  real = integrity.crc32_of
  monkeypatch.setattr(integrity, "crc32_of", lambda p: read.append(os.path.basename(p)) or real(p))
  after = integrity.file_list(new, before)
  assert read == ["b"]
  assert after["a"]["crc32"] == before["a"]["crc32"] != after["b"]["crc32"]
  integrity.verify(new, after, full=True)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A workdir with t0 offloaded and checkpoints (and offload snapshots) of steps 10, 20."""
  return two_snapshots(tmp_path_factory, "integrity")


def _changed_chunk(w):
  """A data file of t0's table in snapshot 20 that differs from snapshot 10's (zarr3:
  `c/<i>/0`, a shard of chunks)."""
  snaps = w / "offload_snapshots"
  root = snaps / "20" / "t0" / "table"
  for new in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "zarr.json"):
    old = snaps / "10" / "t0" / "table" / new.relative_to(root)
    if not old.exists() or not os.path.samefile(new, old):
      return new
  raise AssertionError("no chunk changed between steps 10 and 20")


@pytest.mark.parametrize("damage", ["truncated", "same size"])
def test_a_damaged_snapshot_falls_back_to_the_previous_checkpoint(two_checkpoints, tmp_path,
                                                                  damage):
  """A chunk of the newest snapshot is truncated (or changed, same size): the restart
  refuses checkpoint 20, moves it (and its snapshot) aside, resumes from 10 and trains to
  30, where it used to resume from 20 and fail reading the store mid-training."""
  w = shutil.copytree(two_checkpoints, tmp_path / "w")
  chunk = _changed_chunk(w)
  data = chunk.read_bytes()
  _replace(chunk, data[:len(data) // 2] if damage == "truncated" else bytes(len(data)))
  train_synthetic(w, 30, SMALL_DLRM + OFFLOAD)
  rejected = os.listdir(w / "checkpoints" / "rejected")
  assert len(rejected) == 1 and rejected[0].startswith("20.corrupt."), rejected
  assert (w / "offload_snapshots" / "rejected" / rejected[0] / "t0").is_dir()
  resumes = [l for l in logged_lines(w) if l.get("event") == "resume"]
  assert [r["checkpoint_step"] for r in resumes] == [10]
  assert snapshots.steps(str(w / "offload_snapshots")) == [10, 20, 30]
  assert np.isfinite([l["loss"] for l in logged_lines(w) if "loss" in l]).all()
  # the rejected step can still be exported, but not with its damaged table
  with pytest.raises(CheckpointError, match=rf"/{chunk.name} (has \d+ bytes|differs from).* "
                     r"the snapshot is damaged; .* is a rejected checkpoint \(one step only\); "
                     r"kept steps in .*checkpoints: 10, 20, 30$"):
    convert.export_npz(w / "checkpoints" / "rejected" / rejected[0], tmp_path / "a.npz")


def test_a_damaged_snapshot_is_refused_by_the_tier_and_by_conversion(two_checkpoints, tmp_path):
  """Reading the damaged snapshot directly: `open_table` (conversion, restores onto the
  device) checks CRCs, `locate` (the tier's restore) sizes; both name the file."""
  w = shutil.copytree(two_checkpoints, tmp_path / "w")
  chunk = _changed_chunk(w)
  _replace(chunk, chunk.read_bytes()[:-4])
  snaps = str(w / "offload_snapshots")
  with pytest.raises(OffloadError, match=rf"{chunk.name} has \d+ bytes, \d+ when saved"):
    snapshots.open_table(f"{snaps}/20", "t0")
  from jaxrec.embedding.specs import TableSpec
  meta = snapshots._newest_meta(snaps)["tables"]["t0"]   # pylint: disable=protected-access
  with pytest.raises(OffloadError, match=r"the snapshot is damaged"):
    snapshots.locate(snaps, 20, {"t0": TableSpec("t0", meta["rows"], meta["dim"])})
  assert sorted(snapshots.open_table(f"{snaps}/10", "t0")) == ["opt.accum", "table"]


def test_sizes_only_checks_skip_the_read(two_checkpoints, tmp_path):
  """`OffloadConfig.snapshot_check='sizes'` reads no file at restore: a same-size change
  of rows goes unnoticed (the run resumes from 20), a truncation does not. (The change
  leaves the file's chunk index, at its end, alone: tensorstore checks the index's own
  CRC32C on each read.)"""
  w = shutil.copytree(two_checkpoints, tmp_path / "w")
  chunk = _changed_chunk(w)
  data = chunk.read_bytes()
  _replace(chunk, bytes(len(data) // 2) + data[len(data) // 2:])
  sizes = OFFLOAD + ["OffloadConfig.snapshot_check='sizes'"]
  train_synthetic(w, 25, SMALL_DLRM + sizes)
  resumes = [l for l in logged_lines(w) if l.get("event") == "resume"]
  assert [r["checkpoint_step"] for r in resumes] == [20]
  with pytest.raises(ConfigError, match=r"OffloadConfig.snapshot_check must be one of "
                     r"\('full', 'sizes'\), got 'crc'"):
    train_synthetic(w, 30, SMALL_DLRM + OFFLOAD + ["OffloadConfig.snapshot_check='crc'"])


def _file_stats(root):
  return {os.path.relpath(os.path.join(d, n), root): os.stat(os.path.join(d, n)).st_mtime_ns
          for d, _, names in os.walk(root) for n in names}


def test_a_copied_workdir_without_its_snapshots_does_not_read_the_originals(two_checkpoints,
                                                                            tmp_path):
  """The checkpoints record where their snapshots were saved (the original workdir): a
  copy of the workdir without `offload_snapshots` restored the original's, which that run
  may since have replaced (a re-saved step) or pruned. The copy is refused, naming both
  directories; the original is untouched. Copied with its snapshots, it resumes."""
  w, copy = two_checkpoints, tmp_path / "copy"
  shutil.copytree(w, copy, ignore=shutil.ignore_patterns("offload_snapshots"))
  before = _file_stats(w)
  with pytest.raises(ConfigError, match=rf"{copy}/offload_snapshots has no offload snapshot of "
                     rf"step 20; the one in {w}/offload_snapshots is another workdir's"):
    train_synthetic(copy, 30, SMALL_DLRM + OFFLOAD)
  assert not (copy / "checkpoints" / "rejected").exists()   # no fallback, nothing moved
  assert _file_stats(w) == before
  shutil.copytree(w / "offload_snapshots", copy / "offload_snapshots")
  train_synthetic(copy, 25, SMALL_DLRM + OFFLOAD)
  resumes = [l for l in logged_lines(copy) if l.get("event") == "resume"]
  assert [r["checkpoint_step"] for r in resumes] == [20]
  assert _file_stats(w) == before


def test_a_store_deleted_during_the_run_stops_it_and_the_resume_is_clean(two_checkpoints,
                                                                         tmp_path, monkeypatch,
                                                                         caplog):
  """`rm -rf W/offload/t0` while a run trained: its rows read as zeros, every later
  checkpoint hard-linked the damaged store (chunks, no metadata) and rotation deleted the
  good snapshots; the resume was then refused ('not an offload store'), and after deleting
  the store every step was 'NOT_FOUND'. Now the first checkpoint after the deletion stops
  the run and saves nothing; the same command resumes from the last good step."""
  from jaxrec.offload import store as store_lib  # pylint: disable=import-outside-toplevel
  w = shutil.copytree(two_checkpoints, tmp_path / "w")
  real = store_lib.TableStore.snapshot

  def deleted_first(self, dst):
    shutil.rmtree(self.path)            # as `rm -rf`; write-backs then made chunk files
    for name in self.names:             # without metadata (tensorstore writes no zarr.json)
      os.makedirs(os.path.join(self.path, name, "c", "0"))
      with open(os.path.join(self.path, name, "c", "0", "0"), "wb") as f:
        f.write(b"\0" * 64)
    monkeypatch.setattr(store_lib.TableStore, "snapshot", real)
    return real(self, dst)
  monkeypatch.setattr(store_lib.TableStore, "snapshot", deleted_first)
  with pytest.raises(OffloadError, match=r"offloaded table 't0': its store '.*/offload/t0' "
                     r"lost the metadata of its arrays 'table', 'opt.accum' during the run "
                     r"\(deleted or moved\?\).* rerun the same command to resume"):
    train_synthetic(w, 40, SMALL_DLRM + OFFLOAD)
  assert snapshots.steps(str(w / "offload_snapshots")) == [10, 20]
  assert sorted(int(s) for s in os.listdir(w / "checkpoints") if s.isdigit()) == [10, 20]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train_synthetic(w, 30, SMALL_DLRM + OFFLOAD)
  assert "its store directory" in caplog.text and "lost its OWNER file" in caplog.text
  resumes = [l for l in logged_lines(w) if l.get("event") == "resume"]
  assert [r["checkpoint_step"] for r in resumes][-1] == 20
  assert snapshots.steps(str(w / "offload_snapshots")) == [10, 20, 30]
  assert np.isfinite([l["loss"] for l in logged_lines(w) if "loss" in l]).all()


def _damaged_at_fifth_read(monkeypatch, damage):
  """Patches `TableStore.read` to call `damage(store)` before its fifth read (a store
  damaged between two steps); returns the sizes of the reads so far and the real method."""
  real, reads = TableStore.read, []

  def damaged_at_fifth_read(self, rows):
    reads.append(len(rows))
    if len(reads) == 5:
      damage(self)
    return real(self, rows)
  monkeypatch.setattr(TableStore, "read", damaged_at_fifth_read)
  return reads, real


def test_a_store_deleted_between_steps_stops_the_run_at_its_next_read(two_checkpoints,
                                                                      tmp_path, monkeypatch):
  """A store deleted while the run trains (not only just before a checkpoint) stops the
  run at the next read of its rows, instead of training on zeros until the next
  checkpoint; nothing is saved and the same command resumes from the last good step."""
  w = shutil.copytree(two_checkpoints, tmp_path / "w")
  reads, real = _damaged_at_fifth_read(   # as `rm -rf W/offload/t0` between two steps
      monkeypatch, lambda store: shutil.rmtree(store.path))
  with pytest.raises(OffloadError, match=r"offloaded table 't0': its store '.*/offload/t0' "
                     r"lost the metadata of its arrays 'table', 'opt.accum' during the run "
                     r"\(deleted or moved\?\): its rows can no longer be read, and the run "
                     r"stops before training on them; rerun the same command to resume"):
    train_synthetic(w, 40, SMALL_DLRM + OFFLOAD)
  assert len(reads) < 10                # stopped at that read, not at the next checkpoint
  assert sorted(int(s) for s in os.listdir(w / "checkpoints") if s.isdigit()) == [10, 20]
  monkeypatch.setattr(TableStore, "read", real)
  train_synthetic(w, 30, SMALL_DLRM + OFFLOAD)
  resumes = [l for l in logged_lines(w) if l.get("event") == "resume"]
  assert [r["checkpoint_step"] for r in resumes][-1] == 20
  assert np.isfinite([l["loss"] for l in logged_lines(w) if "loss" in l]).all()


def test_a_chunk_file_deleted_during_the_run_stops_it_before_it_is_saved(two_checkpoints,
                                                                        tmp_path, monkeypatch):
  """`rm W/offload/t0/table/c.0.0` while a run trained: its rows read as zeros, the next
  write-back recreated the file with only the rows it wrote, and the run ended with exit 0
  and every kept checkpoint built on the zeros. Now the next write-back (or snapshot) stops
  the run naming the file; nothing is saved and the same command resumes from the last
  good step."""
  w = shutil.copytree(two_checkpoints, tmp_path / "w")
  chunk = sorted(f for f in os.listdir(w / "offload" / "t0" / "table") if f.startswith("c"))[0]
  _, real = _damaged_at_fifth_read(
      monkeypatch, lambda store: os.remove(os.path.join(store.path, "table", chunk)))
  with pytest.raises(OffloadError, match=rf"offloaded table 't0': 1 file\(s\) of its store "
                     rf"'.*/offload/t0' disappeared during the run \(deleted\?\), e.g. "
                     rf".*/offload/t0/table/{chunk}: their rows read as zeros.* rerun the same "
                     r"command to resume"):
    train_synthetic(w, 40, SMALL_DLRM + OFFLOAD)
  assert sorted(int(s) for s in os.listdir(w / "checkpoints") if s.isdigit()) == [10, 20]
  assert snapshots.steps(str(w / "offload_snapshots")) == [10, 20]
  monkeypatch.setattr(TableStore, "read", real)
  train_synthetic(w, 30, SMALL_DLRM + OFFLOAD)
  resumes = [l for l in logged_lines(w) if l.get("event") == "resume"]
  assert [r["checkpoint_step"] for r in resumes][-1] == 20
