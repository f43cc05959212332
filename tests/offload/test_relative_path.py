"""A relative `OffloadTable.path` is relative to the current directory, as `--workdir` and
the data paths are: each checkpoint records the absolute store directory, and a resume from
another directory (where the same relative path names another store) says so, where it
silently trained a new store and left the old one behind."""

import logging
import os

import pytest

from jaxrec import offload
from jaxrec.checkpoint import storage
from tests.offload.offload_helpers import SMALL_DLRM, train_synthetic
from tests.offload.test_store_owner import _tier


def test_a_relative_path_is_the_current_directorys_and_a_moved_store_is_named(
    tmp_path, monkeypatch):
  w, a, b = tmp_path / "w", tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  monkeypatch.chdir(a)
  first = _tier(w, "stores/big")
  first._ensure_store()
  assert offload.store_paths(first) == {"big": {"path": str(a / "stores" / "big")}}
  meta = {"offload": {"tables": offload.store_paths(first)}}
  assert offload.warn_moved_stores(first, meta, "W/checkpoints/4", str(w)) == []
  monkeypatch.chdir(b)
  moved = _tier(w, "stores/big")
  (warning,) = offload.warn_moved_stores(moved, meta, "W/checkpoints/4", str(w))
  assert warning == (
      f"offloaded table 'big': checkpoint W/checkpoints/4 was saved with its store at "
      f"'{a}/stores/big', this run's is '{b}/stores/big' (a relative 'path' in OffloadConfig.tables is "
      f"relative to the current directory); its snapshot is restored into '{b}/stores/big', "
      f"and '{a}/stores/big' is no longer used (delete it by hand)")
  # a store moved on purpose (W/offload/big → an absolute path): no word of relative paths
  default = _tier(w)
  elsewhere = _tier(w, tmp_path / "ssd" / "big")
  (warning,) = offload.warn_moved_stores(elsewhere, {"offload": {"tables": offload.store_paths(
      default)}}, "W/checkpoints/4", str(w))
  assert warning.startswith(f"offloaded table 'big': checkpoint W/checkpoints/4 was saved "
                            f"with its store at '{w}/offload/big', this run's is "
                            f"'{tmp_path}/ssd/big'; its snapshot is restored into")
  # another workdir's store (a checkpoint copied or imported from it) is not reported
  other = _tier(tmp_path / "w2", "stores/big2")
  assert offload.warn_moved_stores(other, {"offload": {"tables": {
      "big": {"path": str(a / "stores" / "big")}}}}, "W2/checkpoints/4", str(tmp_path / "w2")
                                   ) == []
  for t in (first, moved, default, elsewhere, other):
    t.close()


@pytest.mark.slow
def test_a_resume_from_another_directory_names_both_stores(tmp_path, monkeypatch, caplog):
  w, a, b = tmp_path / "w", tmp_path / "a", tmp_path / "b"
  for d in (a, b):   # train_synthetic reads configs/dlrm_synthetic.gin
    d.mkdir()
    (d / "configs").symlink_to(os.path.abspath("configs"))
  bindings = SMALL_DLRM + ["OffloadConfig.tables={'t0': {'cache_rows': 4000, 'path': 's/t0'}}"]
  monkeypatch.chdir(a)
  with caplog.at_level(logging.INFO):
    train_synthetic(w, 4, bindings)
  assert (f"offloaded table 't0': store at {a}/s/t0 ('path' 's/t0' is relative to "
          "the current directory)") in caplog.text
  meta = storage.read_json(w / "checkpoints" / "4", "meta")
  assert meta["offload"]["tables"]["t0"]["path"] == str(a / "s" / "t0")
  monkeypatch.chdir(b)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    result = train_synthetic(w, 8, bindings)
  assert result["step"] == 8
  assert (f"checkpoint {w}/checkpoints/4 was saved with its store at '{a}/s/t0', this run's "
          f"is '{b}/s/t0'") in caplog.text


def test_an_old_store_another_table_now_uses_is_not_called_unused(tmp_path):
  """'big' moved from W/offload/big to another path and 'small' took W/offload/big: the
  warning called that directory 'no longer used (delete it by hand)'."""
  # pylint: disable-next=import-outside-toplevel
  from tests.offload.offload_helpers import experiment, mesh_of
  from jaxrec.embedding.collection import EmbeddingCollection  # pylint: disable=g-import-not-at-top
  from jaxrec.sharding.plan import uniform_plan  # pylint: disable=g-import-not-at-top
  w = tmp_path / "w"
  before = _tier(w)
  before._ensure_store()
  meta = {"offload": {"tables": offload.store_paths(before)}}   # big at W/offload/big
  before.close()
  cfg = experiment()
  off = offload.OffloadConfig((
      offload.OffloadTable("big", cache_rows=1000, chunk_rows=256, path=str(tmp_path / "p")),
      offload.OffloadTable("small", cache_rows=20, chunk_rows=256,
                           path=str(w / "offload" / "big"))), prefetch_depth=0)
  specs = offload.device_tables(cfg.tables, off, cfg.sparse_tx())
  collection = EmbeddingCollection.create(specs, cfg.features, uniform_plan("dp", specs, 1),
                                          mesh_of(), cfg.sparse_tx())
  after = offload.OffloadTier(collection, cfg.tables, off, key=offload.emb_init_key(0),
                              workdir=str(w))
  assert offload.warn_moved_stores(after, meta, "W/checkpoints/4", str(w)) == []
  after.close()
