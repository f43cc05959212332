"""Eval batches get the same host-side id checks as train batches: an out-of-range id in
the eval data is a DataError naming the feature, not a silently clamped lookup."""

import dataclasses

import numpy as np
import pytest

from jaxrec import launch
from jaxrec.checkpoint.manager import CheckpointManager
from jaxrec.errors import DataError
from jaxrec.train import config as config_lib, data_adapter, loop

BINDINGS = ["ExperimentConfig.batch_size=64", "ExperimentConfig.eval_batch_size=512",
            "ExperimentConfig.num_eval_examples=512", "DLRM.bottom_mlp=(16,)",
            "DLRM.top_mlp=(16,1)"]


class _BadEval:
  """The real eval data, with feature `feature`'s first id set to `value`."""

  def __init__(self, inner, feature, value):
    self.inner, self.feature, self.value = inner, feature, value

  def __iter__(self):
    for batch, mask in self.inner:
      ids = np.array(batch.ids[self.feature])
      ids[0, 0] = self.value
      yield batch.replace(ids=dict(batch.ids, **{self.feature: ids})), mask

  def __getattr__(self, name):
    return getattr(self.inner, name)


def test_out_of_range_eval_id_is_a_data_error(monkeypatch, tmp_path):
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  config = config_lib.ExperimentConfig()
  feature = config.embedding[1][0]
  rows = next(t.rows for t in config.embedding[0] if t.name == feature.table)
  real = data_adapter.eval_data
  monkeypatch.setattr(data_adapter, "eval_data",
                      lambda c, o: _BadEval(real(c, o), feature.name, rows))
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", log_every=2,
                                  checkpoint_every=2, progress=False)
  with pytest.raises(DataError, match=rf"feature '{feature.name}' \(table '{feature.table}', "
                     rf"{rows} rows\): id {rows} is out of range"):
    loop.train_and_evaluate(config, options, str(tmp_path))


def test_a_missing_train_data_leaves_no_checkpointer_open(monkeypatch, tmp_path):
  """A data error found after `W/checkpoints`' manager was created closed neither it nor
  the tier, and orbax's cleanup thread printed a traceback after the `error:` line. The
  training data now opens before the manager: none is created, or it is closed."""
  opened, closed = [], []
  real_init, real_close = CheckpointManager.__init__, CheckpointManager.close
  monkeypatch.setattr(CheckpointManager, "__init__",
                      lambda self, *a, **k: (opened.append(1), real_init(self, *a, **k))[1])
  monkeypatch.setattr(CheckpointManager, "close",
                      lambda self: (closed.append(1), real_close(self)))
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", progress=False,
                                  train_data=str(tmp_path / "missing.tsv"))
  with pytest.raises(DataError, match="missing.tsv: no such file or directory"):
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path / "w"))
  assert len(closed) == len(opened)


def test_the_loss_line_is_written_before_the_checkpoint_and_eval(monkeypatch, tmp_path):
  """At a step that checkpoints and evaluates, the loss line came after the eval: killed in
  the eval once the (async) save had committed, the rerun resumed past a step that never
  got its loss line, the final one included. Now: loss line, checkpoint, eval line."""
  import json  # pylint: disable=import-outside-toplevel
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  seen, saved = [], []
  real, real_save = loop.evaluate, CheckpointManager.save

  def evaluate(*args, **kwargs):
    seen.append([json.loads(l) for l in open(tmp_path / "metrics.jsonl")])
    return real(*args, **kwargs)

  def save(self, step, *args, **kwargs):
    saved.append([json.loads(l) for l in open(tmp_path / "metrics.jsonl")])
    return real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(loop, "evaluate", evaluate)
  monkeypatch.setattr(CheckpointManager, "save", save)
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", log_every=2,
                                  checkpoint_every=2, progress=False)
  result = loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  assert [sorted(l) for l in seen[0]] == [["examples_per_sec", "loss", "step"]]
  assert saved == seen   # the loss line was there before the save, not only the eval
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[0] == seen[0][0] and sorted(lines[1]) == [
      "eval_auc", "eval_calibration", "eval_examples", "eval_logloss", "eval_ne",
      "step"] and lines[1]["step"] == 2
  assert result["loss"] == lines[0]["loss"] and result["eval_auc"] == lines[1]["eval_auc"]


def test_a_restart_without_a_checkpoint_marks_the_dead_runs_lines(tmp_path):
  """A run killed before its first save left lines at steps 50-150; the rerun (no
  checkpoint: from step 0) wrote no rewind line, so plots and `read_metrics` mixed the
  dead run's points (and its eval at a step the new run only logged) into the new run's."""
  import json  # pylint: disable=import-outside-toplevel
  from jaxrec.train import plotting  # pylint: disable=import-outside-toplevel
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  dead = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0, "eval_auc": 0.1},
          {"step": 3, "loss": 7.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dead))
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", log_every=2,
                                  progress=False)
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[:4] == dead + [{"step": 0, "event": "restart"}]
  got = plotting.read_metrics(str(tmp_path))
  assert [r["step"] for r in got] == [0, 2] and got[1]["loss"] != 8.0
  assert got[1]["eval_auc"] != 0.1   # the new run's own eval (the last step evaluates)
  fresh = tmp_path / "fresh"
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(fresh))
  assert all(json.loads(l).get("event") != "restart" for l in open(fresh / "metrics.jsonl"))


def test_a_step_saved_but_not_evaluated_is_evaluated_on_resume(monkeypatch, tmp_path):
  """A run stopped during the eval of a step it had already checkpointed (the loop saves
  first) resumed after that step, and the step's eval was never done: a hole in the eval
  curve, nothing said. The rerun now evaluates the restored step first, once."""
  import json  # pylint: disable=import-outside-toplevel
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  real, evals, killed_at = loop.evaluate, [], [2]

  def killed_in_an_eval(*args, **kwargs):
    evals.append(1)
    if len(evals) == killed_at[0]:
      raise KeyboardInterrupt   # as Ctrl-C / a kill after that step's checkpoint committed
    return real(*args, **kwargs)
  monkeypatch.setattr(loop, "evaluate", killed_in_an_eval)   # in the eval of step 4
  options = config_lib.RunOptions(num_steps=6, mesh="data=8", plan="dp", log_every=2,
                                  eval_every=2, checkpoint_every=2, progress=False)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  monkeypatch.setattr(loop, "evaluate", real)

  def evaluated():
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    return [l["step"] for l in lines if "eval_auc" in l], lines
  assert evaluated()[0] == [2]
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  steps, lines = evaluated()
  assert steps == [2, 4, 6]
  resume = [i for i, l in enumerate(lines) if l.get("event") == "resume"]
  assert lines[resume[0]]["checkpoint_step"] == 4 and lines[resume[0] + 1]["step"] == 4
  assert sorted(lines[resume[0] + 1]) == ["eval_auc", "eval_calibration", "eval_examples",
                                          "eval_logloss", "eval_ne", "step"]
  # a resume from a step whose eval was done does not evaluate it again
  options = dataclasses.replace(options, num_steps=8)
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  assert evaluated()[0] == [2, 4, 6, 8]
  # the last step (evaluated whatever --eval_every says), stopped in its eval and then
  # extended: its checkpoint says it was to be evaluated
  evals.clear()
  killed_at[0] = 1
  monkeypatch.setattr(loop, "evaluate", killed_in_an_eval)   # in the eval of step 9
  options = dataclasses.replace(options, num_steps=9, eval_every=4)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  monkeypatch.setattr(loop, "evaluate", real)
  loop.train_and_evaluate(config_lib.ExperimentConfig(),
                          dataclasses.replace(options, num_steps=10), str(tmp_path))
  assert evaluated()[0] == [2, 4, 6, 8, 9, 10]
