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


def run(workdir, num_steps, batch_size=64, buckets=4096, extra=()):
  launch.parse_gin([CONFIG], documented_bindings() + [
      f"ExperimentConfig.batch_size={batch_size}", "ExperimentConfig.eval_batch_size=256",
      "ExperimentConfig.num_eval_examples=256", f"TwoTower.logq_buckets={buckets}", *extra])
  config = config_lib.ExperimentConfig()
  assert config.model.logq_alpha == 0.01
  assert config.model.logq_correction != ("TwoTower.logq_correction = False" in extra)
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


def test_an_offloaded_item_table_keeps_the_estimate_keyed_by_item(tmp_path):
  """The estimate was keyed by the batch's ids, which for an offloaded table are cache
  slots: a slot holds other items over time, and the losses left the on-device run's from
  step 2 (only 211 of ~15,000 buckets in common after 30 steps). Offloaded with no stale
  rows, the run is the on-device one, bit for bit."""
  on_device = run(tmp_path / "device", 6)
  offloaded = run(tmp_path / "offloaded", 6,
                  extra=["OffloadConfig.tables = {'t4': {'cache_rows': 1024}}"])
  assert os.path.isdir(tmp_path / "offloaded" / "offload" / "t4")
  assert offloaded == on_device


def test_a_correction_switched_on_at_a_resume_counts_from_there(tmp_path):
  """A checkpoint trained without the correction resumes with a fresh estimate: its first
  occurrences' gaps counted the examples since step 0 (4 steps here: up to 6 x 64 after 2
  more, not 2 x 64), so hot items' `log p` was nats too low for hundreds of steps."""
  from jaxrec.checkpoint import convert  # pylint: disable=import-outside-toplevel
  run(tmp_path / "w", 4, extra=["TwoTower.logq_correction = False"])
  run(tmp_path / "w", 6)
  convert.export_npz(tmp_path / "w" / "checkpoints", tmp_path / "w.npz")
  with np.load(tmp_path / "w.npz") as z:
    gap, last_step = z["item_freq/gap"], z["item_freq/last_step"]
  seen = gap > 0
  assert seen.sum() > 64 and gap[seen].max() <= 2 * 64, gap[seen].max()
  assert set(np.unique(last_step)) <= {4, 5}
