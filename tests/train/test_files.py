"""`jaxrec.files.write_text_atomic`: the old file or the new one, never a torn one."""

import os

import pytest

from jaxrec.files import write_text_atomic


def test_replaces_whole_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "plan.json"
  write_text_atomic(path, "old")
  write_text_atomic(path, "new")
  assert path.read_text() == "new" and os.listdir(tmp_path) == ["plan.json"]


def test_failure_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "config.gin"
  path.write_text("old")

  def fail(src, dst):
    raise KeyboardInterrupt   # e.g. Ctrl-C between the write and the rename

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(KeyboardInterrupt):
    write_text_atomic(path, "new")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.gin"]


def test_unwritable_directory_raises_oserror(tmp_path):
  blocker = tmp_path / "afile"
  blocker.write_text("")
  with pytest.raises(OSError):
    write_text_atomic(blocker / "x.json", "{}")
