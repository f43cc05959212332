"""Checks of a run's `--workdir` before anything starts, and the outputs a run leaves in it
(what scripts/train.py's `results in W (...)` line lists)."""

from __future__ import annotations

import os

from jaxrec import files, planner, workdir_layout
from jaxrec.checkpoint import storage
from jaxrec.checkpoint.manager import REJECTED_DIR
from jaxrec.checkpoint.steps import step_dirs
from jaxrec.errors import ConfigError
from jaxrec.train import data_adapter, writers


def check_workdir(workdir: str) -> None:
  """Refuses a `--workdir` that is a file, a checkpoint directory or not writable; creates
  nothing (`train_and_evaluate` creates it)."""
  files.check_not_unexpanded_home("--workdir", workdir)
  files.check_tensorstore_path("--workdir", workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir: '{workdir}' exists and is not a directory")
  # W/checkpoints or W/checkpoints/<step> (what convert_checkpoint.py takes) would start a
  # fresh run that writes its files (and its own checkpoints/) among W's checkpoints
  checkpoints = _checkpoint_dir_of(os.path.abspath(workdir))
  if checkpoints is not None:
    # a run's W/checkpoints: resume W; another name (an import's --output=X/imported): a
    # run reads only W/checkpoints, and --workdir=X, as this said, trained fresh tables
    of_a_run = os.path.basename(checkpoints) == workdir_layout.CHECKPOINTS_DIR
    how = (f"to resume that run pass --workdir={os.path.dirname(checkpoints)}" if of_a_run
           else f"a run resumes only from the checkpoints/ of its workdir: move it there "
           f"(e.g. mkdir W && mv {checkpoints} W/checkpoints) and pass --workdir=W")
    raise ConfigError(f"--workdir: '{workdir}' is a checkpoint directory, not a run's "
                      f"directory; {how}")
  for where in (workdir, data_adapter.checkpoint_dir(workdir)):
    # a read-only checkpoints directory failed only at the first save, and then orbax's
    # threads waited 5 minutes for the step directory before the process exited
    if os.path.isdir(where) and not files.is_writable(where):
      raise ConfigError(f"--workdir: cannot write in {where} (read-only or no permission): "
                        "the run could not save its checkpoints")
  # what an earlier run left that this one appends to or writes in (e.g. owned by another
  # user after a `sudo` run): a traceback when opened, profile.jsonl's only at the first
  # log step, after training
  for name in (writers.METRICS_FILE, planner.PROFILE_FILE):
    path = os.path.join(workdir, name)
    reason = files.append_failure(path) if os.path.lexists(path) else None
    if reason:
      raise ConfigError(f"--workdir: cannot write {path}: {reason}")
  for name, what in ((writers.TB_DIR, "the TensorBoard logs"),
                     (workdir_layout.OFFLOAD_DIR, "the stores of the offloaded tables without "
                      "a 'path' in OffloadConfig.tables"),
                     (workdir_layout.SNAPSHOTS_DIR, "the offloaded tables' snapshots of each "
                      "checkpoint")):
    path = os.path.join(workdir, name)
    if os.path.lexists(path) and not (os.path.isdir(path) and files.is_writable(path)):
      raise ConfigError(f"--workdir: cannot write in {path} (not a directory, read-only or "
                        f"no permission), which holds {what}")


# What a run writes into its workdir, in the order `outputs` names them (README's table).
_OUTPUTS = (writers.METRICS_FILE, writers.TB_DIR + "/", workdir_layout.CHECKPOINTS_DIR + "/",
            "config.gin", "plan.json", planner.PROFILE_FILE, workdir_layout.OFFLOAD_DIR + "/",
            workdir_layout.SNAPSHOTS_DIR + "/")


def outputs(workdir: str) -> list[str]:
  """The run outputs `workdir` holds (`metrics.jsonl`, `tb/`, ...; a directory with `/`):
  what train.py's `results in W (...)` line lists."""
  return [name for name in _OUTPUTS if os.path.exists(os.path.join(workdir, name))]


def _checkpoint_dir_of(path: str) -> str | None:
  """The checkpoint directory (`W/checkpoints`) that `path` is, or holds as a step or a
  rejected step (`W/checkpoints/rejected/<step>.<...>`); None when it is neither."""
  if storage.is_step_dir(path):
    up = os.path.dirname(path)
    return os.path.dirname(up) if os.path.basename(up) == REJECTED_DIR else up
  if any(storage.is_step_dir(os.path.join(path, str(s))) for s in step_dirs(path)):
    return path
  return None
