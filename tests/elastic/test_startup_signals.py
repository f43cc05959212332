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
import time

import pytest

from tests.elastic import elastic_testlib as t

_WRAPPER = r"""
import gc, importlib.abc, os, runpy, signal, sys
SIG, MOMENT, PIDS = getattr(signal, sys.argv[1].split("*")[0]), sys.argv[2], sys.argv[3]
TIMES = int((sys.argv[1].split("*") + ["1"])[1])   # SIGINT*2: twice in the same callback
sys.argv = sys.argv[4:]
armed = []
def in_gc_callback(phase, info):   # the handler runs inside this callback
  if armed and phase == "start":
    armed.clear()
    for _ in range(TIMES):
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
  def parse_gin_in_gc(*a, **kw):
    fire_in_gc()
    return parse_gin(*a, **kw)
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


def _run(tmp_path, sig, moment, script, args, again=""):
  """`again`: send the signal twice (the second exits at once; its line says `again`)."""
  w, pids = tmp_path / "w", tmp_path / "pids"
  (w / "checkpoints" / "10").mkdir(parents=True)
  proc = subprocess.run(
      [sys.executable, "-c", _WRAPPER, sig.name + ("*2" if again else ""), moment, str(pids),
       os.path.join(t.ROOT, "scripts", script), *args, f"--workdir={w}", *t.TINY,
       "--num_steps=40"],
      capture_output=True, text=True, env=t.env(), cwd=t.ROOT, timeout=300)
  assert proc.returncode == 128 + sig, proc.stderr[-3000:]
  where = os.path.join(w, "checkpoints")
  assert proc.stderr.splitlines()[-1] == (
      f"error: interrupted {'again ' if again else ''}by {sig.name}{again}. Stopping; the latest "
      f"checkpoint is step 10 in {where} (run the same command again to resume)."
  ), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
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


def _gone(pid: int, timeout: float = 10.0) -> bool:
  """Whether process `pid` ends (or is a zombie, dead but not reaped) within `timeout` s."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      with open(f"/proc/{pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
          return True
    except FileNotFoundError:
      return True
    time.sleep(0.05)
  return False


@pytest.mark.slow
def test_a_second_ctrl_c_exits_the_launcher_at_once_and_its_workers_die(tmp_path):
  """Two Ctrl-C in jax's gc callback: the second raised there was swallowed (and the first
  with it: the job ran on). Now the launcher exits at once, without waiting for its
  workers, which die with it (PR_SET_PDEATHSIG)."""
  started = _run(tmp_path, signal.SIGINT, "spawn", "launch.py",
                 ["--quiet", "--num_processes=2",
                  f"--train_script={os.path.join(t.ROOT, 'tests', 'elastic', 'fake_train.py')}",
                  "--"], again=" (exited at once; the workers are killed with the launcher)")
  assert started
  for pid in started:
    assert _gone(pid), f"worker {pid} outlived the launcher"


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_trainer_starts_exits_at_once(tmp_path):
  _run(tmp_path, signal.SIGINT, "gc", "train.py", [], again=" (exited at once)")
