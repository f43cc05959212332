"""`--help` prints each script's module docstring (absl): its usage lines as written."""

import ast
import glob
import os
import subprocess
import sys

import pytest
from absl import app, flags

from jaxrec import cli_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py"))
                 + glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_the_docstring_is_its_source_text(path):
  """A `\\` ending a usage line of a plain docstring joined it with the next one, leaving a
  run of spaces in the middle (`... dlrm_synthetic.gin       [--gin_bindings=...`)."""
  source = open(path, encoding="utf-8").read()
  tree = ast.parse(source)
  doc = ast.get_docstring(tree, clean=False)
  if doc is None:
    pytest.skip("no module docstring")
  literal = ast.get_source_segment(source, tree.body[0].value)
  text = literal.lstrip("rRuU")[3:-3]   # the lines between the triple quotes
  assert doc == text


def _keyword(call: ast.Call, name: str):
  return next((k.value for k in call.keywords if k.arg == name), None)


def _text(node) -> str:
  """A help argument's text; an expression (an f-string, a join) counts as text."""
  return node.value if isinstance(node, ast.Constant) else "<expr>" if node is not None else ""


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_flag_has_help_and_shows_its_default(path):
  """`--help` of most benchmarks listed bare `--rows ROWS`, `--mesh MESH`: no help text and
  (argparse's default formatter) no default."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  bare = []
  for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
    name = getattr(call.func, "attr", getattr(call.func, "id", ""))
    if name == "add_argument":
      if not _text(_keyword(call, "help")).strip():
        bare.append(f"line {call.lineno}: {ast.literal_eval(call.args[0])} has no help")
    elif name == "ArgumentParser" and "add_argument" in ast.unparse(tree):
      formatter = _keyword(call, "formatter_class")
      if "HelpFormatter" not in ast.unparse(formatter or ast.Constant("")):   # or common's
        bare.append(f"line {call.lineno}: ArgumentParser does not show defaults")
    elif name.startswith("DEFINE_"):
      help_node = call.args[2] if len(call.args) > 2 else _keyword(call, "help")
      if name == "DEFINE_enum":
        help_node = call.args[3] if len(call.args) > 3 else _keyword(call, "help")
      if not _text(help_node).strip():
        bare.append(f"line {call.lineno}: flag {ast.literal_eval(call.args[0])} has no help")
    elif name == "run" and ast.unparse(call.func) == "app.run":   # absl's --help exits 1
      if "cli_flags.pars" not in ast.unparse(_keyword(call, "flags_parser") or ast.Constant("")):
        bare.append(f"line {call.lineno}: app.run without flags_parser=cli_flags.parse")
  assert not bare, bare


def _flag_call(script: str, flag: str) -> ast.Call:
  """The `flags.DEFINE_*(flag, default, help)` call of scripts/`script`."""
  tree = ast.parse(open(os.path.join(ROOT, "scripts", script), encoding="utf-8").read())
  return next(c for c in ast.walk(tree) if isinstance(c, ast.Call)
              and getattr(c.func, "attr", "").startswith("DEFINE_")
              and isinstance(c.args[0], ast.Constant) and c.args[0].value == flag)


def test_memory_per_device_help_states_the_planners_default():
  """train.py's `--memory_per_device` help gave no default (the README: 16GiB); plan.py's
  flag default is the same budget."""
  from jaxrec.planner import search
  from jaxrec.train import config as config_lib
  default = search.DEFAULT_MEMORY_PER_DEVICE
  text = ast.literal_eval(_flag_call("train.py", "memory_per_device").args[2])
  stated = text.split("default ", 1)[-1].split()[0]   # `... default 16GiB whatever ...`
  assert config_lib.parse_bytes(stated, "help") == default, text
  plan_default = ast.literal_eval(_flag_call("plan.py", "memory_per_device").args[1])
  assert config_lib.parse_bytes(plan_default, "plan.py") == default


@pytest.mark.parametrize("help_flag", [app.HelpFlag, app.HelpshortFlag, app.HelpfullFlag])
def test_cli_flags_turns_absls_help_exit_1_into_0(help_flag, capsys, monkeypatch):
  """The parser every script shares (in this process: absl's help flags on their own
  `FlagValues`, as `app.run` defines them on `flags.FLAGS`)."""
  monkeypatch.setattr(sys.modules["__main__"], "__doc__", "usage of scripts/x.py")
  flag_values = flags.FlagValues()
  flags.DEFINE_flag(help_flag(), flag_values=flag_values)
  with pytest.raises(SystemExit) as e:
    cli_flags.parse(["scripts/x.py", f"--{help_flag().name}"], flag_values)
  assert e.value.code == 0
  assert "usage of scripts/x.py" in capsys.readouterr().out   # absl printed the usage


@pytest.mark.slow   # scripts/*.py in real processes
@pytest.mark.parametrize("script", ["train.py", "launch.py", "plan.py", "convert_checkpoint.py",
                                    "preprocess.py", "plot_metrics.py", "build_vocab.py"])
@pytest.mark.parametrize("flag", ["--help", "--helpfull"])
def test_help_prints_the_usage_and_exits_0(script, flag):
  """absl exits 1 after printing the usage, so `scripts/X.py --help && ...` stopped as if
  it had failed. (A real process: absl defines its help flags once per process.)"""
  path = os.path.join(ROOT, "scripts", script)
  done = subprocess.run([sys.executable, path, flag], capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  first_line = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read())).splitlines()[0]
  assert first_line in done.stdout


@pytest.mark.parametrize("script", ["plan.py", "train.py"])
def test_help_into_a_closed_pipe_exits_0_quietly(script):
  """`scripts/plan.py --help | head -1`: once `head` left, the rest of the usage raised
  BrokenPipeError, a traceback and exit 1 (`train.py`: the traceback)."""
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", script), "--help"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  proc.stdout.close()   # the reader is gone before the usage is printed
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
