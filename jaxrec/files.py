"""Small files written whole or not at all (`plan.json`, `config.gin`, manifests, caches).

A reader never sees a half-written file under the final name: the text goes to a temporary
file of this process in the same directory, which `os.replace` renames over the target; on
any failure (an `OSError`, Ctrl-C) the temporary file is removed and the old file, if any,
is left as it was. A SIGKILL can leave the clearly named `NAME.tmp-PID-NS` behind, never a
torn `NAME`.
"""

from __future__ import annotations

import os
import time


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (see the module docstring); raises the `OSError`."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}-{time.time_ns()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)
