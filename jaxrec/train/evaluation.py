"""The eval pass (exact AUC / logloss over the whole eval set) and the eval a resumed run
still owes: the loop checkpoints a step before evaluating it, so a run stopped during that
eval resumed past a step whose eval was never done."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxrec import elastic, jsonl, signals
from jaxrec.train import predictions as predictions_lib, retrieval
from jaxrec.train.metrics import EvalAccumulator
from jaxrec.train.placement import device_batch
from jaxrec.train.writers import REWIND_EVENTS

log = logging.getLogger(__name__)


class EvalStopped(Exception):
  """`evaluate` gave up between batches because `stop()` said so (SIGTERM during an eval);
  `.state` is the state to go on with."""


def evaluate(eval_step, collection, state, eval_data, sharding, tier=None, stop=None,
             model=None, predictions: tuple[str, int] | None = None
             ) -> tuple[dict[str, Any], dict]:
  """Exact AUC / logloss over the whole eval set (padding masked out), for a `model` with
  towers (`TwoTower`) the in-batch retrieval metrics too (`retrieval.py`: recall@k, MRR),
  and the state to go on with: with offloaded tables `tier.eval_logits` donates it and
  returns one holding the same values. An exception raised here carries that state as
  `.state`. `stop(batch)` true before a batch (1, 2, ...; a SIGTERM request) raises
  `EvalStopped`: a preemption's grace period is not spent on an eval whose result would be
  lost anyway. `predictions`: `(path, step)`, where process 0 writes every example's score
  (`predictions.write`)."""
  acc = EvalAccumulator()
  labeled = getattr(eval_data, "labeled", True)   # False: files without labels, scored only
  ranking = retrieval.accumulator(model, collection) if labeled else None

  def run(st, b):   # global [B, ...], replicated
    return jax.tree.map(np.asarray, eval_step(st, device_batch(collection, b, sharding)))

  def finish(out, batch, mask, number):
    labels = batch.labels
    keys = None if ranking is None else ranking.keys(batch)
    if jax.process_count() > 1:   # this process's rows → the global batch's
      labels, mask, keys = (None if x is None else
                            np.asarray(multihost_utils.process_allgather(x, tiled=True))
                            for x in (batch.labels, mask, keys))
    acc.add(np.asarray(out["logits"]), labels, mask > 0)
    if ranking is not None:
      ranking.add(out["user"], out["item"], keys, labels, mask > 0)
    elastic.report_alive("eval", batches=number)   # not hung: a long eval is no hang

  pending = None   # the batch whose outputs are read while the next one runs
  try:
    for batches, (batch, mask) in enumerate(eval_data, 1):
      signals.check()
      if stop is not None and stop(batches):
        raise EvalStopped(f"stopped before eval batch {batches}")
      if tier is not None:   # offloaded ids → cache slots, in passes when rows do not fit
        state, out = tier.eval_logits(state, batch, run)
      else:
        # dispatched; `pack` checks the ids as for train batches: no silent clamping
        out = eval_step(state, device_batch(collection, batch, sharding))
      if pending is not None:
        finish(*pending)
      pending = (out, batch, mask, batches)
    if pending is not None:
      finish(*pending)
  except Exception as e:   # offloaded: the state to go on with (`state` may be donated)
    e.state = getattr(e, "state", state)
    raise
  if predictions is not None:
    _write_predictions(acc, eval_data, *predictions, labeled=labeled)
  if not labeled:
    return {"eval_examples": acc.num_examples}, state
  return {**acc.result(), **(ranking.result() if ranking is not None else {})}, state


def _write_predictions(acc: EvalAccumulator, eval_data, path: str, step: int,
                       labeled: bool = True) -> None:
  """Process 0 writes the eval's scores to `path`; rows dropped as malformed have none, so
  the lines then do not follow the files' lines: said in a warning naming the counts."""
  if jax.process_index() != 0:
    return
  skipped = eval_data.bad_row_counts() if hasattr(eval_data, "bad_row_counts") else {}
  skipped = {k: v for k, v in skipped.items() if v}
  if skipped:   # under launch.py on its stderr too (a scoring job's only output there)
    text = (f"warning: {predictions_lib.FLAG}: the eval data's malformed rows "
            f"({', '.join(f'{k}: {v}' for k, v in skipped.items())}) were skipped and have "
            "no score: the entries follow the files' good lines only")
    log.warning("%s", text)
    elastic.report_warning(text)
  logits, labels = acc.arrays()
  log.info("%s", predictions_lib.write(path, logits, labels if labeled else None, step))


def stop_check(terminated, step: int, last: bool):
  """`evaluate`'s `stop` for the eval of `step`: a SIGTERM to this run (`terminated`, a
  `termination.SigtermRequests`, or None) or, under scripts/launch.py, the job's preemption
  (`elastic.stop_eval`: the launcher's SIGTERM, or this worker's). Not at the `last` step:
  its checkpoint is the job's last and a worker that stops there has finished."""
  def stop(batch: int) -> bool:
    if terminated is not None and terminated.is_set():
      return True
    return not last and elastic.stop_eval(step, batch)
  return stop


def owed(metrics_path: str | None, meta: Mapping | None, eval_every: int, step: int) -> bool:
  """Whether restored step `step` was to be evaluated after its save (its checkpoint's
  `meta["evaluates"]`; a checkpoint without it: a multiple of `eval_every`) and
  `metrics_path` (process 0's `metrics.jsonl`; None on the other processes, which take
  process 0's answer) has no eval line of it: the run stopped (killed, SIGTERM, a failed
  eval) after saving the step and before writing its eval."""
  due = (meta or {}).get("evaluates")
  if due is None:
    due = bool(eval_every) and step > 0 and step % eval_every == 0
  if not due:
    return False
  missing = metrics_path is not None and not has_eval_line(metrics_path, step)
  if jax.process_count() > 1:
    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing


def has_eval_line(path: str, step: int) -> bool:
  """Whether `path` holds an eval line (`eval_*` keys) of `step` that no later rewind
  (`writers.REWIND_EVENTS`) to an earlier step dropped."""
  found = False
  for at, record in jsonl.step_records(path, '"eval_', '"event"'):
    if record.get("event") in REWIND_EVENTS and at < step:
      found = False
    elif at == step and any(k.startswith("eval_") for k in record):
      found = True
  return found
