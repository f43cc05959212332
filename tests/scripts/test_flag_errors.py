"""Every script's flag errors are one `error:` line and exit code 1 (`jaxrec.cli_flags`).

Each case runs the script's `__main__` block in this process with `absl.app.run` replaced by
a stand-in that only calls the script's `flags_parser`, so what is tested is the script's
own wiring; what the script leaves in the process (flags: several scripts share names;
the signal handlers it deferred at import) is undone (`in_process.restored_process_state`).
"""

import os
import runpy
import sys

import pytest
from absl import app

from tests.scripts import in_process


def _parse_as(monkeypatch, script: str, argv: list[str]) -> list[str]:
  """`scripts/SCRIPT ARGV` up to its flag parsing: what its parser passes to `main`."""
  parsed = []
  monkeypatch.setattr(app, "run", lambda main, flags_parser=None, **kw: parsed.append(
      (flags_parser or app.parse_flags_with_usage)(sys.argv)))
  with in_process.restored_process_state():
    sys.argv = [f"scripts/{script}", *argv]
    runpy.run_path(os.path.join(in_process.ROOT, "scripts", script), run_name="__main__")
  return parsed[0]


OUT = "--output=o.npz"
CASES = [
    ("train.py", ["--on_nan=rollbak"],
     "--on_nan=rollbak: not one of stop, rollback (did you mean rollback?)"),
    ("train.py", ["--num_step=5"], "scripts/train.py has no flag --num_step (did you mean "
                                   "--num_steps?)"),
    ("train.py", ["--seed=1.5"], "--seed=1.5: not an integer"),
    ("train.py", ["--noprogress=1"], "--noprogress=1 does not take an argument"),
    ("train.py", ["--workdir=w", "extra"], "unexpected arguments ['extra'] (flags are written "
                                           "--NAME=VALUE)"),
    ("convert_checkpoint.py", ["--format=npy", OUT],
     "--format=npy: not one of npz, zarr, checkpoint (did you mean npz?)"),
    ("convert_checkpoint.py", [OUT], "--format is required (--format: one of npz, zarr, "
                                     "checkpoint)"),
    ("convert_checkpoint.py", [], "--output and --format are required (--format: one of "
                                  "npz, zarr, checkpoint)"),
    ("preprocess.py", ["--shard_examples=x"], "--shard_examples=x: not an integer"),
    ("preprocess.py", ["--bad_rows=skipp"], "--bad_rows=skipp: not one of error, skip "
                                            "(did you mean skip?)"),
    ("plan.py", ["--calibrate=maybe"], "--calibrate=maybe: not a boolean (true or false)"),
    ("plot_metrics.py", [], "--workdir is required"),
    # an empty required value was taken as "" (the current directory: a copy wrote 20/
    # into the checkout)
    ("convert_checkpoint.py", ["--output=", "--format=checkpoint", "--checkpoint_dir=c"],
     "--output is required (given an empty value)"),
    ("plot_metrics.py", ["--workdir=w", "--workdir="],
     "--workdir is required (given an empty value)"),
    ("plan.py", ["--flagfile=/no/such.flags"],   # was "error: ERROR:: Unable to open ..."
     "--flagfile: cannot read /no/such.flags: No such file or directory"),
    # `~` after `=` is not expanded by the shell: a data path said only "no such file", an
    # output became a directory named `~` here
    ("train.py", ["--workdir=w", "--train_data=~/criteo/day_0"],
     "--train_data=~/criteo/day_0: the shell does not expand '~' after '=' (the path would be "
     "a directory named '~' here); write --train_data ~/criteo/day_0, "
     "--train_data=$HOME/criteo/day_0 or an absolute path"),
    ("convert_checkpoint.py", ["--output=~/t.npz", "--format=npz"],
     "--output=~/t.npz: the shell does not expand '~' after '=' (the path would be a "
     "directory named '~' here); write --output ~/t.npz, --output=$HOME/t.npz or an absolute "
     "path"),
    ("launch.py", ["--hang_timeout=soon", "--", "--workdir=w"],
     "--hang_timeout=soon: not a number"),
    ("launch.py", ["--workdir=w", "--", "--gin_file=c.gin"],
     "scripts/launch.py has no flag --workdir; flags for scripts/train.py go after `--`: "
     "launch.py [launcher flags] -- --workdir=W --gin_file=..."),
]


@pytest.mark.parametrize("script,argv,message", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_a_flag_error_is_one_error_line(monkeypatch, capsys, script, argv, message):
  """Bad enum or number values and missing required flags were absl's `FATAL Flags parsing
  error: ...` plus a usage hint (a traceback for `--noprogress=1`); stray arguments the
  script's usage text; README promises one `error:` line."""
  with pytest.raises(SystemExit) as exit_info:
    _parse_as(monkeypatch, script, argv)
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == f"error: {message}\n"


def test_good_flags_reach_main_and_the_launcher_keeps_the_worker_flags(monkeypatch):
  # (runpy makes argv[0] the script's full path)
  assert _parse_as(monkeypatch, "launch.py", ["--num_processes=2", "--", "--workdir=w"]
                   )[1:] == ["--workdir=w"]
  assert _parse_as(monkeypatch, "train.py", ["--on_nan=rollback"])[1:] == []
