"""Waiting on several tensorstore futures at once (writes, create-opens) without leaving
any of them running: on the first error, `.result()` in a loop returned while the others
still wrote, and they could land after the caller had cleaned up or started over."""

from __future__ import annotations

from typing import Any, Iterable


def wait_all(futures: Iterable[Any]) -> list[Any]:
  """The results of `futures` (anything with `.exception()` and `.result()`: tensorstore or
  `concurrent.futures`), in order, once every one is done; raises the first one's error
  only after all have finished."""
  futures = list(futures)
  errors = [f.exception() for f in futures]   # blocks until each one is done
  for e in errors:
    if e is not None:
      raise e
  return [f.result() for f in futures]
