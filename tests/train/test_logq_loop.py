"""The logQ correction through the trainer: the bindings documented in
configs/two_tower_synthetic.gin work, and a resumed run keeps the item frequency estimate
(its losses are those of a run that never stopped)."""

import json
import os

import numpy as np
import pytest

from jaxrec import launch
from jaxrec.train import config as config_lib, loop

CONFIG = "configs/two_tower_synthetic.gin"


def documented_bindings():
  """The commented `TwoTower.*` lines of the config (`#   TwoTower.x = v  # ...`)."""
  with open(CONFIG) as f:
    lines = [l.lstrip("#").split("#")[0].strip() for l in f if l.startswith("#   TwoTower.")]
  assert any(l.startswith("TwoTower.logq_correction") for l in lines), lines
  return lines


def run(workdir, num_steps, batch_size=64, buckets=4096):
  launch.parse_gin([CONFIG], documented_bindings() + [
      f"ExperimentConfig.batch_size={batch_size}", "ExperimentConfig.eval_batch_size=256",
      "ExperimentConfig.num_eval_examples=256", f"TwoTower.logq_buckets={buckets}"])
  config = config_lib.ExperimentConfig()
  assert config.model.logq_correction and config.model.logq_alpha == 0.01
  options = config_lib.RunOptions(num_steps=num_steps, mesh="data=8", plan="dp",
                                  progress=False, log_every=1, checkpoint_every=2)
  loop.train_and_evaluate(config, options, str(workdir))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {l["step"]: l["loss"] for l in map(json.loads, f) if "loss" in l}


@pytest.mark.slow
def test_resume_keeps_the_estimate(tmp_path):
  straight = run(tmp_path / "a", 4)
  run(tmp_path / "b", 2)
  resumed = run(tmp_path / "b", 4)
  np.testing.assert_allclose([resumed[3], resumed[4]], [straight[3], straight[4]], rtol=1e-5)


def test_a_resume_with_another_batch_size_is_refused(tmp_path):
  """The estimate counts time in steps of the global batch: resumed at batch 128 after 64,
  its gaps were silently scaled (up to 2x in 10% of the buckets)."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  run(tmp_path, 2)
  with pytest.raises(ConfigError, match=r"^ExperimentConfig.batch_size = 128, but the "
                     r"checkpoint was trained with 64, and its item-frequency estimate"):
    run(tmp_path, 4, batch_size=128)
  with pytest.raises(ConfigError, match=r"^'item_freq' in checkpoint .* \(checkpoint: "
                     r"\[\(\[4096\], 'float32'\).*the logQ estimator's bucket count "
                     r"\(TwoTower.logq_buckets\) is not the one the checkpoint was trained "
                     r"with"):   # a bare shape mismatch
    run(tmp_path, 4, buckets=2048)
