"""A run already at --num_steps only evaluates: its `resume` line is the whole record of
that evaluation, so it carries what a training run's lines do (`bad_rows` included)."""

import dataclasses
import json
import os

import jax
import pytest

from jaxrec import launch
from jaxrec.errors import ConfigError
from jaxrec.schedules import lr_schedule
from jaxrec.train import config as config_lib, data_adapter, loop, run_records
from tests.train.test_loop_eval_ids import BINDINGS   # a small DLRM on 8 devices
from tests.train.test_mesh_choice import CONFIG   # a small DLRM, batch_size 64
from tests.train.test_writers import tb_scalars


class _Skipped:
  """The real eval data, reporting `counts` malformed rows dropped (`--bad_rows=skip`)."""

  def __init__(self, inner, counts):
    self.inner, self.counts = inner, counts

  def __iter__(self):
    return iter(self.inner)

  def bad_row_counts(self):
    return dict(self.counts)

  def __getattr__(self, name):
    return getattr(self.inner, name)


@pytest.mark.slow   # ~20 s: a training run to checkpoint, then the evaluate-only run
def test_an_evaluate_only_run_records_the_eval_rows_it_skipped(monkeypatch, tmp_path):
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  options = config_lib.RunOptions(num_steps=1, mesh="data=8", plan="dp", progress=False,
                                  bad_rows="skip")
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  real = data_adapter.eval_data
  monkeypatch.setattr(data_adapter, "eval_data",
                      lambda c, o: _Skipped(real(c, o), {"eval.tsv": 3}))
  result = loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  last = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][-1]
  assert last["event"] == "resume" and "eval_auc" in last
  assert last["bad_rows"] == {"eval.tsv": 3}
  assert result["bad_rows"] == {"eval.tsv": 3}   # the `done:` line
  assert tb_scalars(str(tmp_path))[("bad_rows/eval", 1)] == 3   # TB showed none


def test_an_evaluate_only_run_needs_only_the_eval_batch_to_divide(tmp_path):
  """A finished run resumed to evaluate was refused for a `batch_size` the devices do not
  divide, though it builds no training batch; a run that trains still is."""
  config = dataclasses.replace(CONFIG, batch_size=12, eval_batch_size=64)
  options = config_lib.RunOptions(num_steps=5, mesh="data=8", plan="dp")
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)   # saved at --num_steps: evaluates
  loop.setup(config, options, jax.devices()[:8], str(tmp_path))
  for workdir, num_steps in ((tmp_path, 6), (tmp_path / "new", 5)):   # these train
    with pytest.raises(ConfigError, match=r"^ExperimentConfig.batch_size=12 is not divisible "
                       r"by the 8 devices of the mesh$"):
      loop.setup(config, dataclasses.replace(options, num_steps=num_steps), jax.devices()[:8],
                 str(workdir))
  with pytest.raises(ConfigError, match="eval_batch_size=60 is not divisible by the 8"):
    loop.setup(dataclasses.replace(config, eval_batch_size=60), options, jax.devices()[:8],
               str(tmp_path))


@pytest.mark.slow   # ~20 s: a training run to checkpoint, then the evaluate-only run
def test_an_evaluate_only_run_with_an_odd_train_batch_evaluates(tmp_path):
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  options = config_lib.RunOptions(num_steps=1, mesh="data=8", plan="dp", progress=False)
  first = loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  launch.parse_gin(["configs/dlrm_synthetic.gin"], [*BINDINGS, "ExperimentConfig.batch_size=12"])
  again = loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  assert again["eval_auc"] == first["eval_auc"] and again["step"] == 1


@pytest.mark.slow   # ~20 s: a training run to checkpoint, then the evaluate-only run
def test_an_evaluate_only_run_keeps_the_training_config_and_its_bindings_quiet(tmp_path,
                                                                              caplog):
  """The rerun of the same command rewrote `W/config.gin` without the training data's
  settings (`make_train_iterator.*`: it opens no training data) and warned that those
  bindings were unused."""
  bindings = [*BINDINGS, "make_train_iterator.shuffle=False"]
  options = config_lib.RunOptions(num_steps=1, mesh="data=8", plan="dp", progress=False)
  launch.parse_gin(["configs/dlrm_synthetic.gin"], bindings)
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  trained = (tmp_path / "config.gin").read_text()
  assert "make_train_iterator.shuffle = False" in trained
  launch.parse_gin(["configs/dlrm_synthetic.gin"], bindings)
  caplog.clear()
  with caplog.at_level("WARNING", logger="jaxrec"):
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  assert (tmp_path / "config.gin").read_text() == trained
  assert not [r for r in caplog.records if "no configurable" in r.getMessage()], caplog.text


@pytest.mark.slow   # ~25 s: a training run to two checkpoints, then the fallen-back one
def test_a_run_whose_restore_falls_back_to_train_records_its_data_settings(tmp_path,
                                                                          monkeypatch):
  """A rerun at --num_steps whose newest checkpoint was damaged falls back to an earlier one
  and trains: its config.gin (and the checkpoints' meta) had no `make_train_iterator.*`
  binding at all (the operative config was taken before it opened the training data), so a
  rerun of that config.gin shuffled where the run had not."""
  bindings = [*BINDINGS, "make_train_iterator.shuffle=False"]
  options = config_lib.RunOptions(num_steps=4, mesh="data=8", plan="dp", progress=False,
                                  checkpoint_every=2)
  launch.parse_gin(["configs/dlrm_synthetic.gin"], bindings)
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b"\0" * f.stat().st_size)
  (tmp_path / "config.gin").unlink()
  launch.parse_gin(["configs/dlrm_synthetic.gin"], bindings)
  asked = []   # it opens its training data late: the files-vs-synthetic-eval check too
  monkeypatch.setattr(data_adapter, "synthetic_eval_warning", lambda *a: asked.append(a))
  result = loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  assert "loss" in result and len(asked) == 1   # trained 3..4 again
  assert "make_train_iterator.shuffle = False" in (tmp_path / "config.gin").read_text()
  meta = json.loads((tmp_path / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert "make_train_iterator.shuffle = False" in meta["gin"]


def test_an_evaluate_only_run_keeps_the_training_plan_json(tmp_path):
  """`W/plan.json` was rewritten by a run that only evaluates (e.g. on `--mesh=table=8
  --plan=tw`) while `config.gin` kept the training run's: the two described other runs,
  and `--plan=W/plan.json` no longer named the plan that trained."""
  class Result:
    def __init__(self, kind):
      self.kind = kind

    def dumps(self):   # PlanResult.dumps: the text of plan.json
      return json.dumps({"kind": self.kind}, indent=2, sort_keys=True)
  run_records.write(str(tmp_path), "a = 1\n", Result("grid"), trains=True, options=config_lib.RunOptions())
  run_records.write(str(tmp_path), "a = 2\n", Result("tw"), trains=False, options=config_lib.RunOptions())
  assert json.loads((tmp_path / "plan.json").read_text()) == {"kind": "grid"}
  assert (tmp_path / "config.gin").read_text().endswith("\na = 1\n")
  (tmp_path / "plan.json").unlink()   # none yet: the evaluating run's is written
  run_records.write(str(tmp_path), "a = 2\n", Result("tw"), trains=False, options=config_lib.RunOptions())
  assert json.loads((tmp_path / "plan.json").read_text()) == {"kind": "tw"}
  run_records.write(str(tmp_path), "a = 3\n", Result("rw"), trains=True, options=config_lib.RunOptions())
  assert json.loads((tmp_path / "plan.json").read_text()) == {"kind": "rw"}


def test_a_full_disk_writing_the_run_records_names_the_file(tmp_path, monkeypatch):
  """ENOSPC from write() carries no file name: the error said 'cannot write None'."""
  import errno  # pylint: disable=import-outside-toplevel

  def full(path, text):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(run_records, "write_text_atomic", full)
  with pytest.raises(ConfigError, match=rf"^--workdir: cannot write {tmp_path}/config.gin: "
                     r"No space left on device$"):
    run_records.write(str(tmp_path), "a = 1\n", None, trains=True, options=config_lib.RunOptions())


def test_a_resume_with_another_dense_optimizer_says_what_to_bind(tmp_path):
  """`dense_optimizer.name='adam'` on an SGD checkpoint: the error listed leaf names
  ('opt_state/0/count' ... absent) and said nothing of the dense optimizer."""
  options = config_lib.RunOptions(num_steps=1, mesh="data=8", plan="dp", progress=False)
  loop.train_and_evaluate(dataclasses.replace(CONFIG, num_eval_examples=64,
                                              eval_batch_size=64), options, str(tmp_path))
  from jaxrec.checkpoint import storage  # pylint: disable=import-outside-toplevel
  meta = storage.read_json(tmp_path / "checkpoints" / "1", storage.META)
  assert meta["features"] == [dataclasses.asdict(f) for f in CONFIG.features]   # for convert
  adam = dataclasses.replace(CONFIG, num_eval_examples=64, eval_batch_size=64,
                             dense_optimizer=config_lib.dense_optimizer("adam", 0.01))
  with pytest.raises(ConfigError, match=r"'opt_state' in checkpoint .* does not match the "
                     r"model at .*: the dense optimizer \(dense_optimizer.name, and its "
                     r"momentum, mask or state dtypes; or dense_optimizer.learning_rate "
                     r"switched between a number and a schedule, whose state keeps a step "
                     r"count\) is not the one the checkpoint was trained with; bind that one "
                     r"to resume, or train in a new --workdir; bindings changed since that "
                     r"checkpoint: .*dense_optimizer: \(not called\) -> called \(.*name = 'adam'\)$"):
    loop.train_and_evaluate(adam, dataclasses.replace(options, num_steps=2), str(tmp_path))
  # a schedule where the checkpoint had a number: optax.sgd keeps a step count then
  scheduled = dataclasses.replace(CONFIG, num_eval_examples=64, eval_batch_size=64,
                                  dense_optimizer=config_lib.dense_optimizer(
                                      "sgd", lr_schedule("constant", value=0.01)))
  with pytest.raises(ConfigError, match=r"model at \['opt_state/.*count'\].*: the dense "
                     r"optimizer .* or dense_optimizer.learning_rate switched between a "
                     r"number and a schedule"):
    loop.train_and_evaluate(scheduled, dataclasses.replace(options, num_steps=2),
                            str(tmp_path))


def test_adam_to_adamw_is_a_config_error_not_corrupt_steps(tmp_path, caplog):
  """adam and adamw hold the same `mu`/`nu` leaves in another tree (an `EmptyState` more):
  orbax's structure error was taken for corruption, every step was warned about as
  corrupt and the run ended 'no valid checkpoint ... move them away' (and a valid step
  newer than a tables-only import was rejected)."""
  import logging  # pylint: disable=import-outside-toplevel
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", progress=False,
                                  checkpoint_every=1)
  adam = dataclasses.replace(CONFIG, num_eval_examples=64, eval_batch_size=64,
                             dense_optimizer=config_lib.dense_optimizer("adam", 0.001))
  loop.train_and_evaluate(adam, options, str(tmp_path))
  adamw = dataclasses.replace(adam, dense_optimizer=config_lib.dense_optimizer("adamw", 0.001))
  with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match=(
      r"^'opt_state' in checkpoint .*/2 has the same leaves as this run's but another "
      r"structure \(e.g. adam vs adamw, or a mask added or removed\): the dense optimizer")):
    loop.train_and_evaluate(adamw, dataclasses.replace(options, num_steps=3), str(tmp_path))
  assert "corrupt" not in caplog.text
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_a_rerun_keeps_the_checkpoint_steps_tensorboard_points(tmp_path):
  """The rerun's purge marker sat at the checkpoint's step: TensorBoard (which keeps an
  earlier file's events of steps below the marker only) hid that step's loss and eval
  points, which no rerun logs again (an evaluate-only rerun hid the run's final loss)."""
  from tests.train.test_writers import _read_events   # pylint: disable=import-outside-toplevel
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", progress=False,
                                  log_every=1)
  for _ in range(2):   # the second run only evaluates
    loop.train_and_evaluate(CONFIG, options, str(tmp_path))
  files = sorted(os.listdir(tmp_path / "tb"))
  marks = [(e.step, e.session_log.status) for e in _read_events(tmp_path / "tb" / files[-1])
           if e.HasField("session_log")]
  assert len(files) == 2 and [m[0] for m in marks] == [3], marks
  assert ("loss", 2) in tb_scalars(str(tmp_path)) and ("eval_auc", 2) in tb_scalars(str(tmp_path))


def test_a_checkpoints_steps_are_in_tensorboard_before_it_saves(tmp_path, monkeypatch):
  """TensorBoard's events went out every 10 s only: a run killed (-9) within 10 s of a save
  lost that step's loss and eval points for good (its rerun resumes past them). Now they
  are on disk when a save starts (its loss) and once its eval line is written."""
  from jaxrec.checkpoint.manager import CheckpointManager  # pylint: disable=import-outside-toplevel
  from jaxrec.train import writers  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(writers, "TB_FLUSH_SECS", 3600)
  seen = {}
  real_save = CheckpointManager.save

  def save(self, step, *args, **kwargs):
    seen[step] = set(tb_scalars(str(tmp_path)))
    return real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(CheckpointManager, "save", save)
  real_write = writers.MetricsWriter.write

  def write(self, step, metrics, scalars=None):
    real_write(self, step, metrics, scalars)
    if "eval_auc" in metrics:
      seen[f"eval {step}"] = set(tb_scalars(str(tmp_path)))
  monkeypatch.setattr(writers.MetricsWriter, "write", write)
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", progress=False,
                                  log_every=1, checkpoint_every=1, eval_every=1)
  loop.train_and_evaluate(CONFIG, options, str(tmp_path))
  assert ("loss", 1) in seen[1] and ("eval_auc", 1) in seen[2] and ("loss", 2) in seen[2]
  assert ("eval_auc", 2) in seen["eval 2"]
