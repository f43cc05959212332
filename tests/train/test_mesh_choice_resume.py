"""End to end: a converted copy resumed with --mesh=auto --plan=auto trains on the plan
and mesh it was converted for, and goes on as the original run does."""

import json

import numpy as np
import pytest

from jaxrec.checkpoint import convert
from tests.offload.offload_helpers import SMALL_DLRM, logged_losses, train_synthetic


@pytest.mark.slow
def test_converted_copy_resumes_on_its_recorded_plan(tmp_path, caplog):
  w, w2 = tmp_path / "w", tmp_path / "w2"
  train_synthetic(w, 10, SMALL_DLRM)                        # dp on data=8
  convert.export_checkpoint(w / "checkpoints", w2 / "checkpoints", None,
                            convert.parse_mesh("data=2,table=4"), "tw")
  with caplog.at_level("INFO"):
    train_synthetic(w2, 20, SMALL_DLRM, mesh="auto", plan="auto")
  written = json.loads((w2 / "plan.json").read_text())
  assert written["mesh"] == {"data": 2, "table": 4, "row": 1, "col": 1}
  assert written["mode"] == "checkpoint"
  assert {p["kind"] for p in written["plan"].values()} == {"tw"}
  assert "mesh data=2,table=4,row=1,col=1 (the plan and mesh checkpoint" in caplog.text
  train_synthetic(w, 20, SMALL_DLRM)
  got, want = logged_losses(w2), logged_losses(w)
  np.testing.assert_allclose([got[15], got[20]], [want[15], want[20]], rtol=0, atol=1e-6)
