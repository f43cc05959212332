"""Warnings of a run that only evaluates (its checkpoint is at or past `--num_steps`, or
early stopping stopped it) where the flags say the user meant something else: to train on
new data, or to score an older step. Such a run exits 0 having trained nothing, so these
lines are the only sign."""

from __future__ import annotations

import ast
import logging
import os

import jax

from jaxrec.checkpoint.steps import step_dirs
from jaxrec.train import config_changes
from jaxrec.workdir_layout import checkpoint_dir

log = logging.getLogger(__name__)


def untrained_copy_warning(options, data_state, step: int) -> str | None:
  """The warning for a run given `--train_data` that only evaluates a checkpoint holding no
  data position (`data_state` empty: a `convert_checkpoint.py --restart_data` copy, made
  to train on new data) because `--num_steps` is at or below its step: a daily run passing
  the day's step count (`--num_steps=300` on a copy at step 800) trained nothing on the new
  day and exited 0, saying only `already trained to step 800`; None otherwise."""
  if data_state or not options.train_data:
    return None
  return (f"warning: checkpoint {step} holds no data position (a --restart_data copy or an "
          f"import, made to train on new data), but --num_steps={options.num_steps} is at or below its "
          f"step: nothing of --train_data={options.train_data} is trained, the checkpoint "
          "is only evaluated. --num_steps is the total step count, counted from 0 (not the "
          f"steps to add): to train K steps of it, pass --num_steps={step}+K")


def _path(value: str) -> str:
  return value if value == "synthetic" else os.path.abspath(os.path.expanduser(value))


def other_data_warning(workdir, options, data_state, meta, step: int,
                       stopped: bool) -> str | None:
  """The warning for a run given a `--train_data` other than the data checkpoint `step`
  (holding a data position) was trained on (its `meta`'s recorded
  `ExperimentConfig.train_data`) that only evaluates it: a daily run pointing an
  early-stopped workdir at the next day's file was told `raise --early_stop_patience ...
  to train on`, which then refused the data; a run at `--num_steps` said `already trained`.
  Neither named `--restart_data`, the way to go on with new data. None otherwise."""
  if not options.train_data or not data_state:
    return None
  recorded = config_changes.bindings((meta or {}).get("gin") or "").get(
      "ExperimentConfig.train_data")
  try:
    trained = ast.literal_eval(recorded) if recorded else None
  except (ValueError, SyntaxError):
    return None
  if not isinstance(trained, str) or _path(trained) == _path(options.train_data):
    return None
  why = ("early stopping stopped it" if stopped else
         f"--num_steps={options.num_steps} is at or below its step")
  return (f"warning: nothing trains on --train_data={options.train_data}: checkpoint {step} "
          f"was trained on {trained} and this run only evaluates it ({why}). A workdir's "
          "checkpoints go on only with the data they were trained on: to continue on new "
          f"data, copy the checkpoint with `scripts/convert_checkpoint.py --checkpoint_dir="
          f"{checkpoint_dir(workdir)} --output=W2/checkpoints --format=checkpoint "
          f"--restart_data` and train in W2 with --num_steps above {step}")


def older_step_warning(workdir, options, step: int) -> str | None:
  """The warning for a run that only evaluates its newest checkpoint `step` while
  `--num_steps` names an older one the workdir keeps (early stopping's best step): the
  README's scoring rule (`--num_steps` at or below the checkpoint's step) reads as if
  `--num_steps=400` scored step 400; it scored 480, the `done:` line's `step=480` the only
  sign (a text `--predictions` file holds no step); None otherwise."""
  if not options.num_steps < step or options.num_steps not in step_dirs(
      checkpoint_dir(workdir)):
    return None
  ckpts = checkpoint_dir(workdir)
  return (f"warning: --num_steps={options.num_steps} does not choose the checkpoint: this "
          f"run evaluates the newest, step {step}. To evaluate step {options.num_steps}, "
          f"copy it into a workdir of its own: scripts/convert_checkpoint.py "
          f"--checkpoint_dir={ckpts} --step={options.num_steps} "
          f"--output=W_{options.num_steps}/checkpoints --format=checkpoint, then rerun with "
          f"--workdir=W_{options.num_steps}")


def warn(workdir, options, restored, step: int, stopped: bool) -> None:
  """Logs the warnings above that apply to a run evaluating `restored` (at `step`) only,
  on process 0 (and under launch.py on the supervisor's stderr too)."""
  if jax.process_index() != 0:
    return
  texts = [untrained_copy_warning(options, restored.data_state, step),
           other_data_warning(workdir, options, restored.data_state, restored.meta, step,
                              stopped),
           older_step_warning(workdir, options, step)]
  from jaxrec import elastic  # pylint: disable=import-outside-toplevel
  for text in filter(None, texts):
    log.warning("%s", text)
    elastic.report_warning(text)
