"""`embedding_tables`: tables and features as gin dicts, one entry each (a scoped TableSpec
and FeatureSpec per table took 5.5 lines a table; `uniform_tables` shares nothing)."""

import json
import os

import gin
import pytest

from jaxrec import launch
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.embedding.table_dicts import embedding_tables
from jaxrec.errors import ConfigError
from tests.scripts.in_process import run_script

CONFIG = """
include 'configs/dlrm_synthetic.gin'
ExperimentConfig.embedding = @embedding_tables()
embedding_tables.tables = {
    'user': (500, 16),
    'item': {'rows': 300, 'dim': 16, 'dtype': 'bfloat16'},
}
embedding_tables.features = [
    ('user_id', 'user'),
    ('item_id', 'item'),
    ('history', ('item', 4, 'mean')),
    ('tags', {'table': 'item', 'max_len': 3, 'weighted': True}),
]
"""


def test_entries_build_the_specs_tables_in_name_order_features_as_listed():
  tables, features = embedding_tables(
      {"user": (500, 16), "item": {"rows": 300, "dim": 16, "dtype": "bf16",
                                   "init_scale": 0.1}},
      [("user_id", "user"), ("item_id", ("item",)), ("history", ("item", 4, "mean")),
       ("tags", {"table": "item", "max_len": 3, "weighted": True})])
  assert tables == (TableSpec("item", 300, 16, "bfloat16", 0.1), TableSpec("user", 500, 16))
  assert features == (FeatureSpec("user_id", "user"), FeatureSpec("item_id", "item"),
                      FeatureSpec("history", "item", 4, "mean"),
                      FeatureSpec("tags", "item", 3, weighted=True))


def test_pairs_keep_their_order_and_features_default_to_one_per_table():
  tables, features = embedding_tables([("z", (10, 8)), ("a", (20, 8))],
                                      [("zf", "z"), ("af", ("a", 2))])
  assert [t.name for t in tables] == ["z", "a"] and [f.name for f in features] == ["zf", "af"]
  tables, features = embedding_tables({"b": (10, 8), "a": (20, 8)})
  assert features == (FeatureSpec("a", "a"), FeatureSpec("b", "b"))


def test_the_config_gin_it_writes_rebuilds_the_same_embedding(tmp_path):
  """gin writes a dict sorted by key in config.gin: the features (the dense model's input
  order, the data's columns) are pairs, kept in order; tables in name order."""
  path = tmp_path / "td.gin"
  path.write_text(CONFIG)
  proc = run_script("train.py", f"--workdir={tmp_path / 'w'}", f"--gin_file={path}",
                    "--num_steps=2", "--log_every=1", "--mesh=data=2,row=4", "--plan=rw",
                    "--noprogress")
  assert proc.returncode == 0, proc.stderr
  lines = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  assert any("loss" in l for l in lines)
  gin.clear_config()
  launch.parse_gin([str(path)], [])
  first = launch.bound_value("ExperimentConfig.embedding")
  gin.clear_config()
  launch.parse_gin([str(tmp_path / "w" / "config.gin")], [])
  again = launch.bound_value("ExperimentConfig.embedding")
  assert first == again and [f.name for f in first[1]] == ["user_id", "item_id", "history",
                                                           "tags"]
  assert [t.name for t in first[0]] == ["item", "user"]


@pytest.mark.parametrize("tables, features, message", [
    ({"a": (10,)}, None, "embedding_tables.tables['a'] must be (rows, dim[, dtype[, "
     "init_scale]]) or a dict of"),
    ({"a": (10, 0)}, None, "embedding_tables.tables['a']: table 'a': dim must be a positive"),
    ({"a": {"rows": 10, "dims": 8}}, None, "embedding_tables.tables['a']: unknown key(s) "
     "['dims']"),
    ({"a": {"dim": 8}}, None, "embedding_tables.tables['a']: missing ['rows']"),
    ([], None, "embedding_tables.tables must be a non-empty dict"),
    ({3: (10, 8)}, None, "embedding_tables.tables: key 3 is not a name"),
    ([("a", (10, 8)), ("a", (5, 8))], None, "embedding_tables.tables: 'a' is given twice"),
    ({"a": (10, 8)}, [("x", "b")], "embedding_tables.features['x']: table 'b' is not one of "
     "embedding_tables.tables"),
    ({"a": (10, 8)}, [("x", ("a", 2, "max"))], "embedding_tables.features['x']: feature 'x': "
     "pooling must be one of"),
    ({"a": (10, 8)}, [("x", 5)], "or a table's name, got 5"),
    ({"a": (10, 8)}, {"x": "a"}, "embedding_tables.features must be a list of (name, entry) "
     "pairs in the batch's feature order"),
])
def test_bad_entries_name_the_entry(tables, features, message):
  with pytest.raises(ConfigError) as e:
    embedding_tables(tables, features)
  assert message in str(e.value), str(e.value)


def test_a_bad_entry_in_a_file_names_its_line(tmp_path):
  path = tmp_path / "bad.gin"
  path.write_text(CONFIG.replace("(500, 16)", "(500, -16)"))
  proc = run_script("train.py", f"--workdir={tmp_path / 'w'}", f"--gin_file={path}",
                    "--num_steps=1")
  assert proc.returncode == 1
  assert (f"{path}:4: embedding_tables.tables['user']: table 'user': dim must be a positive "
          "integer, got -16") in proc.stderr, proc.stderr
  assert not os.path.exists(tmp_path / "w")


def test_errors_found_after_the_specs_are_built_name_the_entry(tmp_path):
  """Mixed dims for DLRM (and a resume's other rows or dtype, `specs.bound_field`) named
  the included dlrm_synthetic.gin's unused `uniform_tables.dim` and its line, and said to
  fix `uniform_tables.rows / .dim`; the entry and its file:line are meant."""
  from jaxrec.embedding.specs import bound_field   # pylint: disable=import-outside-toplevel
  path = tmp_path / "mixed.gin"
  path.write_text(CONFIG.replace("'user': (500, 16)", "'user': (500, 8)"))
  proc = run_script("train.py", f"--workdir={tmp_path / 'w'}", f"--gin_file={path}",
                    "--num_steps=1")
  assert proc.returncode == 1
  assert f"embedding_tables.tables['user'] at {path}:4" in proc.stderr, proc.stderr
  assert "uniform_tables.dim at" not in proc.stderr, proc.stderr
  gin.clear_config()
  launch.parse_gin([], ["big/embedding_tables.tables = {'t0': (10, 8)}",
                        "big/embedding_tables.features = [('f', 't0')]"])
  with gin.config_scope("big"):
    tables, features = embedding_tables()
  assert bound_field(tables[0], "rows") == "big/embedding_tables.tables['t0']"
  assert bound_field(features[0], "table") == "big/embedding_tables.features['f']"


def test_a_bad_entry_of_a_scoped_call_names_its_scope_and_line(tmp_path):
  """`@big/embedding_tables()`: the error said `embedding_tables.tables['user']` with no
  file:line (the unscoped name is not bound anywhere)."""
  path = tmp_path / "scoped.gin"
  path.write_text(CONFIG.replace("@embedding_tables()", "@big/embedding_tables()")
                  .replace("\nembedding_tables.", "\nbig/embedding_tables.")
                  .replace("(500, 16)", "(500, -16)"))
  proc = run_script("train.py", f"--workdir={tmp_path / 'w'}", f"--gin_file={path}",
                    "--num_steps=1")
  assert proc.returncode == 1
  assert (f"{path}:4: big/embedding_tables.tables['user']: table 'user': dim must be a "
          "positive integer, got -16") in proc.stderr, proc.stderr


@pytest.mark.parametrize("tables, features, message", [
    ([("a", 10, 16)], None, "embedding_tables.tables[0] must be a (name, entry) pair, e.g. "
     "('user', (1000000, 64)), got ('a', 10, 16)"),
    ({"a": (10, 8)}, [("x", "a"), ("y", "a", 4)], "embedding_tables.features[1] must be a "
     "(name, entry) pair, e.g. ('history', ('item', 20)), got ('y', 'a', 4)"),
    ({"a": (10, 8)}, ["a"], "embedding_tables.features[0] must be a (name, entry) pair"),
])
def test_an_item_of_a_list_that_is_not_a_pair_is_named(tables, features, message):
  """`[('x', 'a'), ('y', 'a', 4)]` said the whole list must be pairs, naming no item."""
  with pytest.raises(ConfigError) as e:
    embedding_tables(tables, features)
  assert message in str(e.value), str(e.value)
