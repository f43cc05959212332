"""Tests for scripts/plot_metrics.py, run in this process (`run_script`) but for one real
process in test_plots_two_runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxrec.train import plotting
from tests.scripts.in_process import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "plot_metrics.py")


def _fake_run(path, scale):
  os.makedirs(path)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step in range(10, 110, 10):
      f.write(json.dumps({"step": step, "loss": scale / step,
                          "examples_per_sec": 1000.0 * scale}) + "\n")
      if step % 50 == 0:
        f.write(json.dumps({"step": step, "eval_auc": 0.7 + step / 1000, "eval_logloss": 0.5,
                            "eval_examples": 100}) + "\n")


def _run(*args):
  return run_script("plot_metrics.py", *args)


def test_plots_two_runs(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _fake_run(a, 1.0)
  _fake_run(b, 2.0)
  res = subprocess.run([sys.executable, SCRIPT, f"--workdir={a}", f"--workdir={b}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert res.returncode == 0, res.stderr
  png = os.path.join(a, "metrics.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  out = str(tmp_path / "sub" / "cmp.png")
  assert _run(f"--workdir={a}", f"--output={out}").returncode == 0
  assert os.path.getsize(out) > 1000


def test_panels_hold_every_run(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _fake_run(a, 1.0)
  _fake_run(b, 2.0)
  with open(os.path.join(b, "metrics.jsonl"), "a") as f:   # a resumed run repeats step 100
    f.write(json.dumps({"step": 100, "loss": 9.0}) + "\n")
  axes = plotting.figure([a, b]).axes
  assert [ax.get_ylabel() for ax in axes] == ["train loss", "eval AUC", "examples/sec"]
  for ax in axes:
    assert [line.get_label() for line in ax.get_lines()] == ["a", "b"]
  loss_a, loss_b = (line.get_ydata() for line in axes[0].get_lines())
  np.testing.assert_allclose(loss_a, 1.0 / np.arange(10, 110, 10))
  assert loss_b[-1] == 9.0    # the last line wins per step
  auc_a = axes[1].get_lines()[0]
  np.testing.assert_array_equal(auc_a.get_xdata(), [50, 100])
  np.testing.assert_allclose(auc_a.get_ydata(), [0.75, 0.8])
  np.testing.assert_allclose(axes[2].get_lines()[1].get_ydata(), [2000.0] * 10)


def test_missing_metrics_is_one_line_error(tmp_path):
  res = _run(f"--workdir={tmp_path}")
  assert res.returncode == 1
  assert "Traceback" not in res.stderr
  assert f"no metrics file at {os.path.join(str(tmp_path), 'metrics.jsonl')}" in res.stderr
  (tmp_path / "metrics.jsonl").write_text("")
  res = _run(f"--workdir={tmp_path}")
  assert res.returncode == 1 and "is empty" in res.stderr and "Traceback" not in res.stderr


def test_incomplete_last_line_and_nulls(tmp_path, caplog):
  """A run killed mid-write leaves a last line without its newline: the plot used to be
  refused; null (non-finite) values were dropped and the curve drawn across them."""
  w = str(tmp_path / "w")
  _fake_run(w, 1.0)
  with open(os.path.join(w, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 110, "loss": None}) + "\n" + '{"step": 120, "lo')
  with caplog.at_level("WARNING"):
    loss = plotting.figure([w]).axes[0].get_lines()[0]
  assert list(loss.get_xdata()) == list(range(10, 120, 10)) and np.isnan(loss.get_ydata()[-1])
  assert "metrics.jsonl:14: left out an incomplete last line" in caplog.text
  assert "loss is NaN/inf at 1 step(s): 110" in caplog.text
  with open(os.path.join(w, "metrics.jsonl"), "a") as f:
    f.write("\n")   # the broken line is complete now: an error naming it
  res = _run(f"--workdir={w}")
  assert res.returncode == 1 and res.stderr.strip().endswith(
      "metrics.jsonl:14: not a JSON object with a 'step'"), res.stderr


def test_bad_output_refused_before_plotting(tmp_path):
  """A directory or a name without an image extension was saved as `<name>.png` while the
  script printed `<name>`; an unknown extension or an unwritable path was a traceback."""
  a = str(tmp_path / "a")
  _fake_run(a, 1.0)
  for out in (str(tmp_path), str(tmp_path / "plot"), str(tmp_path / "plot.txt")):
    res = _run(f"--workdir={a}", f"--output={out}")
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith(f"error: --output: '{out}' is not an image file name"), res.stderr
  blocker = tmp_path / "file"
  blocker.write_text("")
  res = _run(f"--workdir={a}", f"--output={blocker / 'p.png'}")
  assert res.returncode == 1 and res.stderr.startswith("error: --output: cannot write"), res.stderr
  assert sorted(os.listdir(tmp_path)) == ["a", "file"] and os.listdir(a) == ["metrics.jsonl"]
  res = _run(f"--workdir={a}", f"--output={tmp_path / 'p.svg'}")
  assert res.returncode == 0 and res.stdout.strip() == str(tmp_path / "p.svg")


def test_interrupted_plot_keeps_the_old_one_and_leaves_no_tmp(tmp_path, monkeypatch):
  """Only an OSError removed the temporary image: Ctrl-C mid-save left `p.png.tmp-<pid>`."""
  a = str(tmp_path / "a")
  _fake_run(a, 1.0)
  out = tmp_path / "p.png"
  out.write_bytes(b"old plot")

  def interrupted(self, fname, **kwargs):
    with open(fname, "wb") as f:
      f.write(b"\x89PNG half")
    raise KeyboardInterrupt
  monkeypatch.setattr(plotting.Figure, "savefig", interrupted)
  with pytest.raises(KeyboardInterrupt):
    plotting.plot_metrics([a], str(out))
  assert out.read_bytes() == b"old plot" and sorted(os.listdir(tmp_path)) == ["a", "p.png"]


def test_a_format_matplotlib_cannot_write_here_is_one_line(tmp_path, monkeypatch):
  """`.pgf` is listed as a format, but writing it needs a LaTeX engine: without one the
  script ended in matplotlib's RuntimeError traceback. No file is left behind."""
  a = str(tmp_path / "a")
  _fake_run(a, 1.0)

  def no_latex(self, fname, **kwargs):
    with open(fname, "wb") as f:
      f.write(b"%% half")
    raise RuntimeError("'xelatex' not found; install it or change rcParams['pgf.texsystem']")
  monkeypatch.setattr(plotting.Figure, "savefig", no_latex)
  with pytest.raises(plotting.DataError, match=r"^--output: matplotlib cannot write \.pgf here "
                     r"\('xelatex' not found; .*\); pick another extension, e\.g\. \.png$"):
    plotting.plot_metrics([a], str(tmp_path / "p.pgf"))
  assert sorted(os.listdir(tmp_path)) == ["a"]


def test_resume_and_rollback_drop_the_abandoned_steps(tmp_path):
  # run 1 logs to step 190 and is killed (last checkpoint 100); run 2 resumes at 100 and
  # logs every 50, evaluating at 200; a rollback at 200 goes back to 150
  lines = [{"step": s, "loss": 1.0, "eval_auc": 0.1} for s in range(10, 200, 10)]
  lines += [{"step": 100, "event": "resume", "checkpoint_step": 100},
            {"step": 150, "loss": 2.0}, {"step": 200, "loss": 2.0, "eval_auc": 0.9},
            {"step": 150, "event": "nan_rollback", "restored_step": 150},
            {"step": 200, "loss": 3.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  records = plotting.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == list(range(10, 110, 10)) + [150, 200]
  assert records[-2]["loss"] == 2.0 and "eval_auc" not in records[-2]   # not run 1's
  assert records[-1] == {"step": 200, "loss": 3.0}   # not the rolled-back eval at 200


def test_an_evaluate_only_run_does_not_replace_the_training_runs_eval(tmp_path):
  """An evaluate-only run's resume line (maybe on other --eval_data: an all-negative file's
  AUC is null) replaced the final point of the training run's AUC curve; it is plotted
  only at a step with no eval of its own (a converted checkpoint's)."""
  lines = [{"step": 60, "loss": 0.5}, {"step": 60, "eval_auc": 0.67},
           {"step": 60, "event": "resume", "checkpoint_step": 60, "eval_auc": None},
           {"step": 90, "event": "resume", "checkpoint_step": 90, "eval_auc": 0.5}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  records = plotting.read_metrics(str(tmp_path))
  assert [(r["step"], r["eval_auc"]) for r in records] == [(60, 0.67), (90, 0.5)]


def test_a_run_with_nothing_to_plot_is_one_line_error(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _fake_run(a, 1.0)
  os.makedirs(b)   # stopped at its first window: only the event line
  with open(os.path.join(b, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 7, "event": "nan_stop", "bad_step": 7}) + "\n")
  res = _run(f"--workdir={a}", f"--workdir={b}")
  assert res.returncode == 1 and "Traceback" not in res.stderr
  assert (f"{os.path.join(b, 'metrics.jsonl')}: no loss, eval_auc, examples_per_sec value to "
          "plot (only nan_stop lines)") in res.stderr
  assert not os.path.exists(os.path.join(a, "metrics.png"))


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{\"step\": 1}\n", "not UTF-8 text"),             # binary / corrupted file
    (b'{"step": Infinity, "loss": 1}\n', "not a JSON object with a 'step'"),
])
def test_undecodable_or_infinite_step_is_a_data_error(tmp_path, content, message):
  (tmp_path / "metrics.jsonl").write_bytes(content)
  with pytest.raises(plotting.DataError, match=message):
    plotting.read_metrics(str(tmp_path))


def test_unreadable_metrics_is_a_data_error(tmp_path, monkeypatch):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n')

  def denied(path):
    raise PermissionError(13, "Permission denied", path)
  monkeypatch.setattr(plotting.jsonl, "complete_lines", denied)
  with pytest.raises(plotting.DataError, match="cannot read .*: Permission denied"):
    plotting.read_metrics(str(tmp_path))


@pytest.mark.parametrize("value", ['"abc"', "true", "[0.5]"])
def test_a_plotted_value_that_is_not_a_number_is_a_data_error(tmp_path, value):
  """`"loss": "abc"` was left out of the plot without a word (a null is a gap, warned)."""
  (tmp_path / "metrics.jsonl").write_text(
      f'{{"step": 1, "loss": 0.5}}\n{{"step": 2, "loss": {value}}}\n')
  with pytest.raises(plotting.DataError, match=rf"^{tmp_path}/metrics.jsonl:2: 'loss' is "
                     rf"not a number or null: {value.replace('[', '.').replace(']', '.')}$"):
    plotting.read_metrics(str(tmp_path))
