"""Per-example scores of a run's final evaluation (`scripts/train.py --predictions=PATH`).

Scoring a file with a trained model is an evaluate-only rerun (`--num_steps` at or below
the checkpoint's step, `--eval_data=FILES`) that also writes what the eval computed: one
entry per eval example, in the eval data's order (files in their listed order, lines in
order; the padding of the last batch left out). `PATH` ending in `.npz` (any case)
holds arrays `label`, `score` (the sigmoid of the logit: a click probability; a
two-tower's pairwise score) and `logit`, all float32 `[examples]`, and `step`; any other
name is a tab-separated text file with a header line `label  score  logit`,
gzip-compressed when the name ends in `.gz` (any case; `.npz.gz` is refused). Eval files without labels
(`--noeval_labels`) have no `label`. Process 0 writes it (every process's rows are
gathered for the eval anyway), atomically: a run killed while writing leaves the earlier
file or none. With early stopping every eval writes it (any may be the last).
"""

from __future__ import annotations

import gzip
import io
import os

import numpy as np

from jaxrec import files
from jaxrec.errors import ConfigError, OutputError
from jaxrec.train.metrics import sigmoid

FLAG = "--predictions"


def check_path(path: str | None) -> None:
  """Refuses, before anything trains, a `--predictions` path that cannot be written at the
  end: a directory, a missing or read-only parent directory, an unexpanded `~`."""
  if path is None:
    return
  if not str(path).strip():
    raise ConfigError(f"{FLAG}: empty; give a file name (.npz, .tsv or .tsv.gz) or leave "
                      "the flag out")
  files.check_not_unexpanded_home(FLAG, path)
  if str(path).lower().endswith(".npz.gz"):   # was written as gzipped text, not an npz
    raise ConfigError(f"{FLAG}={path}: an .npz file is not gzipped; name it .npz (numpy "
                      "arrays) or .tsv.gz (gzipped text)")
  if os.path.isdir(path):
    raise ConfigError(f"{FLAG}={path} is a directory; give a file name inside it, e.g. "
                      f"{os.path.join(path, 'predictions.tsv')}")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise ConfigError(f"{FLAG}={path}: its directory {parent} does not exist")
  if not files.is_writable(parent):
    raise ConfigError(f"{FLAG}={path}: cannot create files in {parent}")


def at(path: str | None, step: int, final: bool = True) -> tuple[str, int] | None:
  """`evaluate`'s `predictions` for the eval of `step`: None without `--predictions` or
  for an eval before the `final` one (the last step's, or an evaluate-only run's)."""
  return None if path is None or not final else (path, step)


def write(path: str, logits, labels, step: int) -> str:
  """Writes the scores of `step`'s eval (`logits`, `labels`: `[examples]`; `labels` None
  for unlabeled data) to `path` in the format its name picks (module docstring); returns a
  line saying what was written."""
  logits = np.asarray(logits, np.float32).reshape(-1)
  scores = sigmoid(logits).astype(np.float32)   # as the eval's logloss reads them
  columns = {"score": scores, "logit": logits}
  if labels is not None:
    labels = np.asarray(labels, np.float32).reshape(-1)
    if logits.shape != labels.shape:
      raise ValueError(f"{logits.shape[0]} logits for {labels.shape[0]} labels")
    columns = {"label": labels, **columns}
  try:
    with files.atomic_output(path) as tmp:
      kind = os.path.splitext(path)[1].lower()   # `.NPZ` too (it was written as text)
      if kind == ".npz":
        with open(tmp, "wb") as f:   # (np.savez given a name would append .npz to it)
          np.savez(f, **columns, step=np.int64(step))
      else:
        with open(tmp, "wb") as raw:   # gzip's header names `path` (gunzip -N), not `tmp`
          out = (gzip.GzipFile(os.path.basename(path)[:-3], "wb", compresslevel=6, fileobj=raw)
                 if kind == ".gz" else raw)   # (level 6: gzip's own default, 2x faster than 9)
          with io.TextIOWrapper(out, encoding="utf-8") as f:   # closes `out` (the gzip end)
            f.write("\t".join(columns) + "\n")
            np.savetxt(f, np.stack(list(columns.values()), 1), fmt="%.9g", delimiter="\t")
  except OSError as e:
    raise OutputError(f"{FLAG}={path}: writing the eval's scores failed: {e}") from e
  return f"wrote the scores of step {step}'s eval ({logits.size} examples) to {path}"
