"""Metric sinks: `W/metrics.jsonl`, TensorBoard events under `W/tb/`, a tqdm progress bar.

`metrics.jsonl` holds one JSON object per `MetricsWriter.write` call, appended, so a resumed
run continues the same file (steps may then repeat; readers keep the last line per step).
Non-finite floats are written as `null` so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from typing import Any, Mapping

import numpy as np
import tqdm

from jaxrec import jsonl
from jaxrec.errors import OutputError

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
# event lines written at the step a run went back to: the lines past that step before them
# are of steps the run redid (`plotting.read_metrics`, `evaluation.owed`)
REWIND_EVENTS = ("resume", "nan_rollback", "restart")
# TensorBoard events are written out by tensorboardX's own thread this often (and at close).
# A flush fsyncs: one per logged step cost the loop 0.3-0.9 ms a step at `--log_every=1`;
# metrics.jsonl is written at once.
TB_FLUSH_SECS = 10


def _to_python(value: Any) -> Any:
  """numpy / jax scalars and arrays -> Python; non-finite floats -> None."""
  if hasattr(value, "shape") and getattr(value, "shape", None) == ():
    value = np.asarray(value).item()
  elif hasattr(value, "shape") and hasattr(value, "dtype"):
    value = np.asarray(value).tolist()
  elif isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _give_up_events(tb) -> None:
  """Marks the event file of tensorboardX writer `tb`, whose close failed, as closed: its
  atexit hook closes it again otherwise, and prints that failure as a traceback at exit."""
  event_writer = getattr(getattr(tb, "file_writer", None), "event_writer", None)
  if event_writer is None or not hasattr(event_writer, "_closed"):
    return
  worker = getattr(event_writer, "_worker", None)   # its thread reads a queue closed at exit
  if worker is not None:
    worker.stop()
  event_writer._closed = True   # pylint: disable=protected-access


class MetricsWriter:
  """Writes metrics to `workdir/metrics.jsonl` and TensorBoard (`workdir/tb/`).

  Args:
    workdir: run directory; created if missing.
    enabled: if false every call is a no-op (e.g. on processes other than 0).
    purge_step: the first step a resumed or restarted run trains (its checkpoint's step
      + 1): TensorBoard hides the earlier runs' events of that step and after (steps a
      killed run logged past its last checkpoint showed twice, its curve beside the
      rerun's). At the checkpoint's step itself it hid that step's loss and eval points,
      which no rerun logs again.
  """

  def __init__(self, workdir: str, enabled: bool = True, purge_step: int | None = None):
    self.path = os.path.join(workdir, METRICS_FILE)
    self._enabled = enabled
    self._file = None
    self._tb = None
    self.had_records = False   # an earlier run's lines (see `loop`: a restart marks them)
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      jsonl.repair_tail(self.path)   # a killed run's torn last line
      self._file = open(self.path, "a", buffering=1, encoding="utf-8")
      self.had_records = self._file.tell() > 0
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(logdir=os.path.join(workdir, TB_DIR), flush_secs=TB_FLUSH_SECS,
                               purge_step=purge_step)

  def write(self, step: int, metrics: Mapping[str, Any],
            scalars: Mapping[str, float] | None = None) -> None:
    """Appends `{'step': step, **metrics}` as one JSON line; numeric values also go to TB
    (written out every `TB_FLUSH_SECS` and at close), with `scalars`: TB only, what a
    non-number metric stands for there (e.g. `bad_rows/train`, the sum of the per-file
    `bad_rows` mapping)."""
    if not self._enabled:
      return
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items() if k != "step"})
    try:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    except OSError as e:
      self._failed(self.path, e)
    event = "event" in record   # its numbers are bookkeeping (`checkpoint_step`), not metrics
    values = [(k, v) for k, v in record.items() if not event or k.startswith("eval_")]
    for key, value in [*values, *(scalars or {}).items()]:
      value = _to_python(value)
      if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        self._tb.add_scalar(key, float(value), int(step))
    if any(k.startswith("eval_") for k in record):   # a rerun does not evaluate it again
      self.flush_events()

  def flush_events(self) -> None:
    """Writes the TensorBoard events out now (fsync), those still in tensorboardX's queue
    included: before a checkpoint and after an eval line, whose steps a rerun does not log
    again (a kill -9 within `TB_FLUSH_SECS` lost them from TensorBoard for good)."""
    if self._tb is None:
      return
    events = self._tb.file_writer.event_writer
    try:
      if events._worker is not None:   # pylint: disable=protected-access
        events._worker.stop()   # it writes the queued events first (pylint: disable=protected-access)
        events._closed = True   # `reopen`: a fresh thread on the same file (pylint: disable=protected-access)
        events.reopen()
      self._tb.flush()
    except OSError as e:
      self._failed(self._tb.logdir, e)

  def _failed(self, path: str, error: OSError):
    """A write failed (e.g. a full disk): drops both sinks without writing again (their
    buffered data would fail the same way, from `close` and from tensorboardX's atexit
    hook, as two more tracebacks) and raises `OutputError` naming the file."""
    file, tb, self._file, self._tb, self._enabled = self._file, self._tb, None, None, False
    for close in (file and file.close, tb and tb.close):
      try:
        if close is not None:
          close()
      except OSError:
        if tb is not None and close == tb.close:
          _give_up_events(tb)
    raise OutputError(f"cannot write {path}: {error.strerror or error}") from None

  def close(self) -> None:
    """Closes both sinks; a failure to write what they buffered is an `OutputError`."""
    if self._file is None and self._tb is None:
      self._enabled = False
      return
    try:
      if self._file is not None:
        self._file.close()
        self._file = None
      if self._tb is not None:
        self._tb.close()
        self._tb = None
    except OSError as e:
      self._failed(self.path if self._file is not None else self._tb.logdir, e)
    self._enabled = False

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Progress:
  """tqdm bar over training steps showing ETA, loss and examples/sec.

  Args:
    total_steps: last step of the run.
    initial_step: step the run starts from (resumed runs start mid-way).
    enabled: `None` shows the bar only when stderr is a TTY (quiet in CI and logs).
  """

  def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool | None = None):
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    self._bar = tqdm.tqdm(total=int(total_steps), initial=int(initial_step), unit="step",
                          dynamic_ncols=True, disable=disable, file=sys.stderr)
    self._step = int(initial_step)
    self._postfix: dict[str, str] = {}

  def update(self, step: int, loss: float | None = None,
             examples_per_sec: float | None = None) -> None:
    """Moves the bar to `step` and shows the latest loss and throughput (a value not given
    keeps its last one, e.g. no throughput on the first line after a compile)."""
    step = int(step)
    if loss is not None:
      self._postfix["loss"] = f"{float(loss):.4f}"
    if examples_per_sec is not None:
      self._postfix["ex/s"] = f"{float(examples_per_sec):,.0f}"
    if self._postfix:   # before the bar moves: its redraw shows this window, not the last
      self._bar.set_postfix(self._postfix, refresh=False)
    if step > self._step:
      self._bar.update(step - self._step)
      self._step = step

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
