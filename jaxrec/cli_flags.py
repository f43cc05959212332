"""absl `flags_parser` shared by every script in scripts/: a flag error is one `error:` line.

absl's own parser printed `FATAL Flags parsing error: ...` plus usage hints (or, for
`--nobool=1`, a traceback). Here an unknown flag, a malformed or out-of-range value, a
missing (or empty) required flag, a path starting with an unexpanded `~` or a stray argument
is one line naming the flag and the bad value (and the allowed values of an enum), and the
exit code is 1. `--help` (and absl's other
help flags) print the usage and exit 0, where absl exits 1. No jax is imported.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Callable

from absl import flags

from jaxrec import files

# A worker's (scripts/train.py's) unknown flag starts so; jaxrec/elastic/procs.py reads it.
NO_SUCH_FLAG = "has no flag --"

_CONVERSION = (("IntegerParser", "invalid literal", "not an integer"),
               ("FloatParser", "could not convert", "not a number"),
               ("BooleanParser", "Non-boolean", "not a boolean (true or false)"))
_BAD_VALUE = re.compile(r"^flag --([\w.-]+)=(.*?): (.*)$", re.S)
_REQUIRED = re.compile(r"Flag --([\w.-]+) must have a value other than None")


def parse(argv: list[str], flag_values: flags.FlagValues | None = None, *,
          unknown_hint: str = "", positional: bool = False) -> list[str]:
  """Parses `argv` (`[program, *args]`) into `flag_values` (default `flags.FLAGS`) and
  returns `[program, *rest]`; on any flag error prints one `error: ...` line and exits 1.

  unknown_hint: appended to the message of an unknown flag (e.g. where else flags go).
  positional: whether arguments that are not flags are allowed (returned in `rest`).
  """
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    rest = flag_values(argv)
  except SystemExit as e:   # absl's --help/--helpshort/--helpfull/--helpxml printed usage
    raise SystemExit(0 if e.code == 1 else e.code) from None   # and exited 1: it was asked
  except BrokenPipeError:   # `--help | head`: the reader had what it wanted; the rest of the
    # usage (and the flush at exit) goes nowhere, not into a traceback and exit 1
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0) from None
  except flags.UnrecognizedFlagError as e:
    message = _unknown(argv[0], e.flagname, flag_values) + unknown_hint
  except (flags.Error, ValueError) as e:   # absl raises ValueError for `--nobool=1`
    message = _malformed(str(e), flag_values)
  else:
    empty = _required_but_empty(flag_values)
    home = _unexpanded_home(flag_values)
    if empty:
      message = f"{empty} is required (given an empty value)"
    elif home:
      message = home
    elif positional or len(rest) == 1:
      return rest
    else:
      message = f"unexpected arguments {rest[1:]} (flags are written --NAME=VALUE)"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _required_but_empty(flag_values: flags.FlagValues) -> str | None:
  """`--NAME` of the first required flag given as `--NAME=` (absl takes "" as a value: an
  empty `--output` then meant the current directory)."""
  for name in sorted(flag_values):
    flag = flag_values[name]
    value = flag.value
    required = any(_REQUIRED.search(getattr(v, "message", "") or "") for v in flag.validators)
    if required and flag.present and (value == "" or (isinstance(value, list) and "" in value)):
      return f"--{name}"
  return None


def _unexpanded_home(flag_values: flags.FlagValues) -> str | None:
  """`files.unexpanded_home`'s reason for the first flag given a path `~/...` (after `=`
  the shell left `~` as it is): a data path then said only "no such file", a workdir or
  an output became a directory named `~` here."""
  for name in sorted(flag_values):
    flag = flag_values[name]
    if not flag.present:
      continue
    for value in flag.value if isinstance(flag.value, list) else [flag.value]:
      reason = isinstance(value, str) and files.unexpanded_home(f"--{name}", value)
      if reason:
        return reason
  return None


def parser(**kwargs) -> Callable[[list[str]], list[str]]:
  """`parse` with these keyword arguments, for `app.run(main, flags_parser=...)`."""
  return lambda argv: parse(argv, **kwargs)


def _unknown(program: str, name: str, flag_values: flags.FlagValues) -> str:
  parts = program.replace("\\", "/").rsplit("/", 2)   # scripts/X.py, benchmarks/X.py
  script = "/".join(parts[-2:]) if len(parts) > 1 else "scripts/" + parts[-1]
  close = difflib.get_close_matches(name, list(flag_values), n=3, cutoff=0.75)
  hint = f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else ""
  return f"{script} {NO_SUCH_FLAG}{name}{hint}"


def _malformed(text: str, flag_values: flags.FlagValues) -> str:
  """One line for absl's message(s) about a bad value or a missing required flag."""
  missing = _REQUIRED.findall(text)
  if missing:
    return _required(missing, flag_values)
  flagfile = re.search(r"Unable to open flagfile: (?:\[Errno \d+\] )?(.*)", text)
  if flagfile:   # absl's text: "ERROR:: Unable to open flagfile: [Errno 2] No such ...: 'F'"
    why = " ".join(flagfile.group(1).split())
    named = re.match(r"(.*?): '(.*)'$", why)   # `cannot read F: why`, as a path error reads
    return (f"--flagfile: cannot read {named.group(2)}: {named.group(1)}" if named
            else f"--flagfile: cannot read {why}")
  m = _BAD_VALUE.match(text.splitlines()[0])
  if not m or m.group(1) not in flag_values:
    return " ".join(text.split())
  name, value, why = m.groups()
  allowed = getattr(flag_values[name].parser, "enum_values", None)
  if allowed:
    close = difflib.get_close_matches(value, allowed, n=1)
    return (f"--{name}={value}: not one of {', '.join(allowed)}"
            + (f" (did you mean {close[0]}?)" if close else ""))
  kind = type(flag_values[name].parser).__name__
  for parser_kind, absl_text, ours in _CONVERSION:
    if kind == parser_kind and absl_text in why:
      why = ours
  return f"--{name}={value}: {' '.join(why.split())}"


def _required(names: list[str], flag_values: flags.FlagValues) -> str:
  """`--a and --b are required (--b: one of x, y)`."""
  enums = [f"--{n}: one of {', '.join(flag_values[n].parser.enum_values)}" for n in names
           if getattr(flag_values[n].parser, "enum_values", None)]
  listed = " and ".join("--" + n for n in names)
  return (f"{listed} {'are' if len(names) > 1 else 'is'} required"
          + (f" ({'; '.join(enums)})" if enums else ""))
