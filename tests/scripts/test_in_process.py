"""tests/scripts/in_process.py: a script run in this process leaves it as it found it."""

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging

from tests.scripts.in_process import run_script


def _state():
  return (flags.FLAGS["verbosity"].value, flags.FLAGS["verbosity"].present,
          list(absl_logging.get_absl_handler().filters), list(sys.path),
          logging.getLogger().level, absl_logging.get_absl_logger().level)


def test_a_script_past_its_flags_leaves_logging_flags_path_and_environ(tmp_path, monkeypatch):
  """convert_checkpoint.py's `main` adds a filter to absl's handler (without --verbosity),
  and at import puts the repository root on sys.path and sets JAX_PLATFORMS; --verbosity
  kept its value: all were left behind."""
  monkeypatch.delenv("JAX_PLATFORMS")
  before = _state()
  for extra in ([], ["--verbosity=1"]):
    r = run_script("convert_checkpoint.py", f"--output={tmp_path / 'a.npz'}", "--format=npz",
                   *extra)
    assert (r.returncode, r.stderr) == (1, "error: --checkpoint_dir is required (or "
                                           "--torchrec_npz to import)\n")
    assert _state() == before, extra
    assert "JAX_PLATFORMS" not in os.environ and "checkpoint_dir" not in flags.FLAGS


def test_a_benchmark_runs_from_its_folder_and_its_modules_are_forgotten(monkeypatch):
  """`folder="benchmarks"`: `from common import ...` resolves as `python benchmarks/X.py`
  resolves it, and `common` is not left in sys.modules for the next script of that name.
  (Tests of benchmarks/ that ran before in this process may have imported `common`: put
  aside for this test.)"""
  for name in ("common", "vs_torchrec"):
    monkeypatch.delitem(sys.modules, name, raising=False)
  r = run_script("vs_torchrec.py", "--repeats", "0", folder="benchmarks")
  assert r.returncode == 2 and "--repeats must be at least 1" in r.stderr, r.stderr
  assert r.stdout == "" and "common" not in sys.modules and "vs_torchrec" not in sys.modules
