"""benchmarks/checkpoint_tables.py: its lines, and the layout it reports."""

import json

import pytest

from tests.scripts.in_process import run_script


@pytest.mark.parametrize("tables,layout", [(3, "files"), (40, "database")])
def test_a_line_per_save_naming_the_layout(tmp_path, tables, layout):
  out = run_script("checkpoint_tables.py", f"--tables={tables}", "--rows=20", "--saves=2",
                   f"--workdir={tmp_path / 'w'}", folder="benchmarks")
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [json.loads(line) for line in out.stdout.splitlines()]
  assert [(r["benchmark"], r["step"], r["layout"], r["arrays"]) for r in lines] == [
      ("checkpoint_tables", s, layout, 2 * tables) for s in (1, 2)]
  assert all(r["save_s"] >= r["blocked_s"] > 0 and r["restore_s"] > 0 and r["files"] > 0
             for r in lines)
  assert lines[0]["files"] > (4 * tables if layout == "files" else 0)
  assert lines[0]["files"] < (10**6 if layout == "files" else 40)
