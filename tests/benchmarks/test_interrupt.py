"""Ctrl-C in a benchmark: one line, `interrupted (Ctrl-C)`, exit code 130 (was a traceback).

Each script runs in this process (`in_process.run_script`) with its flag parsing (inside
its `main`) raising KeyboardInterrupt, as a Ctrl-C there would."""

import argparse
import glob
import os

import pytest

import common  # noqa: E402  (benchmarks/ is on sys.path: conftest.py)
from benchmarks import common as package_common   # elastic.py's
from tests.scripts.in_process import run_script

BENCH = os.path.dirname(os.path.abspath(common.__file__))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(BENCH, "*.py"))
                 if not p.endswith("common.py"))
# absl's app.run parses their flags (no argparse): their checks call check_at_least. Found
# by reading the scripts: a new one missing from a hand-written list (vocab.py) ran whole.
ABSL = tuple(s for s in SCRIPTS
             if "app.run(" in open(os.path.join(BENCH, s), encoding="utf-8").read())


def _ctrl_c(*args, **kwargs):
  raise KeyboardInterrupt


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_is_one_line_and_exit_130(script, monkeypatch):
  assert {"elastic.py", "input_pipeline.py", "vocab.py"} <= set(ABSL)
  if script in ABSL:
    monkeypatch.setattr(common, "check_at_least", _ctrl_c)
    monkeypatch.setattr(package_common, "check_at_least", _ctrl_c)
  else:
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _ctrl_c)
  out = run_script(script, folder="benchmarks")
  assert out.returncode == 130 and out.stderr == "interrupted (Ctrl-C)\n", out.stderr[-2000:]
  assert out.stdout == ""
