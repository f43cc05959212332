"""Early stopping (`--early_stop_metric`): the decision, its replay from metrics.jsonl on a
resume, the best step's checkpoint kept past --keep_checkpoints, and train.py's stop."""

import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from jaxrec import elastic
from jaxrec.checkpoint import CheckpointManager
from jaxrec.data import pipeline  # noqa: F401  (grain's flags exist before train.py's runs)
from jaxrec.errors import ConfigError
from jaxrec.train import config as config_lib
from jaxrec.train.early_stop import EarlyStop, check_model, eval_history
from tests.checkpoint import ckpt_helpers as h
from tests.scripts.in_process import run_script

NAN = float("nan")


def _stops(metric, values, patience=2, min_delta=0.0):
  """The steps (1, 2, ...) `values` were evaluated at, the best step and where it stopped."""
  stopper = EarlyStop(metric, patience, min_delta)
  for step, value in enumerate(values, 1):
    if stopper.add(step, value):
      break
  return stopper.best_step, stopper.stopped_at


@pytest.mark.parametrize("metric, values, expected", [
    ("eval_auc", [0.6, 0.7, 0.65, 0.69, 0.8], (2, 4)),       # higher is better
    ("eval_recall_at_10", [0.6, 0.7, 0.71, 0.5, 0.5], (3, 5)),
    ("eval_mrr", [0.6, 0.6, 0.6], (1, 3)),                   # equal is no improvement
    ("eval_logloss", [0.6, 0.5, 0.55, 0.4, 0.45, 0.5], (4, 6)),   # lower is better
    ("eval_ne", [1.0, 1.1, 0.9, 0.95], (3, None)),
])
def test_direction_and_patience(metric, values, expected):
  assert _stops(metric, values) == expected


def test_min_delta_is_the_least_improvement_that_counts():
  assert _stops("eval_auc", [0.70, 0.705, 0.709, 0.7095], min_delta=0.01) == (1, 3)
  assert _stops("eval_auc", [0.70, 0.7101, 0.709], min_delta=0.01) == (2, None)
  assert _stops("eval_logloss", [0.5, 0.495, 0.491], min_delta=0.01) == (1, 3)
  assert _stops("eval_logloss", [0.5, 0.489, 0.485], patience=1, min_delta=0.01) == (2, 3)


def test_a_non_finite_value_is_no_improvement():
  assert _stops("eval_auc", [NAN, 0.6, NAN, NAN]) == (2, 4)
  assert _stops("eval_auc", [NAN, NAN]) == (None, 2)   # no best at all: stops too
  assert _stops("eval_logloss", [0.5, -math.inf, 0.4]) == (3, None)
  stopper = EarlyStop("eval_auc", 3)
  stopper.add(1, 0.6)
  stopper.add(2, NAN)
  assert (stopper.best, stopper.since) == (0.6, 1)


class _Steps:
  def __init__(self, *steps):
    self.steps = list(steps)

  def all_steps(self):
    return self.steps

  def protect(self, steps):
    pass


class _Lines:
  def write(self, step, record):
    pass


@pytest.mark.parametrize("ckpt, values, said", [
    (_Steps(2, 4), [0.6, 0.5, 0.5], "(best 0.6 at step 1; it has no checkpoint (saved without "
     "--early_stop_metric or rotated out): checkpoint 3 is the run's last)"),
    (_Steps(1, 3), [0.6, 0.5, 0.5], "(best 0.6 at step 1; its checkpoint is kept)"),
    (_Steps(1, 2), [NAN, NAN], "(best none yet (no finite value))"),
])
def test_the_stop_line_says_a_kept_checkpoint_only_where_there_is_one(ckpt, values, said,
                                                                     caplog):
  """A best from before --early_stop_metric was turned on (its checkpoint rotated out, as
  the restore warned) and a run with no finite value had 'its checkpoint is kept' too."""
  stopper = EarlyStop("eval_auc", 2, ckpt=ckpt)
  with caplog.at_level("INFO", logger="jaxrec"):
    for step, value in enumerate(values, 1):
      stopped = stopper.observe(step, {"eval_auc": value}, _Lines())
  assert stopped
  line = next(r.getMessage() for r in caplog.records if "early stop after" in r.getMessage())
  assert line.endswith(said), line


def test_off_does_nothing(tmp_path):
  stopper = EarlyStop.of(config_lib.RunOptions())
  stopper.restore(str(tmp_path / "metrics.jsonl"), 10)
  assert not stopper.observe(5, {"eval_auc": 0.5}, writer=None)
  assert not stopper.stopped and stopper.summary() == {}


def _write(path, *records, torn=""):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
    f.write(torn)


def test_the_history_drops_evals_a_rewind_redid_and_those_past_the_checkpoint(tmp_path):
  """A killed run's eval lines past its checkpoint (step 6 below) were redone after the
  `resume` at 4; an evaluate-only run's `resume` line is not an eval of the training run."""
  path = tmp_path / "metrics.jsonl"
  _write(path,
         {"step": 2, "loss": 0.7}, {"step": 2, "eval_auc": 0.6},
         {"step": 4, "eval_auc": 0.65},
         {"step": 6, "eval_auc": 0.9},                          # killed after it: not saved
         {"step": 4, "event": "resume", "checkpoint_step": 4},
         {"step": 6, "eval_auc": 0.62},
         {"step": 8, "eval_auc": None},
         {"step": 8, "event": "nan_rollback", "restored_step": 8},
         {"step": 10, "eval_auc": 0.61},
         {"step": 10, "event": "resume", "checkpoint_step": 10, "eval_auc": 0.99},
         {"step": 12, "eval_auc": 0.7},
         torn='{"step": 12, "eval_auc": 0.')                   # a torn last line: left out
  history = eval_history(str(path), "eval_auc", 10)
  assert history[:3] == [(2, 0.6), (4, 0.65), (6, 0.62)] and history[4] == (10, 0.61)
  assert history[3][0] == 8 and math.isnan(history[3][1])
  assert eval_history(str(path), "eval_auc", 12)[-1] == (12, 0.7)
  assert eval_history(str(path), "eval_auc", 5) == [(2, 0.6), (4, 0.65)]
  assert eval_history(str(path), "eval_logloss", 12) == []
  assert eval_history(str(tmp_path / "none.jsonl"), "eval_auc", 12) == []
  stopper = EarlyStop("eval_auc", 2)
  stopper.restore(str(path), 10)   # 0.65 at 4, then 0.62, nan, 0.61: stopped at 8
  assert (stopper.best_step, stopper.since, stopper.stopped_at) == (4, 3, 8)
  stopper = EarlyStop("eval_auc", 4)
  stopper.restore(str(path), 6)   # the killed run's 0.9 at 6 does not count
  assert (stopper.best_step, stopper.best, stopper.since) == (4, 0.65, 1)


@pytest.mark.parametrize("flags, message", [
    (dict(early_stop_metric="eval_calibration"),
     "--early_stop_metric=eval_calibration: not a metric early stopping can watch: its best "
     "is 1.0, not a highest or lowest value; one of eval_auc, eval_logloss, eval_ne, "
     "eval_recall_at_<k>, eval_mrr"),
    (dict(early_stop_metric="auc"), "--early_stop_metric=auc: not a metric early stopping"),
    (dict(early_stop_metric="eval_auc", eval_every=0),
     "--early_stop_metric=eval_auc needs --eval_every > 0 (got 0: only the last step "
     "evaluates)"),
    (dict(early_stop_metric="eval_auc", eval_labels=False, predictions="p.npz"),
     "--early_stop_metric=eval_auc: the eval data has no labels (--noeval_labels), so its "
     "evals give no metric to watch"),
    (dict(early_stop_patience=0), "--early_stop_patience must be at least 1, got 0"),
    (dict(early_stop_min_delta=-0.1), "--early_stop_min_delta must be a number >= 0, got -0.1"),
    (dict(early_stop_min_delta=NAN), "--early_stop_min_delta must be a number >= 0, got nan"),
])
def test_flag_errors(flags, message):
  options = config_lib.RunOptions(**{"early_stop_metric": "eval_logloss", "eval_every": 5,
                                     **flags})
  with pytest.raises(ConfigError, match="^" + re.escape(message)):
    options.validate()


class DLRM:   # stand-ins: `retrieval.has_towers` reads `towers` and `item_features`
  pass


class TwoTower:
  recall_at, item_features = (1, 10), (1,)

  def towers(self):
    pass


def test_a_metric_the_model_does_not_write_is_refused():
  check_model("eval_auc", DLRM())
  check_model("eval_recall_at_10", TwoTower())
  with pytest.raises(ConfigError, match=r"^--early_stop_metric=eval_mrr: the model DLRM does "
                     r"not produce it \(only a two-tower"):
    check_model("eval_mrr", DLRM())
  with pytest.raises(ConfigError, match=r"^--early_stop_metric=eval_recall_at_5: the model "
                     r"TwoTower writes recall at 1, 10 \(TwoTower.recall_at\); one of "
                     r"eval_recall_at_1, eval_recall_at_10, or eval_mrr$"):
    check_model("eval_recall_at_5", TwoTower())


def test_a_protected_step_outlives_keep_checkpoints(tmp_path):
  coll = h.collection("dp", 1)
  state = h.train_state(coll)
  with CheckpointManager(tmp_path, max_to_keep=1) as mgr:
    for step in (1, 2, 3):
      mgr.save(step, state, coll)
      if step == 2:
        mgr.protect([2])
    mgr.wait()
    assert mgr.all_steps() == [2, 3] and sorted(os.listdir(tmp_path)) == ["2", "3"]
    mgr.protect([])   # a later best: the earlier one goes at the next save
    mgr.save(4, state, coll)
    mgr.wait()
    assert mgr.all_steps() == [4]


FLAGS = ["--gin_file=configs/dlrm_synthetic.gin", "--mesh=data=8", "--plan=dp",
         "--num_steps=40", "--log_every=2", "--eval_every=2", "--keep_checkpoints=1",
         "--noprogress", "--early_stop_metric=eval_auc",
         "--early_stop_min_delta=1",   # nothing improves on the first eval: a known stop
         "--gin_bindings=ExperimentConfig.batch_size=64",
         "--gin_bindings=ExperimentConfig.eval_batch_size=256",
         "--gin_bindings=ExperimentConfig.num_eval_examples=256",
         "--gin_bindings=DLRM.bottom_mlp=(16,)", "--gin_bindings=DLRM.top_mlp=(16,1)"]


def test_the_other_early_stop_flags_without_a_metric_are_refused(tmp_path):
  """`--early_stop_patience=5` alone trained to --num_steps without a word."""
  proc = run_script("train.py", f"--workdir={tmp_path / 'w'}",
                    "--gin_file=configs/dlrm_synthetic.gin", "--early_stop_patience=5",
                    "--early_stop_min_delta=0.001")
  assert proc.returncode == 1 and not os.path.exists(tmp_path / "w")
  assert ("error: --early_stop_patience=5 --early_stop_min_delta=0.001 without "
          "--early_stop_metric, which turns early stopping on: add --early_stop_metric="
          "eval_auc (or eval_logloss, ...) or leave out the flag") in proc.stderr, proc.stderr


def _lines(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_train_py_stops_early_keeping_the_best_checkpoint_and_a_rerun_trains_nothing(
    tmp_path, monkeypatch):
  """... and the rerun opens no training data (which may be gone when it scores new data:
  it opened it, and a missing training file stopped it)."""
  w = str(tmp_path / "w")
  proc = run_script("train.py", f"--workdir={w}", "--early_stop_patience=2", *FLAGS,
                    f"--predictions={tmp_path}/p.npz")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(tmp_path / "p.npz") as z:   # the stopping step's eval: the run's last
    assert int(z["step"]) == 6
  lines = _lines(w)
  event = lines[-1]
  best = next(l["eval_auc"] for l in lines if l["step"] == 2 and "eval_auc" in l)
  assert event == {"step": 6, "event": "early_stop", "best_step": 2, "metric": "eval_auc",
                   "best": best, "patience": 2, "min_delta": 1.0}
  assert "eval_auc" in lines[-2] and lines[-2]["step"] == 6   # after the stop step's eval
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "6"]   # keep 1 + best
  assert "early stop after step 6: eval_auc has not improved for 2 evals" in proc.stderr
  assert "early_stop_best_step=2" in proc.stdout
  from jaxrec.train import data_adapter   # pylint: disable=import-outside-toplevel

  def no_training_data(*args):
    raise AssertionError("a rerun of a stopped run opened its training data")
  monkeypatch.setattr(data_adapter, "train_iterator", no_training_data)
  again = run_script("train.py", f"--workdir={w}", "--early_stop_patience=2", *FLAGS)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "stopped early at step 6: eval_auc has not improved for 2 evals" in again.stderr
  assert "training nothing more, evaluating checkpoint 6" in again.stderr
  assert _lines(w)[-1]["event"] == "resume" and _lines(w)[-1]["step"] == 6
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "6"]


@pytest.mark.slow   # ~7 s: a run of train.py
def test_a_stop_at_an_eval_step_between_log_steps_logs_its_window(tmp_path):
  """Under --log_every=100 --eval_every=40 a stop at 960 wrote no loss line for steps
  901-960, and `done:` named step 900, its loss and no eval: every eval step of early
  stopping logs, as any may be the last."""
  w = str(tmp_path / "w")
  flags = [f for f in FLAGS if not f.startswith("--log_every")] + ["--log_every=4"]
  proc = run_script("train.py", f"--workdir={w}", "--early_stop_patience=2", *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _lines(w)
  assert lines[-1]["event"] == "early_stop" and lines[-1]["step"] == 6
  assert [l["step"] for l in lines if "loss" in l] == [2, 4, 6]
  done = next(l for l in proc.stdout.splitlines() if l.startswith("done:"))
  assert "step=6" in done and "eval_auc=" in done and "loss=" in done, done


def test_a_resume_after_sigterm_counts_the_evals_before_it(tmp_path, monkeypatch):
  """SIGTERM after step 5: the resumed run counts the evals of steps 2 and 4 (and not an
  eval line a killed run wrote past checkpoint 5), stopping at step 8 as an uninterrupted
  run does; without them it stopped at 12."""
  w = str(tmp_path / "w")
  real = elastic.report_progress

  def progress(workdir, step, *args, **kwargs):
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(workdir, step, *args, **kwargs)
  monkeypatch.setattr(elastic, "report_progress", progress)
  proc = run_script("train.py", f"--workdir={w}", "--early_stop_patience=3", *FLAGS)
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "5"]
  monkeypatch.setattr(elastic, "report_progress", real)
  with open(os.path.join(w, "metrics.jsonl"), "a") as f:   # as a run killed after it
    f.write(json.dumps({"step": 6, "eval_auc": 0.99}) + "\n")
  proc = run_script("train.py", f"--workdir={w}", "--early_stop_patience=3", *FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  event = _lines(w)[-1]
  assert (event["event"], event["step"], event["best_step"]) == ("early_stop", 8, 2)
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "8"]


def test_a_sigterm_after_a_step_without_an_eval_owes_no_eval(tmp_path, monkeypatch):
  """SIGTERM while step 5 (logged, not evaluated) writes its line: checkpoint 5 said it was
  owed an eval, so the resumed run evaluated step 5 off the --eval_every schedule and
  counted it, stopping at 6 where an uninterrupted run stops at 8."""
  from jaxrec import schedules  # pylint: disable=import-outside-toplevel
  w = str(tmp_path / "w")
  flags = ["--early_stop_patience=3", *FLAGS, "--log_every=1"]
  real = schedules.logged_rate

  def logged_rate(rate, step, name):   # after the step's SIGTERM check, before its line
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(rate, step, name)
  monkeypatch.setattr(schedules, "logged_rate", logged_rate)
  proc = run_script("train.py", f"--workdir={w}", *flags)
  assert proc.returncode == 143, proc.stderr[-3000:]
  monkeypatch.setattr(schedules, "logged_rate", real)
  proc = run_script("train.py", f"--workdir={w}", *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not [l for l in _lines(w) if l["step"] == 5 and "eval_auc" in l]
  event = _lines(w)[-1]
  assert (event["event"], event["step"], event["best_step"]) == ("early_stop", 8, 2)


def test_the_eval_a_resume_owes_writes_the_predictions_of_the_stopping_step(tmp_path,
                                                                           monkeypatch):
  """SIGTERM in step 6's eval (the one that stops the run): the resumed run evaluates step
  6 first and stops there, but that eval wrote no --predictions: the file kept step 4's."""
  w, path = str(tmp_path / "w"), tmp_path / "p.npz"
  flags = ["--early_stop_patience=2", *FLAGS, f"--predictions={path}",
           "--gin_bindings=ExperimentConfig.num_eval_examples=512"]   # 2 eval batches
  real = elastic.stop_eval

  def stop_eval(step, batch):   # before the second batch of step 6's eval: SIGTERM
    if (step, batch) == (6, 1):
      os.kill(os.getpid(), signal.SIGTERM)
    return real(step, batch)
  monkeypatch.setattr(elastic, "stop_eval", stop_eval)
  proc = run_script("train.py", f"--workdir={w}", *flags)
  assert proc.returncode == 143, proc.stderr[-3000:]
  with np.load(path) as z:
    assert int(z["step"]) == 4
  monkeypatch.setattr(elastic, "stop_eval", real)
  proc = run_script("train.py", f"--workdir={w}", *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (_lines(w)[-1]["event"], _lines(w)[-1]["step"]) == ("early_stop", 6)
  with np.load(path) as z:
    assert int(z["step"]) == 6 and z["score"].shape == (512,)


@pytest.mark.slow   # ~60 s: an uninterrupted run and one killed three times, in subprocesses
def test_kill9_resumes_stop_where_an_uninterrupted_run_stops(tmp_path):
  """eval_auc as it comes (min_delta 0, patience 2): it improves at 20, 24 and 32 after
  setbacks at 16 and 28, and stops at 40. SIGKILL mid-save of 20 (checkpoint 16: one eval
  without improvement), of 28 (its eval line may be written, past checkpoint 24) and of 40
  (checkpoint 36: again one); the resumed runs stop at the same step with the same best,
  bit for bit (without the evals before a resume it trained past 40)."""
  from tests.scripts.test_train import ROOT, train  # pylint: disable=import-outside-toplevel
  from tests import xla_env  # pylint: disable=import-outside-toplevel
  common = [f.replace("configs/", os.path.join(ROOT, "configs", "")) for f in FLAGS
            if not f.startswith(("--early_stop_min_delta", "--mesh", "--eval_every",
                                 "--log_every", "--num_steps"))]
  common += ["--mesh=data=2", "--num_steps=80", "--eval_every=4", "--log_every=4",
             "--early_stop_patience=2"]
  ref = str(tmp_path / "ref")
  train(ref, *common, devices=2)
  w = str(tmp_path / "killed")
  for point in ("save:20", "save:28", "save:40"):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "kill_points.py"),
                           f"--workdir={w}", *common], cwd=ROOT, capture_output=True, text=True,
                          env=dict(xla_env.script_env(2), JAXREC_TEST_KILL=point), timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  train(w, *common, devices=2)
  resumes = [l["checkpoint_step"] for l in _lines(w) if l.get("event") == "resume"]
  assert resumes == [16, 24, 36], resumes
  assert _lines(w)[-1] == _lines(ref)[-1]
  assert (_lines(ref)[-1]["step"], _lines(ref)[-1]["best_step"]) == (40, 32)
  assert sorted(os.listdir(os.path.join(w, "checkpoints")), key=int) == ["32", "40"]


def test_the_state_other_processes_take_keeps_every_bit():
  """`_agreed` sends process 0's state as int32 words (a float64 through jax without x64
  lost its low bits)."""
  stopper = EarlyStop("eval_auc", 3, best=0.5839339688444548, best_step=12, since=2)
  other = EarlyStop("eval_auc", 3)
  other._decode(stopper._encode())   # pylint: disable=protected-access
  assert (other.best, other.best_step, other.since, other.stopped_at) == (
      0.5839339688444548, 12, 2, None)
  other._decode(EarlyStop("eval_auc", 1)._encode())   # pylint: disable=protected-access
  assert (other.best, other.best_step, other.since) == (None, None, 0)


def test_config_gin_names_the_flags_and_the_saves_are_counted():
  options = config_lib.RunOptions(num_steps=100, eval_every=10, keep_checkpoints=2,
                                  early_stop_metric="eval_ne", early_stop_min_delta=0.001)
  assert ("--eval_every=10 --early_stop_metric=eval_ne --early_stop_patience=3 "
          "--early_stop_min_delta=0.001\n") in config_lib.config_gin_header(options)
  assert options.most_checkpoints_kept() == 3   # the best one past --keep_checkpoints
  assert config_lib.RunOptions(num_steps=100, keep_checkpoints=2).most_checkpoints_kept() == 1


@pytest.mark.slow   # ~12 s: a run, then its rerun
def test_a_stop_step_whose_eval_was_cut_off_is_evaluated_and_stops_there(tmp_path):
  """Killed in the eval of its stopping step 6 after checkpoint 6 committed (its eval line
  and the early_stop line never written): the rerun evaluates step 6 first (the eval it
  owes), stops there and trains nothing."""
  w = str(tmp_path / "w")
  proc = run_script("train.py", f"--workdir={w}", "--early_stop_patience=2", *FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = open(os.path.join(w, "metrics.jsonl")).readlines()
  stop = json.loads(lines[-1])
  with open(os.path.join(w, "metrics.jsonl"), "w") as f:
    f.writelines(lines[:-2])
  proc = run_script("train.py", f"--workdir={w}", "--early_stop_patience=2", *FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "evaluating it first" in proc.stderr
  again = _lines(w)
  assert again[-1] == stop and "eval_auc" in again[-2] and again[-2]["step"] == 6
  assert not any(l["step"] > 6 for l in again)
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "6"]


def test_a_conversion_of_the_stopping_step_names_the_best_one(tmp_path):
  """`convert_checkpoint.py --restart_data` without `--step` (the docs' day-1 command) on an
  early-stopped run copied its stopping step (eval_auc 0.8444) without a word of the best
  one kept beside it (0.8504)."""
  from jaxrec.train.early_stop import best_step_note  # pylint: disable=import-outside-toplevel
  ckpts = tmp_path / "checkpoints"
  for step in (400, 440, 480):
    (ckpts / str(step)).mkdir(parents=True)
  stop = {"step": 480, "event": "early_stop", "best_step": 400, "metric": "eval_auc",
          "best": 0.8504346954930323, "patience": 2, "min_delta": 0.0}
  (tmp_path / "metrics.jsonl").write_text(
      json.dumps({"step": 400, "eval_auc": 0.85}) + "\n" + json.dumps(stop) + "\n")
  assert best_step_note(str(ckpts), 480) == (
      "note: step 480 is where early stopping stopped the run (eval_auc had not improved "
      "for 2 evals); its best step, 400 (eval_auc 0.850435), is kept in "
      f"{ckpts}: --step=400 converts that one")
  assert best_step_note(str(ckpts), 440) is None   # not the stopping step
  (ckpts / "400").rmdir()
  assert best_step_note(str(ckpts), 480) is None   # its best is gone
  assert best_step_note(str(tmp_path / "none" / "checkpoints"), 480) is None   # no metrics


class _Restored:
  def __init__(self, data_state, meta=None):
    self.data_state, self.meta = data_state, meta


class _Written:
  def __init__(self):
    self.lines = []

  def write(self, step, record):
    self.lines.append(dict(record, step=step))


def test_the_model_new_data_starts_from_is_the_baseline_to_beat(tmp_path, caplog):
  """A --restart_data copy (no data position) at step 20 is evaluated first when
  metrics.jsonl has no eval of it, and that eval counts: on data that only makes the model
  worse the stop names step 20 as the best (it named the least bad of the worse evals, and
  step 20 rotated out). A resume (its checkpoint's meta records `data_start`) does not
  evaluate again: it replays the line."""
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"step": 20, "event": "resume", "checkpoint_step": 20}) + "\n")
  stopper, meta = EarlyStop("eval_auc", 2), {}
  stopper.start_from(_Restored({}), 20, meta)
  assert meta == {"data_start": 20} and stopper.baseline_due(str(path), 20)
  assert "the model this run starts from on this data" in stopper.start_note(20, True)
  with open(path, "a") as f:
    f.write(json.dumps({"step": 20, "eval_auc": 0.8}) + "\n")
  assert not stopper.baseline_due(str(path), 20)   # a rerun of the copy replays it
  assert not EarlyStop(None).baseline_due(str(path), 20)   # early stopping off
  for data_state, meta, step in [({"position": 256}, {"data_start": 20}, 22),   # a resume
                                 ({"position": 256}, {"data_start": 0}, 3),   # a fresh run's
                                 ({"position": 256}, {}, 3)]:   # a checkpoint of before
    resumed, saved = EarlyStop("eval_auc", 2), {}
    resumed.start_from(_Restored(data_state, meta), step, saved)
    assert saved == meta and not resumed.baseline_due(str(tmp_path / "none.jsonl"), step)
  fresh, saved = EarlyStop("eval_auc", 2), {}
  fresh.start_from(None, 0, saved)
  assert saved == {"data_start": 0} and not fresh.baseline_due(str(path), 0)

  written = _Written()
  stopper.add(20, 0.8)   # as the replay (or the baseline's observe) counts it
  assert not stopper.observe(22, {"eval_auc": 0.79}, written)
  with caplog.at_level("WARNING", logger="jaxrec"):
    assert stopper.observe(24, {"eval_auc": 0.78}, written)
  assert written.lines[-1] == {"step": 24, "event": "early_stop", "best_step": 20,
                               "metric": "eval_auc", "best": 0.8, "patience": 2,
                               "min_delta": 0.0, "best_is_start": True}
  assert stopper.summary() == {"early_stop_best_step": 20, "early_stop_best_eval_auc": 0.8,
                               "early_stop_best_is_start": True}
  assert ("warning: no step trained on this data improved on checkpoint 20, the model this "
          "run started from (eval_auc 0.8): it stays the best") in caplog.text
  better = EarlyStop("eval_auc", 1, data_start=20)
  better.add(20, 0.8)
  better.add(22, 0.9)
  assert better.add(24, 0.7) and not better.best_is_start()
  assert "early_stop_best_is_start" not in better.summary()


@pytest.mark.slow   # ~25 s: day 0, its copy, day 1 stopped by SIGTERM and resumed, and again
def test_a_restart_data_copy_is_evaluated_first_and_kept_when_nothing_beats_it(
    tmp_path, monkeypatch):
  """Day 1 on a --restart_data copy of day 0's step 4, where no eval beats the first
  (--early_stop_min_delta=1): the copy's eval counts, the run stops at step 8 naming step 4
  as the best and keeps its checkpoint; a run stopped by SIGTERM after step 7 and resumed
  stops at the same step with the same best (without the baseline: best 6, stop at 10)."""
  w = str(tmp_path / "w")
  flags = [f for f in FLAGS if not f.startswith("--num_steps")]
  proc = run_script("train.py", f"--workdir={w}", "--num_steps=4", "--early_stop_patience=5",
                    *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  days = {}
  for name in ("w2", "w3"):
    days[name] = str(tmp_path / name)
    out = run_script("convert_checkpoint.py", f"--checkpoint_dir={w}/checkpoints",
                     f"--output={days[name]}/checkpoints", "--format=checkpoint",
                     "--restart_data")
    assert out.returncode == 0, out.stderr[-3000:]
  proc = run_script("train.py", f"--workdir={days['w2']}", "--num_steps=40",
                    "--early_stop_patience=2", *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ("evaluating checkpoint 4, the model this run starts from on this data, first"
          in proc.stderr), proc.stderr[-3000:]
  lines = _lines(days["w2"])
  assert [l["step"] for l in lines if "eval_auc" in l] == [4, 6, 8]
  stop = lines[-1]
  assert (stop["event"], stop["step"], stop["best_step"], stop["best_is_start"]) == (
      "early_stop", 8, 4, True)
  assert sorted(os.listdir(os.path.join(days["w2"], "checkpoints"))) == ["4", "8"]
  assert "no step trained on this data improved on checkpoint 4" in proc.stderr
  assert "early_stop_best_step=4" in proc.stdout and "early_stop_best_is_start=True" in (
      proc.stdout)

  real = elastic.report_progress

  def progress(workdir, step, *args, **kwargs):
    if step == 7:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(workdir, step, *args, **kwargs)
  monkeypatch.setattr(elastic, "report_progress", progress)
  proc = run_script("train.py", f"--workdir={days['w3']}", "--num_steps=40",
                    "--early_stop_patience=2", *flags)
  assert proc.returncode == 143, proc.stderr[-3000:]
  monkeypatch.setattr(elastic, "report_progress", real)
  proc = run_script("train.py", f"--workdir={days['w3']}", "--num_steps=40",
                    "--early_stop_patience=2", *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "the model this run starts from" not in proc.stderr   # replayed, not evaluated
  again = _lines(days["w3"])
  assert [l["step"] for l in again if "eval_auc" in l] == [4, 6, 8]
  assert {k: v for k, v in again[-1].items() if k != "best"} == {
      k: v for k, v in stop.items() if k != "best"}
  assert sorted(os.listdir(os.path.join(days["w3"], "checkpoints"))) == ["4", "8"]
  assert "no step trained on this data improved on checkpoint 4" in proc.stderr
