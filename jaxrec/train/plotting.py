"""Plots `metrics.jsonl` of one or more workdirs: loss, eval AUC and examples/sec vs step."""

from __future__ import annotations

import json
import os
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxrec.errors import DataError
from jaxrec.train.writers import METRICS_FILE

PANELS = (("loss", "train loss"), ("eval_auc", "eval AUC"), ("examples_per_sec", "examples/sec"))


def read_metrics(workdir: str) -> list[dict]:
  """Records of `workdir/metrics.jsonl`, sorted by step, the last line winning per step and key.

  Raises:
    DataError: the file is missing, empty or holds a line that is not a JSON object.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise DataError(f"no metrics file at {path}")
  by_step: dict[int, dict] = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        step = int(rec["step"])
      except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}:{lineno}: not a JSON object with a 'step'") from None
      by_step.setdefault(step, {}).update(rec)
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
  fig = Figure(figsize=(6, 3 * len(PANELS)), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(PANELS), 1, sharex=True)
  for ax, (key, title) in zip(axes, PANELS):
    for label, records in zip(_labels(workdirs), runs):
      pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
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
  fig = figure(workdirs)
  output = output or os.path.join(workdirs[0], "metrics.png")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=100)
  return output
