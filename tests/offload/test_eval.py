"""Evaluation with offloaded tables, in the trainer: eval batches interleaved with training
(look-ahead running), right after checkpoint saves, after a resume and on a run that only
evaluates give the metrics of the same run with every table on the device."""

import numpy as np
import pytest

from tests.offload.offload_helpers import (SMALL_DLRM, logged_lines, logged_losses,
                                          train_synthetic)

# 256-example eval batches, the last one partial (600 = 2 x 256 + 88); the eval set holds rows
# training never read. t5 (2,000 rows, bags of 8) caches 1,900: evictions every step.
BINDINGS = SMALL_DLRM + ["ExperimentConfig.eval_batch_size=256",
                         "ExperimentConfig.num_eval_examples=600"]
OFFLOAD = ["OffloadConfig.tables={'t0': {'cache_rows': 3000}, 't5': {'cache_rows': 1900}}",
           "OffloadConfig.host_buffer_rows=600", "OffloadConfig.prefetch_depth=3"]
EVAL_KEYS = ("eval_auc", "eval_logloss", "eval_examples")


def _evals(workdir) -> dict[int, list[float]]:
  """`{step: [auc, logloss, examples]}` of the eval lines (a resume line's too)."""
  return {l["step"]: [l[k] for k in EVAL_KEYS] for l in logged_lines(workdir)
          if "eval_auc" in l}


@pytest.mark.slow
def test_interleaved_evals_and_resume_match_on_device_tables(tmp_path):
  # eval every 7 steps, checkpoints every 10 (and at 12, where the first run stops): evals
  # 7 and 14 run between saves with batches planned ahead, 12 and 22 right after a save,
  # 14 and 21 after the resume from 12; the third run only evaluates checkpoint 22
  ref, off = tmp_path / "ref", tmp_path / "off"
  train_synthetic(ref, 22, BINDINGS, mesh="data=8", eval_every=7)
  train_synthetic(off, 12, BINDINGS + OFFLOAD, mesh="data=8", eval_every=7)
  train_synthetic(off, 22, BINDINGS + OFFLOAD, mesh="data=8", eval_every=7)
  want = _evals(ref)
  first = _evals(off)
  train_synthetic(off, 22, BINDINGS + OFFLOAD, mesh="data=8", eval_every=7)
  again = [l for l in logged_lines(off) if l.get("event") == "resume"][-1]
  assert sorted(first) == [7, 12, 14, 21, 22] and sorted(want) == [7, 14, 21, 22]
  for step in want:
    np.testing.assert_allclose(first[step], want[step], rtol=0, atol=1e-6, err_msg=step)
  assert want[22][2] == 600
  # the evals wrote nothing to the tables: training after them is unchanged
  losses, ref_losses = logged_losses(off), logged_losses(ref)
  np.testing.assert_allclose([losses[s] for s in (5, 10, 20, 22)],
                             [ref_losses[s] for s in (5, 10, 20, 22)], rtol=0, atol=1e-6)
  np.testing.assert_allclose([again[k] for k in EVAL_KEYS], want[22], rtol=0, atol=1e-6)
