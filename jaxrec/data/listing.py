"""The files a data path names: a file, a directory's files or a glob's matches, in the
byte-wise order of their paths (a run's data positions depend on it), checked before any
is read: a path naming nothing, a directory without files, a symbolic link to nothing and
an empty file are errors naming the path; subdirectories and pipes among a directory's
entries are left out with a warning."""

from __future__ import annotations

import glob as globlib
import os
from typing import NoReturn

from absl import logging

from jaxrec.errors import DataError, DataPathError


def list_files(path: str, quiet: bool = False) -> list[str]:
  """A file, a directory (its non-hidden files) or a glob -> file paths in byte-wise order.

  The order is plain string order of the paths (`day_10` before `day_2`, `Z` before `a`),
  never natural order: resumed runs' data positions depend on it.

  An existing path is taken literally, also when its name holds `*`, `?` or `[`, and may be a
  named pipe (`<(zcat day_0.gz)`): it is read once, as a stream. Subdirectories (and pipes)
  inside a directory, or matched by a glob, are not read: a warning names them unless `quiet`.
  An empty regular file (a failed download) is a `DataError` here, before any is read (it
  was found when its turn came: 3M rows preprocessed, then removed).
  """
  files = _listed(path, quiet)
  for p in files:
    if os.path.isfile(p) and os.path.getsize(p) == 0:
      raise DataError(f"{p}: empty file")
  return files


def _listed(path: str, quiet: bool) -> list[str]:
  if any(c in path for c in "*?[") and not os.path.exists(path):
    return _glob_files(path, quiet)
  if os.path.isdir(path):
    files, others = _split_files(
        sorted(os.path.join(path, n) for n in os.listdir(path) if not n.startswith(".")))
    if not files:
      _no_files_in(path)
    if not quiet:
      _warn_not_read(path, others, directory=True)
    return files
  if os.path.exists(path):   # a file, or a pipe (was "no such file or directory")
    return [path]
  raise DataPathError(f"{path}: no such file or directory")


def _split_files(paths: list[str]) -> tuple[list[str], list[str]]:
  """`paths` split into regular files and the rest (directories, pipes, ...), in order.
  `DataPathError` for a symlink to nothing (a day on an unmounted disk): it was left out
  as 'not a regular file', a warning, and the run went on without that file's data."""
  files, others = [], []
  for p in paths:
    if os.path.islink(p) and not os.path.exists(p):
      raise DataPathError(f"{p}: a symbolic link to {os.readlink(p)}, which does not exist")
    (files if os.path.isfile(p) else others).append(p)
  return files, others


def _warn_not_read(given: str, skipped: list[str], directory: bool) -> None:
  """Logs the entries of a directory (`directory`) or the matches of a glob that are left
  out because they are not regular files: subdirectories (their files were dropped without
  a word) and named pipes, sockets or devices (reading one could block)."""
  if not skipped:
    return
  name = os.path.basename if directory else str
  dirs = [name(p) + "/" for p in skipped if os.path.isdir(p)]
  others = [name(p) for p in skipped if not os.path.isdir(p)]
  kinds = ([f"{', '.join(dirs)} (director{'ies' if len(dirs) > 1 else 'y'})"] if dirs else []) \
      + ([f"{', '.join(others)} (not a regular file)"] if others else [])
  many, one = ("entries", "entry") if directory else ("matches", "match")
  what = f"{many} that are not files" if len(skipped) > 1 else f"{one} that is not a file"
  hint = ""
  if directory and dirs:
    hint = ("; only the directory's own files are read (the glob "
            f"{os.path.join(given, '*', '*')} reads the files inside its subdirectories)")
  logging.warning("%s: not reading %d %s: %s%s", given, len(skipped), what, ", ".join(kinds),
                  hint)


def _no_files_in(path: str) -> NoReturn:
  """`DataError` for a directory without files: naming a few subdirectories if it has some
  (it said 'holds no files', as if it were empty)."""
  subdirs = sorted(n for n in os.listdir(path)
                   if not n.startswith(".") and os.path.isdir(os.path.join(path, n)))
  if not subdirs:
    raise DataPathError(f"{path}: directory holds no files")
  names = ", ".join(subdirs[:3]) + (", ..." if len(subdirs) > 3 else "")
  from jaxrec.data import binary   # (binary imports tsv, which imports this module)
  datasets = [n for n in subdirs if binary.is_preprocessed(os.path.join(path, n))]
  if datasets:   # their files are no TSV: a run reads one dataset
    which = ", ".join(datasets[:3]) + (", ..." if len(datasets) > 3 else "")
    are = "are preprocessed datasets" if len(datasets) > 1 else "is a preprocessed dataset"
    raise DataPathError(f"{path}: directory holds only subdirectories ({names}), no files; "
                        f"{which} {are}: give one of them")
  raise DataPathError(f"{path}: directory holds only subdirectories ({names}), no files; "
                      "expected TSV files (plain or gzip) directly in it; to read the files "
                      f"inside the subdirectories, pass the glob {os.path.join(path, '*', '*')}")


def _glob_files(pattern: str, quiet: bool) -> list[str]:
  """The files `pattern` matches (`**`: any number of directories, none included), sorted;
  `DataError` when none (naming a directory when it matches only those)."""
  # `**` matches any depth of directories (as bash's globstar, gsutil): not recursive, it
  # was one level, and `D/**/*.tsv` read D/x/*.tsv only, without a word
  matches = sorted(globlib.glob(pattern, recursive=True))
  files, others = _split_files(matches)
  if files:
    if not quiet:
      _warn_not_read(pattern, others, directory=False)
    return files
  if matches and all(os.path.isdir(p) for p in matches):
    from jaxrec.data import binary   # (binary imports tsv, which imports this module)
    datasets = [p for p in matches if binary.is_preprocessed(p)]
    if datasets:   # "end with /*" led to their manifest.json: "give the directory"
      which = ", ".join(datasets[:3]) + (", ..." if len(datasets) > 3 else "")
      are = "are preprocessed datasets" if len(datasets) > 1 else "is a preprocessed dataset"
      raise DataPathError(f"{pattern}: matches only directories, no files; {which} {are}: "
                          "give one of them (a run reads one preprocessed dataset)")
    raise DataPathError(f"{pattern}: matches only directories (e.g. {matches[0]}), no files; "
                        "to read the files inside them, end the pattern with /*")
  raise DataPathError(f"{pattern}: no files match this pattern")
