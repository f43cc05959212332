"""A checkpoint whose table rows differ from the configuration: the error names the table.
A table this run offloads is checked whole (`specs`), not as its device cache."""

import dataclasses
import re

import pytest

from jaxrec.checkpoint import compatible
from jaxrec.checkpoint import tables as tables_lib
from jaxrec.embedding import optimizers
from jaxrec.errors import ConfigError
from tests.checkpoint import ckpt_helpers as h


def _index(collection, rows_of_t0):
  """The index a checkpoint of `collection` would have, with table t0 at `rows_of_t0`."""
  arrays = {}
  for name, (shape, dtype) in tables_lib.stored_arrays(collection).items():
    if name.split("/")[1] == "t0":
      shape = (rows_of_t0, *shape[1:])
    arrays[name] = {"shape": list(shape), "dtype": dtype}
  return {"arrays": arrays}


def test_rows_that_differ_name_the_table():
  coll = h.collection("rw", 8)          # t0 has 13 rows here
  for rows in (4, 100):
    with pytest.raises(ConfigError, match=r"table 't0': checkpoint W/7 has tables/t0 "
                       rf"\[{rows}, 8\] float32; the configuration has \[13, 8\] float32: a resume "
                       rf"cannot change a table's rows or dim \(no conversion does\); configure "
                       rf"the checkpoint's \[{rows}, 8\] \(e\.g\. uniform_tables\.rows / \.dim\), "
                       r"or start a fresh --workdir$"):
      compatible.check_compatible(_index(coll, rows), coll, "W/7")


def test_an_offloaded_table_is_checked_whole():
  coll = h.collection("rw", 8)          # as if t0's 13 rows were the cache of 100
  t0 = next(t for t in coll.tables if t.name == "t0")
  whole = {"t0": dataclasses.replace(t0, rows=100)}
  assert compatible.check_compatible(_index(coll, 100), coll, "W/7", whole) == ()
  with pytest.raises(ConfigError, match=r"tables/t0 \[13, 8\] float32; the configuration "
                     r"has \[100, 8\] float32: .* configure the checkpoint's \[13, 8\]"):
    compatible.check_compatible(_index(coll, 13), coll, "W/7", whole)


def test_a_changed_dim_says_what_to_do():
  coll = h.collection("rw", 8)
  with pytest.raises(ConfigError, match=r"configuration has \[13, 4\] float32: a resume cannot "
                     r"change a table's rows or dim .* configure the checkpoint's \[13, 8\] .*"
                     r"or start a fresh --workdir$"):
    compatible.check_compatible({"arrays": {
        n: {"shape": list(s), "dtype": d}
        for n, (s, d) in tables_lib.stored_arrays(coll).items()}},
        h.collection("rw", 8, dim=4), "W/7")


@pytest.mark.parametrize("saved, now, fix", [
    (optimizers.Adagrad(), optimizers.SGD(), "@Adagrad()"),
    (optimizers.Adagrad(), optimizers.RowWiseAdagrad(), "@Adagrad()"),
    (optimizers.Adam(), optimizers.FTRL(), "@Adam()")])
def test_a_refused_optimizer_change_says_what_to_do(saved, now, fix):
  index = {"arrays": {n: {"shape": list(s), "dtype": d} for n, (s, d) in
                      tables_lib.stored_arrays(h.collection("rw", 8, optimizer=saved)).items()}}
  with pytest.raises(ConfigError, match=rf"configured {type(now).__name__} .*: a resume does "
                     r"not convert sparse optimizer state \(only a table without any "
                     r"starts it fresh\); configure the optimizer it was saved with "
                     rf"\(ExperimentConfig\.sparse_optimizer = {re.escape(fix)}\), or start a fresh "
                     r"--workdir$"):
    compatible.check_compatible(index, h.collection("rw", 8, optimizer=now), "W/7")


def test_a_checkpoint_without_optimizer_state_starts_it_fresh():
  index = {"arrays": {n: {"shape": list(s), "dtype": d} for n, (s, d) in tables_lib.stored_arrays(
      h.collection("rw", 8, optimizer=optimizers.SGD())).items()}}
  assert compatible.check_compatible(index, h.collection("rw", 8), "W/7") == (
      "t0", "t1", "t2", "t3")


def test_a_changed_scoped_spec_names_its_binding_and_line(tmp_path):
  """A table of its own `@scope/TableSpec()` whose dim changed since the checkpoint: the
  error guessed `uniform_tables.rows / .dim`, which such a config does not use."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import TableSpec  # pylint: disable=import-outside-toplevel
  path = tmp_path / "t.gin"
  path.write_text("x = @t0/TableSpec()\nt0/TableSpec.name = 't0'\nt0/TableSpec.rows = 13\n"
                  "t0/TableSpec.dim = 4\n")
  try:
    launch.parse_gin([str(path)], [])
    spec = gin.query_parameter("%x").scoped_configurable_fn()
    assert isinstance(spec, TableSpec) and spec.dim == 4
    stored = {"tables/t0": ((13, 8), "float32")}
    assert compatible._shape_hint(stored, spec) == (   # pylint: disable=protected-access
        ": a resume cannot change a table's rows or dim (no conversion does); configure the "
        f"checkpoint's [13, 8] (t0/TableSpec.dim, bound at {path}:4), or start a fresh "
        "--workdir")
  finally:
    gin.clear_config()


def test_rows_read_through_a_vocabulary_point_at_it(tmp_path):
  """Rows bound by a vocab.gin rebuilt from the next day's data: the refusal named only the
  rows to configure (which the new vocabulary does not fit), not the vocabulary."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import TableSpec  # pylint: disable=import-outside-toplevel
  spec = TableSpec("t0", 14, 8)
  stored = {"tables/t0": ((13, 8), "float32")}
  try:
    launch.parse_gin([], ["open_source.vocab = '/data/vocab2'"])
    hint = compatible._shape_hint(stored, spec)   # pylint: disable=protected-access
    assert hint.endswith("; this run reads ids through an id vocabulary (open_source.vocab), "
                         "whose vocab.gin binds the rows: one rebuilt from other data has "
                         "other sizes and renumbers the ids, so go on through the vocabulary "
                         "the checkpoint was trained with (its vocab.gin)"), hint
    launch.parse_gin([], [])
    plain = compatible._shape_hint(stored, spec)   # pylint: disable=protected-access
    assert "vocabulary" not in plain, plain
  finally:
    gin.clear_config()
