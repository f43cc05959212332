"""The open-file limit (`ulimit -n`) of a process that memory-maps many files at once: each
map holds a file descriptor, and a preprocessed dataset of more shards than the limit was
an OSError traceback (`Too many open files`)."""

from __future__ import annotations

import os

from absl import logging

from jaxrec.errors import DataError


def make_room(count: int, directory: str) -> None:
  """Raises this process's open-file limit (`ulimit -n`, up to its hard limit) where the
  `count` shards of `directory` would not fit beside the files already open: each shard's
  memory map holds a file descriptor, and a dataset of more shards than the limit (Criteo
  1TB at the default --shard_examples: ~1,043 of a usual 1,024) was an OSError traceback
  (`Too many open files`). A `DataError` says what to do when the hard limit is short."""
  try:
    import resource  # pylint: disable=import-outside-toplevel (not on every platform)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
  except (ImportError, OSError):
    return
  need = used + count + _SPARE_FILES
  if soft == resource.RLIM_INFINITY or need <= soft:
    return
  target = need if hard == resource.RLIM_INFINITY else min(hard, 2 * need)
  if used + count + _SPARE_FILES // 16 > target:
    raise DataError(too_many(count, directory, f"`ulimit -Hn` {hard:,}, {used:,} files open "
                                                "already"))
  resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
  logging.info("raised this process's open-file limit from %d to %d for the %d shards of %s",
               soft, target, count, directory)


_SPARE_FILES = 256   # kept free beside the shards: checkpoints, logs, sockets, a second set


def too_many(count: int, directory: str, limit: str = "`ulimit -n`") -> str:
  """The error for a dataset whose shards this process cannot hold open at once."""
  return (f"{directory}: its {count:,} shards need as many open files at once, past this "
          f"process's limit ({limit}): raise it, or re-run scripts/preprocess.py with a "
          "larger --shard_examples (fewer, larger shards)")
