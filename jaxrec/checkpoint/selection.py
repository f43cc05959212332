"""Which checkpoint step a conversion reads (`--checkpoint_dir`, `--step`), and what it
says when that step cannot be read.

  * `--checkpoint_dir` naming a rejected checkpoint
    (`W/checkpoints/rejected/<step>.<reason>.<ns>`): that one, as the step it holds.
  * `--step=N`: step N; a corrupt one (or one without its offload snapshot) is an error
    naming the steps to pick instead.
  * neither: the newest valid step, as a training restore picks it: a step found corrupt
    while it is read is skipped with a one-line warning (`steps.warn_corrupt`) and the step
    before it is converted; one that a run still saving into the directory rotates out
    meanwhile makes the conversion start again from the new latest (`rotation`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, TypeVar

from absl import logging
from etils import epath

from jaxrec import workdir_layout
from jaxrec.checkpoint import offloaded as offloaded_lib
from jaxrec.checkpoint import rotation
from jaxrec.checkpoint import steps as steps_lib
from jaxrec.checkpoint import storage
from jaxrec.checkpoint.manager import REJECTED_DIR, CheckpointManager
from jaxrec.errors import CheckpointError, ConfigError, DataError

PICK_ANOTHER = "; pick another --step"   # how step errors end; `other_steps` names them
T = TypeVar("T")


def convert_step(checkpoint_dir, step: int | None,
                 convert: Callable[[epath.Path, int], T]) -> T:
  """`convert(step directory, step)` of the step `--checkpoint_dir` and `--step` select
  (see the module docstring); returns its result."""
  rejected = offloaded_lib.rejected_step(checkpoint_dir)
  if rejected is not None:   # its step is the manifest's (rejected for holding another?)
    step_dir = epath.Path(os.path.abspath(checkpoint_dir))   # orbax refuses relative paths
    try:   # the check too: a file missing from it said 'pick another --step', of none
      held = int(check(step_dir).get("step", rejected))
      if step is not None and step != held:
        raise ConfigError(f"--step={step}: --checkpoint_dir {checkpoint_dir} is the rejected "
                          f"checkpoint of step {held}")
      return convert(step_dir, held)
    except CheckpointError as e:   # it holds one step: name the kept ones instead
      raise _kept_instead(e, step_dir) from None
  if step is not None:
    return _given(checkpoint_dir, int(step), convert)
  for attempt in range(rotation.ATTEMPTS):
    try:
      return _latest(checkpoint_dir, convert)
    except rotation.Rotated as e:
      if attempt == rotation.ATTEMPTS - 1:
        raise
      logging.warning("checkpoint %s was rotated out by the run saving into %s while it "
                      "was read; converting the new latest step", e.step_dir, checkpoint_dir)
  raise AssertionError("unreachable")


def _kept_instead(error: CheckpointError, step_dir) -> CheckpointError:
  """`error` of rejected checkpoint `step_dir` (which holds one step, so there is no other
  `--step` to pick) naming the kept steps of the directory above `rejected/`."""
  if not str(error).endswith(PICK_ANOTHER):
    return error
  kept = epath.Path(step_dir).parent.parent
  steps = ", ".join(map(str, CheckpointManager(kept, read_only=True).all_steps())) or "none"
  return CheckpointError(f"{str(error).removesuffix(PICK_ANOTHER)}; {step_dir} is a rejected "
                         f"checkpoint (one step only); kept steps in {kept}: {steps}")


def _given(checkpoint_dir, step: int, convert):
  """`convert` of `--step=step`; its failure names the other steps to pick."""
  mgr, steps = _listed(checkpoint_dir)
  if step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_dir} (steps: "
                          f"{steps}){hint(checkpoint_dir, step)}")
  try:
    with rotation.reading(mgr.step_dir(step)):
      _usable(mgr.step_dir(step), step)
      return convert(mgr.step_dir(step), step)
  except rotation.Rotated:
    raise
  except CheckpointError as e:
    raise CheckpointError(other_steps(e, mgr, steps, step)) from None


def _latest(checkpoint_dir, convert):
  """`convert` of the newest step that passes its checks and converts (module docstring)."""
  mgr, steps = _listed(checkpoint_dir)
  failed = []
  for step in reversed(steps):
    try:
      with rotation.reading(mgr.step_dir(step)):
        _usable(mgr.step_dir(step), step)
        return convert(mgr.step_dir(step), step)
    except rotation.Rotated:
      raise   # a newer step was committed: start again from it
    except CheckpointError as e:
      e = CheckpointError(str(e).removesuffix(PICK_ANOTHER))
      steps_lib.warn_corrupt(mgr.step_dir(step), e)
      failed.append((step, e))
  detail = "; ".join(f"step {s}: {steps_lib.first_line(e, 500)}" for s, e in failed)
  raise CheckpointError(f"no valid checkpoint in {mgr.directory} ({detail})")


def _listed(checkpoint_dir) -> tuple[CheckpointManager, list[int]]:
  """A read-only manager of `checkpoint_dir` and its committed steps (at least one)."""
  for attempt in range(rotation.ATTEMPTS):   # orbax lists the steps: one deleted meanwhile
    try:
      mgr = CheckpointManager(checkpoint_dir, read_only=True)
      break
    except FileNotFoundError:
      if attempt == rotation.ATTEMPTS - 1:
        raise
  steps = mgr.all_steps()
  if not steps:
    raise CheckpointError(f"--checkpoint_dir: no checkpoint in {checkpoint_dir}"
                          f"{hint(checkpoint_dir)}")
  return mgr, steps


def _usable(step_dir, step: int) -> None:
  """What a conversion checks before reading step `step`: its manifest, the arrays it
  lists, and its offload snapshot (if it has offloaded tables)."""
  check(step_dir, step=step)
  offloaded_lib.snapshot_of(step_dir)


def check(step_dir, full: bool = False, step: int | None = None) -> dict:
  """`storage.check_step`, its errors (bad JSON, missing arrays, a manifest of another
  `step`, ...) as `CheckpointError`; a file the filesystem fails to read (EIO) as
  `read_errors` words it."""
  try:
    with read_errors(step_dir):
      return storage.check_step(step_dir, full=full, step=step)
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"checkpoint {step_dir} is corrupt: {steps_lib.first_line(e)}"
                          f"{PICK_ANOTHER}") from e


@contextlib.contextmanager
def read_errors(step_dir) -> Iterator[None]:
  """`storage.ReadError` (the disk failed, not the checkpoint) as a `DataError` naming the
  file, `--checkpoint_dir: cannot read FILE: REASON (checkpoint STEP_DIR)`: it stops the
  conversion, where a corrupt step is skipped for the one before."""
  try:
    yield
  except storage.ReadError as e:
    raise DataError(f"--checkpoint_dir: {e} (checkpoint {step_dir})") from None


def other_steps(error, mgr, steps: list[int], step: int) -> str:
  """`error`'s message for `--step=step`, with the other steps it may take instead."""
  text = str(error).removesuffix(PICK_ANOTHER)
  others = [s for s in steps if s != step]
  usable = [s for s in others if _has_snapshot(mgr.step_dir(s))]
  if usable:
    return f"{text}{PICK_ANOTHER}: {', '.join(map(str, usable))}"
  if others:
    return (f"{text}; no other step has its offload snapshot either (steps: "
            f"{', '.join(map(str, steps))})")
  return f"{text}; {mgr.directory} holds no other step"


def _has_snapshot(step_dir) -> bool:
  """Checkpoint `step_dir` has its offload snapshot, or needs none."""
  try:
    offloaded_lib.snapshot_of(step_dir)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def hint(checkpoint_dir, step: int | None = None) -> str:
  """That `checkpoint_dir` does not exist, or what to pass instead: a workdir's checkpoints,
  a step directory's parent and step, or the rejected checkpoints (of `step`) under
  `checkpoint_dir` (or `checkpoint_dir` itself being their directory)."""
  path = epath.Path(checkpoint_dir)
  if not path.exists():   # a mistyped path said only "no checkpoint in PATH"
    return " (no such directory)"
  if not path.is_dir():
    return " (it is a file, not a directory)"
  inner = path / workdir_layout.CHECKPOINTS_DIR
  if step is None and inner.is_dir():   # a workdir given for its checkpoints
    return f" (did you mean --checkpoint_dir={inner}?)"
  if step is None and path.name.isdigit() and storage.is_step_dir(path):   # W/checkpoints/N
    return (f" (it is the directory of step {path.name}: pass --checkpoint_dir={path.parent} "
            f"--step={path.name})")
  where = path if path.name == REJECTED_DIR else path / REJECTED_DIR
  found = sorted((s, p.name) for p in where.iterdir()
                 if (s := offloaded_lib.rejected_step(p)) is not None) if where.is_dir() else []
  names = [name for s, name in found if step is None or s == step]
  if not names:
    unfinished = sorted(p.name for p in path.iterdir() if steps_lib.unfinished_save(p.name))
    if step is None and unfinished:   # a save killed before it committed: nothing to read
      return (f" (it holds only {len(unfinished)} unfinished save(s), e.g. {unfinished[-1]}: "
              "a save killed before it committed, which no restore or conversion reads)")
    return ""
  shown = ", ".join(str(where / n) for n in names[-3:])
  return (f"; rejected checkpoints{f' of step {step}' if step is not None else ''} are kept "
          f"in {where} ({len(names)}): export one with --checkpoint_dir=<its directory>, e.g. "
          f"{shown}")
