"""A checkpoint restored into a configuration with tables added or removed."""

import jax
import pytest

from jaxrec.checkpoint import compatible
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
    (("t3",), (), "'t3'", "none"),          # a table added to the configuration
    ((), ("old",), "none", "'old'"),        # a table removed from it
    (("t3",), ("t9",), "'t3'", "'t9'"),     # renamed
])
def test_another_set_of_tables_names_which_side_lacks_them(drop, add, lacks, extra):
  """The message said 'missing: [], extra: [...]' for a table only the checkpoint has,
  which read as the configuration missing nothing; it names each side now."""
  coll = h.collection("dp", 1)
  with pytest.raises(ConfigError) as e:
    compatible.check_compatible(_index(coll, drop, add), coll, "W/checkpoints/4")
  msg = str(e.value)
  assert f"not in the checkpoint: {lacks}; not in the configuration: {extra}" in msg
  assert "start a fresh --workdir" in msg
  # counts, not both whole lists (~900 characters at 24 tables)
  assert f"has {4 - len(drop) + len(add)} tables, the configuration 4 tables" in msg, msg


def test_stored_array_shapes_are_traced_once_per_dim_and_dtype(monkeypatch):
  """`table_arrays` traced `init_table` for every table: restoring 300 tables spent 8.6 of
  11.5 s there, the first save of 750 ~15 s. Now once per (dim, dtype), the rows put in."""
  from jaxrec.checkpoint import tables as tables_lib  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding import layout as layout_lib  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding import optimizers  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import TableSpec  # pylint: disable=import-outside-toplevel
  specs = [TableSpec(f"t{i}", rows, dim, dtype) for i, (rows, dim, dtype) in enumerate(
      (r, d, t) for r in (1, 7, 1000, 123457) for d in (3, 16) for t in ("float32", "int8",
                                                                         "bfloat16"))]
  reference = {}
  for spec in specs:   # what the stored arrays are: the table as initialised, leaf by leaf
    abstract = jax.eval_shape(lambda spec=spec: layout_lib.init_table(jax.random.key(0), spec))
    for leaf, a in tables_lib.canonical_lib.leaf_names(abstract):
      reference[tables_lib.table_name(spec.name, leaf)] = (tuple(a.shape), str(a.dtype))
  tables_lib._row_leaves.cache_clear()   # pylint: disable=protected-access
  traces, real = [], layout_lib.init_table
  monkeypatch.setattr(layout_lib, "init_table", lambda *a: traces.append(1) or real(*a))
  got = {}
  for spec in specs:
    got.update({k: v for k, v in tables_lib.table_arrays(spec, optimizers.Adam()).items()
                if k.startswith("tables/")})
  assert got == reference and len(traces) == 6
