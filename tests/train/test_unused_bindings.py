"""gin bindings the run never used (a configurable it does not call) are named in a warning."""

import glob
import logging
import os

import gin
import pytest

from jaxrec import gin_usage, launch
from jaxrec.errors import ConfigError
from jaxrec.train import config as config_lib, loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.gin")))
assert len(CONFIGS) >= 6, CONFIGS   # an empty parameter set would skip, not fail


def _built(files, bindings):
  launch.parse_gin(files, bindings)
  config = launch.build(config_lib.ExperimentConfig)
  config.dense_tx(), config.sparse_tx()
  return config


def test_a_binding_of_an_optimizer_the_run_does_not_use_is_named_with_its_origin(tmp_path):
  """`RowWiseAdagrad.lr=-0.1` on an SGD config trained as if it were not there, silently."""
  extra = tmp_path / "extra.gin"
  extra.write_text("# unused by a DLRM run\n\nDeepFM.deep_mlp = (8,)\nSGD.lr = 0.5\n")
  _built([os.path.join(ROOT, "configs", "dlrm_synthetic.gin"), str(extra)],
         ["RowWiseAdagrad.lr=-0.1", "train/SGD.lr=2.0", "unused_macro = 3"])
  assert gin_usage.unused() == [f"DeepFM.deep_mlp ({extra}:3)",
                                "RowWiseAdagrad.lr (--gin_bindings)",
                                "train/SGD.lr (--gin_bindings)",
                                "%unused_macro (--gin_bindings)"]
  assert "\n" not in gin_usage.warning()


def test_configurables_a_run_skips_by_design_are_not_reported():
  """A run that only evaluates never calls `make_train_iterator`: its bindings (the same
  command as the training run's) were reported as typos."""
  _built([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")],
         ["make_train_iterator.shuffle=False", "RowWiseAdagrad.lr=0.1"])
  assert gin_usage.unused() == ["make_train_iterator.shuffle (--gin_bindings)",
                                "RowWiseAdagrad.lr (--gin_bindings)"]
  assert gin_usage.unused(not_called=("make_train_iterator",)) == [
      "RowWiseAdagrad.lr (--gin_bindings)"]


def test_an_unscoped_binding_used_by_a_scoped_call_is_used_unless_the_scope_overrides_it(
    tmp_path):
  """gin applies `uniform_tables.dim` to a call in scope `emb/` too: it was reported as
  unused."""
  scoped = tmp_path / "scoped.gin"
  scoped.write_text("ExperimentConfig.embedding = @emb/uniform_tables()\n"
                    "emb/uniform_tables.num_tables = 2\nemb/uniform_tables.rows = 10\n"
                    "uniform_tables.dim = 4\nuniform_tables.prefix = 'u'\n"
                    "emb/uniform_tables.prefix = 'e'\n"
                    "ExperimentConfig.model = @build_model()\nbuild_model.name = 'dlrm'\n")
  config = _built([str(scoped)], [])
  assert [t.name for t in config.tables] == ["e0", "e1"] and config.tables[0].dim == 4
  assert gin_usage.unused() == [f"uniform_tables.prefix ({scoped}:5)"]


@pytest.mark.parametrize("name", CONFIGS)
def test_the_shipped_configs_use_every_binding(name):
  """(The data sources and the checkpointer, which the loop builds, are checked by the run
  test below.)"""
  path = os.path.join(ROOT, "configs", name)
  _built([path], ["m = 64", "ExperimentConfig.batch_size = %m", "x/RowWiseAdagrad.lr = 0.5"])
  assert gin_usage.unused() == ["x/RowWiseAdagrad.lr (--gin_bindings)"]
  # gin_usage reads gin's own (private) tables: they hold what its public config strings
  # write (a gin release that moved them fails here)
  bound, operative = gin_usage._tables()   # pylint: disable=protected-access
  assert _parsed(gin.config_str()) == bound
  written = _parsed(gin.operative_config_str())
  assert written and all(params <= operative.get(key, set()) for key, params in written.items())


def _parsed(config_text):
  """`{(scope, full selector): {parameter, ...}}` of a gin config string."""
  from gin import config_parser  # pylint: disable=import-outside-toplevel
  # pylint: disable=protected-access
  out = {}
  for statement in config_parser.ConfigParser(config_text, gin_usage._Placeholders()):
    if isinstance(statement, config_parser.BindingStatement):
      scope, selector, arg = gin_usage._key(statement)
      out.setdefault((scope, selector), set()).add(arg)
  return out


@pytest.mark.slow   # 25 s on 2 busy cores: a whole (1-step) run, then an evaluate-only one
def test_a_run_warns_once_about_its_unused_bindings(tmp_path, caplog, monkeypatch):
  """... in its log, and under scripts/launch.py to the supervisor (its stderr); a run
  that only evaluates (already at --num_steps) warns the same way."""
  bindings = ["ExperimentConfig.batch_size=64", "ExperimentConfig.eval_batch_size=512",
              "ExperimentConfig.num_eval_examples=512", "DLRM.bottom_mlp=(16,)",
              "DLRM.top_mlp=(16,1)", "RowWiseAdagrad.lr=-0.1"]
  options = config_lib.RunOptions(num_steps=1, mesh="data=8", plan="dp", progress=False)
  for evaluates_only in (False, True):
    reported = []
    monkeypatch.setattr(loop.elastic, "report_warning", reported.append)
    launch.parse_gin(["configs/dlrm_synthetic.gin"], bindings)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxrec"):
      result = loop.train_and_evaluate(config_lib.ExperimentConfig(), options,
                                       str(tmp_path / "w"))
    assert ("loss" not in result) == evaluates_only, result
    lines = [r.getMessage() for r in caplog.records if "no configurable" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(": RowWiseAdagrad.lr (--gin_bindings)")
    assert reported == lines


def test_a_macro_used_but_never_bound_is_one_line_naming_where_it_is_used(tmp_path):
  """gin's error was a ValueError traceback that dumped the whole config."""
  extra = tmp_path / "extra.gin"
  extra.write_text("# the tables\nExperimentConfig.embedding = %tabels\n")
  with pytest.raises(ConfigError) as e:
    launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin"), str(extra)], [])
  assert str(e.value) == (f"--gin_file: {extra}:2: %tabels is used but never bound; bind it "
                          "(e.g. `tabels = ...` in a gin file or --gin_bindings=\"tabels=...\") "
                          "or fix the name")
  with pytest.raises(ConfigError, match="^--gin_bindings: %x is used but never bound"):
    launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")],
                     ["DLRM.top_mlp = %x"])


def test_a_bad_value_names_where_its_binding_was_written(tmp_path):
  """`RowWiseAdagrad.lr = -0.1` on line 3 of a file said only 'RowWiseAdagrad.lr must be a
  number >= 0', the same as from --gin_bindings; a binding after an `include` was placed at
  the included file's line for that parameter."""
  bad = tmp_path / "bad.gin"
  bad.write_text(f"include '{ROOT}/configs/dlrm_synthetic.gin'\n"
                 "ExperimentConfig.sparse_optimizer = @RowWiseAdagrad()\n"
                 "RowWiseAdagrad.lr = -0.1\n")
  for bindings, where in (([], f"--gin_file: {bad}:3"), (["RowWiseAdagrad.lr=-1.0"],
                                                         "--gin_bindings")):
    with pytest.raises(ConfigError) as e:
      _built([str(bad)], bindings)
    assert launch.user_message(e.value).startswith(
        f"{where}: RowWiseAdagrad.lr must be a number >= 0"), launch.user_message(e.value)
  with open(bad, "a") as f:
    f.write("DLRM.top_mlp = (64, 2)\n")
  launch.parse_gin([str(bad)], [])
  assert gin_usage.bound_at("DLRM.top_mlp") == f"{bad}:4"   # not the include's line
  line = gin_usage.bound_at("DLRM.bottom_mlp")
  assert line.startswith(f"{ROOT}/configs/dlrm_synthetic.gin:")
  assert gin_usage.locate("DLRM.bottom_mlp must be ...") == (
      f"--gin_file: {line}: DLRM.bottom_mlp must be ...")
  assert gin_usage.locate("DCN.cross_layers must be ...") == "DCN.cross_layers must be ..."
  assert gin_usage.locate("table 't0': rows must be ...") == "table 't0': rows must be ..."


def test_a_value_bound_in_a_scope_too_is_not_placed_at_the_unscoped_line(tmp_path):
  """`m/DLRM.top_mlp = (128, 64, 2)` was reported at dlrm_synthetic.gin's valid unscoped
  `DLRM.top_mlp` line (the check names the parameter without its scope)."""
  scoped = tmp_path / "scoped.gin"
  scoped.write_text(f"include '{ROOT}/configs/dlrm_synthetic.gin'\n"
                    "ExperimentConfig.model = @m/build_model()\n"
                    "m/DLRM.top_mlp = (128, 64, 2)\n")
  launch.parse_gin([str(scoped)], [])
  assert gin_usage.bound_at("m/DLRM.top_mlp") == f"{scoped}:3"
  assert gin_usage.bound_at("DLRM.top_mlp") is None
  assert gin_usage.locate("DLRM.top_mlp = (128, 64, 2) must end in 1 unit") == (
      "DLRM.top_mlp = (128, 64, 2) must end in 1 unit")


def test_a_binding_a_flag_overrides_is_not_placed_at_the_files_line():
  """`--train_data` binds `ExperimentConfig.train_data` over the config's line: an error
  about the value must not name that line, which no longer holds it."""
  config = os.path.join(ROOT, "configs", "dlrm_synthetic.gin")
  launch.parse_gin([config], [])
  assert gin_usage.bound_at("ExperimentConfig.train_data").startswith(config)
  launch.parse_gin([config], [], overrides={"ExperimentConfig.train_data": "/d.tsv"})
  assert gin_usage.bound_at("ExperimentConfig.train_data") is None
  assert gin_usage.bound_at("ExperimentConfig.eval_data").startswith(config)
