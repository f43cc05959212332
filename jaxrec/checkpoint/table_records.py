"""The records of a stored `embeddings` item beside its arrays (`tables`):

    index.json                  {"processes", "arrays": {name: {"shape", "dtype"}}}
    fingerprints.<process>.json {name: this process's partial fingerprint}

written after the arrays (`write`), read to check a restore bit for bit (`saved_fingerprints`:
the partial sums of every process added up).
"""

from __future__ import annotations

import json
from typing import Mapping

import jax
from etils import epath

INDEX = "index.json"


def write(directory: epath.Path, arrays: Mapping[str, tuple], prints: Mapping[str, int]
          ) -> None:
  """This process's `fingerprints.<process>.json` (`prints`) and, on process 0, the index
  of `arrays` (`{name: (shape, dtype)}`)."""
  process = jax.process_index()
  (directory / f"fingerprints.{process}.json").write_text(json.dumps(prints, sort_keys=True))
  if process == 0:
    index = {"processes": jax.process_count(),
             "arrays": {name: {"shape": list(shape), "dtype": dtype}
                        for name, (shape, dtype) in arrays.items()}}
    (directory / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))


def read_index(directory: epath.PathLike) -> dict:
  """`index.json` of a stored `embeddings` item: `{"processes", "arrays": {name:
  {"shape", "dtype"}}}`."""
  return _read_json(epath.Path(directory) / INDEX)


def _read_json(path: epath.Path):
  """A JSON file of the item; ValueError naming it (and the line) when it does not parse
  (a missing file stays FileNotFoundError: damage, like any other missing file)."""
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def saved_fingerprints(directory: epath.PathLike) -> dict[str, int]:
  """`{array name: fingerprint}` recorded when saving (partial sums of every process)."""
  directory = epath.Path(directory)
  index = read_index(directory)
  total = {name: 0 for name in index["arrays"]}
  for process in range(int(index.get("processes", 1))):
    path = directory / f"fingerprints.{process}.json"
    part = _read_json(path)
    unlisted = sorted(set(part) - set(total)) if isinstance(part, dict) else []
    if unlisted:   # an index that lost every table's optimizer arrays passed the table checks
      raise ValueError(f"{path}: records arrays {unlisted[:8]} that {INDEX} does not list "
                       "(the index lost them)")
    for name in total:
      value = part.get(name) if isinstance(part, dict) else None
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{path}: no integer fingerprint for array '{name}' "
                         f"({json.dumps(value)[:40]})")
      total[name] = (total[name] + value) & 0xFFFFFFFF
  return total
