"""Plots `metrics.jsonl` of one or more workdirs: loss, eval AUC and examples/sec vs step."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxrec import jsonl
from jaxrec.errors import DataError
from jaxrec.files import atomic_output
from jaxrec.train.writers import METRICS_FILE, REWIND_EVENTS

_LOG = logging.getLogger(__name__)
PANELS = (("loss", "train loss"), ("eval_auc", "eval AUC"), ("examples_per_sec", "examples/sec"))


def read_metrics(workdir: str) -> list[dict]:
  """Records of `workdir/metrics.jsonl`, sorted by step, the last line winning per step and key.

  A `resume`, `restart` or `nan_rollback` line (written at the step the run went back to) drops the
  earlier lines past its step: they are of the steps the run redoes (a run killed after
  its last checkpoint, a rolled-back window), not of the curve it then trains.
  An event line's eval values (an evaluate-only run's, maybe of other data) leave those of
  a training run's eval line at that step as they are.

  A last line without its newline that does not parse (a run killed mid-write) is left
  out with a warning.

  Raises:
    DataError: the file is missing, unreadable, not UTF-8 text, empty or holds a line that
      is not a JSON object with a finite 'step', or whose loss, eval AUC or examples/sec
      is neither a number nor null.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise DataError(f"no metrics file at {path}")
  by_step: dict[int, dict] = {}
  try:
    lines = list(jsonl.complete_lines(path))
  except UnicodeDecodeError as e:   # not a metrics file (binary, or corrupted on disk)
    raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from None
  for lineno, line in lines:
    try:
      rec = json.loads(line)
      step = int(rec["step"])
    except (ValueError, KeyError, TypeError, OverflowError):   # Overflow: "step": Infinity
      raise DataError(f"{path}:{lineno}: not a JSON object with a 'step'") from None
    for key, _ in PANELS:   # a null is a gap (warned); anything else would be left out
      value = rec.get(key)
      if key in rec and value is not None and (
          isinstance(value, bool) or not isinstance(value, (int, float))):
        raise DataError(f"{path}:{lineno}: '{key}' is not a number or null: "
                        f"{json.dumps(value)}")
    if rec.get("event") in REWIND_EVENTS:
      by_step = {s: r for s, r in by_step.items() if s <= step}
    entry = by_step.setdefault(step, {})
    if "event" in rec:   # an evaluate-only run's values (maybe of other --eval_data) leave
      rec = {k: v for k, v in rec.items()   # the training run's eval at that step as it is
             if not k.startswith("eval_") or not any(x.startswith("eval_") for x in entry)}
    entry.update(rec)
  if not by_step:
    raise DataError(f"metrics file {path} is empty")
  return [by_step[s] for s in sorted(by_step)]


def _labels(workdirs: Sequence[str]) -> list[str]:
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def figure(workdirs: Sequence[str]) -> Figure:
  """One panel per `PANELS` entry (loss, eval AUC, examples/sec vs step), each workdir's
  curve overlaid and labelled with its name."""
  if not workdirs:
    raise DataError("no workdir given")
  runs = [read_metrics(w) for w in workdirs]
  for workdir, records in zip(workdirs, runs):   # else an empty curve, missing from the legend
    if not any(isinstance(r.get(key), (int, float)) for r in records for key, _ in PANELS):
      events = ", ".join(sorted({str(r.get("event")) for r in records}))
      raise DataError(f"{os.path.join(workdir, METRICS_FILE)}: no "
                      f"{', '.join(k for k, _ in PANELS)} value to plot (only {events} lines)")
  fig = Figure(figsize=(6, 3 * len(PANELS)), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(PANELS), 1, sharex=True)
  for ax, (key, title) in zip(axes, PANELS):
    for workdir, label, records in zip(workdirs, _labels(workdirs), runs):
      pts = [(r["step"], math.nan if r[key] is None else r[key]) for r in records
             if key in r and (r[key] is None or isinstance(r[key], (int, float)))]
      bad = [x for x, y in pts if not math.isfinite(y)]
      if bad:   # written as null: a gap in the curve
        _LOG.warning("%s: %s is NaN/inf at %d step(s): %s",
                     os.path.join(workdir, METRICS_FILE), key, len(bad),
                     ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""))
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, markersize=3, label=label)
    ax.set_ylabel(title)
    ax.grid(True, alpha=0.3)
    if ax.has_data():
      ax.legend(fontsize="small")
  axes[-1].set_xlabel("step")
  return fig


def plot_metrics(workdirs: Sequence[str], output: str | None = None) -> str:
  """Draws every workdir's curves overlaid in one PNG (see `figure`); returns its path.

  Args:
    workdirs: run directories holding `metrics.jsonl`; legend entries are their names.
    output: PNG path; default `<workdirs[0]>/metrics.png`.
  """
  if not workdirs:
    raise DataError("no workdir given")
  output = output or os.path.join(workdirs[0], "metrics.png")
  fmt = os.path.splitext(output)[1][1:].lower()
  formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
  if os.path.isdir(output) or fmt not in formats:
    raise DataError(f"--output: '{output}' is not an image file name ending in one of "
                    f"{', '.join('.' + f for f in sorted(formats))}")
  fig = figure(workdirs)
  try:   # an existing plot stays whole, and no partial image is left, whatever fails
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with atomic_output(output) as tmp:
      fig.savefig(tmp, dpi=100, format=fmt)
  except OSError as e:
    raise DataError(f"--output: cannot write {output}: {e.strerror or e}") from None
  except RuntimeError as e:   # a format whose backend needs a tool (.pgf: a LaTeX engine)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"--output: matplotlib cannot write .{fmt} here ({reason}); pick "
                    "another extension, e.g. .png") from None
  return output
