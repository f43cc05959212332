"""Checkpoints a running job deletes (`--keep_checkpoints`) while a conversion reads them.

A conversion reads only committed steps, but a run still saving into the directory may
rotate the one it picked out at any moment: that is reported as `Rotated`, and a
conversion of the latest step (no `--step`) starts again from the new latest (`selection`);
`steps.latest_valid` skips it.
"""

from __future__ import annotations

import contextlib
import os
import time

from jaxrec.errors import CheckpointError, ConfigError

ATTEMPTS = 3


class Rotated(CheckpointError):
  """The checkpoint being read was deleted meanwhile (not corrupt)."""

  def __init__(self, step_dir):
    super().__init__(f"checkpoint {step_dir} was deleted while it was being read: a run still "
                     "saving into that directory rotated it out (--keep_checkpoints); convert "
                     "again, or pick a step it keeps with --step")
    self.step_dir = step_dir


def _entries(step_dir) -> int | None:
  """How many files and directories `step_dir` holds (None once it is gone)."""
  if not os.path.isdir(step_dir):
    return None
  return sum(len(dirs) + len(names) for _, dirs, names in os.walk(step_dir))


def _gone(step_dir, wait: float = 2.0, settle: float = 0.5, poll: float = 0.05) -> bool:
  """Whether checkpoint `step_dir` is deleted, or is being deleted (gone within `wait` s):
  a running job rotating it out, not a corrupt checkpoint. A directory whose entries stay
  as they are for `settle` s is not being deleted (an error is then reported after 0.5 s,
  not after the whole `wait`)."""
  start = time.time()
  count, since = _entries(step_dir), start
  while count is not None:
    now = time.time()
    if now - since >= settle or now - start >= wait:
      return False
    time.sleep(poll)
    latest = _entries(step_dir)
    if latest != count:
      count, since = latest, time.time()
  return True


@contextlib.contextmanager
def reading(step_dir):
  """Any error the body raises once checkpoint `step_dir` is gone becomes `Rotated`: the
  one place that waits to tell a deleted checkpoint from a corrupt one. `ConfigError`s
  (flags, `--output`: never caused by a deletion) pass unchanged."""
  try:
    yield
  except (Rotated, ConfigError):
    raise
  except Exception:  # pylint: disable=broad-except
    if _gone(step_dir):
      raise Rotated(step_dir) from None
    raise
