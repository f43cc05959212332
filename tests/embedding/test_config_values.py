"""Bad configuration values of the embedding layer fail at construction, naming the binding:
sparse optimizer hyperparameters, table and feature specs, `uniform_tables`,
`EmbeddingOptions`."""

import gin
import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import EmbeddingOptions, FeatureSpec, TableSpec, uniform_tables
from jaxrec.errors import ConfigError
from jaxrec.kernels import optim as kernel_optim

BAD_HPARAMS = [
    (optimizers.SGD, {"lr": -0.1}, "SGD.lr must be a number >= 0, got -0.1"),
    (optimizers.SGD, {"lr": "0.1"}, "SGD.lr must be a number >= 0, got '0.1'"),
    (optimizers.SGD, {"lr": True}, "SGD.lr must be a number >= 0, got True"),
    # float32 inf in the update: the run ended with eval_auc=nan and --on_nan never fired
    (optimizers.SGD, {"lr": 1e39}, r"SGD.lr = 1e\+39 is past float32's range \(largest "
                                   r"3.403e\+38\), in which the update computes"),
    (optimizers.SGD, {"lr": float("nan")}, "SGD.lr must be a number >= 0, got nan"),
    (optimizers.SGD, {"lr": float("inf")}, "SGD.lr must be a number >= 0, got inf"),
    (optimizers.Adagrad, {"eps": 0.0}, "Adagrad.eps must be a number > 0, got 0.0"),
    (optimizers.Adagrad, {"initial_accumulator": -1}, "Adagrad.initial_accumulator must be"),
    (optimizers.RowWiseAdagrad, {"lr": None}, "RowWiseAdagrad.lr must be a number >= 0"),
    (optimizers.RowWiseAdagrad, {"eps": -1e-8}, "RowWiseAdagrad.eps must be a number > 0"),
    (optimizers.Adam, {"b1": 1.0}, r"Adam.b1 must be a number in \[0, 1\), got 1.0"),
    # values the rules passed that float32, in which the update computes, makes 1.0 or 0
    # (a subnormal, flushed): rows of NaN and inf
    (optimizers.Adam, {"b1": 0.99999999}, r"Adam.b1 = 0.99999999 is 1.0 in float32, in which "
                                          r"it is used: it must be at most 0.99999994"),
    (optimizers.Adagrad, {"eps": 1e-40}, r"Adagrad.eps = 1e-40 is 0 in float32 \(smallest "
                                         r"normal 1.175e-38\)"),
    (optimizers.FTRL, {"lr": 1e-40}, r"FTRL.lr = 1e-40 is 0 in float32"),
    (optimizers.Adam, {"b2": -0.5}, r"Adam.b2 must be a number in \[0, 1\), got -0.5"),
    (optimizers.Adam, {"eps": 0}, "Adam.eps must be a number > 0, got 0"),
    (optimizers.FTRL, {"lr": 0.0}, "FTRL.lr must be a number > 0, got 0.0"),
    (optimizers.FTRL, {"l1": -0.01}, "FTRL.l1 must be a number >= 0"),
    (optimizers.FTRL, {"l2": "x"}, "FTRL.l2 must be a number >= 0"),
    (optimizers.FTRL, {"beta": -1}, "FTRL.beta must be a number >= 0"),
    (optimizers.FTRL, {"initial_accumulator": -0.1}, "FTRL.initial_accumulator must be"),
    (kernel_optim.SGD, {"lr": -1}, "SGD.lr must be a number >= 0"),
    (kernel_optim.Adagrad, {"eps": 0}, "Adagrad.eps must be a number > 0"),
    (kernel_optim.RowWiseAdagrad, {"initial_accumulator": float("nan")},
     "RowWiseAdagrad.initial_accumulator must be"),
]


@pytest.mark.parametrize("cls, kwargs, message", BAD_HPARAMS,
                         ids=[f"{c.__name__}-{next(iter(k))}-{i}"
                              for i, (c, k, _) in enumerate(BAD_HPARAMS)])
def test_bad_optimizer_hyperparameters_name_the_binding(cls, kwargs, message):
  with pytest.raises(ConfigError, match=message):
    cls(**kwargs)


def test_good_hyperparameters_are_kept_as_floats():
  assert optimizers.SGD(1).lr == 1.0 and isinstance(optimizers.SGD(1).lr, float)
  assert optimizers.SGD(0) == optimizers.SGD(0.0)          # lr = 0 freezes the tables
  assert optimizers.Adam(b1=0, b2=0.5).b1 == 0.0
  assert optimizers.FTRL(beta=0, initial_accumulator=0, l2=0.1).beta == 0.0
  assert optimizers.FTRL(beta=0).initial_accumulator == 0.1


def test_ftrl_that_cannot_keep_a_row_is_refused():
  """beta = initial_accumulator = l2 = 0 (TF's allowed edge): a row's first denominator
  is 0 and a zero gradient set every seen row to 0."""
  with pytest.raises(ConfigError, match=r"^FTRL.beta = 0 with FTRL.initial_accumulator = 0 "
                     r"and FTRL.l2 = 0: a row's first update could not keep its value"):
    optimizers.FTRL(beta=0, initial_accumulator=0)
  assert kernel_optim.coerce(optimizers.RowWiseAdagrad(0.5)) == kernel_optim.RowWiseAdagrad(0.5)


def test_sparse_optimizer_factory_names_its_bindings():
  with pytest.raises(ConfigError, match=r"sparse_optimizer.b1: rowwise_adagrad takes no such "
                                        r"field \(its fields: lr, initial_accumulator, eps\)"):
    optimizers.sparse_optimizer("rowwise_adagrad", lr=0.1, b1=0.9)
  with pytest.raises(ConfigError, match=r"^sparse_optimizer.lr must be .* \(name='adam'\)\n"):
    optimizers.sparse_optimizer("adam", lr=-1)   # said 'Adam.lr': no binding says that, and
                                                 # gin_usage.locate found no FILE:LINE
  with pytest.raises(ConfigError, match="sparse_optimizer.name: unknown"):
    optimizers.sparse_optimizer(["sgd"])
  assert optimizers.sparse_optimizer("ftrl", l1=0.1) == optimizers.FTRL(l1=0.1)


@pytest.mark.parametrize("kwargs, message", [
    ({"init_scale": -0.1}, "table 't': init_scale must be a number >= 0, got -0.1"),
    ({"init_scale": "0.1"}, "table 't': init_scale must be a number >= 0, got '0.1'"),
    ({"init_scale": float("inf")}, "table 't': init_scale must be a number >= 0, got inf"),
    ({"name": 3}, "TableSpec.name must be a non-empty string, got 3"),
])
def test_bad_table_spec(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    TableSpec(**{"name": "t", "rows": 10, "dim": 4, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"weighted": "False"}, "feature 'f': weighted must be True or False, got 'False'"),
    ({"weighted": 1}, "feature 'f': weighted must be True or False, got 1"),
    ({"table": None}, "feature 'f': FeatureSpec.table must be a non-empty string, got None"),
    ({"name": ""}, "FeatureSpec.name must be a non-empty string, got ''"),
])
def test_bad_feature_spec(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    FeatureSpec(**{"name": "f", "table": "t", **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"rows": 1e5}, None),                                     # gin's float, whole: fine
    ({"rows": [10, 20.5]}, r"uniform_tables.rows must be positive integers, got \[10, 20.5\]"),
    ({"rows": True}, "uniform_tables.rows must be positive integers, got True"),
    ({"rows": [10, 20, 30]}, r"uniform_tables.rows must have 2 entries \(num_tables\), got 3"),
    ({"max_len": 2.5}, "uniform_tables.max_len must be positive integers, got 2.5"),
    ({"max_len": [1, 1.5]}, "uniform_tables.max_len must be positive integers"),
    ({"num_tables": 2.5}, "uniform_tables.num_tables must be a positive integer, got 2.5"),
    ({"num_tables": "2"}, "uniform_tables.num_tables must be a positive integer, got '2'"),
    # shared values are named as their binding (they were table 't0''s: no file or flag
    # could be named), and a number for `prefix` made tables '50', '51'
    ({"dim": 0}, "^uniform_tables.dim must be positive integers, got 0"),
    ({"dim": 16.5}, "^uniform_tables.dim must be positive integers, got 16.5"),
    ({"dim": [16, 8, 4]}, r"^uniform_tables.dim must have 2 entries \(num_tables\), got 3"),
    ({"dim": [16, 0]}, r"^uniform_tables.dim must be positive integers, got \[16, 0\]"),
    ({"pooling": "max"}, r"^uniform_tables.pooling must be one of \('sum', 'mean'\), got 'max'"),
    ({"dtype": "fp8"}, r"^uniform_tables.dtype must be one of .* got 'fp8'"),
    ({"prefix": 5}, "^uniform_tables.prefix must be a string, got 5"),
])
def test_uniform_tables_values(kwargs, message):
  args = {"num_tables": 2, "rows": 100, **kwargs}
  if message is None:
    tables, _ = uniform_tables(**args)
    assert [t.rows for t in tables] == [100_000, 100_000]
    return
  with pytest.raises(ConfigError, match=message):
    uniform_tables(**args)


def test_uniform_tables_takes_a_dim_per_table():
  tables, features = uniform_tables(num_tables=3, rows=[10, 20, 30], dim=[8, 16, 8])
  assert [(t.name, t.rows, t.dim) for t in tables] == [("t0", 10, 8), ("t1", 20, 16),
                                                       ("t2", 30, 8)]
  assert [f.table for f in features] == ["t0", "t1", "t2"]


def test_gin_binds_specs_through_uniform_tables():
  """`TableSpec.init_scale` / `FeatureSpec.weighted` bindings reach the specs that
  `uniform_tables` builds; their errors name both."""
  gin.clear_config()
  try:
    gin.parse_config("FeatureSpec.weighted = 'no'")
    with pytest.raises(ConfigError, match="uniform_tables: feature 'f0': weighted must be"):
      uniform_tables(2, 100)
  finally:
    gin.clear_config()


@pytest.mark.parametrize("kwargs, message", [
    ({"stochastic_rounding": "False"}, "EmbeddingOptions.stochastic_rounding must be True or "
                                       "False, got 'False'"),
    ({"interpret": "no"}, "EmbeddingOptions.interpret must be True or False, got 'no'"),
    ({"comm_dtype": "int4"}, "EmbeddingOptions.comm_dtype must be one of"),
])
def test_embedding_options_flags(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    EmbeddingOptions(**kwargs)
  assert EmbeddingOptions(interpret=None, stochastic_rounding=True).interpret is None


SCOPED_SPECS = """ExperimentConfig.embedding = ((@a/TableSpec(), @b/TableSpec()),
    (@u/FeatureSpec(), @c/FeatureSpec()))
ExperimentConfig.model = @build_model()
build_model.name = 'dcnv2'
a/TableSpec.name = 'ta'
a/TableSpec.rows = 64
a/TableSpec.dim = 16
b/TableSpec.name = 'tb'
b/TableSpec.rows = 64
b/TableSpec.dim = 16
u/FeatureSpec.name = 'user'
u/FeatureSpec.table = 'ta'
c/FeatureSpec.name = 'ctx'
c/FeatureSpec.table = 'tb'
"""


@pytest.mark.parametrize("old, new, line, message", [
    ("c/FeatureSpec.table = 'tb'", "c/FeatureSpec.table = 'tc'", 14,
     "c/FeatureSpec.table: feature 'ctx' names unknown table 'tc' (tables: ta, tb)"),
    ("b/TableSpec.dim = 16", "b/TableSpec.dim = '16'", 10,
     "b/TableSpec.dim: table 'tb': dim must be a positive integer, got '16'"),
    ("a/TableSpec.rows = 64", "a/TableSpec.rows = 6.5", 6,
     "a/TableSpec.rows: table 'ta': rows must be a positive integer, got 6.5"),
    ("b/TableSpec.name = 'tb'", "b/TableSpec.name = 3", 8,
     "b/TableSpec.name must be a non-empty string, got 3"),
    ("u/FeatureSpec.table = 'ta'", "u/FeatureSpec.table = 'ta'\nu/FeatureSpec.pooling = 'max'",
     13, "u/FeatureSpec.pooling: feature 'user': pooling must be one of ('sum', 'mean')"),
    # a duplicated name: at the later spec's binding (it named neither binding nor line)
    ("b/TableSpec.name = 'tb'", "b/TableSpec.name = 'ta'", 8,
     "b/TableSpec.name: duplicate table names: ['ta'] (also bound by a/TableSpec.name)"),
    # also where table_optimizers names the table renamed: it said "names no table"
    ("b/TableSpec.name = 'tb'",
     "b/TableSpec.name = 'ta'\nExperimentConfig.table_optimizers = {'tb': @Adam()}", 8,
     "b/TableSpec.name: duplicate table names: ['ta'] (also bound by a/TableSpec.name)"),
    ("c/FeatureSpec.name = 'ctx'", "c/FeatureSpec.name = 'user'", 13,
     "c/FeatureSpec.name: duplicate feature names: ['user'] (also bound by u/FeatureSpec.name)"),
])
def test_a_bad_scoped_spec_binding_names_its_file_line(tmp_path, old, new, line, message):
  """A table or feature written as its own `@scope/TableSpec()` said only `table 'tb': dim
  must be ...` or `feature 'ctx' names unknown table 'tc'`: not the binding nor its line."""
  from jaxrec import launch   # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib   # pylint: disable=import-outside-toplevel
  path = tmp_path / "specs.gin"
  path.write_text(SCOPED_SPECS.replace(old, new))
  try:
    launch.parse_gin([str(path)], [])
    with pytest.raises(ConfigError) as e:
      launch.build(config_lib.ExperimentConfig).validate(1)
    assert launch.user_message(e.value).startswith(f"--gin_file: {path}:{line}: {message}"), (
        launch.user_message(e.value))
  finally:
    gin.clear_config()


def test_a_spec_built_in_code_keeps_its_message():
  """Only a value a gin binding gave is named as that binding."""
  with pytest.raises(ConfigError, match="^table 't': dim must be a positive integer"):
    TableSpec("t", 10, "4")
  assert FeatureSpec("f", "t") == FeatureSpec("f", "t")   # compared by fields only


def test_a_spec_binding_applied_through_uniform_tables_names_its_file_line(tmp_path):
  """`FeatureSpec.weighted = 'no'` reaches every feature `uniform_tables` builds: named as
  the binding, at its line (not `uniform_tables: feature 'f0': ...`, which no line holds)."""
  from jaxrec import launch   # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib   # pylint: disable=import-outside-toplevel
  path = tmp_path / "w.gin"
  path.write_text("include 'configs/dlrm_synthetic.gin'\nFeatureSpec.weighted = 'no'\n")
  try:
    launch.parse_gin([str(path)], [])
    with pytest.raises(ConfigError) as e:
      launch.build(config_lib.ExperimentConfig)
    assert launch.user_message(e.value) == (
        f"--gin_file: {path}:2: FeatureSpec.weighted: feature 'f0': weighted must be True or "
        "False, got 'no'")
  finally:
    gin.clear_config()
