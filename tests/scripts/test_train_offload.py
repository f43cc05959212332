"""Offloaded table through scripts/train.py: exact (S=0) vs on-device, and resume."""

import numpy as np

from tests.scripts.test_train import read_metrics, train

FLAGS = ["--gin_file=configs/dlrm_synthetic.gin", "--log_every=5", "--plan=dp",
         "--gin_bindings=ExperimentConfig.batch_size=128",
         "--gin_bindings=ExperimentConfig.num_eval_examples=4096"]
OFFLOAD = "--gin_bindings=OffloadConfig.tables={'t0': {'cache_rows': 20000}}"


def losses(workdir):
  return np.array([l["loss"] for l in read_metrics(workdir) if "loss" in l])


def test_offloaded_equals_on_device_and_resumes(tmp_path):
  on_device, offloaded, resumed = (str(tmp_path / n) for n in ("dev", "off", "resumed"))
  train(on_device, *FLAGS, "--num_steps=30")
  train(offloaded, *FLAGS, OFFLOAD, "--num_steps=30")
  np.testing.assert_allclose(losses(offloaded), losses(on_device), rtol=0, atol=1e-6)
  train(resumed, *FLAGS, OFFLOAD, "--num_steps=15", "--checkpoint_every=10")
  train(resumed, *FLAGS, OFFLOAD, "--num_steps=30", "--checkpoint_every=10")
  lines = read_metrics(resumed)
  assert [l["checkpoint_step"] for l in lines if l.get("event") == "resume"] == [15]
  np.testing.assert_allclose(losses(resumed)[-3:], losses(on_device)[-3:], rtol=0, atol=1e-6)
