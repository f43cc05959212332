"""SIGTERM (a preemption, a time limit): scripts/train.py saves a checkpoint of the step in
progress, says so, exits 143, and the same command resumes from that step. Before, it
died like SIGKILL and lost every step since the last checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests import xla_env
from tests.scripts.test_train import ROOT, read_metrics, train

FLAGS = ["--gin_file=configs/dlrm_synthetic.gin", "--plan=dp", "--log_every=5",
         "--eval_every=0", "--checkpoint_every=0", "--noprogress",
         "--gin_bindings=ExperimentConfig.batch_size=128",
         "--gin_bindings=ExperimentConfig.eval_batch_size=512",
         "--gin_bindings=ExperimentConfig.num_eval_examples=512"]


def _default_sighup():
  """In the child: SIGHUP at its default action (a suite run under `nohup` passes it on
  ignored, and train.py leaves an ignored SIGHUP alone)."""
  signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [
    signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)])   # as SIGTERM
def test_sigterm_checkpoints_the_step_and_the_same_command_resumes(tmp_path, signum):
  w = str(tmp_path / "w")
  env = xla_env.script_env(1)
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                           f"--workdir={w}", "--num_steps=100000", *FLAGS], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=_default_sighup)
  try:
    deadline = time.monotonic() + 300
    while not (os.path.exists(os.path.join(w, "metrics.jsonl"))
               and any("loss" in l for l in read_metrics(w))):   # compiled and training
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
      time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  name = signal.Signals(signum).name
  assert proc.returncode == 128 + signum, err[-2000:]
  assert "Traceback" not in err and "error:" not in err, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"stopped by {name} after step ") and "the same command resumes" in last
  step = int(last.split("after step ")[1].split(":")[0])
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == [str(step)]
  assert read_metrics(w)[-1] == {"step": step, "event": "terminated", "signal": name}
  train(w, f"--num_steps={step + 5}", *FLAGS, devices=1)
  lines = read_metrics(w)
  assert [l["checkpoint_step"] for l in lines if l.get("event") == "resume"] == [step]
  assert lines[-2]["step"] == lines[-1]["step"] == step + 5   # loss line, then the eval's
  assert "loss" in lines[-2] and "eval_auc" in lines[-1]


def test_a_second_sigterm_stops_at_once():
  """The first SIGTERM of a training run only asks for a checkpoint; a second one (a run
  stuck in a step or a save) exits at once (it killed the process without a line)."""
  code = ("import os, signal, time\n"
          "from jaxrec.train import termination\n"
          "with termination.sigterm_requests() as requested:\n"
          "  requested.training()\n"
          "  os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
          "  print('asked', requested.is_set(), flush=True)\n"
          "  os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
          "  print('still running', flush=True)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 143 and proc.stdout == "asked True\n", proc
  assert proc.stderr == "error: interrupted again by SIGTERM\n", proc
