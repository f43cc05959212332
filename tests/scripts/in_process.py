"""Runs a `scripts/*.py` command line in the test process, as a subprocess would run it.

A subprocess of scripts/preprocess.py spends ~3 s importing jax and flax before it reads a
flag; tests that check its flags and messages run it here instead (`run_script`), with the
same outcome: its exit code, what it printed to stdout and stderr (absl log lines
included), run from the repository root with its folder first on `sys.path`. What the
script's `__main__` leaves in the process is undone: the flags it defined and the values it
gave absl's own (`--verbosity`), the signal handlers it deferred at import, the working
directory, `os.environ`, `sys.path` and the modules it imported from its own folder (a
benchmark's `common`), absl's log handler and its filters (`restored_process_state`). Gin
bindings are cleared by tests/conftest.py after every test.
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
import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# jax settings `jaxrec.compile_cache` changes (train.py), put back after a run in process
CACHE_CONFIG = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                 "jax_persistent_cache_min_compile_time_secs", "jax_compilation_cache_max_size")


@contextlib.contextmanager
def restored_process_state(folder: str | None = None):
  """Puts back sys.argv, sys.path, os.environ, jax's compilation cache settings, the cwd,
  the stop signals' handlers, the values of flags defined before (absl's `--verbosity`),
  every logger's level and the root logger's handlers (absl's `app.run` adds
  its own) and the absl handler's filters; removes new flags and the modules newly
  imported from `folder`."""
  argv, path, environ, cwd = sys.argv, list(sys.path), dict(os.environ), os.getcwd()
  root, absl_logger = logging.getLogger(), absl_logging.get_absl_logger()
  log_handlers, log_level = list(root.handlers), root.level
  absl_level, absl_filters = absl_logger.level, list(absl_logging.get_absl_handler().filters)
  levels = {n: l.level for n, l in logging.root.manager.loggerDict.items()
            if isinstance(l, logging.Logger)}   # (convert_checkpoint.py sets jaxrec's)
  handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  defined = {name: (flags.FLAGS[name].value, flags.FLAGS[name].present) for name in flags.FLAGS}
  modules = set(sys.modules)
  cache = {k: getattr(jax.config, k) for k in CACHE_CONFIG}   # train.py's compile_cache
  try:
    yield
  finally:
    for k, v in cache.items():
      if getattr(jax.config, k) != v:
        jax.config.update(k, v)
    sys.argv = argv
    if folder:
      _forget_modules_from(folder, set(sys.modules) - modules)
    sys.path[:] = path
    if dict(os.environ) != environ:
      os.environ.clear()
      os.environ.update(environ)
    os.chdir(cwd)
    for name, (value, present) in defined.items():
      if name in flags.FLAGS and (flags.FLAGS[name].value, flags.FLAGS[name].present) != (
          value, present):
        flags.FLAGS[name].value, flags.FLAGS[name].present = value, present
    root.handlers[:] = log_handlers
    root.setLevel(log_level)
    absl_logger.setLevel(absl_level)
    for name, logger in list(logging.root.manager.loggerDict.items()):
      if isinstance(logger, logging.Logger) and logger.level != levels.get(name, logging.NOTSET):
        logger.setLevel(levels.get(name, logging.NOTSET))
    absl_logging.get_absl_handler().filters[:] = absl_filters
    for s, handler in handlers.items():
      signal.signal(s, handler)
    for name in set(flags.FLAGS) - set(defined) - _library_flags():
      if name in flags.FLAGS:   # a short name goes with its flag
        delattr(flags.FLAGS, name)


def _library_flags() -> set[str]:
  """Names of the flags that modules still imported defined (grain's and orbax's, at their
  first import during a run): they stay, as their modules do, and would not be defined
  again. The script's own (`__main__`'s, keyed by its path) are not among them."""
  return {f.name for module, fs in flags.FLAGS.flags_by_module_dict().items()
          if module != "__main__" and module in sys.modules for f in fs}


def _forget_modules_from(folder: str, names: set[str]) -> None:
  """Removes from `sys.modules` the modules in `names` whose file lies in `folder` (a
  benchmark's `common`: the next script of that name would find it imported)."""
  folder = os.path.join(os.path.abspath(folder), "")
  for name in names:
    file = getattr(sys.modules.get(name), "__file__", None) or ""
    if os.path.abspath(file).startswith(folder):
      del sys.modules[name]


def run_script(script: str, *args: str, folder: str = "scripts") -> subprocess.CompletedProcess:
  """`python FOLDER/SCRIPT ARGS` from the repository root, in this process."""
  path = os.path.join(ROOT, folder, script)
  out, err = io.StringIO(), io.StringIO()
  handler = absl_logging.get_absl_handler().python_handler
  code = 0
  with restored_process_state(os.path.dirname(path)), contextlib.redirect_stdout(out), \
      contextlib.redirect_stderr(err):
    stream, handler.stream = handler.stream, err
    absl_logging.use_absl_handler()   # app.run adds it in its first call only
    os.chdir(ROOT)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(path))   # as `python PATH` puts it
    try:
      runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
    finally:
      handler.stream = stream
  return subprocess.CompletedProcess([path, *args], code, out.getvalue(), err.getvalue())
