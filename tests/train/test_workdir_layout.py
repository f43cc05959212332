"""`W/checkpoints`, `W/offload` and `W/offload_snapshots` are named once
(`jaxrec.workdir_layout`): the trainer's checkpoint directory and results line, the
supervisor's latest checkpoint, an offloaded table's default store and the snapshots the
trainer and the checkpoint tools find all follow that one definition (each had its own
literal)."""

import os

import pytest

from jaxrec import workdir_layout
from jaxrec.checkpoint import offloaded
from jaxrec.elastic import procs
from jaxrec.errors import ConfigError
from jaxrec.offload import owner
from jaxrec.offload.config import OffloadTable
from jaxrec.train import data_adapter, workdir_checks


def test_every_user_of_the_workdir_layout_follows_its_one_definition(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_layout, "CHECKPOINTS_DIR", "ckpts")
  monkeypatch.setattr(workdir_layout, "OFFLOAD_DIR", "tier")
  monkeypatch.setattr(workdir_layout, "SNAPSHOTS_DIR", "snaps")
  monkeypatch.setattr(workdir_checks, "_OUTPUTS", ("ckpts/", "tier/", "snaps/"))   # built at import
  w = str(tmp_path)
  os.makedirs(os.path.join(w, "ckpts", "7"))
  os.makedirs(os.path.join(w, "tier"))
  os.makedirs(os.path.join(w, "snaps"))
  assert data_adapter.checkpoint_dir(w) == os.path.join(w, "ckpts")
  assert data_adapter.newest_saved_step(w) == 7
  assert procs.latest_checkpoint(w) == 7
  assert OffloadTable("big", cache_rows=4).resolve_path(w) == os.path.join(w, "tier", "big")
  assert workdir_layout.snapshots_dir(w) == os.path.join(w, "snaps")
  beside = offloaded.snapshots_beside(data_adapter.checkpoint_dir(w))
  assert str(beside) == os.path.join(w, "snaps")
  assert workdir_checks.outputs(w) == ["ckpts/", "tier/", "snaps/"]


def test_the_results_line_names_the_layouts_directories():
  assert f"{workdir_layout.CHECKPOINTS_DIR}/" in workdir_checks._OUTPUTS   # pylint: disable=protected-access
  assert f"{workdir_layout.OFFLOAD_DIR}/" in workdir_checks._OUTPUTS       # pylint: disable=protected-access
  assert f"{workdir_layout.SNAPSHOTS_DIR}/" in workdir_checks._OUTPUTS     # pylint: disable=protected-access


def test_a_refused_store_names_the_layouts_default_path(tmp_path, monkeypatch):
  """The refusal of another workdir's store spelled the default `W/offload/<table>` itself."""
  monkeypatch.setattr(workdir_layout, "OFFLOAD_DIR", "tier")
  store, w = tmp_path / "ssd" / "big", os.path.realpath(tmp_path / "w")
  owner.claim({"big": str(store)}, str(tmp_path / "other"))
  with pytest.raises(ConfigError, match=f"leave it unset: '{os.path.join(w, 'tier', 'big')}'"):
    owner.claim({"big": str(store)}, w)
