"""The supervisor's reading of the capacity file (no workers): a rewrite is never lost."""

import json
import os

import pytest

from jaxrec.elastic import supervisor as sup


def _supervisor(tmp_path):
  options = sup.Options(num_processes=4, devices_per_process=2)
  return sup.Supervisor(options, [f"--workdir={tmp_path}", "--gin_file=configs/x.gin"])


def _events(tmp_path):
  with open(os.path.join(tmp_path, "events.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_rewrite_in_the_same_clock_tick_as_its_truncation_is_read(tmp_path):
  """`echo 2 > capacity` truncates, then writes. A poll between the two saw an empty file
  and remembered its mtime; with the write in the same tick of the file system's clock
  the mtime did not change again, and the new capacity was never read."""
  s = _supervisor(tmp_path)
  path = s.capacity_file
  with open(path, "w") as f:
    f.write("1\n")
  assert s._read_capacity(initial=True) and s.capacity == (1, 2)
  open(path, "w").close()                        # truncated: a poll sees an empty file
  tick = os.stat(path).st_mtime_ns
  assert not s._read_capacity()
  with open(path, "w") as f:
    f.write("3\n")
  os.utime(path, ns=(tick, tick))                # the write lands in the same tick
  assert s._read_capacity() and s.capacity == (3, 2)
  assert not s._read_capacity()                  # nothing new


def test_same_text_rewritten_is_a_fresh_statement_and_errors_are_said_once(tmp_path):
  s = _supervisor(tmp_path)
  path = s.capacity_file
  with open(path, "w") as f:
    f.write("2\n")
  assert s._read_capacity(initial=True)
  s.lost = {1: 1.0}                              # a slot was lost since
  os.utime(path, ns=(1, 1))                      # rewritten with the same text
  assert s._read_capacity() and s.lost == {}     # the rewrite returns the lost slot
  with open(path, "w") as f:
    f.write('{"num_processes": null}\n')         # was a TypeError that ended the supervisor
  assert not s._read_capacity() and not s._read_capacity()
  errors = [e for e in _events(tmp_path) if e.get("error")]
  assert errors[0]["error"] == (f"{s.capacity_file}:1: num_processes must be a whole "
                                "number, got null; ignored"), errors
  assert s.capacity == (2, 2)


def test_a_count_that_is_not_a_whole_number_is_refused(tmp_path):
  """`{"num_processes": 1.5}` (or `true`, or `2.0` devices) was read as 1 (`int()`)."""
  s = _supervisor(tmp_path)
  for i, text in enumerate(['{"num_processes": 1.5}', '{"num_processes": true}',
                            '{"num_processes": 2, "devices_per_process": 2.0}', "1.5"]):
    with open(s.capacity_file, "w") as f:
      f.write(text + "\n")
    os.utime(s.capacity_file, ns=(i + 1, i + 1))
    assert not s._read_capacity(), text
    assert s.capacity == (4, 2), text
  errors = [e["error"] for e in _events(tmp_path) if e.get("error")]
  assert len(errors) == 4 and all(e.startswith(s.capacity_file + ":1: ") for e in errors)
  assert "num_processes must be a whole number, got 1.5" in errors[0], errors
  assert "devices_per_process must be a whole number, got 2.0" in errors[2], errors


def test_comments_beside_the_plain_form_are_read_past():
  """'# two processes' above '2 2' was an error blaming line 2, 'found another line'."""
  from jaxrec.elastic import capacity  # pylint: disable=import-outside-toplevel
  assert capacity.parse("# two processes\n2 2  # of 2 devices\n\n", "cap", 4) == (2, 2)
  assert capacity.parse("3#\n", "cap", 4) == (3, 4)


@pytest.mark.parametrize("text,why", [
    ("2 4 junk\n", ":1: expected `N` or `N K`, got '2 4 junk'"),
    ("2\n4\n", ":2: one line `N` or `N K` expected, found another line '4'"),
    ("2 abc\n", ":1: devices_per_process must be a whole number, got 'abc'"),
    ("3 0\n", ":1: devices_per_process must be >= 1, got 0"),
    ("-1\n", ":1: num_processes must be >= 0, got -1"),
    ('{"num_processes": 3,\n "devices": 4}\n',
     ":2: unknown key(s) ['devices'] (known: num_processes, devices_per_process)"),
    ('{"devices_per_process": 2}', ':1: the JSON object needs "num_processes"'),
    ("[2]", ":1: num_processes must be a whole number, got '[2]'"),
    ('{"num_processes": 2,\n "devices_per_process": x}', ":2: not valid JSON: Expecting value"),
    ("# nothing yet\n", ": only comments; expected one line `N` or `N K`"),
    ("# two\n2 2 # now\n3\n", ":3: one line `N` or `N K` expected, found another line '3'"),
])
def test_bad_content_is_an_error_naming_the_file_and_line(tmp_path, text, why):
  """'2 4 junk', a second line and an unknown JSON key (`devices`) were read past silently;
  '3 0' said 'negative'; a missing key said only "'num_processes'"; none named a line."""
  s = _supervisor(tmp_path)
  with open(s.capacity_file, "w") as f:
    f.write(text)
  assert not s._read_capacity() and s.capacity == (4, 2)
  errors = [e["error"] for e in _events(tmp_path) if e.get("error")]
  assert len(errors) == 1 and errors[0].startswith(s.capacity_file + why), errors
  assert errors[0].endswith("; ignored"), errors


def test_bad_content_at_start_is_a_user_error(tmp_path, monkeypatch):
  """A capacity file the supervisor cannot read when it starts was ignored (the job ran on
  the flags' capacity, the error only an event); now nothing starts (exit 1)."""
  s = _supervisor(tmp_path)
  monkeypatch.setattr(sup.replan, "load_config", lambda args: None)
  with open(s.capacity_file, "w") as f:
    f.write("2 4 junk\n")
  s._plan = None                                  # never reached: no plan, no workers
  assert s._run() == sup.EXIT_USER_ERROR
  ev = _events(tmp_path)
  assert [e["event"] for e in ev] == ["start", "capacity", "give_up"], ev
  assert ev[-1]["reason"] == "user_error"
  assert ev[-1]["message"].startswith(f"{s.capacity_file}:1: expected `N` or `N K`"), ev[-1]
  assert ev[1]["error"].endswith("; the job does not start"), ev[1]   # was "; ignored"


def _run_after_checkpoint_10(s, monkeypatch, capacity: str) -> int:
  """Runs supervisor `s` (no config, no workers) on a workdir holding checkpoint 10 and a
  capacity file stating `capacity`; its exit code."""
  monkeypatch.setattr(sup.replan, "load_config", lambda args: None)
  os.makedirs(os.path.join(s.workdir, "checkpoints", "10"))
  with open(s.capacity_file, "w") as f:
    f.write(capacity)
  return s._run()


def test_bad_content_at_start_says_to_fix_the_file_not_to_rerun(tmp_path, monkeypatch, capsys):
  """With a checkpoint on disk the give_up said 'run the same command again to resume': the
  same command found the same file and stopped again. It names the file to fix."""
  s = _supervisor(tmp_path)
  assert _run_after_checkpoint_10(s, monkeypatch, "2 4 junk\n") == sup.EXIT_USER_ERROR
  message = _events(tmp_path)[-1]["message"]
  assert "run the same command again" not in message, message
  assert f"fix or remove {s.capacity_file}, then run again" in message, message
  assert "step 10" in message, message
  err = capsys.readouterr().err
  assert err == f"error: {message}\n", err


def test_below_minimum_by_the_capacity_file_says_to_change_it(tmp_path, monkeypatch, capsys):
  """A capacity file stating fewer than --min_processes: the give_up said 'run the same
  command again to resume', which read the file again and stopped the same way."""
  options = sup.Options(num_processes=4, devices_per_process=2, min_processes=2)
  s = sup.Supervisor(options, [f"--workdir={tmp_path}", "--gin_file=configs/x.gin"])
  assert _run_after_checkpoint_10(s, monkeypatch, "1\n") == sup.EXIT_BELOW_MIN
  message = _events(tmp_path)[-1]["message"]
  assert "run the same command again" not in message, message
  assert message.startswith("only 1 process(es) x 2 device(s) available, below "
                            f"--min_processes=2. Stopping; change {s.capacity_file} (it "
                            "states 1 x 2: no usable job) or remove it, then run "
                            "again to resume from the latest checkpoint, step 10 in "), message


def test_a_rewrite_made_while_a_generation_stops_is_planned_on(tmp_path, monkeypatch):
  """The file was read only while a generation ran: a rewrite during a stop was seen after
  the next launch, which then had to stop again (restore, compile and steps for nothing)."""
  s = _supervisor(tmp_path)
  s.config = None
  seen = []
  monkeypatch.setattr(sup.replan, "best_choice",
                      lambda config, args, available, k, *rest: (seen.append(available), (
                          None, ["no mesh (test)"]))[1])
  with open(s.capacity_file, "w") as f:
    f.write("3\n")
  s._plan()
  assert seen == [3] and s.capacity == (3, 2)


def test_a_removed_file_keeps_the_last_statement_and_says_so(tmp_path):
  """`rm W/elastic/capacity` mid-run changed nothing and said nothing, where the start-up
  error's 'or remove it' suggested the flags' capacity would return."""
  s = _supervisor(tmp_path)
  with open(s.capacity_file, "w") as f:
    f.write("1\n")
  assert s._read_capacity(initial=True) and s.capacity == (1, 2)
  os.remove(s.capacity_file)
  assert not s._read_capacity() and not s._read_capacity() and s.capacity == (1, 2)
  removed = [e for e in _events(tmp_path) if e.get("removed")]
  assert len(removed) == 1 and removed[0]["note"].startswith(
      f"{s.capacity_file} removed: the last capacity it stated stays in force"), removed
  with open(s.capacity_file, "w") as f:
    f.write("1\n")
  assert s._read_capacity()   # written again: a statement (it returns lost slots)
