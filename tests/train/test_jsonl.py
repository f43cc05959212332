"""Appending to a JSON-lines file after a run that was killed mid-line."""

import json

import pytest

from jaxrec import jsonl
from jaxrec.planner import profile
from jaxrec.train import plotting
from jaxrec.train.writers import MetricsWriter


@pytest.mark.parametrize("tail, kept", [
    ('{"step": 2, "lo', []),               # torn: cut off
    ('{"step": 2}', [{"step": 2}]),        # complete but for its newline: kept
    ("", []),                              # nothing torn: untouched
])
def test_repair_tail(tmp_path, tail, kept):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1}\n' + tail)
  jsonl.repair_tail(path)
  text = path.read_text()
  assert text.endswith("\n")
  assert [json.loads(l) for l in text.splitlines()] == [{"step": 1}] + kept


def test_a_resumed_run_appends_after_a_torn_line(tmp_path):
  """The resumed run's first record was glued onto the torn line: plot_metrics and
  plan.py --profile then refused the file (a bad line in the middle)."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 100, "loss": 0.5}\n{"step": 200, "lo')
  with MetricsWriter(str(tmp_path)) as w:
    w.write(200, {"loss": 0.4})
  assert [r["step"] for r in plotting.read_metrics(str(tmp_path))] == [100, 200]
  rec = {"step": 1, "step_time_s": 0.1, "plan": {}, "mesh": {"data": 1}}
  (tmp_path / profile.PROFILE_FILE).write_text(json.dumps(rec) + '\n{"step": 2, "st')
  profile.append_profile(tmp_path, dict(rec, step=3))
  assert [r["step"] for r in profile.read_profile(tmp_path)] == [1, 3]


def test_an_empty_or_missing_file_is_left_alone(tmp_path):
  jsonl.repair_tail(tmp_path / "none.jsonl")
  assert not (tmp_path / "none.jsonl").exists()
  (tmp_path / "e.jsonl").write_text("")
  jsonl.repair_tail(tmp_path / "e.jsonl")
  assert (tmp_path / "e.jsonl").read_text() == ""


def test_complete_lines_reads_a_line_at_a_time(tmp_path, caplog):
  """A restart owing an eval read the whole metrics.jsonl and split it (225 MB of
  `--log_every=1` lines: +740 MB at start-up). Lines come as iterated; a missing file
  raises at the call; a torn last line is still left out."""
  with pytest.raises(FileNotFoundError):
    jsonl.complete_lines(tmp_path / "none.jsonl")
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
  lines = jsonl.complete_lines(path)
  assert next(lines) == (1, '{"step": 1}')   # an iterator, not a list read at the call
  assert list(lines) == [(3, '{"step": 2}')]
  assert "m.jsonl:4: left out an incomplete last line" in caplog.text
  path.write_text('{"step": 1}\n{"step": 2}')   # complete but for its newline: kept
  assert list(jsonl.complete_lines(path)) == [(1, '{"step": 1}'), (2, '{"step": 2}')]
