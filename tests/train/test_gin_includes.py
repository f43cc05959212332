"""Gin files composed of others (`include`), and data paths reached through macros: what a
run reads, records in `W/config.gin` and says when something is wrong names the file and
line it came from."""

import os
import sys

import gin
import pytest

from jaxrec import gin_usage, launch
from jaxrec.errors import ConfigError
from jaxrec.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNTHETIC = os.path.join(ROOT, "configs", "dlrm_synthetic.gin")


def _parse_error(files, bindings=()) -> str:
  with pytest.raises(ConfigError) as e:
    launch.parse_gin([str(f) for f in files], list(bindings))
  return str(e.value)


def test_a_syntax_error_in_an_included_file_names_that_file(tmp_path):
  """It was the including file's path with the included file's line number (a line the
  outer file may not have), and the BOM and arithmetic hints were lost."""
  inner, outer = tmp_path / "inner.gin", tmp_path / "outer.gin"
  outer.write_text(f"include '{SYNTHETIC}'\n# x\ninclude '{inner}'\n")
  inner.write_text("# a\n# b\nuniform_tables.rows = 2**10\n")
  assert _parse_error([outer]) == (
      f"--gin_file: {inner}:3: gin reads literal values only, not arithmetic such as 2**10: "
      f"write 1024 (included by {outer})")
  inner.write_bytes(b"\xef\xbb\xbfExperimentConfig.batch_size = 64\n")
  assert _parse_error([outer]).startswith(f"--gin_file: {inner}:1: ")
  assert "byte-order mark" in _parse_error([outer])


def test_a_missing_include_is_named_with_a_comment_and_when_nested(tmp_path):
  """A trailing comment made it 'cannot read OUTER' (or gin's TypeError for a name whose
  directory exists here); one level down, the name ran into the outer include's."""
  outer = tmp_path / "outer.gin"
  outer.write_text(f"include '{SYNTHETIC}'\ninclude 'nope/base.gin'  # my base\n")
  assert _parse_error([outer]).startswith(
      f"--gin_file: {outer}:2: include 'nope/base.gin': no such file (a relative path")
  outer.write_text("include 'configs/nope.gin'  # my base\n")
  assert "include 'configs/nope.gin': no such file" in _parse_error([outer])
  mid, top = tmp_path / "mid.gin", tmp_path / "top.gin"
  mid.write_text("# mid\n\ninclude 'nope/deeper.gin'\n")
  top.write_text(f"# top\ninclude '{mid}'\n")
  message = _parse_error([top])
  assert message.startswith(f"--gin_file: {mid}:3: include 'nope/deeper.gin': no such file")
  assert message.endswith(f" (included at {top}:2)"), message


def test_an_include_cycle_is_one_short_line(tmp_path):
  """A file including itself (or A and B each other) was a ~20 KB 'maximum recursion depth
  exceeded' line repeating the chain."""
  a, b = tmp_path / "a.gin", tmp_path / "b.gin"
  a.write_text(f"include '{b}'\n")
  b.write_text(f"# b\ninclude '{a}'\n")
  assert _parse_error([a]) == (f"--gin_file: {a}:1 includes '{b}', {b}:2 includes '{a}': "
                               "an include cycle (a file includes itself); remove one of them")
  a.write_text(f"include '{a}'\n")
  assert _parse_error([a]) == (f"--gin_file: {a}:1 includes '{a}': an include cycle (a file "
                               "includes itself); remove one of them")


def test_an_include_found_in_a_python_package_is_read(tmp_path, monkeypatch):
  """gin also finds `include 'pkg/base.gin'` in a package on sys.path; recording where the
  bindings came from opened the name in the current directory: a FileNotFoundError."""
  (tmp_path / "mycfg").mkdir()
  (tmp_path / "mycfg" / "__init__.py").write_text("")
  (tmp_path / "mycfg" / "base.gin").write_text(open(SYNTHETIC).read())
  user = tmp_path / "user.gin"
  user.write_text("include 'mycfg/base.gin'\nExperimentConfig.num_eval_examples = 1024\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.chdir(ROOT)
  sys.modules.pop("mycfg", None)
  launch.parse_gin([str(user)], [])
  assert gin.query_parameter("ExperimentConfig.num_eval_examples") == 1024
  assert str(tmp_path / "mycfg" / "base.gin") in gin_usage.files_read()


def test_a_file_included_by_gin_bindings_is_recorded_as_its_files(tmp_path):
  """`--gin_bindings="include 'x.gin'"`: a bad value there was placed at the line of the
  --gin_file's valid binding, its unused bindings were not reported, and it was not among
  the files an output must not overwrite."""
  inc = tmp_path / "inc.gin"
  inc.write_text("# included\nAdam.lr = 0.3\nExperimentConfig.batch_size = 64\n")
  launch.parse_gin([SYNTHETIC], [f"include '{inc}'"])
  assert str(inc) in gin_usage.files_read()
  assert gin_usage.bound_at("ExperimentConfig.batch_size") == f"{inc}:3"
  assert gin_usage.bound_at("Adam.lr") == f"{inc}:2"


@pytest.mark.parametrize("macros", [["DATA = 'data/day.tsv'"],
                                    ["DATA = %D2", "D2 = 'data/day.tsv'"]])
def test_a_data_path_bound_through_a_macro_is_recorded_absolute(tmp_path, monkeypatch,
                                                                macros):
  """`ExperimentConfig.train_data = %DATA` stayed relative in W/config.gin: a rerun from
  another directory trained on another file of that name, without a word."""
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "day.tsv").write_text("")
  monkeypatch.chdir(tmp_path)
  launch.parse_gin([SYNTHETIC], [*macros, "ExperimentConfig.train_data = %DATA"])
  config_lib.absolute_data_paths()
  assert gin.query_parameter("%DATA" if len(macros) == 1 else "%D2") == str(
      tmp_path / "data" / "day.tsv")
  assert "ExperimentConfig.train_data = %DATA" in gin.config_str()   # the macro still used


def test_a_data_path_starting_with_a_tilde_is_expanded(tmp_path, monkeypatch):
  """A shell expands `--train_data=~/x.tsv`; gin's string `'~/x.tsv'` was read as a
  directory named `~`: 'no such file or directory' for a file that exists."""
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "day.tsv").write_text("")
  launch.parse_gin([SYNTHETIC], ["ExperimentConfig.eval_data = '~/day.tsv'"])
  config_lib.absolute_data_paths()
  assert gin.query_parameter("ExperimentConfig.eval_data") == str(tmp_path / "day.tsv")



def test_a_relative_vocabulary_is_recorded_absolute(tmp_path, monkeypatch):
  """`open_source.vocab = 'v'` stayed relative in W/config.gin: a rerun of it from another
  directory read no vocabulary there (or another one of that name)."""
  (tmp_path / "v").mkdir()
  monkeypatch.chdir(tmp_path)
  launch.parse_gin([SYNTHETIC], ["open_source.vocab = 'v'"])
  config_lib.absolute_data_paths()
  assert gin.query_parameter("open_source.vocab") == str(tmp_path / "v")
  launch.parse_gin([SYNTHETIC], ["open_source.vocab = None"])
  config_lib.absolute_data_paths()
  assert gin.query_parameter("open_source.vocab") is None

@pytest.mark.parametrize("lines, message", [
    (["ExperimentConfig.table_optimizers = {'t0': @big/SGD()}", "big/SGD.lr = -1.0"],
     "{f}:3: big/SGD.lr must be a number >= 0, got -1.0"),
    (["ExperimentConfig.table_optimizers = {'t0': @big/sparse_optimizer()}",
      "big/sparse_optimizer.name = 'adam'", "big/sparse_optimizer.b1 = 1.5"],
     "{f}:4: big/sparse_optimizer.b1 must be a number in [0, 1), got 1.5 (name='adam')"),
    (["SGD.lr = -2.0"], "{f}:2: SGD.lr must be a number >= 0, got -2.0"),
    # an unscoped binding a scoped call inherits: it was `outer/lr_schedule.value`, unwritten
    (["SGD.lr = @outer/lr_schedule()", "outer/lr_schedule.name = 'linear'",
      "outer/lr_schedule.init_value = 0.9", "outer/lr_schedule.end_value = 0.1",
      "outer/lr_schedule.transition_steps = 4", "lr_schedule.value = 7.0"],
     "{f}:7: lr_schedule.value: the 'linear' schedule takes no such argument (it takes: "
     "init_value, end_value, transition_steps, transition_begin)")])
def test_a_bad_hyperparameter_in_a_scope_is_named_with_its_scope_and_line(tmp_path, lines,
                                                                           message):
  """`big/SGD.lr = -1.0` was `SGD.lr must be ...`: no scope and no FILE:LINE, while the
  file's only unscoped `SGD.lr` (from the included config) was valid."""
  path = tmp_path / "scoped.gin"
  path.write_text("\n".join([f"include '{SYNTHETIC}'", *lines]) + "\n")
  launch.parse_gin([str(path)], [])
  with pytest.raises(ConfigError) as e:
    launch.build(config_lib.ExperimentConfig)
  assert launch.user_message(e.value) == "--gin_file: " + message.format(f=path)


def test_a_required_parameter_bound_under_a_mistyped_scope_is_pointed_at(tmp_path):
  """`sprse/lr_schedule.name` for a `@sparse/lr_schedule()`: gin's 'Required bindings for
  `lr_schedule` not provided' named neither the call's scope nor the binding's line."""
  path = tmp_path / "typo.gin"
  path.write_text(f"include '{SYNTHETIC}'\nSGD.lr = @sparse/lr_schedule()\n"
                  "sprse/lr_schedule.name = 'constant'\nsparse/lr_schedule.value = 0.5\n")
  launch.parse_gin([str(path)], [])
  with pytest.raises(ConfigError) as e:
    launch.build(config_lib.ExperimentConfig)
  assert str(e.value) == (
      "--gin_file: Required bindings for `lr_schedule` not provided in config: ['name'] "
      f"(bound only in another scope: sprse/lr_schedule.name at {path}:3; the config calls "
      "@sparse/lr_schedule())")


def test_a_bad_value_through_a_macro_names_the_binding_that_uses_it(tmp_path):
  """`user/TableSpec.dim = %DIM` with `DIM = 0`: the error named the table only."""
  path = tmp_path / "m.gin"
  path.write_text(f"include '{SYNTHETIC}'\nExperimentConfig.embedding = "
                  "((@user/TableSpec(),), (@u/FeatureSpec(),))\nuser/TableSpec.name = 't_user'\n"
                  "user/TableSpec.rows = 100\nuser/TableSpec.dim = %DIM\n"
                  "u/FeatureSpec.name = 'user_id'\nu/FeatureSpec.table = 't_user'\n")
  launch.parse_gin([str(path)], ["DIM = 0"])
  with pytest.raises(ConfigError) as e:
    launch.build(config_lib.ExperimentConfig)
  assert launch.user_message(e.value) == (
      f"--gin_file: {path}:5: user/TableSpec.dim: table 't_user': dim must be a positive "
      "integer, got 0")


def test_a_gin_file_that_is_a_pipe_is_named_as_such(tmp_path):
  """`--gin_file=<(cat x.gin)` said "no such file" of the /dev/fd path it was given."""
  fifo = tmp_path / "config.pipe"
  os.mkfifo(fifo)
  with pytest.raises(ConfigError, match=r"--gin_file: cannot read '.*config.pipe': is a pipe "
                     r"or another kind of non-regular file: give a file"):
    launch.parse_gin([str(fifo)], [])
  with pytest.raises(ConfigError, match=r"cannot read '.*nope.gin': no such file$"):
    launch.parse_gin([str(tmp_path / "nope.gin")], [])
