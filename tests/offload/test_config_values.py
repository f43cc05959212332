"""Bad `OffloadConfig` / `OffloadTable` values: a ConfigError naming the binding when the
config is built (not a ValueError from `int()`, nor a silently truncated value)."""

import dataclasses

import pytest

from jaxrec import offload
from jaxrec.embedding import optimizers
from jaxrec.errors import ConfigError
from jaxrec.offload.config import check_paths


@pytest.mark.parametrize("fields, message", [
    # named as the binding (gin_usage.locate then adds its FILE:LINE), not as the table
    ({"cache_rows": "abc"}, r"^OffloadConfig.tables\['t0'\]: cache_rows must be an integer >= 1, "
                            "got 'abc'"),
    ({"cache_rows": 1.5}, r"^OffloadConfig.tables\['t0'\]: cache_rows must be an integer >= 1, "
                          "got 1.5"),
    ({"cache_rows": True}, "cache_rows must be an integer >= 1, got True"),
    ({"cache_rows": -5}, "cache_rows must be an integer >= 1, got -5"),
    ({"cache_bytes": "16GiB"}, "cache_bytes must be an integer >= 1, got '16GiB'"),
    ({"cache_rows": 10, "chunk_rows": "x"}, "chunk_rows must be an integer >= 1, got 'x'"),
    ({"cache_rows": 10, "chunk_rows": 2.5}, "chunk_rows must be an integer >= 1, got 2.5"),
    ({"cache_rows": 10, "path": 5}, r"^OffloadConfig.tables\['t0'\]: path must be a string"),
    ({"cache_rows": 10, "shard_rows": 0}, "shard_rows must be an integer >= 1, got 0"),
    ({"cache_rows": 10, "driver": "zarr", "shard_rows": 4096},
     r"^OffloadConfig.tables\['t0'\]: shard_rows=4096 needs driver 'zarr3' \(driver is 'zarr'\)"),
    ({"cache_rows": 10, "chunk_rows": 256, "shard_rows": 1000},
     r"^OffloadConfig.tables\['t0'\]: shard_rows=1000 must be a multiple of chunk_rows=256"),
    ({"cache_rows": 10, "nope": 1}, r"OffloadConfig.tables\['t0'\]: expected \{field: value\}"),
])
def test_bad_table_fields(fields, message):
  with pytest.raises(ConfigError, match=message):
    offload.OffloadConfig({"t0": fields})


def test_table_entry_must_be_a_mapping():
  with pytest.raises(ConfigError, match=r"OffloadConfig.tables\['t0'\]: expected .* got 1000"):
    offload.OffloadConfig({"t0": 1000})
  with pytest.raises(ConfigError, match="OffloadConfig.tables: expected OffloadTable entries"):
    offload.OffloadConfig(5)


@pytest.mark.parametrize("kwargs, message", [
    ({"prefetch_depth": "x"}, "OffloadConfig.prefetch_depth must be an integer >= 0, got 'x'"),
    ({"prefetch_depth": 1.5}, "OffloadConfig.prefetch_depth must be an integer >= 0, got 1.5"),
    ({"max_staleness": None}, "OffloadConfig.max_staleness must be an integer >= 0, got None"),
    ({"protect_ahead": 1.5}, "OffloadConfig.protect_ahead must be an integer >= 0, got 1.5"),
    ({"host_buffer_rows": 0.5}, "OffloadConfig.host_buffer_rows must be an integer >= 1"),
    ({"auto": "no"}, "OffloadConfig.auto must be True or False, got 'no'"),
    ({"auto_cache_fraction": "x"}, r"OffloadConfig.auto_cache_fraction must be a number in "
                                   r"\(0, 1\), got 'x'"),
])
def test_bad_options(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    offload.OffloadConfig(**kwargs)


def test_whole_floats_become_ints():
  cfg = offload.OffloadConfig({"t0": {"cache_bytes": 1e6, "chunk_rows": 64.0}},
                              prefetch_depth=2.0, protect_ahead=None)
  assert cfg.tables[0].cache_bytes == 1_000_000 and type(cfg.tables[0].cache_bytes) is int
  assert cfg.prefetch_depth == 2 and cfg.horizon == 2


@pytest.mark.parametrize("paths, message", [
    (("same", "same"), r"offloaded tables 'big' and 'small' share the store directory '.*/same'"),
    (("outer", "outer/inner"), r"'big' and 'small' have store directories '.*/outer' and "
     r"'.*/outer/inner', one inside the other \('path' in OffloadConfig.tables\)"),
    ((None, "w/offload/big"), "share the store directory '.*/w/offload/big'"),
])
def test_tables_need_store_directories_of_their_own(tmp_path, paths, message):
  """Two tables in one directory overwrote each other's arrays (silently wrong training);
  a table inside another's was deleted by the other's restore."""
  from tests.offload.offload_helpers import experiment, mesh_of
  from jaxrec.embedding.collection import EmbeddingCollection
  from jaxrec.sharding.plan import uniform_plan
  tables = tuple(offload.OffloadTable(name, cache_rows=40, path=p and str(tmp_path / p))
                 for name, p in zip(("big", "small"), paths))
  cfg, off = experiment(), offload.OffloadConfig(tables)
  specs = offload.device_tables(cfg.tables, off, cfg.sparse_tx())
  collection = EmbeddingCollection.create(specs, cfg.features, uniform_plan("dp", specs, 1),
                                          mesh_of(), cfg.sparse_tx())
  with pytest.raises(ConfigError, match=message):
    offload.OffloadTier(collection, cfg.tables, off, workdir=str(tmp_path / "w"))
  memory = tuple(dataclasses.replace(t, kvstore="memory") for t in tables)
  check_paths(offload.OffloadConfig(memory), str(tmp_path / "w"))   # no shared files


@pytest.mark.parametrize("paths, message", [
    (("real", "link"), r"'big' and 'small' share one store directory: '.*/real' and "
     r"'.*/link' are both '.*/real'"),
    (("real", "link/inner"), r"'big' and 'small' have store directories '.*/real' and "
     r"'.*/link/inner', one inside the other \(through symlinks: '.*/real' and "
     r"'.*/real/inner'\)"),
])
def test_a_symlink_to_another_tables_store_is_the_same_directory(tmp_path, paths, message):
  """`link` -> `real`: the two tables wrote each other's arrays; the run failed later
  with DATA_LOSS reading a shard index (or, at equal shapes, read each other's rows)."""
  (tmp_path / "real").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "real")
  tables = tuple(offload.OffloadTable(name, cache_rows=40, path=str(tmp_path / p))
                 for name, p in zip(("big", "small"), paths))
  with pytest.raises(ConfigError, match=message):
    check_paths(offload.OffloadConfig(tables), str(tmp_path / "w"))


def test_path_expands_the_home_directory(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  table = offload.OffloadConfig({"t0": {"cache_rows": 10, "path": "~/stores/t0"}}).tables[0]
  assert table.path == str(tmp_path / "stores" / "t0")
  assert table.resolve_path("/elsewhere") == str(tmp_path / "stores" / "t0")
  with pytest.raises(ConfigError, match=r"^OffloadConfig.tables\['t0'\]: path "
                     r"'~no_such_user_qa81/t0': cannot expand '~no_such_user_qa81' "
                     r"\(no such user, or no HOME\)"):
    offload.OffloadConfig({"t0": {"cache_rows": 10, "path": "~no_such_user_qa81/t0"}})


def test_a_bad_offload_binding_names_its_file_line(tmp_path):
  """`{'t0': {'cache_rows': '100'}}` on line 2 of a gin file said `offloaded table 't0':
  cache_rows must be ...`, and a table not configured `OffloadConfig: offloaded table 't9'
  ...`: neither named the binding nor where it was written."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import TableSpec  # pylint: disable=import-outside-toplevel
  path = tmp_path / "o.gin"
  try:
    path.write_text("# offload\nOffloadConfig.tables = {'t0': {'cache_rows': '100'}}\n")
    launch.parse_gin([str(path)], [])
    with pytest.raises(ConfigError) as e:
      launch.build(offload.OffloadConfig)
    assert launch.user_message(e.value) == (
        f"--gin_file: {path}:2: OffloadConfig.tables['t0']: cache_rows must be an integer >= "
        "1, got '100'")
    path.write_text("# offload\nOffloadConfig.tables = {'t9': {'cache_rows': 100}}\n")
    launch.parse_gin([str(path)], [])
    with pytest.raises(ConfigError) as e:
      offload.config.check_tables((TableSpec("t0", 10, 4),), launch.build(offload.OffloadConfig))
    assert launch.user_message(e.value) == (
        f"--gin_file: {path}:2: OffloadConfig.tables: offloaded table 't9' is not a configured "
        "table (tables: t0)")
    # the cache's size against its table (resolved later, with the optimizer): the same
    for fields, want in ((", 'cache_rows': 30", "cache of 30 rows is larger than the table "
                          "(10 rows); keep the table on the device instead"),
                         (", 'cache_bytes': 10", "the cache holds 0 rows (cache_rows=None, "
                          "cache_bytes=10); one row takes 16 bytes")):
      path.write_text(f"# offload\nOffloadConfig.tables = {{'t0': {{'path': 'x'{fields}}}}}\n")
      launch.parse_gin([str(path)], [])
      config = launch.build(offload.OffloadConfig)
      with pytest.raises(ConfigError) as e:
        config.tables[0].resolve_cache_rows(TableSpec("t0", 10, 4), optimizers.SGD())
      assert launch.user_message(e.value) == (
          f"--gin_file: {path}:2: OffloadConfig.tables['t0']: {want}")
      assert config.cache_advice("t0") == ("raise its cache_rows/cache_bytes (OffloadConfig."
                                           f"tables['t0'], bound at {path}:2)")
  finally:
    gin.clear_config()
