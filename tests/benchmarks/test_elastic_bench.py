"""benchmarks/elastic.py with fake workers (tests/elastic/fake_train.py): its exit status."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = os.path.join(ROOT, "tests", "elastic", "fake_train.py")


def _bench(tmp_path, fake_args, workdir=None, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu", FAKE_TRAIN_ARGS=fake_args)
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "elastic.py"),
                         f"--train_script={FAKE}", f"--workdir={workdir or tmp_path / 'w'}",
                         "--num_steps=60", "--kill_at=15", "--checkpoint_every=10",
                         "--timeout=120"],
                        capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_a_relative_workdir_is_where_the_benchmark_runs(tmp_path):
  """The launcher runs in the repository root: `--workdir=w` from elsewhere put the job in
  ROOT/w while the benchmark watched ./w ('the launcher exited (0) before step 15')."""
  name = f"w_rel_{os.getpid()}"
  try:
    out = _bench(tmp_path, "--step_s=0.05", workdir=name, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / name / "launch.log").exists() and not os.path.exists(
        os.path.join(ROOT, name))
  finally:
    subprocess.run(["rm", "-rf", os.path.join(ROOT, name)], check=False)


def test_a_job_that_fails_after_recovering_fails_the_benchmark(tmp_path):
  """The restarted worker crashes after the recovery was measured: the job stops below
  --min_processes (exit 2), yet the benchmark exited 0 (only `"completed": false`)."""
  out = _bench(tmp_path, "--step_s=0.1 --crash_at=1:5")
  assert out.returncode == 1, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-2000:]
  assert errors[0].startswith("error: the job failed after its recovery: scripts/launch.py "
                              "exited 2: only 0 process(es)"), errors
  record = json.loads(out.stdout.splitlines()[-1])
  assert record["completed"] is False and record["job_exit_code"] == 2, record
  assert record["goal_op"] == "<=" and record["workdir"] == str(tmp_path / "w"), record


def test_a_workdir_it_did_not_make_is_not_deleted(tmp_path):
  """`--workdir=DIR` was emptied with rmtree whatever it held (`--workdir=.` or a real run's
  directory): only a directory of its own earlier run is."""
  w = tmp_path / "w"
  w.mkdir()
  (w / "notes.txt").write_text("mine")
  out = _bench(tmp_path, "--step_s=0.1")
  assert out.returncode == 1 and (w / "notes.txt").read_text() == "mine", out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [
      f"error: --workdir: {w} is not empty and not a directory of an earlier run of this "
      "benchmark; remove it or pick another"], out.stderr[-2000:]
