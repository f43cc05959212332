"""A training batch's data error mid-run (a preprocessed shard holding a record preprocessing
never writes) saves the steps trained since the last checkpoint before the error ends the
run, and the rerun resumes at that batch: it trained them again before."""

import json
import os

import pytest

from jaxrec import launch
from jaxrec.checkpoint import tables
from jaxrec.errors import DataError
from jaxrec.train import config as config_lib, data_adapter, loop
from tests.train.test_loop_nan import BINDINGS

BAD = 6 * 64   # data position of the 7th batch


class FailingIterator:
  """Wraps the real train iterator. `how`: 'read' raises at position BAD as a shard's bad
  record does (the position stays); 'id' hands that batch out with an id out of range (the
  position moves on, `pack` refuses it); None: the real batches (the fixed data)."""

  def __init__(self, inner, how):
    self.inner, self.how = inner, how

  def __next__(self):
    position = self.inner.get_state()["position"]
    if position == BAD and self.how == "read":
      raise DataError("shard-00001.bin: record 5: label must be 0 or 1, got 2")
    batch = next(self.inner)
    if position == BAD and self.how == "id":
      next(iter(batch.ids.values()))[0] = 10**6
    return batch

  def __getattr__(self, name):
    return getattr(self.inner, name)


def config_with(monkeypatch, how):
  real = data_adapter.train_iterator
  monkeypatch.setattr(data_adapter, "train_iterator",
                      lambda c, o: FailingIterator(real(c, o), how))
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  return config_lib.ExperimentConfig()


def run(config, workdir, checkpoint_every=4):
  options = config_lib.RunOptions(num_steps=10, mesh="data=8", plan="dp", log_every=4,
                                  checkpoint_every=checkpoint_every, progress=False)
  return loop.train_and_evaluate(config, options, str(workdir))


def fingerprints(workdir, step):
  """The recorded fingerprints of every table's and optimizer state's exact bits."""
  return tables.saved_fingerprints(os.path.join(workdir, "checkpoints", str(step),
                                                "embeddings"))


@pytest.mark.parametrize("how,message", [("read", "record 5: label"),
                                         ("id", "id 1000000 is out of range")])
def test_the_steps_since_the_last_checkpoint_are_saved_and_the_rerun_resumes_there(
    monkeypatch, tmp_path, how, message):
  with pytest.raises(DataError, match=message):
    run(config_with(monkeypatch, how), tmp_path / "w")
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["4", "6"]
  lines = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  assert [l["step"] for l in lines if "loss" in l] == [4, 6]   # steps 5-6's window
  # the data fixed: the rerun resumes at step 6, at the failed batch, and ends where an
  # uninterrupted run ends
  monkeypatch.undo()
  assert run(config_with(monkeypatch, None), tmp_path / "w")["step"] == 10
  lines = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  assert {"step": 6, "event": "resume", "checkpoint_step": 6} in lines
  last = run(config_with(monkeypatch, None), tmp_path / "whole")
  assert [l for l in lines if "loss" in l][-1]["loss"] == last["loss"]   # steps 9-10
  assert fingerprints(tmp_path / "w", 10) == fingerprints(tmp_path / "whole", 10)


def test_nothing_trained_since_the_last_checkpoint_saves_nothing(monkeypatch, tmp_path):
  with pytest.raises(DataError):
    run(config_with(monkeypatch, "read"), tmp_path / "w", checkpoint_every=6)
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["6"]
