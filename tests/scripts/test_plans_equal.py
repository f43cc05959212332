"""Every plan on 8 devices gives the 1-device run's losses (and tables), via scripts/train.py."""

import os

import numpy as np
import pytest

from tests.scripts.test_train import read_metrics, train

PLANS = [("dp", "data=8"), ("tw", "table=8"), ("rw", "row=8"), ("cw", "col=8"),
         ("twrw", "data=2,table=2,row=2"), ("twcw", "data=2,table=2,col=2"),
         ("grid", "table=2,row=2,col=2")]
SMALL = ["ExperimentConfig.batch_size=64", "ExperimentConfig.eval_batch_size=512",
         "ExperimentConfig.num_eval_examples=1024"]


def run(workdir, plan, mesh, devices):
  train(workdir, "--gin_file=configs/dlrm_synthetic.gin", "--num_steps=20", "--log_every=1",
        f"--plan={plan}", f"--mesh={mesh}", *[f"--gin_bindings={b}" for b in SMALL],
        devices=devices)
  return np.array([l["loss"] for l in read_metrics(workdir) if "loss" in l])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("ref") / "w")
  return w, run(w, "dp", "data=1", devices=1)


@pytest.mark.parametrize("plan,mesh", PLANS, ids=[p for p, _ in PLANS])
def test_plan_matches_single_device(tmp_path, reference, plan, mesh):
  ref_dir, ref_losses = reference
  losses = run(str(tmp_path / "w"), plan, mesh, devices=8)
  assert len(losses) == 20
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-4)
  assert os.path.exists(os.path.join(ref_dir, "metrics.jsonl"))
