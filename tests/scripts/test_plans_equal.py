"""Every plan on 8 devices gives the 1-device run's losses (and tables), via scripts/train.py."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.scripts.test_train import ROOT, read_metrics, train

PLANS = [("dp", "data=8"), ("tw", "table=8"), ("rw", "row=8"), ("cw", "col=8"),
         ("twrw", "data=2,table=2,row=2"), ("twcw", "data=2,table=2,col=2"),
         ("grid", "table=2,row=2,col=2")]
SMALL = ["ExperimentConfig.batch_size=64", "ExperimentConfig.eval_batch_size=512",
         "ExperimentConfig.num_eval_examples=1024"]


def run(workdir, plan, mesh, devices):
  """Trains 20 steps; returns (per-step losses, final tables exported to npz)."""
  train(workdir, "--gin_file=configs/dlrm_synthetic.gin", "--num_steps=20", "--log_every=1",
        f"--plan={plan}", f"--mesh={mesh}", *[f"--gin_bindings={b}" for b in SMALL],
        devices=devices)
  losses = np.array([l["loss"] for l in read_metrics(workdir) if "loss" in l])
  out = os.path.join(workdir, "final.npz")
  subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_checkpoint.py"),
                  f"--checkpoint_dir={workdir}/checkpoints", f"--output={out}", "--format=npz"],
                 check=True, capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  with np.load(out) as z:
    tables = {k: z[k] for k in z.files if k.startswith("tables/")}
  return losses, tables


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("ref") / "w")
  return w, run(w, "dp", "data=1", devices=1)


@pytest.mark.parametrize("plan,mesh", PLANS, ids=[p for p, _ in PLANS])
def test_plan_matches_single_device(tmp_path, reference, plan, mesh):
  _, (ref_losses, ref_tables) = reference
  losses, tables = run(str(tmp_path / "w"), plan, mesh, devices=8)
  assert len(losses) == 20
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-4)
  assert sorted(tables) == sorted(ref_tables) and len(tables) == 8
  for name, ref in ref_tables.items():
    np.testing.assert_allclose(tables[name], ref, rtol=0, atol=1e-5, err_msg=name)
