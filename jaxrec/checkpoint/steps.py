"""Step discovery and validation: which step directories a checkpoint directory holds,
and the newest one that passes its checks.

A step that fails its check is corrupt, unless its directory is gone meanwhile: a run
still saving into the directory rotated it out (`--keep_checkpoints`), which is skipped
quietly (debug log) rather than reported as corruption. A file the filesystem fails to
read (EIO, EACCES) stops instead (`stop_if_unreadable`): the step may be intact, and
falling back would train from an older one.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

from absl import logging
from etils import epath

from jaxrec import files
from jaxrec.checkpoint import rotation
from jaxrec.checkpoint import storage
from jaxrec.errors import CheckpointError, ConfigError


def step_dirs(directory) -> list[int]:
  """The steps of the step directories in checkpoint directory `directory`, ascending (a
  listing, no orbax: a save is renamed to its step when it commits); [] if it is absent.
  Names as orbax writes them only: a zero-padded `0350` (a copy) is no step orbax reads."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and p.name == str(int(p.name)))


def refuse_linked_steps(directory) -> None:
  """`ConfigError` naming a step directory that is a symbolic link (a step moved to another
  disk and linked back): `--keep_checkpoints` rotation deletes old steps with orbax's
  `rmtree`, which refuses a link, and the run died with a traceback when it came to it."""
  for step in step_dirs(directory):
    path = os.path.join(directory, str(step))
    if os.path.islink(path):
      raise ConfigError(
          f"checkpoint {path} is a symbolic link (to {os.readlink(path)}): rotation "
          "(--keep_checkpoints) deletes old step directories and cannot delete a link; move "
          f"the step back into {directory} (mv), or delete the link to drop that step")


def unfinished_save(name: str) -> bool:
  """Whether `name` is an orbax save in flight, or killed before it committed
  (`<step>.orbax-checkpoint-tmp-<ns>`)."""
  return name.split(".", 1)[0].isdigit() and ".orbax-checkpoint-tmp" in name


def warn_only_unfinished(directory) -> None:
  """Warns when checkpoint directory `directory` holds unfinished saves
  (`<step>.orbax-checkpoint-tmp-*`, which opening it removes) and no committed step: the
  run starts from fresh tables at step 0. A `convert_checkpoint.py --restart_data` copy
  killed midway leaves one (and no checkpoint); a daily job that went on to train there
  trained a fresh model on one day's data, removing the copy's leftovers without a word."""
  directory = epath.Path(directory)
  if not directory.is_dir() or step_dirs(directory):
    return
  left = sorted(p.name for p in directory.iterdir() if unfinished_save(p.name))
  if left:
    logging.warning("warning: %s holds no checkpoint, only unfinished saves (%s: a run or a "
                    "convert_checkpoint.py copy killed while writing it), removed now; this "
                    "run starts from fresh tables at step 0", directory, ", ".join(left))


def foreign_entries(directory, also: Iterable[str] = ()) -> list[str]:
  """Names in checkpoint directory `directory` that no checkpoint writer puts there, sorted:
  not a step, an orbax save in progress (`<step>.orbax-checkpoint-tmp-<ns>`), a dotfile or
  one of `also`; [] if it is absent."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  also = set(also)

  def own(name: str) -> bool:
    return name.isdigit() or unfinished_save(name) or name in also or name.startswith(".")
  return sorted(p.name for p in directory.iterdir() if not own(p.name))


def latest_valid(directory, steps: Sequence[int], check: Callable[[int], object]) -> int | None:
  """Newest of `steps` (of checkpoint directory `directory`) for which `check(step)`
  passes, warning about each newer corrupt one; None when `steps` is empty.

  Raises:
    CheckpointError: every step is corrupt (or deleted meanwhile), naming each failure.
    rotation.Rotated: every step was deleted while it was checked (none is corrupt): a
      run saving into `directory` rotated them out; list the steps again.
  """
  directory = epath.Path(directory)
  errors, vanished = [], []
  for step in reversed(steps):
    try:
      with rotation.reading(directory / str(step)):
        check(step)
      return step
    except rotation.Rotated as e:
      logging.debug("checkpoint %s was deleted while it was checked (rotated out by a run "
                    "saving into %s); skipping it", e.step_dir, directory)
      vanished.append(e)
    except Exception as e:  # pylint: disable=broad-except
      stop_if_unreadable(directory / str(step), e)
      warn_corrupt(directory / str(step), e)
      errors.append((step, e))
  if errors:
    raise none_valid(directory, errors)
  if vanished:
    raise vanished[0]
  return None


def stop_if_unreadable(step_dir, error: BaseException) -> None:
  """Raises `CheckpointError` naming the file when `error` (raised reading checkpoint
  `step_dir`) is a filesystem read failure rather than a damaged checkpoint."""
  failed = storage.unreadable(error, step_dir)
  if failed is not None:
    raise CheckpointError(
        f"cannot read checkpoint {step_dir}: {failed[0]}: {failed[1]}. The filesystem "
        "failed, not necessarily the checkpoint, so the run stops rather than fall back to "
        "an older step; fix the storage and rerun") from error


def warn_corrupt(step_dir, error: BaseException) -> None:
  """Logs that checkpoint `step_dir` is skipped for `error` (its first line)."""
  logging.warning("checkpoint %s is corrupt or unreadable (%s); falling back to the "
                  "previous one", step_dir, _described(error))


def none_valid(directory, errors: Sequence[tuple[int, BaseException]]) -> CheckpointError:
  """The error when every step of `directory` failed: `errors` is `[(step, error)]`."""
  detail = "; ".join(f"step {s}: {_described(e)}" for s, e in errors)
  return CheckpointError(f"no valid checkpoint in {directory}: every one failed to "
                         f"restore ({detail}). Fix or move them away to start afresh.")


def _described(error: BaseException) -> str:
  """`Type: first line` of the error `shown` picks (at most 500 characters of the line)."""
  error = shown(error)
  return f"{type(error).__name__}: {first_line(error, 500)}"


def first_line(error: BaseException, limit: int = 300) -> str:
  """The first line of `error`'s message (its type's name if it has none), at most
  `limit` characters; of the error `shown` picks."""
  error = shown(error)
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


_WRAPPED = "See full TensorStore details"


def shown(error: BaseException) -> BaseException:
  """The error to tell a user of: `error`, or for orbax's wrapper of a failed array read
  (`Encountered error while reading array index: (slice(...)). See full TensorStore
  details: <bound method ...spec of TensorStore({`: neither the array nor the file) the
  tensorstore error it wraps (`OUT_OF_RANGE: Error reading "params.bottom_mlp.layer_0.
  kernel/0.0" in OCDBT database at local file ".../state/": ...`)."""
  while _WRAPPED in str(error) and error.__cause__ is not None:
    error = error.__cause__
  return error


def rejected_note(directory) -> str:
  """What a `rejected/` directory holds, for the warning that moves a step there: its
  entries and bytes (a file linked twice counts once), which nothing deletes."""
  size = files.bytes_under([directory])
  try:
    entries = len(os.listdir(directory))
  except OSError:
    entries = 0
  from jaxrec.planner.result import format_bytes  # pylint: disable=import-outside-toplevel
  return (f"it holds {entries} rejected step(s), {format_bytes(size)}: nothing there is "
          "deleted; remove them once inspected")

