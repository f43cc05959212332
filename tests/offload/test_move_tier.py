"""A table moved between device and host between runs: the run resumes from the other
tier's checkpoint (on another mesh and plan) and continues as if nothing had moved."""

import json

import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointManager
from jaxrec.errors import CheckpointError
from jaxrec.offload import snapshots
from tests.offload.offload_helpers import SMALL_DLRM, logged_losses, train_synthetic
from tests.scripts.test_train import export

OFFLOAD = ["OffloadConfig.tables={'t0': {'cache_rows': 4000}}",
           "OffloadConfig.host_buffer_rows=600"]


def _run(workdir, num_steps, offloaded, mesh="data=8", plan="dp", extra=(), **options):
  bindings = SMALL_DLRM + (OFFLOAD if offloaded else []) + list(extra)
  return train_synthetic(workdir, num_steps, bindings, mesh, plan, **options)


# Both directions on the same legs; "device" first (the longer one) runs in the slow target.
@pytest.mark.parametrize("first", [pytest.param("device", marks=pytest.mark.slow), "host"])
def test_table_changes_tier_on_resume(tmp_path, first):
  """10 steps with t0 on `first`, then 10 on the other tier, on another mesh and plan;
  the reference never offloads (offloading is exact: tests/offload/test_exact.py)."""
  legs = [(10, "data=8", "dp"), (20, "data=2,row=4", "rw")]
  ref, w = tmp_path / "ref", tmp_path / "w"
  for num_steps, mesh, plan in legs:
    _run(ref, num_steps, False, mesh, plan)
  for (num_steps, mesh, plan), offloaded in zip(legs, [first == "host", first == "device"]):
    _run(w, num_steps, offloaded, mesh, plan)
  got, want = logged_losses(w), logged_losses(ref)
  for step in (5, 10, 15, 20):
    np.testing.assert_allclose(got[step], want[step], rtol=0, atol=1e-6, err_msg=step)
  a, b = export(w), export(ref)   # an offloaded table's whole arrays: from its snapshot
  for key in ("tables/t0", "table_opt/t0/accum", "tables/t1"):
    np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
  assert snapshots.steps(str(w / "offload_snapshots")) == [20 if first == "device" else 10]


@pytest.mark.slow
def test_auto_offload_on_a_smaller_budget_resumes(tmp_path):
  """`--plan=auto` with `OffloadConfig.auto`: a smaller memory budget (as after losing
  devices) makes the planner offload t0 and t1, which the checkpoint holds on the device."""
  ref, w = tmp_path / "ref", tmp_path / "w"
  for workdir, budget in ((ref, None), (w, 8 << 20)):
    _run(workdir, 10, False, plan="auto")
    _run(workdir, 20, False, plan="auto", extra=["OffloadConfig.auto=True"],
         memory_per_device=budget)
  plan = json.loads((w / "plan.json").read_text())
  assert "offloaded 't0'" in str(plan) and "offloaded 't1'" in str(plan)
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  assert mesh_choice.recorded(str(w)).offloaded == ("t0", "t1")   # a resume offloads them
  assert snapshots.steps(str(w / "offload_snapshots")) == [20]
  got, want = logged_losses(w), logged_losses(ref)
  np.testing.assert_allclose([got[15], got[20]], [want[15], want[20]], rtol=0, atol=1e-6)
  a, b = export(w), export(ref)
  for key in ("tables/t0", "tables/t1", "table_opt/t1/accum"):
    np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)


def test_a_table_that_fails_its_fingerprint_is_not_trained_offloaded(tmp_path):
  w = tmp_path / "w"
  _run(w, 10, offloaded=False)
  prints = w / "checkpoints" / "10" / "embeddings" / "fingerprints.0.json"
  saved = json.loads(prints.read_text())
  saved["tables/t0"] = (saved["tables/t0"] + 1) & 0xFFFFFFFF
  prints.write_text(json.dumps(saved))
  with pytest.raises(CheckpointError, match=r"step 10: ValueError: 'tables/t0' in "
                     ".*checkpoints/10/embeddings fails its fingerprint check"):
    _run(w, 20, offloaded=True)
  assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["10"]


def test_an_imported_checkpoint_trains_offloaded(tmp_path):
  """A tables-only checkpoint (what a TorchRec import writes; float16 here, widened to the
  configured float32) starts an offloaded run as it starts an on-device one."""
  rows = [100000, 50000, 20000, 10000, 5000, 2000, 1000, 500]   # configs/dlrm_synthetic.gin
  rng = np.random.default_rng(0)
  tables = {f"t{i}": (rng.standard_normal((n, 16)) * 0.01).astype(np.float16)
            for i, n in enumerate(rows)}
  for name in ("ref", "w"):
    with CheckpointManager(str(tmp_path / name / "checkpoints")) as mgr:
      mgr.save_arrays(0, tables)
  _run(tmp_path / "ref", 10, offloaded=False)
  _run(tmp_path / "w", 10, offloaded=True)
  got, want = logged_losses(tmp_path / "w"), logged_losses(tmp_path / "ref")
  np.testing.assert_allclose([got[5], got[10]], [want[5], want[10]], rtol=0, atol=1e-6)
  a, b = export(tmp_path / "w"), export(tmp_path / "ref")
  np.testing.assert_allclose(a["tables/t0"], b["tables/t0"], rtol=0, atol=1e-6)
