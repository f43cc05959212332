"""Helpers for the elastic tests: run scripts/launch.py, wait for worker progress, read events."""

import json
import os
import signal
import subprocess
import sys
import time

from jaxrec.elastic import events as events_lib
from jaxrec.elastic import worker as worker_lib
from tests import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tiny DLRM run: 256 examples per step, small eval set, SGD 0.1 on the tables.
TINY = ["--gin_file=configs/dlrm_synthetic.gin",
        "--gin_bindings=ExperimentConfig.batch_size=256",
        "--gin_bindings=ExperimentConfig.eval_batch_size=512",
        "--gin_bindings=ExperimentConfig.num_eval_examples=1024",
        "--gin_bindings=SGD.lr=0.1", "--noprogress"]


def env(**extra):
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
  e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, e.get("PYTHONPATH")) if p)
  return e


def launch(workdir, launch_flags, train_flags, script=None, preexec_fn=None):
  """Starts scripts/launch.py (returns the Popen; stderr/stdout to W.launch.log)."""
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "launch.py"), "--quiet", *launch_flags,
         "--", f"--workdir={workdir}", *train_flags]
  if script:
    cmd = [sys.executable, script, *cmd[2:]]
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, "launch.log"), "w")
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=ROOT,
                          preexec_fn=preexec_fn)


def run_train(workdir, train_flags, devices):
  """scripts/train.py in one process with `devices` CPU devices."""
  e = env(XLA_FLAGS=xla_env.xla_flags(devices))
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--workdir={workdir}",
         *train_flags]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]


def events(workdir):
  path = os.path.join(workdir, "events.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def progress(workdir, process):
  """A worker's progress records (a torn last line is skipped)."""
  return events_lib.read_events(worker_lib.progress_path(workdir, process))


def last_step(workdir, process):
  return max([r.get("step", 0) for r in progress(workdir, process)] or [0])


def worker_pids(workdir, generation):
  for e in events(workdir):
    if e["event"] == "launch" and e["generation"] == generation:
      return e["pids"]
  return None


def wait_for(predicate, timeout, what, proc=None):
  t0 = time.time()
  while time.time() - t0 < timeout:
    value = predicate()
    if value:
      return value
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"launcher exited ({proc.returncode}) while waiting for {what}")
    time.sleep(0.1)
  raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_step(workdir, process, generation, step, timeout=600, proc=None):
  """Waits until `process` of `generation` reported `step`."""
  return wait_for(lambda: any(r.get("generation") == generation and r.get("step", 0) >= step
                              for r in progress(workdir, process)),
                  timeout, f"process {process} gen {generation} step {step}", proc)


def kill(pid, sig=signal.SIGKILL):
  os.kill(pid, sig)


def alive(pid):
  """True while `pid` runs (a zombie counts as dead)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return True


def finish(proc, timeout=900):
  try:
    return proc.wait(timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise


def names(evts):
  return [e["event"] for e in evts]


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def checkpoint_data_state(workdir, step):
  """The data iterator state saved with checkpoint `step`."""
  path = os.path.join(workdir, "checkpoints", str(step), "data_state", "metadata")
  with open(path) as f:
    return json.load(f)
