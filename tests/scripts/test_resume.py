"""Kill -9 and resume through scripts/train.py; resume on another mesh and plan."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.scripts.test_train import ROOT, read_metrics, train

SMALL = ["ExperimentConfig.batch_size=48", "ExperimentConfig.eval_batch_size=96",
         "ExperimentConfig.num_eval_examples=96", "DLRM.bottom_mlp=(32,16)",
         "DLRM.top_mlp=(32,1)"]
FLAGS = ["--gin_file=configs/dlrm_synthetic.gin", "--log_every=5"] + [
    f"--gin_bindings={b}" for b in SMALL]


def export(workdir, name="final"):
  out = os.path.join(workdir, f"{name}.npz")
  subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_checkpoint.py"),
                  f"--checkpoint_dir={workdir}/checkpoints", f"--output={out}", "--format=npz"],
                 check=True, capture_output=True)
  with np.load(out) as z:
    return {k: z[k] for k in z.files if k != "metadata"}


def assert_bitwise_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def start(workdir, *flags, devices=2):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                           f"--workdir={workdir}", *flags], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kills", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_kill9_resume_is_bitwise_equal(tmp_path, kills):
  common = FLAGS + ["--num_steps=60", "--checkpoint_every=7", "--plan=rw", "--mesh=row=2"]
  ref = str(tmp_path / "ref")
  train(ref, *common, devices=2)
  w = str(tmp_path / "killed")
  rnd = random.Random(kills)
  for _ in range(kills):
    proc = start(w, *common)
    time.sleep(rnd.uniform(4.0, 9.0))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
  train(w, *common, devices=2)       # resumes from whatever the kills left and finishes
  assert_bitwise_equal(export(w), export(ref))
  steps = [l["step"] for l in read_metrics(w) if "loss" in l]
  assert steps[-1] == 60


def test_resume_on_other_mesh_and_plan(tmp_path):
  """8 devices rw → 4 devices tw → 6 devices (uneven) grid, same workdir."""
  w = str(tmp_path / "w")
  train(w, *FLAGS, "--num_steps=10", "--plan=rw", "--mesh=row=8", devices=8)
  saved = export(w, "step10")
  train(w, *FLAGS, "--num_steps=20", "--plan=tw", "--mesh=table=2,data=2", devices=4)
  train(w, *FLAGS, "--num_steps=30", "--plan=grid", "--mesh=table=3,row=2", devices=6)
  lines = read_metrics(w)
  resumes = [l for l in lines if l.get("event") == "resume"]
  assert [r["checkpoint_step"] for r in resumes] == [10, 20]
  assert [l["step"] for l in lines if "loss" in l] == [5, 10, 15, 20, 25, 30]
  assert json.load(open(os.path.join(w, "plan.json")))["mesh"]["table"] == 3
  final = export(w)
  assert not np.array_equal(final["tables/t0"], saved["tables/t0"])   # it kept training
