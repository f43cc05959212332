"""Fixtures for the data tests."""

import pytest

import data_testlib


@pytest.fixture
def tsv_file(tmp_path):
  """`make(lines, name=None, **write_kw)` writes a fresh file and returns its path."""
  counter = iter(range(1000))

  def make(lines, name=None, **kw):
    return data_testlib.write(tmp_path / (name or f"data{next(counter)}.tsv"), lines, **kw)
  return make
