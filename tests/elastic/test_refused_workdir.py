"""A workdir scripts/launch.py created is removed again when the job stops on a user error
before anything was trained (as train.py's `files.made_dir`); it was left behind with
`events.jsonl`, `workers/` and `elastic/launch.lock`. One that existed, or that holds a
checkpoint or a metrics line, stays as it is."""

import os
import signal
import subprocess
import sys
import threading

import pytest

from jaxrec.elastic import supervisor as sup
from jaxrec.errors import ConfigError
from tests.elastic import elastic_testlib as t
from tests.elastic.test_supervisor import FAKE

TRAIN = ["--gin_file=configs/dlrm_synthetic.gin", "--plan=dp", "--num_steps=5",
         "--gin_bindings=ExperimentConfig.batch_size=256"]
# A trainer that writes FILE (relative to --workdir) and then stops on a user error.
WRITES_THEN_FAILS = """import os, sys
w = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
path = os.path.join(w, os.environ["WRITE"])
os.makedirs(os.path.dirname(path), exist_ok=True)
open(path, "w").write("x\\n")
print("error: --train_data: no such file", file=sys.stderr)
sys.exit(1)
"""


def _run(workdir, *train_flags, script=FAKE):
  options = sup.Options(num_processes=1, devices_per_process=2, train_script=str(script),
                        poll_interval=0.05)
  return sup.Supervisor(options, [f"--workdir={workdir}", *TRAIN, *train_flags]).run()


def test_a_new_workdir_is_removed_after_a_workers_user_error(tmp_path, capsys):
  new = tmp_path / "runs" / "w"   # its parent is new too: removed with it
  assert _run(new, "--error") == sup.EXIT_USER_ERROR
  assert not (tmp_path / "runs").exists()
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "the fake trainer fails as asked" in errors[0], errors


def test_a_new_workdir_is_removed_after_a_bad_gin_binding(tmp_path):
  with pytest.raises(ConfigError, match="--gin_bindings: 'Nope.x=1'"):
    _run(tmp_path / "w", "--gin_bindings=Nope.x=1")
  assert not (tmp_path / "w").exists()


def test_a_new_workdir_is_removed_when_no_mesh_of_the_processes_takes_the_config(
    tmp_path, capsys):
  assert _run(tmp_path / "w", "--mesh=data=2",
              "--gin_bindings=ExperimentConfig.eval_batch_size=127") == sup.EXIT_USER_ERROR
  assert "ExperimentConfig.eval_batch_size=127 is not divisible" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_a_workdir_that_existed_stays(tmp_path):
  (tmp_path / "notes.txt").write_text("mine\n")
  assert _run(tmp_path, "--error") == sup.EXIT_USER_ERROR
  assert (tmp_path / "notes.txt").read_text() == "mine\n"
  assert (tmp_path / "events.jsonl").exists()


@pytest.mark.parametrize("written", ["checkpoints/5/state", "metrics.jsonl", "config.gin"])
def test_a_new_workdir_with_a_checkpoint_or_metrics_stays(tmp_path, monkeypatch, written):
  script = tmp_path / "writes_then_fails.py"
  script.write_text(WRITES_THEN_FAILS)
  monkeypatch.setenv("WRITE", written)
  assert _run(tmp_path / "w", script=script) == sup.EXIT_USER_ERROR
  assert (tmp_path / "w" / written).exists() and (tmp_path / "w" / "events.jsonl").exists()


@pytest.mark.slow   # scripts/launch.py and a real worker (imports jax)
def test_launch_with_a_missing_train_data_leaves_no_workdir(tmp_path):
  w = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, os.path.join(t.ROOT, "scripts", "launch.py"), "--quiet",
       "--num_processes=1", "--devices_per_process=1", "--", f"--workdir={w}", *t.TINY,
       f"--train_data={tmp_path / 'missing.tsv'}", "--num_steps=2"],
      capture_output=True, text=True, cwd=t.ROOT, env=t.env(), timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: worker 0: --train_data"), lines
  assert not w.exists()


def test_a_new_workdir_is_removed_when_the_launch_is_interrupted_before_training(tmp_path):
  """SIGINT while the workers start (as train.py's `made_dir` on Ctrl-C): exit 130 and no
  workdir of events, worker logs and locks left behind."""
  script = tmp_path / "starts_slowly.py"
  script.write_text("import time\ntime.sleep(60)\n")
  timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
  timer.start()
  try:
    assert _run(tmp_path / "w", script=script) == 128 + signal.SIGINT
  finally:
    timer.cancel()
  assert not (tmp_path / "w").exists()


def test_a_new_workdir_is_removed_when_no_capacity_lets_the_first_workers_start(tmp_path):
  capacity = tmp_path / "capacity"
  capacity.write_text("1\n")
  options = sup.Options(num_processes=2, min_processes=2, devices_per_process=2,
                        train_script=FAKE, capacity_file=str(capacity), poll_interval=0.05)
  w = tmp_path / "w"
  assert sup.Supervisor(options, [f"--workdir={w}", *TRAIN]).run() == sup.EXIT_BELOW_MIN
  assert not w.exists()


def test_a_workdir_of_failed_workers_keeps_their_logs(tmp_path):
  """After failures (a worker that crashes before writing anything, --max_restarts=0) the
  worker logs explain them: the workdir stays."""
  script = tmp_path / "crashes.py"
  script.write_text("import sys\nprint('segfault, say')\nsys.exit(1)\n")
  options = sup.Options(num_processes=1, devices_per_process=2, train_script=str(script),
                        max_restarts=0, poll_interval=0.05)
  w = tmp_path / "w"
  code = sup.Supervisor(options, [f"--workdir={w}", *TRAIN]).run()
  assert code == sup.EXIT_MAX_RESTARTS
  assert (w / "events.jsonl").exists() and os.listdir(w / "workers")


@pytest.mark.parametrize("body,said", [
    ("sys.exit(1)", "worker 0 exited 1 without output"),
    ("print('RuntimeError: boom', flush=True); sys.exit(1)",
     "worker 0 exited (exit code 1): RuntimeError: boom")])
@pytest.mark.parametrize("max_restarts,ends", [
    (0, "1 failure (the last: {}): --max_restarts=0 allows 0 restart(s)"),
    (2, "below --min_processes=1 (lost slot(s) [0] never come back without --rejoin_after=S, "
        "which offers a lost slot again after S seconds, e.g. to restart a crashed worker "
        "where it ran); the last failure: {}.")])
def test_the_give_up_line_says_what_the_failed_worker_said(tmp_path, capsys, body, said,
                                                           max_restarts, ends):
  """Under --quiet (no `worker_exit` event echoed) a crashing --train_script ended in
  `1 failure: --max_restarts=0 allows 0 restart(s)` or `below --min_processes=1`: what the
  worker said, or that it said nothing, was only in events.jsonl and its log."""
  script = tmp_path / "crash.py"
  script.write_text(f"import sys\n{body}\n")
  options = sup.Options(num_processes=1, devices_per_process=2, train_script=str(script),
                        poll_interval=0.05, max_restarts=max_restarts)
  assert sup.Supervisor(options, [f"--workdir={tmp_path / 'w'}", *TRAIN]).run() in (
      sup.EXIT_MAX_RESTARTS, sup.EXIT_BELOW_MIN)
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and ends.format(said) in errors[0], errors
