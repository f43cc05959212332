"""A directory or glob given as data: entries that are not files are named, not dropped
silently (a subdirectory's TSV files were left out of the run without a word)."""

import logging
import os

import data_testlib as lib
from jaxrec.data import tsv


def test_a_directory_names_the_subdirectories_it_does_not_read(tmp_path, caplog):
  lib.write(tmp_path / "day_0.tsv", [lib.line()])
  for sub in ["old", "extra"]:
    (tmp_path / sub).mkdir()
    lib.write(tmp_path / sub / "day_1.tsv", [lib.line()])
  (tmp_path / ".cache").mkdir()   # hidden: skipped as documented, not named
  os.mkfifo(tmp_path / "pipe")
  with caplog.at_level(logging.WARNING):
    assert tsv.list_files(str(tmp_path)) == [str(tmp_path / "day_0.tsv")]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == [
      f"{tmp_path}: not reading 3 entries that are not files: extra/, old/ (directories), "
      "pipe (not a regular file); only the directory's own files are read (the glob "
      f"{tmp_path / '*' / '*'} reads the files inside its subdirectories)"]


def test_a_glob_names_the_directories_it_matched_but_does_not_read(tmp_path, caplog):
  lib.write(tmp_path / "day_0.tsv", [lib.line()])
  (tmp_path / "day_1").mkdir()
  lib.write(tmp_path / "day_1" / "part.tsv", [lib.line()])
  pattern = str(tmp_path / "day_*")
  with caplog.at_level(logging.WARNING):
    assert tsv.list_files(pattern) == [str(tmp_path / "day_0.tsv")]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == [f"{pattern}: not reading 1 match that is not a file: "
                      f"{tmp_path / 'day_1'}/ (directory)"]


def test_files_only_log_nothing(tmp_path, caplog):
  lib.write(tmp_path / "day_0.tsv", [lib.line()])
  with caplog.at_level(logging.WARNING):
    tsv.list_files(str(tmp_path))
    tsv.list_files(str(tmp_path / "*"))
  assert not caplog.records


def test_a_symlink_to_nothing_is_an_error(tmp_path):
  """A day on an unmounted disk: the dangling link was left out as 'not a regular file' (a
  warning) and preprocess.py wrote half the data, exit 0."""
  import pytest  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import DataPathError  # pylint: disable=import-outside-toplevel
  lib.write(tmp_path / "day_00.tsv", [lib.line()])
  os.symlink("/mnt/gone/day_01.tsv", tmp_path / "day_01.tsv")
  for given in (str(tmp_path), str(tmp_path / "day_*")):
    with pytest.raises(DataPathError, match=f"^{tmp_path / 'day_01.tsv'}: a symbolic link to "
                       "/mnt/gone/day_01.tsv, which does not exist$"):
      tsv.list_files(given)


def test_a_double_star_matches_any_depth(tmp_path):
  """`D/**/*.tsv` read D/x/*.tsv only (Python's glob without `recursive`): D/top.tsv and
  D/x/y/deep.tsv were left out without a word."""
  for rel in ["top.tsv", "x/mid.tsv", "x/y/deep.tsv", "x/y/skip.txt"]:
    os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
    lib.write(tmp_path / rel, [lib.line()])
  assert tsv.list_files(str(tmp_path / "**" / "*.tsv")) == [
      str(tmp_path / p) for p in ("top.tsv", "x/mid.tsv", "x/y/deep.tsv")]
