"""SIGINT / SIGTERM while a script works (after its start-up): acted on at the next point
where it can stop cleanly, one line, exit 130 / 143, no partial output under the final name.

The signal comes from inside a gc callback at a chosen moment (tests/scripts/signal_points.py):
a handler that raised there had its exception swallowed, and the script went on.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.elastic import elastic_testlib as t


def _run(sig, moment, script, *args, times=1, **env):
  """`script` with `args`, sent `sig` `times` times at `moment` (signal_points.py)."""
  return subprocess.run(
      [sys.executable, os.path.join(t.ROOT, "tests", "scripts", "signal_points.py"), script,
       *args], capture_output=True, text=True, cwd=t.ROOT, timeout=300,
      env=t.env(JAXREC_TEST_SIGNAL=f"{sig.name}*{times}:{moment}", **env))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_first_compile_stops_after_that_step(tmp_path, sig):
  """Ctrl-C there was lost (the run trained on to the end; raised outside a gc callback,
  it stopped mid-compile and once segfaulted at exit). Now the step finishes and the run
  stops: Ctrl-C names the latest checkpoint, SIGTERM saves that step first."""
  w = tmp_path / "w"
  proc = _run(sig, "compile", "scripts/train.py", f"--workdir={w}", *t.TINY, "--num_steps=40",
              "--log_every=1")
  assert proc.returncode == 128 + sig, proc.stderr[-3000:]
  with open(w / "metrics.jsonl") as f:
    trained = [r["step"] for r in map(json.loads, f) if "loss" in r]
  assert trained == [1], trained
  where = w / "checkpoints"
  assert proc.stderr.splitlines()[-1] == (
      f"error: interrupted by SIGINT. Stopping; no checkpoint was saved in {where}."
      if sig == signal.SIGINT else
      f"stopped by SIGTERM after step 1: checkpoint 1 is saved in {where}; the same command "
      "resumes from it"), proc.stderr[-3000:]



def _metrics(w):
  with open(w / "metrics.jsonl") as f:
    return [json.loads(l) for l in f]


@pytest.mark.parametrize("num_steps", [4, 2])   # an eval on the way; the final one
def test_sigterm_during_an_eval_saves_that_step_and_stops(tmp_path, num_steps):
  """SIGTERM during the eval of step 2 waited for the whole eval and then trained step 3
  (at the last step it was ignored). Now the eval stops before its next batch, step 2 is
  saved, its loss line is written without eval values, and the run exits 143; the same
  command goes on from step 2 (or evaluates it, when it was the last)."""
  w = tmp_path / "w"
  flags = [f"--workdir={w}", *t.TINY, f"--num_steps={num_steps}", "--log_every=2",
           "--eval_every=2"]
  proc = _run(signal.SIGTERM, "eval", "scripts/train.py", *flags)
  assert proc.returncode == 143, proc.stderr[-3000:]
  then = "evaluates it" if num_steps == 2 else "resumes from it"
  assert proc.stderr.splitlines()[-1] == (
      f"stopped by SIGTERM during the eval of step 2: checkpoint 2 is saved in "
      f"{w / 'checkpoints'}; the same command {then}"), proc.stderr[-3000:]
  lines = _metrics(w)
  assert len(lines) == 2 and lines[0]["step"] == 2 and "loss" in lines[0], lines
  assert not [k for k in lines[0] if k.startswith("eval")], lines
  assert lines[1] == {"step": 2, "event": "terminated", "signal": "SIGTERM"}
  assert os.listdir(w / "checkpoints") == ["2"]
  again = subprocess.run([sys.executable, "scripts/train.py", *flags], capture_output=True,
                         text=True, cwd=t.ROOT, timeout=300, env=t.env())
  assert again.returncode == 0, again.stderr[-3000:]
  resumed = _metrics(w)[2:]
  assert resumed[0]["event"] == "resume" and resumed[0]["checkpoint_step"] == 2, resumed
  assert "eval_auc" in resumed[-1] and resumed[-1]["step"] == num_steps, resumed


def test_ctrl_c_during_an_eval_keeps_the_loss_line(tmp_path):
  """The loss of the steps before an eval went into one line with the eval's values,
  written after the eval: Ctrl-C during it lost the line for good (a resume from an
  earlier checkpoint redoes the steps, but the one at --num_steps only re-evaluates)."""
  w = tmp_path / "w"
  proc = _run(signal.SIGINT, "eval", "scripts/train.py", f"--workdir={w}", *t.TINY,
              "--num_steps=2", "--log_every=1")
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1].startswith("error: interrupted by SIGINT"), proc.stderr
  lines = _metrics(w)
  assert [l["step"] for l in lines] == [1, 2] and all("loss" in l for l in lines), lines
  assert not [k for l in lines for k in l if k.startswith("eval")], lines


def _trained_2_steps(tmp_path):
  """W (`tmp_path/w`) after a 2-step run: checkpoint 2 for the next run to restore."""
  w = tmp_path / "w"
  first = subprocess.run([sys.executable, "scripts/train.py", f"--workdir={w}", *t.TINY,
                          "--num_steps=2"], capture_output=True, text=True, cwd=t.ROOT,
                         timeout=300, env=t.env())
  assert first.returncode == 0, first.stderr[-3000:]
  return w


@pytest.mark.slow
def test_ctrl_c_during_a_slow_restore_stops_before_the_next_block(tmp_path):
  """Ctrl-C waited for the whole restore, then the first compile and step (3 blocks of 1 s:
  7.6 s from the signal to the exit on 2 cores); now the block being read ends it."""
  w = _trained_2_steps(tmp_path)
  proc = _run(signal.SIGINT, "restore", "scripts/train.py", f"--workdir={w}", *t.TINY,
              "--num_steps=4", JAXREC_TEST_BLOCK_DELAY="1")
  assert proc.returncode == 130, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert lines.count("signal_points: block read") == 1, proc.stderr[-3000:]   # of 3
  assert lines[-1] == (f"error: interrupted by SIGINT. Stopping; the latest checkpoint is step "
                       f"2 in {w / 'checkpoints'} (run the same command again to resume).")
  with open(w / "metrics.jsonl") as f:   # nothing trained (or written) after the restore
    assert max(r["step"] for r in map(json.loads, f)) == 2
  assert os.listdir(w / "checkpoints") == ["2"]


@pytest.mark.slow
@pytest.mark.parametrize("times", [1, 2])
def test_sigterm_during_a_slow_restore_stops_before_the_next_block(tmp_path, times):
  """SIGTERM only asked the trainer for a checkpoint: it waited for the whole restore, the
  first compile and step and a save; a second one there killed the process without a
  line. Now the block being read ends it (nothing trained: no new checkpoint), and a
  second one exits at once with the `interrupted again` line."""
  w = _trained_2_steps(tmp_path)
  proc = _run(signal.SIGTERM, "restore", "scripts/train.py", f"--workdir={w}", *t.TINY,
              "--num_steps=4", times=times, JAXREC_TEST_BLOCK_DELAY="1")
  assert proc.returncode == 143, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert lines.count("signal_points: block read") == 1, proc.stderr[-3000:]   # of 3
  again = " again" if times == 2 else ""
  assert lines[-1] == (
      f"error: interrupted{again} by SIGTERM{' (exited at once)' if again else ''}. "
      f"Stopping; the latest checkpoint is step 2 in {w / 'checkpoints'} (run the same "
      "command again to resume)."), proc.stderr[-3000:]
  with open(w / "metrics.jsonl") as f:
    assert max(r["step"] for r in map(json.loads, f)) == 2
  assert os.listdir(w / "checkpoints") == ["2"]

@pytest.mark.slow
@pytest.mark.parametrize("moments,again", [("workdir", False), ("setup,SIGTERM:line", True)])
def test_every_sigterm_before_training_ends_with_one_line(tmp_path, moments, again):
  """SIGTERM was back at its default between train.py's start-up deferral and the
  trainer's (its --workdir check), and once `TerminateRequested` had left the trainer (a
  second one while the `error:` line was composed): the process died there without a
  line. Now the first stops at the next check, the second exits at once with its line."""
  w = tmp_path / "w"
  proc = _run(signal.SIGTERM, moments, "scripts/train.py", f"--workdir={w}", *t.TINY,
              "--num_steps=2")
  assert proc.returncode == 143, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == [f"error: interrupted{' again' if again else ''} by SIGTERM"
                    f"{' (exited at once)' if again else ''}. Stopping; no checkpoint was "
                    f"saved in {w / 'checkpoints'}."], proc.stderr[-3000:]
  assert not w.exists()   # refused before it wrote anything (`files.made_dir`)


def _tsv(tmp_path):
  """A 50-row Criteo TSV file in `tmp_path`."""
  line = "\t".join(["1", *map(str, range(13)), *(f"{k:x}" for k in range(26))])
  (tmp_path / "in.tsv").write_text((line + "\n") * 50)
  return tmp_path / "in.tsv"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_preprocessing_leaves_no_dataset(tmp_path, sig):
  """Both were lost in the gc callback (the dataset was written, exit 0); raised anywhere,
  one inside the clean-up left shards behind."""
  out = tmp_path / "out"
  proc = _run(sig, "records", "scripts/preprocess.py", f"--input={_tsv(tmp_path)}",
              f"--output={out}", "--rows=100", "--shard_examples=10")
  assert proc.returncode == 128 + sig, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1] == (
      f"interrupted ({'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'}): no dataset written "
      f"to {out} (the shards written so far were removed)"), proc.stderr[-3000:]
  assert not out.exists()


@pytest.fixture(name="checkpoints")
def _checkpoints(tmp_path):
  """W/checkpoints with step 0: two tables imported from a TorchRec npz."""
  from jaxrec.checkpoint import convert   # pylint: disable=import-outside-toplevel
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.t{k}.weight": np.ones((64, 8), np.float32)
                   for k in range(2)})
  convert.import_torchrec(npz, tmp_path / "w" / "checkpoints")
  return tmp_path / "w" / "checkpoints"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("fmt, moment", [("npz", "export"), ("checkpoint", "copy")])
def test_a_signal_while_converting_leaves_no_output(tmp_path, checkpoints, sig, fmt, moment):
  """Ctrl-C was lost in the gc callback (the output was written, exit 0); SIGTERM killed
  the conversion and left its temporary copy."""
  out = tmp_path / "out" / ("x.npz" if fmt == "npz" else "checkpoints")
  proc = _run(sig, moment, "scripts/convert_checkpoint.py", f"--checkpoint_dir={checkpoints}",
              f"--output={out}", f"--format={fmt}")
  assert proc.returncode == 128 + sig, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1] == (
      f"error: interrupted by {sig.name}: the conversion stopped; nothing was written to "
      f"--output {out} (its temporary files were removed)"), proc.stderr[-3000:]
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_calibrating_writes_no_calibration(tmp_path, sig):
  """Ctrl-C was lost in the gc callback (the calibration was cached, exit 0); SIGTERM
  killed the script without a line."""
  cache = tmp_path / "calibration.json"
  proc = _run(sig, "calibrate", "scripts/plan.py", "--calibrate", f"--calibration_file={cache}",
              "--calibration_devices=2")
  assert proc.returncode == 128 + sig, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1] == (
      f"error: interrupted by {sig.name}. Stopping; not written: the calibration (the cache "
      "file is unchanged)."), proc.stderr[-3000:]
  assert not cache.exists()


@pytest.mark.slow
def test_a_second_signal_while_preprocessing_exits_and_the_next_run_writes_over(tmp_path):
  """The second Ctrl-C raised in the gc callback was swallowed with the first (the dataset
  was written, exit 0). Now it exits at once; what it leaves is not a dataset, and the
  next run into the same --output writes one."""
  out = tmp_path / "out"
  args = [f"--input={_tsv(tmp_path)}", f"--output={out}", "--rows=100", "--shard_examples=10"]
  proc = _run(signal.SIGINT, "records", "scripts/preprocess.py", *args, times=2)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1] == (
      f"interrupted again (Ctrl-C, exited at once): no dataset written to {out} (the shards "
      "written so far are left, without a manifest; the next run into it removes them)")
  assert not (out / "manifest.json").exists()
  again = subprocess.run([sys.executable, "scripts/preprocess.py", *args], capture_output=True,
                         text=True, cwd=t.ROOT, timeout=300, env=t.env())
  assert again.returncode == 0, again.stderr[-3000:]
  listed = {s["file"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
  assert set(os.listdir(out)) == listed | {"manifest.json"}


@pytest.mark.slow
def test_a_second_signal_while_converting_leaves_tmp_that_the_next_run_ignores(
    tmp_path, checkpoints):
  out = tmp_path / "out" / "x.npz"
  args = [f"--checkpoint_dir={checkpoints}", f"--output={out}", "--format=npz"]
  proc = _run(signal.SIGTERM, "export", "scripts/convert_checkpoint.py", *args, times=2)
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1] == (
      f"error: interrupted again by SIGTERM (exited at once): nothing was written to --output "
      f"{out}; temporary files named '*tmp-*' beside or inside it may be left (every "
      "conversion ignores them: remove them when you like)"), proc.stderr[-3000:]
  left = os.listdir(tmp_path / "out")
  assert [n.startswith("x.npz.tmp-") for n in left] == [True], left
  again = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", *args],
                         capture_output=True, text=True, cwd=t.ROOT, timeout=300, env=t.env())
  assert again.returncode == 0, again.stderr[-3000:]
  assert out.exists()


@pytest.mark.slow
def test_ctrl_c_with_data_workers_is_one_line(tmp_path):
  """Ctrl-C reaches the whole process group: grain's data worker (spawned, with
  `make_train_iterator.num_workers=1`) printed a KeyboardInterrupt traceback and leaked
  its shared memory next to the trainer's one `error:` line."""
  import time  # pylint: disable=import-outside-toplevel
  w = tmp_path / "w"
  proc = subprocess.Popen(
      [sys.executable, os.path.join(t.ROOT, "scripts", "train.py"), f"--workdir={w}", *t.TINY,
       "--num_steps=100000", "--log_every=5", "--eval_every=100000",
       "--gin_bindings=make_train_iterator.num_workers=1"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=t.ROOT,
      env=t.env(), start_new_session=True)
  for _ in range(240):
    if (w / "metrics.jsonl").exists() and (w / "metrics.jsonl").stat().st_size:
      break
    time.sleep(0.5)
  time.sleep(1)
  os.killpg(proc.pid, signal.SIGINT)   # as a terminal's Ctrl-C does
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "leaked" not in err, err[-3000:]
  assert err.rstrip().splitlines()[-1].startswith("error: interrupted by SIGINT"), err[-3000:]
