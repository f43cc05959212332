"""The `scripts/train.py` flags the elastic supervisor reads (after `--`). No jax: the
launcher's Ctrl-C message (which checkpoint to resume from) needs the workdir before the
heavy imports are done."""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

from jaxrec import files
from jaxrec.elastic.options import LAUNCH_FLAGS
from jaxrec.errors import ConfigError

# Flags of scripts/train.py the supervisor reads (all take a value).
_VALUE_FLAGS = ("workdir", "gin_file", "gin_bindings", "mesh", "plan", "num_steps",
                "memory_per_device", "checkpoint_every", "train_data", "eval_data", "seed",
                "log_every", "eval_every", "keep_checkpoints", "on_nan", "bad_rows")
_MULTI = ("gin_file", "gin_bindings")


def _check_not_a_stream(name: str, path: str) -> None:
  """Refuses a pipe (`<(zcat day_0.gz)`, a FIFO) as data of supervised workers: they do not
  inherit the launcher's `/dev/fd/N` ("no such file"), a FIFO's stream was split between
  them (a torn line blamed the data), and a restarted worker would find it consumed."""
  if path and os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
    raise ConfigError(f"--{name}={path} is a pipe or other stream, not a file: under "
                      "scripts/launch.py every worker, and every restart, opens the data "
                      "itself; give the file (gzip is read directly), or run "
                      "scripts/train.py, which reads a pipe once")


@dataclasses.dataclass(frozen=True)
class TrainArgs:
  """The `scripts/train.py` flags given after `--` (other flags pass through untouched)."""

  argv: tuple[str, ...]
  values: Mapping[str, object]

  @classmethod
  def parse(cls, argv: Sequence[str]) -> "TrainArgs":
    values: dict[str, object] = {k: [] for k in _MULTI}
    i, argv = 0, list(argv)
    while i < len(argv):
      a = argv[i]
      name, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
      if name in LAUNCH_FLAGS or (name.startswith("no") and name[2:] in LAUNCH_FLAGS):
        raise ConfigError(f"--{name} is a flag of scripts/launch.py, not of scripts/train.py: "
                          "put it before `--` (launch.py [launcher flags] -- --workdir=W "
                          "--gin_file=...)")
      if name in _VALUE_FLAGS:
        if not eq:
          if i + 1 >= len(argv):
            raise ConfigError(f"train flag --{name} needs a value")
          value, i = argv[i + 1], i + 1
        if name in _MULTI:
          values[name].append(value)
        else:
          values[name] = value
      i += 1
    if not values.get("workdir"):
      raise ConfigError("the train.py flags after `--` need --workdir")
    for name in ("workdir", "train_data", "eval_data"):   # --NAME=~/x: ~ not expanded
      files.check_not_unexpanded_home(f"--{name}", str(values.get(name, "")))
    files.check_tensorstore_path("--workdir", str(values["workdir"]))
    for name in ("train_data", "eval_data"):
      _check_not_a_stream(name, str(values.get(name, "")))
    for path in values["gin_file"]:
      files.check_not_unexpanded_home("--gin_file", str(path))
    if not values["gin_file"]:
      raise ConfigError("the train.py flags after `--` need --gin_file")
    return cls(tuple(argv), values)

  def get(self, name: str, default=None):
    return self.values.get(name, default)

  @property
  def workdir(self) -> str:
    return str(self.values["workdir"])

  @property
  def num_steps(self) -> int:
    return int(self.values.get("num_steps", 1000))

  def with_mesh_plan(self, mesh: str, plan: str) -> list[str]:
    """argv with `--mesh` and `--plan` replaced."""
    out, skip = [], False
    for a in self.argv:
      if skip:
        skip = False
        continue
      if a in ("--mesh", "--plan"):
        skip = True
        continue
      if a.startswith(("--mesh=", "--plan=")):
        continue
      out.append(a)
    return out + [f"--mesh={mesh}", f"--plan={plan}"]
