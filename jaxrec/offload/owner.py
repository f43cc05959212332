"""Which workdir a store directory belongs to: `<store>/OWNER` holds the workdir's absolute
path (first line) and the store's own (second line).

A restore deletes and re-links a store's files, so two runs sharing a store `path` (a copied
workdir, two jobs with the same gin) would destroy each other's tables. `claim` makes every
store directory belong to one workdir:

  - a store whose `OWNER` names another workdir is refused before anything is touched. To
    hand it over, delete `OWNER` (once no run uses it);
  - a store whose `OWNER` names another directory than the store's own is a copy (e.g.
    `cp -r W W2` copies `W/offload/<table>`): it belongs to whoever uses it, the file is
    rewritten;
  - a store without `OWNER` (new, or written before owners existed) is adopted (logged).

`OWNER` is created atomically and exclusively (written to a temporary file, then hard-linked
into place), so two runs starting on one fresh path cannot both claim it. A run refused at its
start hands its new claims back (`release`): its store paths are as it found them, and the
next run, of any workdir, is not refused by the `OWNER` of a workdir that was never made.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping, Sequence

from jaxrec import files, workdir_layout
from jaxrec.errors import ConfigError

OWNER = "OWNER"
TRAINED = "TRAINED"   # `'init': 'existing'` arrays changed by the workdir it names (`store`)
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Claim:
  """What `claim` changed at one store directory, for `release`."""

  path: str
  previous: str | None   # the OWNER text it replaced (a copy's); None: there was none
  made: str | None       # the outermost directory it created (`files.missing_top`)


def _read(path: str) -> tuple[str, str] | None:
  """(workdir, store) of `<path>/OWNER`; None when there is no such file."""
  try:
    with open(os.path.join(path, OWNER)) as f:
      lines = f.read().splitlines() + ["", ""]
  except FileNotFoundError:
    return None
  return lines[0].strip(), lines[1].strip()


def _not_arrays(path: str) -> list[str]:
  """Entries of directory `path` that are not stored arrays (a directory holding a zarr
  array's metadata, or an empty one), nor an `OWNER` or `TRAINED` file (or a temporary)."""
  out = []
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if name.startswith((OWNER, TRAINED)):
      continue
    inside = set(os.listdir(full)) if os.path.isdir(full) and not os.path.islink(full) else None
    if inside is None or (inside and not {".zarray", "zarr.json"} & inside):
      out.append(name)
  return out


def _copied_into(path: str) -> str | None:
  """The workdir whose default store directory (`X/offload/<table>`) `path` is, when X is
  a run's directory (it holds `checkpoints/`); None otherwise. A copy there (`cp -r W X`)
  belongs to X: another workdir naming it as its `path` took it over, and X's own run was
  then refused."""
  parent = os.path.dirname(path)
  if os.path.basename(parent) != workdir_layout.OFFLOAD_DIR:
    return None
  home = os.path.dirname(parent)
  return home if os.path.isdir(workdir_layout.checkpoint_dir(home)) else None


def _own_damaged(table: str, path: str, workdir: str, others: Sequence[str]) -> bool:
  """Whether `path` is this workdir's default store of `table` (`W/offload/<table>`) whose
  only entries that are not arrays are arrays of a store that lost its metadata (`table`,
  `opt.*`): the store was deleted while a run wrote to it. It is jaxrec's own directory,
  and a restore replaces those arrays (refused as 'not an offload store', the run could
  not resume until the user deleted it)."""
  default = os.path.realpath(workdir_layout.offload_dir(workdir, table))
  return path == default and all(n == "table" or n.startswith("opt.") for n in others)


def read_owner(path: str) -> str | None:
  """The workdir named in `<path>/OWNER` (None when there is no such file)."""
  found = _read(path)
  return None if found is None else found[0]


def _check(table: str, path: str, workdir: str) -> str:
  """What `claim` does with `path`: 'keep' (ours), 'copy', 'adopt'; raises for a store of
  another workdir."""
  found = _read(path)
  if found is None:
    others = _not_arrays(path) if os.path.isdir(path) else []
    if others and _own_damaged(table, path, workdir, others):
      _LOG.warning("offloaded table '%s': its store directory '%s' lost its %s file and the "
                   "metadata of %s (deleted during a run?): it is written afresh (from the "
                   "checkpoint's snapshot when one is restored)", table, path, OWNER,
                   ", ".join(map(repr, others)))
      return "adopt"
    if others:   # a restore would replace what is there
      raise ConfigError(
          f"offloaded table '{table}': its store directory '{path}' ('path' in "
          "OffloadConfig.tables) "
          f"already holds {', '.join(repr(n) for n in others[:5])}"
          f"{' and more' if len(others) > 5 else ''}, which is not an offload store: give "
          "the table a directory of its own (new or empty), e.g. a subdirectory")
    return "adopt"
  owner, store = found
  if owner == workdir:
    return "keep"
  if store and store != path:
    home = _copied_into(path)
    if home in (None, workdir):
      return "copy"
    raise ConfigError(   # W2/offload/<t> of `cp -r W W2` is W2's, not any run's naming it
        f"offloaded table '{table}': its store '{path}' is the default store of the workdir "
        f"'{home}' (a copy of '{store}'): a run restoring from its own checkpoints would "
        f"replace that run's tables there. Give this run a fresh 'path' in "
        f"OffloadConfig.tables (or leave it unset: "
        f"'{workdir_layout.offload_dir(workdir, table)}')")
  owner_file = os.path.join(path, OWNER)
  if not os.path.isabs(owner):   # it said the store "belongs to the workdir 'garbage'"
    raise ConfigError(
        f"offloaded table '{table}': the {OWNER} file of its store '{path}' is malformed (it "
        f"names {owner!r}, not a workdir's absolute path): if no other run uses this store, "
        f"delete '{owner_file}' and this workdir takes the store over")
  default = workdir_layout.offload_dir(workdir, table)
  fresh = ("Give this run a fresh 'path' in OffloadConfig.tables" + (
      "" if os.path.realpath(path) == os.path.realpath(default) else   # (it named this one)
      f" (or leave it unset: '{default}')"))
  raise ConfigError(
      f"offloaded table '{table}': its store '{path}' belongs to the workdir '{owner}' (its "
      f"{OWNER} file), not to this workdir '{workdir}': a run restoring from its own "
      f"checkpoints would replace the other run's tables there. {fresh}; "
      f"or, if no run of '{owner}' uses it any more, delete '{owner_file}' and "
      "this workdir takes the store over")


def _write(path: str, workdir: str, replace: bool) -> None:
  os.makedirs(path, exist_ok=True)
  tmp = os.path.join(path, f"{OWNER}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    f.write(f"{workdir}\n{path}\n")
  try:
    if replace:
      os.replace(tmp, os.path.join(path, OWNER))
    else:
      os.link(tmp, os.path.join(path, OWNER))   # fails if another run claimed it meanwhile
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def claim(paths: Mapping[str, str], workdir: str) -> list[Claim]:
  """Makes each store directory (`{table: absolute path}`) belong to `workdir`; checks them
  all first, so a refused claim changes nothing. Returns what it changed (for `release`;
  a store this workdir already owned is not listed). Raises `ConfigError` for a store of
  another workdir."""
  workdir = os.path.realpath(workdir)
  real = {t: os.path.realpath(p) for t, p in paths.items()}
  claims: list[Claim] = []
  try:
    found = {t: _check(t, p, workdir) for t, p in real.items()}
    _claim(found, real, workdir, claims)
    return claims
  except OSError as e:   # a file in the way, a path it cannot create (/sys, /proc, ...)
    release(claims)      # the stores claimed before it (their OWNER named this workdir)
    failed = os.path.abspath(e.filename) if e.filename else None   # the store or a parent
    table = next((t for t, p in real.items() if failed and
                  os.path.commonpath([p, failed]) in (p, failed)), None)
    what = f"offloaded table '{table}': its" if table else "an offloaded table's"
    raise ConfigError(f"{what} store directory cannot be used ('path' in OffloadConfig.tables): "
                      f"{e.strerror or e}: '{e.filename}'") from None


def _claim(found: Mapping[str, str], real: Mapping[str, str], workdir: str,
           claims: list[Claim]) -> None:
  """Claims each store, appending what it changed to `claims` as it goes."""
  for table, what in found.items():
    path = real[table]
    if what == "keep":
      continue
    if what == "copy":
      _LOG.info("offload store '%s' is a copy of another: this workdir '%s' owns it now",
                path, workdir)
      with open(os.path.join(path, OWNER)) as f:
        previous = f.read()
      _write(path, workdir, replace=True)
      claims.append(Claim(path, previous, None))
      continue
    if os.path.isdir(path) and os.listdir(path):
      _LOG.warning("offload store '%s' has no %s file: this workdir '%s' adopts it",
                   path, OWNER, workdir)
    made = files.missing_top(path)
    try:
      _write(path, workdir, replace=False)
    except FileExistsError:   # another run claimed it between the check and now
      _check(table, path, workdir)
      continue
    claims.append(Claim(path, None, made))


def release(claims: Sequence[Claim]) -> None:
  """Undoes `claims` of a run refused at its start: a copy's `OWNER` gets its old text
  back, an adopted store loses the `OWNER` the run wrote, and a directory the claim made
  is removed with what the run put in the store (its fresh arrays: `OWNER`'s exclusive
  creation kept every other run out of it), unless something else was put beside it. Best
  effort: a failure is logged, not raised (the start-up error that led here is shown).
  Last claim first: a directory an earlier claim made may hold a later one's store."""
  for c in reversed(claims):
    try:
      if c.made is not None:
        files.remove_made(c.made, c.path, lambda name: not name.startswith(os.pardir))
        if os.path.exists(os.path.join(c.path, OWNER)):   # kept: something was put beside
          os.remove(os.path.join(c.path, OWNER))
      elif c.previous is not None:
        with files.atomic_output(os.path.join(c.path, OWNER)) as tmp, open(tmp, "w") as f:
          f.write(c.previous)
      else:
        os.remove(os.path.join(c.path, OWNER))
    except OSError as e:
      _LOG.warning("offload store '%s': could not undo this run's claim (%s)", c.path, e)
