"""Runs a script that sends itself SIGINT or SIGTERM at a chosen moment (no sleeps).

  JAXREC_TEST_SIGNAL=SIGINT:compile python tests/scripts/signal_points.py scripts/train.py ...

The signal is sent from inside a gc callback, where Python runs its handler: an exception
the handler raises there is printed as ignored (as in jax's `_xla_gc_callback`) and the
script goes on. `SIGINT*2:...` sends it twice there (the second exits at once);
`SIGTERM:setup,SIGTERM:line` sends one at each of two moments. Moments:

  compile    scripts/train.py: the first train step (its trace and XLA compile)
  eval       scripts/train.py: the first eval batch (of the first evaluation)
  restore    scripts/train.py: reading the first table block of a checkpoint restore; every
             block read takes JAXREC_TEST_BLOCK_DELAY s more (a big or slow checkpoint), and
             one `signal_points: block read` line goes to stderr per block
  records    scripts/preprocess.py: converting the first chunk's rows to records
  export     scripts/convert_checkpoint.py: reading the first array (npz, zarr)
  copy       scripts/convert_checkpoint.py --format=checkpoint: copying the step
  calibrate  scripts/plan.py --calibrate: timing the first primitive (quick sizes)
  workdir    scripts/train.py: the trainer's check of --workdir (the second call of
             `workdir_checks.check_workdir`, in `train_and_evaluate` before it takes SIGTERM over)
  setup      scripts/train.py: the trainer's mesh and plan (`loop.setup`)
  line       scripts/train.py: composing its `error: interrupted ...` line
             (`procs.checkpoint_text`)
"""

import functools
import gc
import importlib
import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

_armed = []


def _send_in_gc(phase, info):  # pylint: disable=unused-argument
  if _armed and phase == "start":
    sig, times = _armed.pop()
    print(f"signal_points: {sig.name} at {time.time():.3f}", file=sys.stderr, flush=True)
    for _ in range(times):
      os.kill(os.getpid(), sig)


def _during_call(fn, sig, nth: int = 1):
  """`fn`, whose `nth` call sends `sig` at the first gc inside it (or right after it)."""
  calls = []

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    calls.append(1)
    if len(calls) != nth:
      return fn(*args, **kwargs)
    _armed.append(sig)
    try:
      return fn(*args, **kwargs)
    finally:
      if _armed:   # no gc ran inside: one now
        gc.collect()
  return wrapped


def _slowed(read, delay: float):
  """`read` (checkpoint.tables._read_block) taking `delay` s more per call."""
  @functools.wraps(read)
  def slow(*args, **kwargs):
    time.sleep(delay)
    print("signal_points: block read", file=sys.stderr, flush=True)
    return read(*args, **kwargs)
  return slow


def _patch(module: str, name: str, make) -> None:
  mod = importlib.import_module(module)
  setattr(mod, name, make(getattr(mod, name)))


def _arm(entry: str) -> None:
  """Patches the moment of one `SIG[*TIMES]:MOMENT` entry to send its signal."""
  sig_name, _, moment = entry.partition(":")
  sig_name, _, times = sig_name.partition("*")
  sig = (signal.Signals[sig_name], int(times or 1))
  first = functools.partial(_during_call, sig=sig)
  if moment == "compile":   # the step function that make_train_step returns
    _patch("jaxrec.train.step", "make_train_step",
           lambda make: lambda *a, **k: first(make(*a, **k)))
  elif moment == "eval":
    _patch("jaxrec.train.step", "make_eval_step",
           lambda make: lambda *a, **k: first(make(*a, **k)))
  elif moment == "restore":
    delay = float(os.environ.get("JAXREC_TEST_BLOCK_DELAY", "0"))
    _patch("jaxrec.checkpoint.tables", "_read_block", lambda read: first(_slowed(read, delay)))
  elif moment == "records":
    _patch("jaxrec.data.binary", "to_records", first)
  elif moment == "export":
    _patch("jaxrec.checkpoint.convert", "_read_blocks", first)
  elif moment == "copy":
    _patch("jaxrec.tree_copy", "_copy_file", first)
  elif moment == "calibrate":
    _patch("jaxrec.planner", "calibrate",
           lambda cal: first(lambda n: cal(n, quick=True, reps=1)))
  elif moment == "workdir":
    _patch("jaxrec.train.workdir_checks", "check_workdir", lambda check: first(check, nth=2))
  elif moment == "setup":
    _patch("jaxrec.train.loop", "setup", first)
  elif moment == "line":
    _patch("jaxrec.elastic.procs", "checkpoint_text", first)
  else:
    raise SystemExit(f"signal_points: unknown moment {moment!r}")


def main():
  gc.callbacks.append(_send_in_gc)
  for entry in os.environ["JAXREC_TEST_SIGNAL"].split(","):
    _arm(entry)
  script = os.path.join(ROOT, sys.argv[1])
  sys.argv = [script] + sys.argv[2:]
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main()
