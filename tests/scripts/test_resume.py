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

from tests import xla_env
from tests.scripts.test_train import ROOT, export, read_metrics, train

SMALL = ["ExperimentConfig.batch_size=48", "ExperimentConfig.eval_batch_size=96",
         "ExperimentConfig.num_eval_examples=96", "DLRM.bottom_mlp=(32,16)",
         "DLRM.top_mlp=(32,1)"]
FLAGS = ["--gin_file=configs/dlrm_synthetic.gin", "--log_every=5"] + [
    f"--gin_bindings={b}" for b in SMALL]


def assert_bitwise_equal(a, b):
  a, b = ({k: v for k, v in x.items() if k != "metadata"} for x in (a, b))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def start(workdir, *flags, devices=2):
  env = xla_env.script_env(devices)
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                           f"--workdir={workdir}", *flags], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def metadata(workdir):
  with np.load(os.path.join(workdir, "final.npz")) as z:
    return json.loads(str(z["metadata"]))


def test_kill9_mid_save_and_mid_step_resumes_bitwise_equal(tmp_path):
  """SIGKILL while checkpoint 14 is half written, then mid-step 25; each restart resumes
  from the last committed checkpoint (the slow target kills at random moments too)."""
  common = FLAGS + ["--num_steps=40", "--checkpoint_every=7", "--plan=rw", "--mesh=row=2"]
  ref = str(tmp_path / "ref")
  train(ref, *common, devices=2)
  w = str(tmp_path / "killed")
  env = xla_env.script_env(2)
  for point in ("save:14", "step:25"):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "kill_points.py"),
                           f"--workdir={w}", *common], env=dict(env, JAXREC_TEST_KILL=point),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    if point == "save:14":   # the half-written save is there, and not listed as a step
      names = os.listdir(os.path.join(w, "checkpoints"))
      assert "7" in names and "14" not in names
      assert any(n.startswith("14.") and "tmp" in n for n in names), names
  train(w, *common, devices=2)
  resumes = [l["checkpoint_step"] for l in read_metrics(w) if l.get("event") == "resume"]
  assert len(resumes) == 2 and resumes[0] == 7 and resumes[1] in (14, 21), resumes
  assert_bitwise_equal(export(w), export(ref))
  assert metadata(w)["data_state"] == metadata(ref)["data_state"]   # no example lost/repeated
  steps = [l["step"] for l in read_metrics(w) if "loss" in l]
  assert steps[-1] == 40


@pytest.mark.slow
@pytest.mark.parametrize("kills", [4])
def test_kill9_resume_is_bitwise_equal(tmp_path, kills):
  """SIGKILL at random moments (timer), restart each time."""
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


@pytest.mark.slow
def test_resume_on_other_mesh_and_plan(tmp_path):
  """8 devices rw → 4 devices tw → 6 devices (uneven) grid, same workdir. Slow target: the
  default suite resumes on other meshes in tests/checkpoint/test_reshard.py (in process) and
  tests/offload/test_move_tier.py (through the trainer)."""
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
  # Run again at the final step: nothing trains, the checkpoint is evaluated and reported.
  again = train(w, *FLAGS, "--num_steps=30", "--plan=grid", "--mesh=table=3,row=2", devices=6)
  assert "done: eval_auc=" in again.stdout and "step=30" in again.stdout, again.stdout
  assert len(read_metrics(w)) == len(lines) + 1   # only the resume event is added
  resume, final_eval = read_metrics(w)[-1], [l for l in lines if "eval_auc" in l][-1]
  assert resume["event"] == "resume" and resume["eval_auc"] == final_eval["eval_auc"]
  assert_bitwise_equal(export(w, "again"), final)
