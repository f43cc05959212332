"""Checkpoints a running job deletes (`--keep_checkpoints`) while a conversion reads them.

A conversion reads only committed steps, but a run still saving into the directory may
rotate the one it picked out at any moment: that is reported as `Rotated`, and a
conversion of the latest step (no `--step`) starts again from the new latest.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

from absl import logging

from jaxrec.errors import CheckpointError

ATTEMPTS = 3


class Rotated(CheckpointError):
  """The checkpoint being read was deleted meanwhile (not corrupt)."""

  def __init__(self, step_dir):
    super().__init__(f"checkpoint {step_dir} was deleted while it was being read: a run still "
                     "saving into that directory rotated it out (--keep_checkpoints); convert "
                     "again, or pick a step it keeps with --step")
    self.step_dir = step_dir


def gone(step_dir, wait: float = 2.0) -> bool:
  """Whether checkpoint `step_dir` is deleted, or is being deleted (gone within `wait` s):
  a running job rotating it out, not a corrupt checkpoint."""
  deadline = time.time() + wait
  while os.path.isdir(step_dir):
    if time.time() > deadline:
      return False
    time.sleep(0.1)
  return True


@contextlib.contextmanager
def reading(step_dir):
  """Any error the body raises once checkpoint `step_dir` is gone becomes `Rotated`."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, Rotated) and gone(step_dir):
      raise Rotated(step_dir) from None
    raise


def latest_retried(fn):
  """Decorates a conversion `(source, output, step=None, ...)`: without `step`, a latest
  step rotated out while it was read is converted again from the new latest."""
  @functools.wraps(fn)
  def wrapped(source, output, step=None, *args, **kwargs):
    for attempt in range(ATTEMPTS):
      try:
        return fn(source, output, step, *args, **kwargs)
      except Rotated as e:
        if step is not None or attempt == ATTEMPTS - 1:
          raise
        logging.warning("checkpoint %s was rotated out by the run saving into %s while it "
                        "was read; converting the new latest step", e.step_dir, source)
  return wrapped
