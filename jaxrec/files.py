"""Small files written whole or not at all (`plan.json`, `config.gin`, manifests, caches).

A reader never sees a half-written file under the final name: the text goes to a temporary
file of this process in the same directory, which `os.replace` renames over the target; on
any failure (an `OSError`, Ctrl-C) the temporary file is removed and the old file, if any,
is left as it was. A SIGKILL can leave the clearly named `NAME.tmp-PID-NS` behind, never a
torn `NAME`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary file name for the body to write; on success it replaces `path`
  (see the module docstring). Raises what the body or the rename raised."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}-{time.time_ns()}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (see the module docstring); raises the `OSError`."""
  with atomic_output(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def is_writable(directory: str | os.PathLike) -> bool:
  """Whether a file can be created in `directory` (tried: `os.access` says yes to root on
  a directory without write permission bits, and `EROFS` shows only on writing)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  try:
    with tempfile.TemporaryFile(dir=directory):
      return True
  except OSError:
    return False


def unexpanded_home(flag: str, path: str) -> str | None:
  """Why `FLAG=PATH` is refused when PATH starts with `~` and names nothing here: a shell
  expands `~` only at the start of a word, so `--workdir=~/runs/x` is taken as `./~/runs/x`
  (a directory named `~` here). None otherwise (an existing `./~` is taken as it is)."""
  parts = str(path).replace("\\", "/").split("/")
  if parts[0] != "~" or os.path.exists(path):
    return None
  rest = "/".join(parts[1:])
  return (f"{flag}={path}: the shell does not expand '~' after '=' (the path would be a "
          f"directory named '~' here); write {flag} ~/{rest}, {flag}=$HOME/{rest} or an "
          "absolute path")


def check_not_unexpanded_home(flag: str, path: str) -> None:
  """Raises `ConfigError` with `unexpanded_home`'s reason, if any."""
  reason = unexpanded_home(flag, path)
  if reason:
    from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
    raise ConfigError(reason)


def check_tensorstore_path(what: str, path: str) -> None:
  """Refuses a path with a backslash (`ConfigError`): tensorstore's file driver, under orbax
  checkpoints, offload stores and zarr exports, reads `\\` as a directory separator, so
  `a\\b` is written as `a/b`: another directory, maybe another run's, while the checks
  and the resume look at `a\\b` (a resume then found no valid checkpoint). A relative
  path counts the current directory's name too."""
  full = os.path.abspath(path)
  if "\\" in full:
    from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
    where = "" if "\\" in str(path) else f" (the current directory is '{os.getcwd()}')"
    raise ConfigError(f"{what}: '{path}'{where} holds a backslash, which tensorstore "
                      "(checkpoints, offload stores, zarr) reads as a directory separator: "
                      f"its files would go to '{full.replace(chr(92), '/')}'; use a path "
                      "without '\\'")


def append_failure(path: str | os.PathLike) -> str | None:
  """Why file `path` cannot be opened for appending (`strerror`), or None when it can; the
  file is not changed."""
  try:
    with open(path, "ab"):
      return None
  except OSError as e:
    return e.strerror or str(e)


LOCK_NAME = ".jaxrec.lock"


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, name: str = LOCK_NAME,
                 holder_kind: str = "another run", flag: str = "--workdir") -> Iterator[None]:
  """Holds an exclusive lock on `workdir` (`flock` of `<workdir>/<name>`, by default
  `.jaxrec.lock`, and of the directory holding it; released when the body ends or the
  process dies, even by SIGKILL). Raises `ConfigError` naming the holder (`holder_kind`)
  and its pid when another process (or another `workdir_lock` of this one) holds it: two
  runs in one workdir overwrite each other's checkpoints, snapshots and offload stores.
  The directory's lock refuses a second run also when the lock file was deleted or
  replaced while the first ran (the second would lock a new file). `flag`: the option
  that named it."""
  path = os.path.join(os.fspath(workdir), name)
  # the directory again: a run refused at the same moment may have just removed the one
  # this run made (`made_dir`), before this lock existed to keep it
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  dir_fd = None
  try:
    _lock_or_refuse(fd, workdir, holder_kind, flag)
    dir_fd = _open_dir(os.path.dirname(path))
    if dir_fd is not None and not _flocked(dir_fd):
      raise _in_use(workdir, holder_kind, flag, _flock_holder(dir_fd) or "unknown",
                    f"; its lock file {path} was removed or replaced while it ran")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)   # releases the locks
    if dir_fd is not None:
      os.close(dir_fd)


def check_unlocked(workdir: str | os.PathLike, name: str, holder_kind: str,
                   flag: str = "--workdir") -> None:
  """Raises `workdir_lock`'s `ConfigError` when another process holds `<workdir>/<name>`
  or its directory's lock (none when neither exists); holds nothing after."""
  path = os.path.join(os.fspath(workdir), name)
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    fd = None
  dir_fd = _open_dir(os.path.dirname(path))
  try:
    if fd is not None:
      _lock_or_refuse(fd, workdir, holder_kind, flag)
    if dir_fd is not None and not _flocked(dir_fd):
      raise _in_use(workdir, holder_kind, flag, _flock_holder(dir_fd) or "unknown")
  finally:
    for opened in (fd, dir_fd):
      if opened is not None:
        os.close(opened)


def _lock_or_refuse(fd: int, workdir, holder_kind: str, flag: str) -> None:
  """`flock`s `fd` exclusively, or raises a `ConfigError` naming its holder's pid."""
  if not _flocked(fd):
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
    raise _in_use(workdir, holder_kind, flag, holder or _flock_holder(fd) or "unknown")


def _in_use(workdir, holder_kind: str, flag: str, holder: str, why: str = ""):
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  return ConfigError(f"{flag}: {os.fspath(workdir)} is in use by {holder_kind} (pid "
                     f"{holder}{why}); wait for it to finish or pick another {flag}")


def _flocked(fd: int) -> bool:
  """`flock`s `fd` exclusively without waiting: False when another open file holds it.
  A file system that cannot lock (`OSError` other than "busy") counts as locked."""
  import fcntl  # pylint: disable=import-outside-toplevel
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  except OSError:
    return True
  return True


def _open_dir(path: str) -> int | None:
  """A read-only descriptor of directory `path` for `flock`, or None when it cannot be
  opened (then only the lock file counts)."""
  try:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  except OSError:
    return None


def _flock_holder(fd: int) -> str | None:
  """The pid `/proc/locks` gives for the `flock` on `fd`'s file, or None (not Linux)."""
  st = os.fstat(fd)
  key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
  try:
    with open("/proc/locks", encoding="ascii", errors="replace") as locks:
      for line in locks:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key:
          return fields[4]
  except OSError:
    pass
  return None


@contextlib.contextmanager
def made_dir(path: str | os.PathLike, flag: str = "--workdir") -> Iterator[None]:
  """Creates directory `path` (and missing parents; `make_dirs`, its error naming `flag`)
  for the body. When the body raises and `path` did not exist, what this created is
  removed again if it holds nothing but empty directories and `LOCK_NAME` files (a run
  refused at its start leaves no empty workdir); a directory that existed before, one
  holding any other file, or one whose `LOCK_NAME` another process holds, is never removed:
  two runs started at once both found `path` missing, and the one refused by the other's
  lock removed the directory (and lock) the other ran in, so a third run was not refused."""
  top = missing_top(path)
  make_dirs(os.path.abspath(os.fspath(path)), flag, shown=path)
  try:
    yield
  except BaseException:
    with _unless_locked(os.path.join(os.fspath(path), LOCK_NAME)) as free:
      if free:   # the lock held while removing: no run can take it in between
        remove_made(top, path, lambda name: os.path.basename(name) == LOCK_NAME)
    raise


@contextlib.contextmanager
def _unless_locked(lock_path: str) -> Iterator[bool]:
  """Holds `lock_path`'s `flock` and its directory's for the body and yields True; False
  when another open of either (a run in that workdir) holds it. A missing file is free (no
  run has locked yet) unless its directory is locked."""
  opened = []
  try:
    for path, flags in ((lock_path, os.O_RDONLY),
                        (os.path.dirname(lock_path), os.O_RDONLY | os.O_DIRECTORY)):
      try:
        opened.append(os.open(path, flags))
      except OSError:
        continue
      if not _flocked(opened[-1]):
        yield False
        return
    yield True
  finally:
    for fd in opened:
      os.close(fd)


def missing_top(path: str | os.PathLike) -> str | None:
  """The outermost of `path` (made absolute) and its parents that does not exist: what
  creating `path` creates, for `remove_made`; None when `path` exists."""
  top = os.path.abspath(os.fspath(path))
  if os.path.exists(top):
    return None
  while not os.path.exists(os.path.dirname(top)):
    top = os.path.dirname(top)
  return top


def remove_made(top: str | None, path: str | os.PathLike, removable) -> bool:
  """Removes `top` (`missing_top(path)` before `path` was created; None: nothing) with
  everything in it when `removable(name)` holds for every file in it, `name` relative to
  `path` (e.g. `workers/0.log`); returns whether it did. Empty directories count as
  nothing; any other file keeps the whole tree as it is."""
  if top is None or not os.path.isdir(top):
    return False
  path = os.path.abspath(os.fspath(path))
  if not all(removable(os.path.relpath(os.path.join(d, n), path))
             for d, _, names in os.walk(top) for n in names):
    return False
  shutil.rmtree(top, ignore_errors=True)
  return True


def make_dirs(path: str | os.PathLike, flag: str = "--workdir",
              shown: str | os.PathLike | None = None) -> None:
  """`os.makedirs(path, exist_ok=True)`; an `OSError` is a one-line `ConfigError`,
  SHOWN the flag's value (default `path`): `FLAG=SHOWN: FILE is a file, not a directory`
  for a file where `path` or one of its parents should be, else `FLAG=SHOWN: cannot create
  DIR: reason` (a parent without write permission), DIR the directory that failed."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    where = f"{flag}={os.fspath(shown if shown is not None else path)}"
    in_the_way = deepest_existing(os.fspath(e.filename or path))
    if os.path.isfile(in_the_way):
      raise ConfigError(f"{where}: {in_the_way} is a file, not a directory") from None
    raise ConfigError(f"{where}: cannot create {e.filename or os.fspath(path)}: "
                      f"{e.strerror or e}") from None


def deepest_existing(path: str) -> str:
  """`path` or its deepest parent that exists ('' if none does)."""
  while path and not os.path.lexists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def user_cache_dir() -> str:
  """jaxrec's cache directory: `$JAXREC_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxrec`, else
  `~/.cache/jaxrec` (the planner's calibration, the compilation cache)."""
  if os.environ.get("JAXREC_CACHE_DIR"):
    return os.environ["JAXREC_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxrec")


def bytes_under(paths) -> int:
  """Bytes of the files under `paths` (directories; absent ones count 0), each inode once
  (offload snapshots hard-link the store's files, as rejected steps' snapshots may)."""
  seen, total = set(), 0
  for path in paths:
    for root, _, names in os.walk(path):
      for name in names:
        try:
          st = os.lstat(os.path.join(root, name))
        except OSError:
          continue
        if (st.st_dev, st.st_ino) not in seen:
          seen.add((st.st_dev, st.st_ino))
          total += st.st_size
  return total
