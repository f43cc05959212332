"""Which workdir a store directory belongs to: `<store path>/OWNER` holds its absolute path.

A restore deletes and re-links a store's files, so two runs sharing a store `path` (a copied
workdir, two jobs with the same gin) would destroy each other's tables. `claim` makes every
store directory belong to one workdir:

  - a store inside the workdir (the default `W/offload/<table>`, or a `path` under `W`)
    belongs to it: a copy of the whole workdir takes its stores along (the file is rewritten);
  - a store elsewhere belongs to the workdir its `OWNER` names; another workdir is refused
    before anything is touched. To hand it over, delete `OWNER` (once no run uses it);
  - a store without `OWNER` (new, or written before owners existed) is adopted (logged).

`OWNER` is created atomically and exclusively (written to a temporary file, then hard-linked
into place), so two runs starting on one fresh path cannot both claim it.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

from jaxrec.errors import ConfigError

OWNER = "OWNER"
_LOG = logging.getLogger(__name__)


def _inside(path: str, directory: str) -> bool:
  return os.path.commonpath([path, directory]) == directory


def read_owner(path: str) -> str | None:
  """The workdir named in `<path>/OWNER` (None when there is no such file)."""
  try:
    with open(os.path.join(path, OWNER)) as f:
      return f.read().strip()
  except FileNotFoundError:
    return None


def _check(table: str, path: str, workdir: str) -> str | None:
  """The owner to replace (None: none or this workdir); raises for another's store."""
  owner = read_owner(path)
  if owner is None or owner == workdir or _inside(path, workdir):
    return owner
  raise ConfigError(
      f"offloaded table '{table}': its store '{path}' belongs to the workdir '{owner}' (its {OWNER} file), not to "
      f"this workdir '{workdir}': a run restoring from its own checkpoints would replace the "
      f"other run's tables there. Give this run a fresh OffloadTable.path (or leave it unset: "
      f"'{workdir}/offload/<table>'); or, if no run of '{owner}' uses it any more, delete "
      f"'{os.path.join(path, OWNER)}' and this workdir takes the store over")


def _write(path: str, workdir: str, replace: bool) -> None:
  os.makedirs(path, exist_ok=True)
  tmp = os.path.join(path, f"{OWNER}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    f.write(workdir + "\n")
  try:
    if replace:
      os.replace(tmp, os.path.join(path, OWNER))
      return
    os.link(tmp, os.path.join(path, OWNER))   # fails if another run claimed it meanwhile
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def claim(paths: Mapping[str, str], workdir: str) -> None:
  """Makes each store directory (`{table: absolute path}`) belong to `workdir`; checks them
  all first, so a refused claim changes nothing. Raises `ConfigError` for a store of another
  workdir."""
  workdir = os.path.realpath(workdir)
  found = {t: _check(t, os.path.realpath(p), workdir) for t, p in paths.items()}
  for table, owner in found.items():
    path = paths[table]
    real = os.path.realpath(path)
    if owner == workdir:
      continue
    if owner is not None:    # a store inside this workdir, copied with it
      _LOG.info("offload store '%s' (in this workdir) now belongs to '%s' (was '%s')",
                path, workdir, owner)
      _write(real, workdir, replace=True)
      continue
    if os.path.isdir(real) and os.listdir(real):
      _LOG.warning("offload store '%s' has no %s file: this workdir '%s' adopts it",
                   path, OWNER, workdir)
    try:
      _write(real, workdir, replace=False)
    except FileExistsError:   # another run claimed it between the check and now
      _check(table, real, workdir)
