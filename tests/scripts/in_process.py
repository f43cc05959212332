"""Runs a `scripts/*.py` command line in the test process, as a subprocess would run it.

A subprocess of scripts/preprocess.py spends ~3 s importing jax and flax before it reads a
flag; tests that check its flags and messages run it here instead (`run_script`), with the
same outcome: its exit code, what it printed to stdout and stderr (absl log lines
included), run from the repository root. What the script's `__main__` leaves in the
process is undone: the flags it defined, the signal handlers it deferred at import, the
working directory, absl's log handler (`restored_process_state`). Gin bindings are cleared by
tests/conftest.py after every test.
"""

import contextlib
import io
import logging
import os
import runpy
import signal
import subprocess
import sys

from absl import app  # noqa: F401  (its flags exist before a script's are noted)
from absl import flags
from absl import logging as absl_logging

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def restored_process_state():
  """Puts back sys.argv, the cwd, the stop signals' handlers and the root logger's handlers
  (absl's `app.run` adds its own), and removes new flags."""
  argv, cwd = sys.argv, os.getcwd()
  root = logging.getLogger()
  log_handlers, log_level = list(root.handlers), root.level
  handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  defined = set(flags.FLAGS)
  try:
    yield
  finally:
    sys.argv = argv
    os.chdir(cwd)
    root.handlers[:] = log_handlers
    root.setLevel(log_level)
    for s, handler in handlers.items():
      signal.signal(s, handler)
    for name in set(flags.FLAGS) - defined:
      if name in flags.FLAGS:   # a short name goes with its flag
        delattr(flags.FLAGS, name)


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
  """`python scripts/SCRIPT ARGS` from the repository root, in this process."""
  path = os.path.join(ROOT, "scripts", script)
  out, err = io.StringIO(), io.StringIO()
  handler = absl_logging.get_absl_handler().python_handler
  code = 0
  with restored_process_state(), contextlib.redirect_stdout(out), \
      contextlib.redirect_stderr(err):
    stream, handler.stream = handler.stream, err
    absl_logging.use_absl_handler()   # app.run adds it in its first call only
    os.chdir(ROOT)
    sys.argv = [path, *args]
    try:
      runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
    finally:
      handler.stream = stream
  return subprocess.CompletedProcess([path, *args], code, out.getvalue(), err.getvalue())
