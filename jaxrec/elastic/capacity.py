"""The capacity file (`W/elastic/capacity` or `--capacity_file`): what the job may use now.

One line `N` or `N K` (`#` starts a comment), or a JSON object `{"num_processes": N,
"devices_per_process": K}` (`K` defaults to the devices per process in use). `parse`
reads it strictly: anything else (a third number, an unknown JSON key, a count that is not
a whole number, a second line) is a `ConfigError` naming the file and line, never a value
read past or guessed.
`Reader` re-reads the file when it changed and says each unreadable state once.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from jaxrec.errors import ConfigError

KEYS = ("num_processes", "devices_per_process")


def parse(text: str, path: str, devices_per_process: int) -> tuple[int, int]:
  """`(processes, devices per process)` the file states."""
  if text.lstrip().startswith("{"):
    n, k, line = _parse_json(text, path)
  else:
    n, k, line = _parse_plain(text, path)
  k = devices_per_process if k is None else k
  if n < 0:
    raise ConfigError(f"{path}:{line}: num_processes must be >= 0, got {n}")
  if k < 1:
    raise ConfigError(f"{path}:{line}: devices_per_process must be >= 1, got {k}")
  return n, k


class Reader:
  """Reads `path` when it changed; `error` / `message`: the last unreadable state said."""

  def __init__(self, path: str, emit: Callable[..., None]):
    self.path = path
    self._emit = emit                          # events.emit, for the `capacity` error event
    self._seen: tuple | None = None            # (mtime, text) of the last read
    self.error: tuple | None = None            # what the last error event was about
    self.message = ""                          # ... and its message

  def read(self, devices_per_process: int, initial: bool = False) -> tuple[int, int] | None:
    """`(processes, devices per process)` of a new statement, else None. `initial`: the
    read at start, where an unreadable file stops the job (later one is ignored)."""
    try:
      with open(self.path) as f:
        raw = f.read()
      mtime = os.stat(self.path).st_mtime_ns
    except FileNotFoundError:
      if self._seen is not None:   # said once: a removal changes nothing mid-run
        self._seen = None
        self._emit("capacity", source="file", removed=True,
                   note=f"{self.path} removed: the last capacity it stated stays in force "
                   "(write N K to change it; the flags' capacity applies from the next "
                   "start)")
      return None
    except OSError as e:      # e.g. a directory: said once, until the error changes
      return self._error(("error", str(e)), f"cannot read {self.path}: {e.strerror or e}",
                         initial)
    # An empty file is one being rewritten (`echo 2 > capacity` truncates first): look again
    # at the next poll. Remembering its mtime lost the write when both fell in one tick of
    # the file system's clock. The text counts too: a same-tick rewrite changes only it.
    if not raw.strip() or (mtime, raw) == self._seen:
      return None
    self._seen = (mtime, raw)
    try:
      return parse(raw, self.path, devices_per_process)
    except ConfigError as e:
      return self._error(self._seen, str(e), initial)

  def _error(self, seen: tuple, message: str, initial: bool) -> None:
    """The `capacity` error event, once per distinct content or read error (`initial`: the
    read at start, which the job does not survive)."""
    if seen != self.error:
      self.error, self.message = seen, message
      then = "the job does not start" if initial else "ignored"
      self._emit("capacity", source="file", error=f"{message}; {then}")
    return None


def _parse_plain(text: str, path: str) -> tuple[int, int | None, int]:
  """`N` or `N K` on one line; `#` starts a comment (a comment line was 'found another
  line', blamed on the valid line after it)."""
  lines = [(i, words) for i, l in enumerate(text.splitlines(), 1)
           if (words := l.split("#", 1)[0].split())]
  if not lines:
    raise ConfigError(f"{path}: only comments; expected one line `N` or `N K`")
  if len(lines) > 1:
    raise ConfigError(f"{path}:{lines[1][0]}: one line `N` or `N K` expected, found another "
                      f"line '{' '.join(lines[1][1])}'")
  line, words = lines[0]
  if len(words) > 2:
    raise ConfigError(f"{path}:{line}: expected `N` or `N K`, got '{' '.join(words)}'")
  counts = []
  for name, word in zip(KEYS, words):
    try:
      counts.append(int(word))
    except ValueError:
      raise ConfigError(f"{path}:{line}: {name} must be a whole number, got "
                        f"'{word}'") from None
  return counts[0], counts[1] if len(counts) > 1 else None, line


def _parse_json(text: str, path: str) -> tuple[int, int | None, int]:
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
  unknown = sorted(set(obj) - set(KEYS))
  if unknown:
    raise ConfigError(f"{path}:{_line_of(text, unknown[0])}: unknown key(s) {unknown} "
                      f"(known: {', '.join(KEYS)})")
  if "num_processes" not in obj:
    raise ConfigError(f"{path}:1: the JSON object needs \"num_processes\"")
  for name in KEYS:
    v = obj.get(name, 1)
    if type(v) is not int:                      # 1.5, true, null: not a count
      raise ConfigError(f"{path}:{_line_of(text, name)}: {name} must be a whole number, "
                        f"got {json.dumps(v)}")
  return obj["num_processes"], obj.get("devices_per_process"), _line_of(text, KEYS[0])


def _line_of(text: str, key: str) -> int:
  """Line of `"key"` in `text` (1 if absent)."""
  at = text.find(json.dumps(key))
  return text.count("\n", 0, at) + 1 if at >= 0 else 1
