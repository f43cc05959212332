"""jax's persistent compilation cache, on by default for `scripts/train.py`.

Every start compiles the run's ~12 programs again (state init, train and eval steps): a
resume, an elastic restart, an evaluate-only rerun. With the cache a second start of the
same config skips that (`dlrm_synthetic`, 10 steps on one CPU device: 5.5-5.8 s without,
3.7-4.0 s with; the first run with an empty cache is no slower). Each start keeps the
directory within `DEFAULT_MAX_BYTES`, removing the entries used least recently (`prune`).
jax's own size limit (`JAX_COMPILATION_CACHE_MAX_SIZE`) is not used by default: it reads
every entry's `-atime` file at each write (0.3 s a write at 3,000 entries) and needs
`filelock`. Environment settings of jax (`JAX_COMPILATION_CACHE_DIR`, `..._MAX_SIZE`,
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`) are kept.

jax keeps an entry it cannot read (a damaged file: it warns naming the program only, then
compiles it again but does not write over the entry), so every later start warned again;
`enable` has such entries removed when jax reports them (`_drop_unreadable`), one line
naming the file, and this start writes them anew.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

import jax

from jaxrec.errors import ConfigError
from jaxrec.files import check_not_unexpanded_home, is_writable, user_cache_dir
from jaxrec.planner.result import format_bytes

_LOG = logging.getLogger(__name__)
DEFAULT_MAX_BYTES = 1 << 30
OFF = "none"


def default_dir() -> str:
  """`$JAX_COMPILATION_CACHE_DIR` when set, else `user_cache_dir()/xla`."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(user_cache_dir(), "xla")


def enable(directory: str | None, flag: str = "--compilation_cache") -> str | None:
  """Turns the cache on in `directory` (None: `default_dir()`; `none`: off) before the
  first compile. Returns the directory used, or None when off.

  A directory given by the flag that cannot be made or written is a `ConfigError` naming
  the flag; the default one is skipped with a warning (the run does not need it)."""
  if directory is not None and directory.strip().lower() == OFF:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  given = directory is not None
  if given:
    check_not_unexpanded_home(flag, directory)
    if not directory.strip():
      raise ConfigError(f"{flag}: empty; give a directory, or '{OFF}' for no cache")
  path = os.path.abspath(os.path.expanduser(directory if given else default_dir()))
  problem = None
  try:
    os.makedirs(path, exist_ok=True)
    if not is_writable(path):
      problem = "not writable"
  except OSError as e:
    problem = e.strerror or str(e)
  if problem:
    if given:
      raise ConfigError(f"{flag}={directory}: cannot use {path} as the compilation cache: "
                        f"{problem} (give another directory, or '{OFF}')")
    _LOG.warning("the compilation cache %s cannot be used (%s): compiling every program "
                 "(--compilation_cache=DIR to use another)", path, problem)
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  _report_unreadable_entries()
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)   # CPU: most < 1 s
  if jax.config.jax_compilation_cache_max_size == -1:   # else jax's own, from the environment
    prune(path, DEFAULT_MAX_BYTES)
  return path


def prune(path: str, max_bytes: int) -> None:
  """Removes the least recently used entries of cache `path` (by their files' access or
  modification time, whichever is later) until at most 80% of `max_bytes` is left, when
  the entries take more than `max_bytes`."""
  entries = []
  try:
    with os.scandir(path) as it:
      for e in it:
        if e.name.endswith("-cache") and e.is_file():
          st = e.stat()
          entries.append((max(st.st_atime, st.st_mtime), st.st_size, e.path))
  except OSError as e:
    _LOG.warning("compilation cache %s: not pruned (%s)", path, e.strerror or e)
    return
  total = sum(size for _, size, _ in entries)
  if total <= max_bytes:
    return
  removed = freed = 0
  for _, size, entry in sorted(entries):
    if total - freed <= 0.8 * max_bytes:
      break
    try:
      os.remove(entry)
    except OSError:
      continue
    removed, freed = removed + 1, freed + size
    atime = entry[:-len("-cache")] + "-atime"   # of a cache jax size-limited before
    if os.path.exists(atime):
      os.remove(atime)
  _LOG.info("compilation cache %s: removed the %d least recently used programs (%s) of %s "
            "(limit %s)", path, removed, format_bytes(freed), format_bytes(total),
            format_bytes(max_bytes))


_READ_ERROR = re.compile(r"Error reading persistent compilation cache entry for '([^']*)': (.*)",
                         re.S)


def _report_unreadable_entries() -> None:
  """Routes jax's warnings about cache entries it cannot read to `_drop_unreadable`
  (through `warnings.showwarning`, once per process; other warnings pass unchanged)."""
  previous = warnings.showwarning
  if getattr(previous, "jaxrec_compile_cache", False):
    return

  def showwarning(message, category, filename, lineno, file=None, line=None):
    found = _READ_ERROR.match(str(message))
    directory = jax.config.jax_compilation_cache_dir
    if not (found and directory and _drop_unreadable(directory, *found.groups())):
      previous(message, category, filename, lineno, file, line)

  showwarning.jaxrec_compile_cache = True
  warnings.showwarning = showwarning


def _drop_unreadable(directory: str, program: str, error: str) -> bool:
  """Removes the entries of `program` in cache `directory` that do not decompress (jax
  named the program, not the file) and logs one line naming each; when none is damaged
  that way (the error came later, e.g. deserializing), one line naming the directory and
  what to remove. Returns whether a line was logged (then jax's own warning is not shown)."""
  try:
    from jax._src import compilation_cache   # pylint: disable=import-outside-toplevel
    decompress = compilation_cache.decompress_executable
  except (ImportError, AttributeError):   # another jax: its own warning stays
    return False
  # jax names the program (`jit_step`) where it reads an entry, its key (`jit_step-<hash>`)
  # where it checks that one exists
  name = re.compile(re.escape(program) + r"(-[0-9a-f]+)?-cache")
  removed = []
  try:
    entries = [e.path for e in os.scandir(directory) if name.fullmatch(e.name)]
  except OSError:
    return False
  for entry in entries:
    try:
      with open(entry, "rb") as f:
        decompress(f.read())
    except OSError:
      continue
    except Exception:   # pylint: disable=broad-except  (what a damaged stream raises varies)
      try:
        os.remove(entry)
      except OSError:
        continue
      removed.append(entry)
      atime = entry[:-len("-cache")] + "-atime"   # jax's, when it limits the size
      if os.path.exists(atime):
        os.remove(atime)
  for entry in removed:
    _LOG.warning("compilation cache %s: removed %s, which jax could not read (%s); "
                 "compiling '%s' again writes it anew", directory, os.path.basename(entry),
                 error, program)
  if not removed:
    _LOG.warning("compilation cache %s: jax could not read its entry for '%s' (%s) and "
                 "compiles it again at every start: remove %s-*-cache there, or run with "
                 "--compilation_cache=none", directory, program, error,
                 os.path.join(directory, program))
  return True
