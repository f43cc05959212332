"""`W/checkpoints` and `W/offload` are named once (`jaxrec.workdir_layout`): the trainer's
checkpoint directory and results line, the supervisor's latest checkpoint and an offloaded
table's default store all follow that one definition (each had its own literal)."""

import os

from jaxrec import workdir_layout
from jaxrec.elastic import procs
from jaxrec.offload.config import OffloadTable
from jaxrec.train import data_adapter, loop


def test_every_user_of_the_workdir_layout_follows_its_one_definition(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_layout, "CHECKPOINTS_DIR", "ckpts")
  monkeypatch.setattr(workdir_layout, "OFFLOAD_DIR", "tier")
  monkeypatch.setattr(loop, "_OUTPUTS", ("ckpts/", "tier/"))   # built at import
  w = str(tmp_path)
  os.makedirs(os.path.join(w, "ckpts", "7"))
  os.makedirs(os.path.join(w, "tier"))
  assert data_adapter.checkpoint_dir(w) == os.path.join(w, "ckpts")
  assert data_adapter.newest_saved_step(w) == 7
  assert procs.latest_checkpoint(w) == 7
  assert OffloadTable("big", cache_rows=4).resolve_path(w) == os.path.join(w, "tier", "big")
  assert loop.outputs(w) == ["ckpts/", "tier/"]


def test_the_results_line_names_the_layouts_directories():
  assert f"{workdir_layout.CHECKPOINTS_DIR}/" in loop._OUTPUTS   # pylint: disable=protected-access
  assert f"{workdir_layout.OFFLOAD_DIR}/" in loop._OUTPUTS       # pylint: disable=protected-access
