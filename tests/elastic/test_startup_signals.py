"""SIGINT / SIGTERM while scripts/launch.py or scripts/train.py start: a clean stop at any
moment (exit 130 / 143, one line naming the checkpoint, no worker left).

The signal is sent by the script to itself at a chosen moment (a `-c` wrapper, no sleeps):
`import` while jaxlib's extension is being imported (it printed an ImportError traceback),
`gc` from inside a gc callback while the config loads (the handler's exception there was
swallowed, as in jax's `_xla_gc_callback`, and the run went on), `spawn` from a gc callback
just after the first worker started.
"""

import os
import signal
import subprocess
import sys

import pytest

from tests.elastic import elastic_testlib as t

_WRAPPER = r"""
import gc, importlib.abc, os, runpy, signal, sys
SIG, MOMENT, PIDS = getattr(signal, sys.argv[1]), sys.argv[2], sys.argv[3]
sys.argv = sys.argv[4:]
armed = []
def in_gc_callback(phase, info):   # the handler runs inside this callback
  if armed and phase == "start":
    armed.clear()
    os.kill(os.getpid(), SIG)
gc.callbacks.append(in_gc_callback)
def fire_in_gc():
  armed.append(1)
  gc.collect()
class AtImport(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "jaxlib._jax":
      sys.meta_path.remove(self)
      os.kill(os.getpid(), SIG)
    return None
if MOMENT == "import":
  sys.meta_path.insert(0, AtImport())
elif MOMENT == "gc":
  from jaxrec import launch
  parse_gin = launch.parse_gin
  def parse_gin_in_gc(*a):
    fire_in_gc()
    return parse_gin(*a)
  launch.parse_gin = parse_gin_in_gc
elif MOMENT == "spawn":
  from jaxrec.elastic import procs
  start_worker = procs.start_worker
  def start_then_signal(*a):
    popen = start_worker(*a)
    with open(PIDS, "a") as f:
      f.write(f"{popen.pid}\n")
    fire_in_gc()
    return popen
  procs.start_worker = start_then_signal
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(tmp_path, sig, moment, script, args):
  w, pids = tmp_path / "w", tmp_path / "pids"
  (w / "checkpoints" / "10").mkdir(parents=True)
  proc = subprocess.run(
      [sys.executable, "-c", _WRAPPER, sig.name, moment, str(pids),
       os.path.join(t.ROOT, "scripts", script), *args, f"--workdir={w}", *t.TINY,
       "--num_steps=40"],
      capture_output=True, text=True, env=t.env(), cwd=t.ROOT, timeout=300)
  assert proc.returncode == 128 + sig, proc.stderr[-3000:]
  where = os.path.join(w, "checkpoints")
  assert proc.stderr.splitlines()[-1] == (
      f"error: interrupted by {sig.name}. Stopping; the latest checkpoint is step 10 in "
      f"{where} (run the same command again to resume)."), proc.stderr[-3000:]
  return [int(p) for p in pids.read_text().split()] if pids.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("moment", ["import", "gc", "spawn"])
def test_a_signal_at_any_moment_of_the_launch_stops_it_cleanly(tmp_path, sig, moment):
  """Ctrl-C 1.5 s after start was swallowed in jax's gc callback (the job ran on), at 0.3 s
  an ImportError traceback; SIGTERM before the supervisor's loop killed the launcher with
  no line."""
  started = _run(tmp_path, sig, moment, "launch.py",
                 ["--quiet", "--num_processes=2",
                  f"--train_script={os.path.join(t.ROOT, 'tests', 'elastic', 'fake_train.py')}",
                  "--"])
  assert bool(started) == (moment == "spawn")
  for pid in started:   # the supervisor waited for them: reaped, gone
    assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived the launcher"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("moment", ["import", "gc"])
def test_a_signal_while_the_trainer_starts_stops_it_cleanly(tmp_path, sig, moment):
  """scripts/train.py alone: the same exposure while it imports and reads its config."""
  _run(tmp_path, sig, moment, "train.py", [])
