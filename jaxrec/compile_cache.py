"""jax's persistent compilation cache, on by default for `scripts/train.py`.

Every start compiles the run's ~12 programs again (state init, train and eval steps): a
resume, an elastic restart, an evaluate-only rerun. With the cache a second start of the
same config skips that (`dlrm_synthetic`, 10 steps on one CPU device: 5.5-5.8 s without,
3.7-4.0 s with; the first run with an empty cache is no slower). jax keeps the cache
within `JAX_COMPILATION_CACHE_MAX_SIZE` bytes (least recently used first; default here
`DEFAULT_MAX_BYTES`), so it does not grow with every shape and config tried. Environment
settings of jax (`JAX_COMPILATION_CACHE_DIR`, `..._MAX_SIZE`,
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`) are kept.
"""

from __future__ import annotations

import logging
import os

import jax

from jaxrec.errors import ConfigError
from jaxrec.files import check_not_unexpanded_home, is_writable, user_cache_dir

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
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    try:   # jax's size limit locks the directory with filelock (a dependency of jaxrec)
      import filelock  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      _LOG.warning("the compilation cache %s has no size limit: the filelock package that "
                   "jax needs for one is not installed", path)
    else:
      jax.config.update("jax_compilation_cache_max_size", DEFAULT_MAX_BYTES)
  if jax.config.jax_compilation_cache_max_size != -1:
    _drop_unfinished(path)
  return path


def _drop_unfinished(path: str) -> None:
  """Removes the entries of `path` that lack their `-atime` file. jax's size-limited cache
  writes an entry, then its `-atime` file: a process killed (or a disk filled) between the
  two left an entry, maybe truncated, that made every later write fail (jax reads every
  entry's `-atime` to evict) and, truncated, was read and refused at every start, never
  written again. A cache filled without a size limit has no `-atime` files either: its
  programs are compiled once more. Under jax's lock, so no entry being written is taken."""
  import filelock  # pylint: disable=import-outside-toplevel
  try:
    with filelock.FileLock(os.path.join(path, ".lockfile"), timeout=10):
      names = set(os.listdir(path))
      for name in names:
        if name.endswith("-cache") and name[:-len("-cache")] + "-atime" not in names:
          os.remove(os.path.join(path, name))
  except (filelock.Timeout, OSError) as e:
    _LOG.warning("compilation cache %s: unfinished entries not removed (%s)", path, e)
