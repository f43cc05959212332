"""The loop's log windows: loss and throughput cover exactly the steps since the last line,
whatever eval and checkpoint steps fall between lines."""

import json
import time
import types

import numpy as np
import pytest

from jaxrec import launch
from jaxrec.checkpoint.manager import CheckpointManager
from jaxrec.train import config as config_lib, loop

BINDINGS = ["ExperimentConfig.batch_size=64", "ExperimentConfig.eval_batch_size=512",
            "ExperimentConfig.num_eval_examples=512", "DLRM.bottom_mlp=(16,)",
            "DLRM.top_mlp=(16,1)"]


def run(workdir, **kw):
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  options = config_lib.RunOptions(num_steps=8, mesh="data=8", plan="dp", progress=False, **kw)
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(workdir))
  return [json.loads(l) for l in open(workdir / "metrics.jsonl")]


SAVE_S = 1000.0   # what each checkpoint save adds to the loop's clock


@pytest.fixture
def slow_save(monkeypatch):
  """Every checkpoint save takes SAVE_S longer on the loop's clock (a `time.perf_counter`
  of `loop` that a save moves on), not on the wall clock: a sleep of 1 s against a bound of
  0.5 s for 3 real steps failed whenever a loaded machine made those steps slow."""
  real_clock, offset = time.perf_counter, [0.0]
  monkeypatch.setattr(loop, "time", types.SimpleNamespace(
      perf_counter=lambda: real_clock() + offset[0]))
  real = CheckpointManager.save

  def save(self, *a, **kw):
    offset[0] += SAVE_S
    return real(self, *a, **kw)

  monkeypatch.setattr(CheckpointManager, "save", save)


def test_windows_between_log_lines(tmp_path, slow_save):
  per_step = run(tmp_path / "each", log_every=1)
  losses = np.array([l["loss"] for l in per_step if "loss" in l])
  lines = run(tmp_path / "w", log_every=4, eval_every=2, checkpoint_every=2)
  train = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train] == [4, 8]
  # loss: the mean of all 4 steps of the window, not only those after the checkpoint
  np.testing.assert_allclose([l["loss"] for l in train],
                             [losses[:4].mean(), losses[4:].mean()], rtol=1e-5)
  # an eval every 2 steps, also on steps that checkpoint without logging
  assert [l["step"] for l in lines if "eval_auc" in l] == [2, 4, 6, 8]
  # checkpoint time (SAVE_S each) is not training time: 3-4 tiny steps take far less
  for l in train:
    assert l["examples_per_sec"] > 3 * 64 / (SAVE_S / 10), l
