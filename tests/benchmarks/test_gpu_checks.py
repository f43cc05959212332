"""benchmarks/gpu_checks.sh: its exit status and fresh logs, with a stand-in python."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fake_python(tmp_path, env_rc):
  """A `$PYTHON` whose `-c` (the env step) exits `env_rc` (saying why when not 0) and
  anything else exits 3."""
  py = tmp_path / "py"
  why = "echo \"ModuleNotFoundError: No module named 'jax'\"; " if env_rc else ""
  py.write_text(f'#!/bin/sh\n[ "$1" = -c ] && {{ {why}exit {env_rc}; }}\necho failing; exit 3\n')
  py.chmod(0o755)
  return str(py)


def _checks(tmp_path, env_rc, checks="sweep"):
  out = tmp_path / "out"
  out.mkdir(exist_ok=True)
  (out / "summary.log").write_text("== an old run\n")
  (out / "bench.log").write_text('{"benchmark": "old"}\n')
  env = dict(os.environ, PYTHON=_fake_python(tmp_path, env_rc), CHECKS=checks)
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_checks.sh"), str(out)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
  return proc, out


def test_no_gpu_backend_stops_with_one_line(tmp_path):
  """Each step failed (no cuda backend) and the script exited 0."""
  proc, out = _checks(tmp_path, 1)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.startswith("gpu_checks.sh: no GPU backend") and proc.stderr.count("\n") == 1
  # why (it said only 'no GPU backend' where the env's python had no jax)
  assert ": ModuleNotFoundError: No module named 'jax'; see " in proc.stderr, proc.stderr
  assert "kernels_sweep" not in (out / "summary.log").read_text()


def test_help_prints_the_usage_and_options_are_not_an_out_dir(tmp_path):
  """`--help` was taken as OUT_DIR: mkdir printed its own help and every log write failed."""
  script = os.path.join(ROOT, "benchmarks", "gpu_checks.sh")
  proc = subprocess.run(["bash", script, "--help"], capture_output=True, text=True,
                        cwd=tmp_path, timeout=60)
  assert proc.returncode == 0 and "CHECKS=" in proc.stdout and "OUT_DIR" in proc.stdout
  assert not proc.stdout.startswith("!") and "set -u" not in proc.stdout
  proc = subprocess.run(["bash", script, "-x"], capture_output=True, text=True, cwd=tmp_path,
                        timeout=60)
  assert proc.returncode == 2 and "unknown option '-x'" in proc.stderr
  assert os.listdir(tmp_path) == []


def test_a_failed_step_fails_the_run_and_logs_start_afresh(tmp_path):
  proc, out = _checks(tmp_path, 0, "sweep kernels")
  assert proc.returncode == 1, proc.stderr
  assert "gpu_checks.sh: 4 step(s) failed: kernels_sweep kernels_float32" in proc.stderr
  summary = (out / "summary.log").read_text()
  assert "an old run" not in summary and "== kernels_sweep: rc=3" in summary
  assert "old" not in (out / "bench.log").read_text()


def test_memory_warning_passes_on_its_test_passing_and_keeps_the_env_steps_log(tmp_path):
  """The check passes when its one GPU test passed, not when it was skipped; the test's
  output is appended to kernel_tests.log (a `tee` truncated it: the env step's jax version
  and devices were lost)."""
  py = tmp_path / "py"
  py.write_text('#!/bin/sh\n[ "$1" = -c ] && { echo "jax env line"; exit 0; }\n'
                'echo "$FAKE_PYTEST"; exit 0\n')
  py.chmod(0o755)
  out = tmp_path / "out"
  for line, rc in (("1 passed, 12 deselected in 3.00s", 0),
                   ("1 skipped, 12 deselected in 3.00s", 1)):
    env = dict(os.environ, PYTHON=str(py), CHECKS="memory_warning", FAKE_PYTEST=line)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_checks.sh"),
                           str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == rc, proc.stderr
    log = (out / "kernel_tests.log").read_text()
    assert log.startswith("== env\njax env line\n== memory_warning\n") and line in log, log
