"""A checkpoint whose table rows differ from the configuration: the error names the table
and, where offloading explains it, says so (an offloaded table's checkpoint holds its
device cache)."""

import pytest

from jaxrec.checkpoint import tables as tables_lib
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


def test_rows_of_an_offloaded_table_name_its_cache():
  coll = h.collection("rw", 8)          # t0 has 13 rows here
  with pytest.raises(ConfigError, match=r"table 't0': .*the configuration has \[13, 8\] "
                     r"float32 \(the run that saved it offloaded the table"):
    tables_lib.check_compatible(_index(coll, 4), coll, "W/7", offloaded={"t0": {}})
  with pytest.raises(ConfigError, match=r"\[13, 8\] float32 \(if this run offloads the "
                     "table: a table the checkpoint holds whole cannot resume offloaded\\)"):
    tables_lib.check_compatible(_index(coll, 100), coll, "W/7")
  with pytest.raises(ConfigError, match=r"has \[13, 8\] float32$"):   # fewer rows: no hint
    tables_lib.check_compatible(_index(coll, 4), coll, "W/7")
