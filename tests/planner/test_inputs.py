"""Planner inputs agree with the checks the rest of jaxrec applies to the same values."""

import dataclasses
import os

import pytest

from jaxrec import launch
from jaxrec.errors import ConfigError
from jaxrec.planner import cost_model as cm
from jaxrec.planner import inputs

GIN = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "dlrm_criteo.gin")


def test_tables_flag_takes_a_pooling_factor_of_zero_as_table_stats_do():
  """`t:100:16:0` (a table whose features are all empty in the data) was refused by
  `--tables` while `TableStats(0)` (a config, a profile) was planned."""
  spec = inputs.parse_tables_flag("t:100:16:0:1.1")
  assert spec.table_stats["t"] == cm.TableStats(0.0, 1.1)
  assert spec.features[0].max_len == 1
  load, = cm.table_loads(spec.tables, spec.features, spec.table_stats)
  assert load.pooling_factor == 0
  with pytest.raises(ConfigError, match=r"--tables: 't:100:16:-1': table 't': pooling factor "
                     r"must be >= 0 \(0: its features' bags are empty\), got -1"):
    inputs.parse_tables_flag("t:100:16:-1")
  with pytest.raises(ConfigError, match=r"pooling factor -1.0 must be a number in \[0, 1\]"):
    cm.table_loads(spec.tables, spec.features, {"t": cm.TableStats(-1.0)})


@pytest.mark.parametrize("binding, message", [
    ("ExperimentConfig.batch_size = 'abc'",
     "ExperimentConfig.batch_size must be an integer, got 'abc'"),
    ("ExperimentConfig.batch_size = 1.5", "ExperimentConfig.batch_size must be an integer, "
     "got 1.5"),
    ("ExperimentConfig.batch_size = 0", "ExperimentConfig.batch_size must be positive, got 0"),
])
def test_gin_batch_sizes_are_checked_naming_the_binding(binding, message):
  """A text batch size ended in a raw ValueError from `int()`; 1.5 was planned as 1 and 0
  silently became the default 512 (the trainer refuses all three)."""
  launch.parse_gin([GIN], [binding])
  with pytest.raises(ConfigError, match=message):
    inputs.inputs_from_gin()


@pytest.mark.parametrize("value", ["'4k'", "True", "None", "0"])
def test_eval_batch_size_is_checked_as_the_trainer_checks_it(value):
  """scripts/plan.py warns, as train.py does, when the eval batch takes the lookup over
  the budget (`budget_hint.eval_memory_warning`), so it reads `eval_batch_size`: a bad one
  is refused naming the binding, as the trainer refuses it."""
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  launch.parse_gin([GIN], [f"ExperimentConfig.eval_batch_size = {value}"])
  with pytest.raises(ConfigError, match="ExperimentConfig.eval_batch_size must be"):
    inputs.inputs_from_gin()
  with pytest.raises(ConfigError, match="ExperimentConfig.eval_batch_size must be"):
    launch.build(ExperimentConfig).validate(num_devices=1)


def test_whole_float_batch_sizes_are_taken_as_the_trainer_takes_them():
  """gin writes `1e3` as a float: the trainer takes a whole one as a count, plan.py
  refused it ('must be an integer, got 1000.0'). Unbound, the eval batch is the
  trainer's default."""
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  launch.parse_gin([GIN], ["ExperimentConfig.batch_size = 1e3"])
  spec = inputs.inputs_from_gin()
  assert spec.batch_size == 1000 and isinstance(spec.batch_size, int)
  assert spec.eval_batch_size == launch.build(ExperimentConfig).eval_batch_size
  launch.parse_gin([], ["tables = @uniform_tables()", "uniform_tables.num_tables = 2",
                        "uniform_tables.rows = 100", "uniform_tables.dim = 8",
                        "ExperimentConfig.eval_batch_size = 2e3"])
  spec = inputs.inputs_from_gin()
  assert spec.eval_batch_size == 2000 and spec.batch_size is None
  launch.parse_gin([], ["tables = @uniform_tables()", "uniform_tables.num_tables = 2",
                        "uniform_tables.rows = 100", "uniform_tables.dim = 8"])
  assert inputs.inputs_from_gin().eval_batch_size is None   # planner-only: no eval


def test_gin_batch_size_macro_is_checked_naming_it():
  launch.parse_gin([], ["tables = @uniform_tables()", "uniform_tables.num_tables = 2",
                        "uniform_tables.rows = 100", "uniform_tables.dim = 8",
                        "batch_size = 'abc'"])
  with pytest.raises(ConfigError, match="gin macro %batch_size must be an integer, got 'abc'"):
    inputs.inputs_from_gin()
  launch.parse_gin([GIN], ["ExperimentConfig.batch_size = 256"])
  assert inputs.inputs_from_gin().batch_size == 256


@pytest.mark.parametrize("value", ["@Adagrad", "'adagrad'", "5"])
def test_gin_sparse_optimizer_is_checked_as_the_trainer_checks_it(value):
  """`@Adagrad` (the class, not `@Adagrad()`) ended in a raw TypeError from `state_layout()`;
  a text or a number was planned although the trainer refuses it."""
  launch.parse_gin([GIN], [f"ExperimentConfig.sparse_optimizer = {value}"])
  with pytest.raises(ConfigError, match="ExperimentConfig.sparse_optimizer must be a sparse "
                     r"optimizer, e.g. @RowWiseAdagrad\(\) or @sparse_optimizer\(\), got "):
    inputs.inputs_from_gin()
  launch.parse_gin([GIN], ["ExperimentConfig.sparse_optimizer = @Adagrad()"])
  assert type(inputs.inputs_from_gin().optimizer).__name__ == "Adagrad"


@pytest.mark.parametrize("binding, message", [
    ("ExperimentConfig.embedding = 5", r"ExperimentConfig.embedding must give \(tables, "
     r"features\), e.g. @uniform_tables\(\), got 5"),
    ("ExperimentConfig.embedding = (1, 2, 3)", r"must give \(tables, features\).*got \(1, 2, 3\)"),
    ("ExperimentConfig.batch_size = None", "ExperimentConfig.batch_size must be an integer, "
     "got None"),
])
def test_other_gin_values_are_one_line_errors(binding, message):
  """The first two were raw TypeErrors; a None batch size was planned as the default 512."""
  launch.parse_gin([GIN], [binding])
  with pytest.raises(ConfigError, match=message):
    inputs.inputs_from_gin()


@pytest.mark.parametrize("bindings, message", [
    (["tables = 5"], r"gin macros %tables and %features must give \(tables, features\)"),
    (["uniform_tables.num_tables = 2"], "--gin_file: Required bindings for `uniform_tables` "
     r"not provided in config: \['rows'\]"),
    (["tables = @uniform_tables()", "uniform_tables.num_tables = 2"], "--gin_file: Required "
     "bindings for `uniform_tables`"),
])
def test_tables_from_gin_macros_are_one_line_errors(bindings, message):
  """A raw TypeError (`len()` of a number) or gin's RuntimeError for a missing binding."""
  launch.parse_gin([], bindings)
  with pytest.raises(ConfigError, match=message):
    inputs.inputs_from_gin()


def test_gin_table_optimizers_are_planned_and_the_flag_replaces_the_default_only():
  """`ExperimentConfig.table_optimizers` was not read: every table was planned with
  `sparse_optimizer`'s state. `--optimizer` (`planned_optimizer`'s `flag_value`) replaces
  the default only, made an optimizer at its defaults (a table whose own equals it then
  shares its stacks, as in the collection); a factor stays a factor."""
  from jaxrec.embedding import optimizers  # pylint: disable=import-outside-toplevel
  launch.parse_gin([GIN], ["ExperimentConfig.table_optimizers = "
                           "{'t3': @Adam(), 't0': @sparse_optimizer()}"])
  spec = inputs.inputs_from_gin()
  sgd, adam = optimizers.SGD(0.1), optimizers.Adam()   # the config's default: SGD.lr = 0.1
  assert spec.optimizer == sgd and spec.table_optimizers == {"t3": adam, "t0": sgd}
  assert inputs.planned_optimizer(spec) == optimizers.TableOptimizers(
      sgd, (("t0", sgd), ("t3", adam)))
  opt = inputs.planned_optimizer(spec, "sgd")   # SGD() at its default lr 0.1: t0's equal
  assert opt.default == sgd and opt.group("t0") == 0 and opt.group("t3") == 1
  opt = inputs.planned_optimizer(spec, "adam")
  assert opt.default == adam and opt.group("t3") == 0 and opt.group("t0") == 1
  opt = inputs.planned_optimizer(spec, "1.5")
  assert opt.default == 1.5 and cm.state_of(opt, "t3") == cm.optimizer_state("adam")
  spec = dataclasses.replace(spec, optimizer=None)
  assert inputs.planned_optimizer(spec).default == optimizers.SGD()   # the trainer's default
  spec = dataclasses.replace(spec, table_optimizers=None)
  assert inputs.planned_optimizer(spec) == "sgd" and inputs.planned_optimizer(spec, "2") == 2.0


def test_gin_table_optimizer_patterns_are_expanded_as_the_trainer_does():
  from jaxrec.embedding import optimizers  # pylint: disable=import-outside-toplevel
  launch.parse_gin([GIN], ["ExperimentConfig.table_optimizers = {'t[0-1]': @Adam()}"])
  assert inputs.inputs_from_gin().table_optimizers == {"t0": optimizers.Adam(),
                                                       "t1": optimizers.Adam()}


@pytest.mark.parametrize("value, message", [
    ("{'t99': @Adam()}", r"ExperimentConfig.table_optimizers\['t99'\] names no table"),
    ("{'t*': @Adam(), 't1': @SGD()}", r"table 't1' is named by both 't\*' and 't1'"),
    ("{'t1': @Adam}", r"ExperimentConfig.table_optimizers\['t1'\] must be a sparse optimizer"),
    ("'t1'", r"ExperimentConfig.table_optimizers must be a dict \{table name: sparse "),
])
def test_gin_table_optimizers_are_checked_as_the_trainer_checks_them(value, message):
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  launch.parse_gin([GIN], [f"ExperimentConfig.table_optimizers = {value}"])
  with pytest.raises(ConfigError, match=message):
    inputs.inputs_from_gin()
  with pytest.raises(ConfigError, match=message):
    launch.build(ExperimentConfig).validate(num_devices=1)
