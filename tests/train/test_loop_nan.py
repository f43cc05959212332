"""--on_nan: stop names the step; rollback restores, skips the bad batch and goes on."""

import json
import os

import numpy as np
import pytest

from jaxrec import launch
from jaxrec.train import config as config_lib, data_adapter, loop

BINDINGS = ["ExperimentConfig.batch_size=64", "ExperimentConfig.eval_batch_size=512",
            "ExperimentConfig.num_eval_examples=512", "DLRM.bottom_mlp=(16,)",
            "DLRM.top_mlp=(16,1)"]


class PoisonedIterator:
  """Wraps the real train iterator; the batch at data position `bad` has NaN dense values."""

  def __init__(self, inner, bad):
    self.inner, self.bad = inner, bad

  def __next__(self):
    position = self.inner.get_state()["position"]
    batch = next(self.inner)
    if position == self.bad:
      batch.dense[:] = np.nan
    return batch

  def __getattr__(self, name):
    return getattr(self.inner, name)


@pytest.fixture
def poisoned(monkeypatch):
  real = data_adapter.train_iterator
  monkeypatch.setattr(data_adapter, "train_iterator",
                      lambda c, o: PoisonedIterator(real(c, o), bad=6 * 64))
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  return config_lib.ExperimentConfig()


def run(config, workdir, on_nan):
  options = config_lib.RunOptions(num_steps=12, mesh="data=8", plan="dp", log_every=4,
                                  checkpoint_every=4, on_nan=on_nan, progress=False)
  return loop.train_and_evaluate(config, options, str(workdir))


def test_stop_names_the_step_and_keeps_checkpoints(poisoned, tmp_path):
  with pytest.raises(loop.TrainingError, match="non-finite loss nan at step 7 .*checkpoint .step 4. in .* is untouched"):
    run(poisoned, tmp_path, "stop")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[-1] == {"step": 7, "event": "nan_stop", "bad_step": 7, "position": 384,
                       "rollbacks": 0}
  assert all(np.isfinite(l["loss"]) for l in lines if "loss" in l)


def test_stop_before_the_first_checkpoint_says_none_was_saved(monkeypatch, tmp_path):
  """A NaN before any checkpoint used to say "the last checkpoint in W/checkpoints is
  untouched" of an empty directory; the message now says none was saved (and names the
  step of the one kept when there is one, see above)."""
  real = data_adapter.train_iterator
  monkeypatch.setattr(data_adapter, "train_iterator",
                      lambda c, o: PoisonedIterator(real(c, o), bad=1 * 64))
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  with pytest.raises(loop.TrainingError) as e:
    run(config_lib.ExperimentConfig(), tmp_path, "stop")
  assert "at step 2 (--on_nan=stop); no checkpoint was saved in" in str(e.value), e.value
  assert os.listdir(tmp_path / "checkpoints") == []


def test_rollback_skips_the_batch(poisoned, tmp_path):
  result = run(poisoned, tmp_path, "rollback")
  assert result["step"] == 12 and np.isfinite(result["loss"])
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  events = [l for l in lines if l.get("event") == "nan_rollback"]
  assert events == [{"step": 4, "event": "nan_rollback", "bad_step": 7, "restored_step": 4,
                     "skipped_position": 384}]
  assert all(np.isfinite(l["loss"]) for l in lines if "loss" in l)
