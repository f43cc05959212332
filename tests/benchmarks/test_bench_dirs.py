"""Benchmark directories: a user's files are never deleted, temp dirs go on any exit."""

import json
import os
import subprocess
import sys

import pytest

import common  # noqa: E402  (benchmarks/ is on sys.path: conftest.py)
from tests.scripts.in_process import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _error(message):
  raise SystemExit(f"error: {message}")


def test_checkpoint_refuses_a_checkpoints_dir_it_did_not_make(tmp_path):
  """It rmtree'd W/checkpoints whatever it held: a real run's checkpoints."""
  mine = tmp_path / "checkpoints" / "100"
  mine.mkdir(parents=True)
  out = run_script("checkpoint.py", "--workdir", str(tmp_path), folder="benchmarks")
  assert out.returncode == 2 and mine.is_dir(), out.stderr[-2000:]
  assert (f"--workdir: {tmp_path / 'checkpoints'} is not empty and not a directory of an "
          "earlier run of this benchmark") in out.stderr


def test_own_dir_empties_an_earlier_run_of_its_own(tmp_path):
  d = tmp_path / "d"
  common.own_dir(_error, "workdir", str(d), ".mark")
  (d / "old").write_text("x")
  common.own_dir(_error, "workdir", str(d), ".mark")
  assert sorted(os.listdir(d)) == [".mark"]


def test_own_dir_removes_only_the_outputs_named_and_takes_a_symlink(tmp_path):
  """input_pipeline.py emptied its whole earlier --workdir, with the `trainer/metrics.jsonl`
  that --trainer_metrics named (a FileNotFoundError after measuring); a symlinked
  directory was an rmtree traceback."""
  d = tmp_path / "d"
  common.own_dir(_error, "workdir", str(d), ".mark")
  (d / "bin").mkdir()
  (d / "trainer").mkdir()
  (d / "trainer" / "metrics.jsonl").write_text("{}")
  (d / "train.tsv").write_text("x")
  link = tmp_path / "link"
  link.symlink_to(d)
  common.own_dir(_error, "workdir", str(link), ".mark", ("train.tsv", "bin", "absent"))
  assert sorted(os.listdir(d)) == [".mark", "trainer"] and link.is_symlink()
  common.own_dir(_error, "workdir", str(link), ".mark")
  assert sorted(os.listdir(d)) == [".mark"]


def test_own_dir_refuses_a_file(tmp_path):
  f = tmp_path / "f"
  f.write_text("x")
  with pytest.raises(SystemExit, match=f"error: --workdir: {f} is not a directory"):
    common.own_dir(_error, "workdir", str(f), ".mark")
  with pytest.raises(SystemExit, match=f"error: --workdir: cannot make {f}/x "):
    common.own_dir(_error, "workdir", str(f / "x"), ".mark")


def test_scratch_dir_is_removed_on_an_error():
  """Ctrl-C or an error left /tmp/jaxrec_ckpt_bench_* (~300 MB) behind."""
  with pytest.raises(KeyboardInterrupt):
    with common.scratch_dir(None, "jaxrec_test_") as tmp:
      open(os.path.join(tmp, "f"), "w").close()
      raise KeyboardInterrupt
  assert not os.path.exists(tmp)


def test_scratch_dir_keeps_a_given_path(tmp_path):
  with common.scratch_dir(str(tmp_path), "jaxrec_test_") as d:
    assert d == str(tmp_path)
  assert tmp_path.is_dir()


def test_elastic_keep_says_where_its_temp_dir_is():
  """--keep without --workdir kept a temp dir and never said where."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", FAKE_TRAIN_ARGS="--step_s=0.1 --crash_at=1:5")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "elastic.py"),
                        f"--train_script={os.path.join(ROOT, 'tests', 'elastic', 'fake_train.py')}",
                        "--keep", "--num_steps=60", "--kill_at=15", "--checkpoint_every=10",
                        "--timeout=120"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  workdir = json.loads(out.stdout.splitlines()[-1])["workdir"]
  try:
    assert os.path.isfile(os.path.join(workdir, "launch.log")), out.stderr[-2000:]
    assert f"kept the run directory: {workdir}" in out.stderr
  finally:
    subprocess.run(["rm", "-rf", workdir], check=False)


def test_input_pipeline_refuses_a_workdir_holding_files_it_did_not_make(tmp_path):
  """A --workdir already holding its output (bin/) failed with a traceback after the
  synthetic measurement."""
  (tmp_path / "bin").mkdir()
  out = run_script("input_pipeline.py", f"--workdir={tmp_path}", folder="benchmarks")
  assert out.returncode == 1 and (tmp_path / "bin").is_dir(), out.stderr[-2000:]
  assert out.stderr.strip() == (f"error: --workdir: {tmp_path} is not empty and not a "
                                "directory of an earlier run of this benchmark; remove it "
                                "or pick another")
  assert out.stdout == ""
