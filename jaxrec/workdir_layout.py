"""The directories a run keeps in its workdir `W`, named once for every reader and writer
(the trainer, the elastic supervisor, the offload tier, the checkpoint tools):

  W/checkpoints/<step>         orbax checkpoints (`CHECKPOINTS_DIR`)
  W/offload/<table>            offloaded tables without their own `path` (`OFFLOAD_DIR`)
  W/offload_snapshots/<step>   offloaded tables of checkpoint <step> (`SNAPSHOTS_DIR`)

No jax here: the supervisor imports it before any worker starts.
"""

from __future__ import annotations

import os

CHECKPOINTS_DIR = "checkpoints"
OFFLOAD_DIR = "offload"
SNAPSHOTS_DIR = "offload_snapshots"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """`W/checkpoints`, absolute."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)


def offload_dir(workdir: str | os.PathLike, table: str) -> str:
  """`W/offload/<table>`, absolute: an offloaded table's store without a `path`."""
  return os.path.join(os.path.abspath(workdir), OFFLOAD_DIR, table)


def snapshots_dir(workdir: str | os.PathLike) -> str:
  """`W/offload_snapshots`, absolute: the offloaded tables of each checkpoint step."""
  return os.path.join(os.path.abspath(workdir), SNAPSHOTS_DIR)
