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
"""

from __future__ import annotations

import logging
import os

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
