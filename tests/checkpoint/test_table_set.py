"""A checkpoint restored into a configuration with tables added or removed."""

import pytest

from jaxrec.checkpoint import tables as tables_lib
from jaxrec.errors import ConfigError
from tests.checkpoint import ckpt_helpers as h


def _index(coll, drop=(), add=()):
  """A stored index of `coll`'s tables without `drop`, with `add` as extra tables."""
  arrays = {n: {"shape": list(s), "dtype": d} for n, (s, d) in
            tables_lib.stored_arrays(coll).items() if n.split("/")[1] not in drop}
  for name in add:
    arrays[f"tables/{name}"] = {"shape": [5, h.DIM], "dtype": "float32"}
  return {"arrays": arrays}


@pytest.mark.parametrize("drop, add, lacks, extra", [
    (("t3",), (), "['t3']", "[]"),          # a table added to the configuration
    ((), ("old",), "[]", "['old']"),        # a table removed from it
    (("t3",), ("t9",), "['t3']", "['t9']"),  # renamed
])
def test_another_set_of_tables_names_which_side_lacks_them(drop, add, lacks, extra):
  """The message said 'missing: [], extra: [...]' for a table only the checkpoint has,
  which read as the configuration missing nothing; it names each side now."""
  coll = h.collection("dp", 1)
  with pytest.raises(ConfigError) as e:
    tables_lib.check_compatible(_index(coll, drop, add), coll, "W/checkpoints/4")
  msg = str(e.value)
  assert f"not in the checkpoint: {lacks}, not in the configuration: {extra}" in msg
  assert "start a fresh --workdir" in msg
