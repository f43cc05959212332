"""Early stopping on an eval metric (`--early_stop_metric`, `--early_stop_patience`,
`--early_stop_min_delta`): the run stops once the metric has not improved for `patience`
evals in a row, as Keras' `EarlyStopping` does, and the best eval's checkpoint is kept past
`--keep_checkpoints` (`CheckpointManager.protect`).

Every eval step is then a checkpoint step, so the best step and the stopping step both have
one. The state (best value and step, evals since it) is not stored: a resumed run (a kill
-9, a SIGTERM, an elastic restart, a NaN rollback) replays the eval lines of
`metrics.jsonl` up to its checkpoint's step, respecting rewinds (`writers.REWIND_EVENTS`),
so it goes on exactly as the run that was not stopped; metrics.jsonl holds every eval value
bit for bit (JSON floats round-trip), and an eval a killed run wrote past its checkpoint is
not counted. Process 0 reads the file and decides; the other processes of a job take its
state (`_agreed`).

The baseline: a run that starts training on new data from a restored model (a
`convert_checkpoint.py --restart_data` copy, or an import: a checkpoint holding no data
position, at a step above 0) first evaluates that model when metrics.jsonl has no eval of
its step, and that
eval counts as any other: the steps trained on this data must beat it, and while none does
its checkpoint is the one kept (on a day whose data only made the model worse, the best was
the least bad of the worse evals and the starting model rotated out). Its line is an
ordinary eval line of the start step, so a resume replays it; the step this data's training
started from is recorded in each checkpoint's meta (`data_start`), so a resumed run still
says when no step improved on it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import struct
from typing import Any, Mapping

import numpy as np

from jaxrec import jsonl
from jaxrec.errors import ConfigError

log = logging.getLogger("jaxrec")

EVENT = "early_stop"
HIGHER = ("eval_auc", "eval_mrr")   # and eval_recall_at_<k>: higher is better
LOWER = ("eval_logloss", "eval_ne")
NAMES = "eval_auc, eval_logloss, eval_ne, eval_recall_at_<k>, eval_mrr"
_RECALL = re.compile(r"^eval_recall_at_([0-9]+)$")


def mode(metric: str) -> str | None:
  """`max` or `min`: which way `metric` improves; None for a name it cannot watch."""
  if metric in HIGHER or _RECALL.match(metric):
    return "max"
  return "min" if metric in LOWER else None


def check_options(options) -> None:
  """The flags alone (`RunOptions.validate`): a known metric with a direction, evals
  during training to watch it, a patience of at least one eval, a finite `min_delta`."""
  metric = options.early_stop_metric
  if not metric:
    return
  if mode(metric) is None:
    why = (": its best is 1.0, not a highest or lowest value" if metric == "eval_calibration"
           else "")
    raise ConfigError(f"--early_stop_metric={metric}: not a metric early stopping can watch"
                      f"{why}; one of {NAMES}")
  if not options.eval_labels:
    raise ConfigError(f"--early_stop_metric={metric}: the eval data has no labels "
                      "(--noeval_labels), so its evals give no metric to watch")
  if options.eval_every <= 0:
    raise ConfigError(f"--early_stop_metric={metric} needs --eval_every > 0 (got "
                      f"{options.eval_every}: only the last step evaluates)")
  if options.early_stop_patience < 1:
    raise ConfigError(f"--early_stop_patience must be at least 1, got "
                      f"{options.early_stop_patience}")
  delta = options.early_stop_min_delta
  if not math.isfinite(delta) or delta < 0:
    raise ConfigError(f"--early_stop_min_delta must be a number >= 0, got {delta}")


def check_model(metric: str | None, model) -> None:
  """Before anything compiles: the retrieval metrics come from a model with towers
  (`TwoTower`), recall only at a `k` of its `recall_at`."""
  if not metric or metric in ("eval_auc", "eval_logloss", "eval_ne"):
    return
  from jaxrec.train import retrieval  # pylint: disable=import-outside-toplevel
  name = type(model).__name__
  if not retrieval.has_towers(model):
    raise ConfigError(f"--early_stop_metric={metric}: the model {name} does not produce it "
                      "(only a two-tower model's eval ranks items); its eval writes "
                      "eval_auc, eval_logloss, eval_ne")
  recall = _RECALL.match(metric)
  ks = tuple(int(k) for k in model.recall_at)
  if recall and int(recall.group(1)) not in ks:
    raise ConfigError(f"--early_stop_metric={metric}: the model {name} writes recall at "
                      f"{', '.join(map(str, ks)) or 'no k'} (TwoTower.recall_at); one of "
                      + ", ".join(f"eval_recall_at_{k}" for k in ks) + ", or eval_mrr")


def eval_history(path: str | None, metric: str, upto: int) -> list[tuple[int, float]]:
  """`(step, value)` of each eval line of `metric` in metrics.jsonl `path` at a step up to
  `upto`, by step: a rewind (`REWIND_EVENTS`) drops the lines before it past its step (steps
  the run then redid), a step's later line replaces an earlier one, and `null` is NaN.
  Event lines (an evaluate-only run's `resume`, maybe of other eval data) do not count."""
  from jaxrec.train.writers import REWIND_EVENTS  # pylint: disable=import-outside-toplevel
  if path is None:
    return []
  found: dict[int, float] = {}
  for at, record in jsonl.step_records(path, f'"{metric}"', '"event"'):
    if record.get("event") in REWIND_EVENTS:
      found = {s: v for s, v in found.items() if s <= at}
    elif "event" not in record and metric in record:
      value = record[metric]
      found[at] = float("nan") if value is None else float(value)
  return sorted((s, v) for s, v in found.items() if s <= upto)


def stopped_by(path: str, options, step: int | None) -> bool:
  """Whether the evals of `metrics.jsonl` (`path`) up to checkpoint `step` stopped the run
  (`options`' early stopping): a rerun from `step` then only evaluates, and opens no
  training data (which may be gone when new data is scored). Read on every process (the
  trainer's `EarlyStop.restore` takes process 0's state later)."""
  stopper = EarlyStop.of(options)
  if stopper.metric is None or step is None:
    return False
  for at, value in eval_history(path, stopper.metric, step):
    stopper.add(at, value)
  return stopper.stopped


@dataclasses.dataclass
class EarlyStop:
  """The decision of `--early_stop_*` (`metric` None: off; every method is then a no-op).
  `ckpt`: the run's `CheckpointManager`, told to keep the best step (None: tests)."""

  metric: str | None
  patience: int = 3
  min_delta: float = 0.0
  ckpt: Any = None
  best: float | None = None        # None: no finite value yet
  best_step: int | None = None
  since: int = 0                   # evals since the best (or the start) without improvement
  stopped_at: int | None = None
  data_start: int | None = None    # the step training on this data began at (`start_from`)

  @classmethod
  def of(cls, options, ckpt=None) -> EarlyStop:
    return cls(options.early_stop_metric or None, options.early_stop_patience,
               float(options.early_stop_min_delta), ckpt)

  @property
  def stopped(self) -> bool:
    return self.metric is not None and self.since >= self.patience

  def improves(self, value: float) -> bool:
    """Whether `value` beats the best by more than `min_delta` (the first finite value
    does; NaN and inf never)."""
    if not math.isfinite(value):
      return False
    if self.best is None:
      return True
    if mode(self.metric) == "max":
      return value - self.min_delta > self.best
    return value + self.min_delta < self.best

  def add(self, step: int, value: float) -> bool:
    """Counts the eval of `step`; returns whether the run stops here."""
    if self.improves(value):
      self.best, self.best_step, self.since = float(value), int(step), 0
    else:
      self.since += 1
    if self.stopped and self.stopped_at is None:
      self.stopped_at = int(step)
    return self.stopped

  def restore(self, metrics_path: str | None, step: int) -> None:
    """The state of a run at `step` (a restored checkpoint's), from `metrics_path` (process
    0's metrics.jsonl; None on the others, which take its state); keeps the best step's
    checkpoint."""
    if self.metric is None:
      return
    self.best, self.best_step, self.since, self.stopped_at = None, None, 0, None
    for at, value in eval_history(metrics_path, self.metric, step):
      self.add(at, value)
    self._agreed()
    if self.best_step is not None and self.ckpt is not None and (
        self.best_step not in self.ckpt.all_steps()):
      log.warning("warning: early stopping on %s: the best eval so far, at step %d, has no "
                  "checkpoint (saved without --early_stop_metric, which saves each eval step, "
                  "or rotated out): a later best step will have one", self.metric,
                  self.best_step)
    if self.best_step is not None:
      log.info("early stopping on %s: best %.6g at step %d, %d eval(s) without improvement "
               "since (of --early_stop_patience=%d)", self.metric, self.best, self.best_step,
               self.since, self.patience)

  def start_from(self, restored, step: int, meta: dict) -> None:
    """Where training on this run's data began (`data_start`): a fresh run at 0, a restore
    of a checkpoint holding no data position (a --restart_data copy, an import) at its
    `step`, a resume where its checkpoint's meta says; written into `meta` (the saves')."""
    if restored is None:
      self.data_start = 0
    elif not restored.data_state:
      self.data_start = int(step)
    else:
      self.data_start = (restored.meta or {}).get("data_start")
    if self.data_start is not None:
      meta["data_start"] = self.data_start

  def baseline_due(self, metrics_path: str | None, step: int) -> bool:
    """Whether restored step `step`, where training on this data starts (`data_start`),
    is evaluated first as early stopping's baseline: metrics.jsonl (`metrics_path`,
    process 0's; None on the others, which take its answer) has no eval of it with the
    metric."""
    if self.metric is None or self.data_start != step or step <= 0:
      return False
    due = metrics_path is not None and step not in dict(
        eval_history(metrics_path, self.metric, step))
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
    return due

  def start_note(self, step: int, baseline: bool) -> str:
    """The log line of a run that evaluates its restored `step` before training."""
    if baseline:
      return (f"early stopping on {self.metric}: evaluating checkpoint {step}, the model this "
              "run starts from on this data, first (metrics.jsonl has no eval of it): the "
              "steps trained on this data must beat it, and while none does its checkpoint "
              "is the best, kept")
    return (f"step {step} was saved to be evaluated and metrics.jsonl has no eval of it (the "
            "run stopped before or during that eval): evaluating it first")

  def best_is_start(self) -> bool:
    """Whether the best eval is that of the step training on this data started from (a
    baseline): no step trained on it improved on the model it started with."""
    return (self.metric is not None and self.best_step is not None
            and self.best_step == self.data_start and self.data_start > 0)

  def observe(self, step: int, record: Mapping[str, Any], writer) -> bool:
    """After the eval line of `step` (`record` holds its values; one without the metric,
    e.g. an eval SIGTERM cut short, is no eval): counts it, keeps the best step's
    checkpoint and, when the run stops here, writes the `early_stop` line. Returns
    whether it stops."""
    if self.metric is None or self.metric not in record:
      return False
    value = record[self.metric]
    self.add(step, float("nan") if value is None else float(value))
    self._agreed()
    if not self.stopped:
      log.info("%s %.6g at step %d: best %s, %d of %d eval(s) without improvement",
               self.metric, float("nan") if value is None else value, step, self._best_text(),
               self.since, self.patience)
      return False
    line = {"event": EVENT, "best_step": self.best_step, "metric": self.metric,
            "best": self.best, "patience": self.patience, "min_delta": self.min_delta}
    if self.best_is_start():
      line["best_is_start"] = True
    writer.write(step, line)
    log.info("early stop after step %d: %s has not improved for %d evals (best %s%s)", step,
             self.metric, self.since, self._best_text(), self._kept_text())
    if self.best_is_start():   # under launch.py on the supervisor's stderr too
      import jax  # pylint: disable=import-outside-toplevel
      from jaxrec import elastic  # pylint: disable=import-outside-toplevel
      log.warning("%s", self.no_improvement_text())
      if jax.process_index() == 0:
        elastic.report_warning(self.no_improvement_text())
    return True

  def no_improvement_text(self) -> str:
    """The warning of a stop whose best is the model the run started from."""
    where = "the checkpoint directory" if self.ckpt is None else str(self.ckpt.directory)
    return (f"warning: no step trained on this data improved on checkpoint {self.best_step}, "
            f"the model this run started from ({self.metric} {self.best:.6g}): it stays the "
            f"best, kept in {where}; go on from it (convert_checkpoint.py --step="
            f"{self.best_step}), not from the stopping step {self.stopped_at}")

  def _kept_text(self) -> str:
    """What the stop line says of the best step's checkpoint: a best from before early
    stopping was on may have none (the restore warned), and a run without one has none."""
    if self.best_step is None:
      return ""
    if self.ckpt is not None and self.best_step not in self.ckpt.all_steps():
      return ("; it has no checkpoint (saved without --early_stop_metric or rotated out): "
              f"checkpoint {self.stopped_at} is the run's last")
    return "; its checkpoint is kept"

  def rerun_note(self, step: int) -> str:
    """The log line of a rerun whose evals up to its checkpoint `step` stopped it (the
    stopping step's, or a lower `--early_stop_patience`): it trains nothing."""
    return (f"stopped early at step {self.stopped_at}: {self.metric} has not improved for "
            f"{self.since} evals (--early_stop_patience={self.patience}; best "
            f"{self._best_text()}): training nothing more, evaluating checkpoint {step}; "
            "raise --early_stop_patience or leave out the --early_stop_* flags to train on")

  def summary(self) -> dict[str, Any]:
    """The `done:` line's (`train_and_evaluate`'s result's) fields: where the best is."""
    if self.metric is None or self.best_step is None:
      return {}
    return {"early_stop_best_step": self.best_step, f"early_stop_best_{self.metric}": self.best,
            **({"early_stop_best_is_start": True} if self.best_is_start() else {})}

  def _best_text(self) -> str:
    return ("none yet (no finite value)" if self.best_step is None
            else f"{self.best:.6g} at step {self.best_step}")

  def _agreed(self) -> None:
    """Process 0's state on every process of a job (their eval values could differ in the
    last bit), then the best step kept from rotation."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      self._decode(np.asarray(multihost_utils.broadcast_one_to_all(self._encode())))
    if self.ckpt is not None:
      self.ckpt.protect(() if self.best_step is None else (self.best_step,))

  def _encode(self) -> np.ndarray:
    """int32 words (a float64 through jax without x64 would lose bits)."""
    best = struct.unpack("<2i", struct.pack("<d", math.nan if self.best is None else self.best))
    return np.asarray([-1 if self.best_step is None else self.best_step, self.since,
                       -1 if self.stopped_at is None else self.stopped_at, *best], np.int32)

  def _decode(self, words: np.ndarray) -> None:
    best_step, since, stopped_at, lo, hi = (int(w) for w in words)
    self.best_step = None if best_step < 0 else best_step
    self.best = None if best_step < 0 else struct.unpack("<d", struct.pack("<2i", lo, hi))[0]
    self.since, self.stopped_at = since, None if stopped_at < 0 else stopped_at


def best_step_note(checkpoint_dir: str, step: int) -> str | None:
  """The note for a conversion without `--step` that picked `step` of `checkpoint_dir`
  (`W/checkpoints`) where early stopping stopped W's run (`W/metrics.jsonl`'s last
  `early_stop` line) and kept its better best step: following the docs' `--restart_data`
  command, day 1 went on from the stopping step (eval_auc 0.8444) while the best (0.8504)
  sat beside it, unnamed. None otherwise (also for a best step no longer there)."""
  from jaxrec.checkpoint.steps import step_dirs  # pylint: disable=import-outside-toplevel
  from jaxrec.train.writers import METRICS_FILE  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), METRICS_FILE)
  stops = [r for _, r in jsonl.step_records(path, f'"{EVENT}"') if r.get("event") == EVENT]
  if not stops or stops[-1]["step"] != step:
    return None
  last = stops[-1]
  best = last.get("best_step")
  if best is None or best == step or best not in step_dirs(checkpoint_dir):
    return None
  return (f"note: step {step} is where early stopping stopped the run ({last['metric']} had "
          f"not improved for {last['patience']} evals); its best step, {best} "
          f"({last['metric']} {last['best']:.6g}), is kept in {checkpoint_dir}: "
          f"--step={best} converts that one")
