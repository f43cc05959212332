"""Waiting for asynchronous work without leaving any of it running after an error: several
tensorstore futures (writes, create-opens), or the threads of a failed orbax save. What
still runs can land after the caller has cleaned up or started over."""

from __future__ import annotations

import threading
from typing import Any, Iterable


def wait_all(futures: Iterable[Any]) -> list[Any]:
  """The results of `futures` (anything with `.exception()` and `.result()`: tensorstore or
  `concurrent.futures`), in order, once every one is done; raises the first one's error
  only after all have finished."""
  futures = list(futures)
  error = first_error(futures)
  if error is not None:
    raise error
  return [f.result() for f in futures]


def first_error(futures: Iterable[Any]) -> BaseException | None:
  """The first of `futures`' errors once every one is done; None when all succeeded."""
  errors = [f.exception() for f in futures]   # blocks until each one is done
  return next((e for e in errors if e is not None), None)


def join_threads(started_since: set, module: str, timeout: float = 60.0) -> None:
  """Joins the threads alive now, not in `started_since` (a `threading.enumerate()` set),
  whose class comes from `module` (e.g. "orbax."): a failed orbax save raises at its first
  failed item while its other items' threads still write (at most `timeout` s each). An
  orbax thread's `join` raises the error its own work hit (often the same full disk): the
  caller is handling the first one, so these are dropped (one raised here ended a run with
  an `OSError` traceback instead of its one-line `CheckpointError`)."""
  for t in threading.enumerate():
    if t not in started_since and type(t).__module__.startswith(module):
      try:
        t.join(timeout)
      except Exception:  # pylint: disable=broad-except
        pass
