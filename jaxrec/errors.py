"""User-facing errors.

`ConfigError` and `DataError` carry a message meant to be shown as one line to the user
(entry points print it without a traceback and exit non-zero).
"""

import difflib
import re


class JaxrecError(Exception):
  """Base class for errors whose message is complete and user-facing."""


class ConfigError(JaxrecError, ValueError):
  """A configuration, flag, table or plan is invalid; the message names it."""


class BudgetError(ConfigError):
  """No plan the planner found fits `--memory_per_device` on a mesh: another mesh, more
  memory or offloading may fit (`--mesh=auto` tries other meshes on this one)."""


class DataError(JaxrecError, ValueError):
  """Input data is malformed; the message names the file, line and column."""


class DataPathError(DataError):
  """A data path names no file to read (missing, an empty directory, a glob matching no
  file); the script that got it prefixes the flag or binding it came from."""


class OffloadError(JaxrecError):
  """The offload tier failed at run time (a tensorstore read or write-back failed, or a
  batch needs more distinct rows than the cache holds); the message names table and path."""


class OutputError(JaxrecError):
  """A file the run writes as it goes (e.g. `W/metrics.jsonl`) cannot be written (a full
  disk, a lost mount); the message names the file and the reason."""


class CheckpointError(JaxrecError):
  """No usable checkpoint: every candidate is corrupt, or a requested step is absent."""


def in_order(names) -> list[str]:
  """`names` sorted as a person reads them in a message: the numbers inside a name compare
  as numbers (`t2` before `t10`; text order put t0, t1, t10, t11, t2 in a list of tables)."""
  return sorted(names, key=_natural_key)


def _natural_key(name) -> tuple:
  pieces = re.split(r"(\d+)", str(name))   # text at even positions, digits at odd ones
  return [int(p) if i % 2 else p for i, p in enumerate(pieces)], str(name)


def some(names, limit: int = 8, quote: bool = True) -> str:
  """A message's list of `names`: all, or the first `limit` and how many more (`'t0', ...,
  't7', +992 more`): an unknown table among 1,000 listed every name, 7,150 characters."""
  names = list(names)
  shown = ", ".join(repr(n) if quote else str(n) for n in names[:limit])
  return f"{shown}, +{len(names) - limit} more" if len(names) > limit else shown


def close_to(name: str, names) -> str:
  """`; did you mean 'x'?` for the nearest of `names` to a misspelt `name`, else ''."""
  close = difflib.get_close_matches(str(name), [str(n) for n in names], n=1, cutoff=0.8)
  return f"; did you mean '{close[0]}'?" if close else ""


def counted(n: int, noun: str) -> str:
  """`1 malformed row`, `2 malformed rows` (`wrote 1 examples` read oddly)."""
  return f"{n:,} {noun}{'' if n == 1 else 's'}"
