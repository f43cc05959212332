"""The ```sh commands of README.md and docs/*.md, and the usage lines of each script's
docstring (its `--help`), run as written: the venv's interpreter, and only flags the script
they start defines (checked on its source, nothing is run)."""

import ast
import functools
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = ".venv/bin/python"   # what `make train` / `make test` install jaxrec into
_SCRIPT = re.compile(r"(\S*python\S*)\s+((?:scripts|benchmarks)/\w+\.py)")


def doc_commands() -> list[tuple[str, str]]:
  """`(FILE:LINE, command)` for each command of a ```sh block, `\\`-continued lines joined
  and `#` comments dropped."""
  out = []
  for path in ["README.md"] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
    rel = os.path.relpath(os.path.join(ROOT, path), ROOT)
    in_sh, pending, start = False, "", 0
    for number, line in enumerate(open(os.path.join(ROOT, rel), encoding="utf-8"), 1):
      if line.startswith("```"):
        in_sh = line.strip() == "```sh"
        continue
      if not in_sh:
        continue
      text = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
      if not pending:
        start = number
      pending += " " + text.rstrip("\\").strip()
      if not text.endswith("\\") and pending.strip():
        out.append((f"{rel}:{start}", pending.strip()))
        pending = ""
  return out


def usage_commands() -> list[tuple[str, str]]:
  """`(FILE:LINE, command)` for each usage line of a scripts/ or benchmarks/ docstring (a
  line that runs one of them), `\\`-continued lines joined and `#` comments dropped."""
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py"))
                     + glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))):
    rel = os.path.relpath(path, ROOT)
    tree = ast.parse(open(path, encoding="utf-8").read())
    doc = ast.get_docstring(tree, clean=False) or ""
    first = tree.body[0].lineno if doc else 0
    lines = doc.splitlines()
    for i, line in enumerate(lines):
      if not _SCRIPT.match(line.strip()):
        continue
      command = line.split(" #", 1)[0].rstrip()
      for more in lines[i + 1:]:
        if not command.endswith("\\"):
          break
        command = command[:-1] + " " + more.split(" #", 1)[0].strip()
      out.append((f"{rel}:{first + i}", " ".join(command.split())))
  return out


@functools.cache
def script_flags(script: str) -> frozenset[str]:
  """Flag names a script defines: absl `flags.DEFINE_*('name', ...)` or argparse
  `add_argument('--name', ...)`."""
  tree = ast.parse(open(os.path.join(ROOT, script), encoding="utf-8").read())
  names = set()
  for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
    func = getattr(call.func, "attr", getattr(call.func, "id", ""))
    if not call.args or not isinstance(call.args[0], ast.Constant):
      continue
    if func.startswith("DEFINE_"):
      names.add(call.args[0].value)
      if func == "DEFINE_bool" or func == "DEFINE_boolean":
        names.add("no" + call.args[0].value)
    elif func == "add_argument":
      names.add(call.args[0].value.lstrip("-"))
  return frozenset(names) | {"help", "helpfull"}


def problems(where: str, command: str) -> list[str]:
  """What keeps one doc command from running as written, as `FILE:LINE: ...` lines."""
  found = []
  for match in _SCRIPT.finditer(command):
    python, script = match.groups()
    if python.split("=")[-1] != PYTHON:
      found.append(f"{where}: {python} {script}: run it with {PYTHON} (a bare `{python}` "
                   "has no jaxrec)")
    rest = command[match.end():]
    parts = rest.split(" -- ", 1)   # launch.py: the workers' train.py flags after `--`
    owners = [(script, parts[0])] + ([("scripts/train.py", parts[1])] if len(parts) > 1 else [])
    for owner, text in owners:
      for flag in re.findall(r"(?<![\w-])--([a-z][\w]*)", text):
        if flag not in script_flags(owner):
          found.append(f"{where}: {owner} has no flag --{flag}")
  return found


def test_every_doc_command_uses_the_venv_and_existing_flags():
  commands = doc_commands()
  assert len(commands) >= 15, commands   # the parser still finds the blocks
  bad = [p for where, command in commands for p in problems(where, command)]
  assert not bad, "\n".join(bad)


def test_every_usage_line_uses_the_venv_and_existing_flags():
  """The usage lines `--help` prints said `python scripts/X.py`, where a bare `python` has
  no jaxrec (the README runs `.venv/bin/python scripts/X.py`)."""
  commands = usage_commands()
  assert len(commands) >= 15, commands   # the parser still finds the usage lines
  bad = [p for where, command in commands for p in problems(where, command)]
  assert not bad, "\n".join(bad)


def test_a_bare_python_and_an_unknown_flag_are_caught():
  """The checks themselves: a doc command with `python` or a renamed flag is reported."""
  assert problems("X:1", "python scripts/train.py --workdir=W") == [
      "X:1: python scripts/train.py: run it with .venv/bin/python (a bare `python` has no "
      "jaxrec)"]
  assert problems("X:2", ".venv/bin/python scripts/launch.py --num_processes=2 -- "
                  "--num_step=3") == ["X:2: scripts/train.py has no flag --num_step"]
  assert not problems("X:3", "XLA_FLAGS=--x=8 .venv/bin/python scripts/train.py --noprogress")
