"""A run resumed with another gin config than the one that trained its checkpoint: it said
nothing, and `W/config.gin` claimed to rerun steps it never trained."""

import dataclasses
import json
import logging
import os

from jaxrec.train import config as config_lib, config_changes, loop
from tests.train.test_mesh_choice import CONFIG   # a small DLRM, batch_size 64


def test_bindings_join_values_over_lines_and_skip_comments():
  text = ("# Macros:\nDATA = '/x.tsv'\n\n# Parameters for DLRM:\n# ====\nDLRM.top_mlp = [\n"
          "    64,\n    1,\n]\nbig/SGD.lr = 0.3\n")
  assert config_changes.bindings(text) == {"DATA": "'/x.tsv'", "DLRM.top_mlp": "[ 64, 1, ]",
                                           "big/SGD.lr": "0.3"}
  assert config_changes.changed(text, text.replace("0.3", "0.5") + "SGD.lr = 1\n") == [
      "big/SGD.lr: 0.3 -> 0.5", "SGD: (not called) -> called (lr = 1)"]


def test_a_model_field_older_configs_recorded_is_no_change():
  """Models' flax `name` field is out of their gin bindings now; older checkpoints'
  configs recorded `DLRM.name = None`, which is not a change at a resume."""
  assert config_changes.changed("DLRM.name = None\nDLRM.dim = 8\n", "DLRM.dim = 8\n") == []


def test_a_configurable_called_on_one_side_only_is_one_entry():
  """Switching `sparse_optimizer` from SGD to FTRL listed each of FTRL's five defaults as
  a change (`FTRL.beta: (unbound) -> 1.0; ...`), pushing the other changes out of view."""
  before = "ExperimentConfig.sparse_optimizer = @SGD()\nSGD.lr = 0.1\nDLRM.dim = 8\n"
  after = ("ExperimentConfig.sparse_optimizer = @FTRL()\nFTRL.beta = 1.0\nFTRL.l1 = 0.0\n"
           "FTRL.lr = 0.1\nFTRL.l2 = 0.0\nFTRL.initial_accumulator = 0.1\nDLRM.dim = 16\n")
  assert config_changes.changed(before, after) == [
      "DLRM.dim: 8 -> 16", "ExperimentConfig.sparse_optimizer: @SGD() -> @FTRL()",
      "FTRL: (not called) -> called (beta = 1.0, initial_accumulator = 0.1, l1 = 0.0, "
      "l2 = 0.0, +1 more)", "SGD: called (lr = 0.1) -> (not called)"]


def test_a_resume_with_another_config_says_so_and_keeps_the_earlier_one(tmp_path, caplog):
  def run(config, steps):
    options = config_lib.RunOptions(num_steps=steps, mesh="data=8", plan="dp", progress=False,
                                    checkpoint_every=2)
    with caplog.at_level(logging.WARNING):
      loop.train_and_evaluate(config, options, str(tmp_path))

  run(CONFIG, 2)
  run(CONFIG, 4)   # the same config: nothing said, nothing kept
  assert "differs" not in caplog.text and not (tmp_path / "config-until-2.gin").exists()
  header = open(tmp_path / "config.gin").read().split("\n\n")[0]
  assert "resumed" not in header and "other configs" not in header
  run(dataclasses.replace(CONFIG, num_eval_examples=128), 6)
  assert ("warning: this run resumes at step 4 with a gin config that differs from the one "
          "that trained it: ExperimentConfig.num_eval_examples: ") in caplog.text, caplog.text
  assert "W/config-until-4.gin keeps the earlier one" in caplog.text
  kept = open(tmp_path / "config-until-4.gin").read()
  assert kept.startswith("# The operative config that trained steps 1 to 4 of this run.")
  assert (f"ExperimentConfig.num_eval_examples = {CONFIG.num_eval_examples}\n" in kept)
  header = open(tmp_path / "config.gin").read().split("\n\n")[0]
  assert header.endswith("# It resumed at step 4 with 1 binding(s) other than those of the "
                         "steps before (their config: config-until-4.gin): this file alone "
                         "does not rerun them."), header
  assert "Rerun it with" not in header
  caplog.clear()
  run(dataclasses.replace(CONFIG, num_eval_examples=128), 8)   # unchanged since: still said
  assert "differs" not in caplog.text
  assert "# Steps 1 to 4 were trained with other configs (config-until-4.gin" in open(
      tmp_path / "config.gin").read().split("\n\n")[0]
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith("config")) == [
      "config-until-4.gin", "config.gin"]


def test_a_resume_refused_for_another_model_names_the_changed_bindings(tmp_path):
  """The refusal named flax parameter paths (and only the leaves one side lacked: of
  `deep_mlp` (256, 128, 64) -> (256, 128), layer_3, not layer_2's new shape)."""
  import pytest  # pylint: disable=import-outside-toplevel
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel

  def run(deep_mlp):
    launch.parse_gin(["configs/deepfm_synthetic.gin"], [
        "ExperimentConfig.batch_size=64", "ExperimentConfig.num_eval_examples=128",
        "ExperimentConfig.eval_batch_size=64", f"DeepFM.deep_mlp={deep_mlp}"])
    options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", progress=False)
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))

  run("(32, 16, 8)")
  with pytest.raises(ConfigError, match=r"^'params' in checkpoint .* does not match the model "
                     r"at 4 leaves, e.g. \['params/deep_mlp/layer_3/bias', "
                     r"'params/deep_mlp/layer_3/kernel', 'params/deep_mlp/layer_2/bias'\] .*; "
                     r"bindings changed since that checkpoint: DeepFM.deep_mlp: \(32, 16, 8\) "
                     r"-> \(32, 16\)$"):
    run("(32, 16)")


def test_a_run_on_a_pipe_says_its_config_does_not_rerun_it(tmp_path):
  """`--train_data=<(zcat ...)` is recorded as /dev/fd/63: the header said "Rerun it with
  --gin_file=<this file>", which then read no file."""
  fifo = tmp_path / "pipe"
  os.mkfifo(fifo)
  for path in ("/dev/fd/63", str(fifo)):
    header = config_lib.config_gin_header(config_lib.RunOptions(train_data=path))
    assert f"# It read --train_data={path}, a pipe that is gone: to rerun it, bind " in header
    assert "Rerun it with" not in header
  assert "Rerun it with" in config_lib.config_gin_header(
      config_lib.RunOptions(train_data=str(tmp_path)))


def test_a_resume_changing_ftrls_rate_or_initial_accumulator_is_refused(tmp_path):
  """FTRL's state (z, n) holds the rows under its rate and tells rows never updated by
  `n == initial_accumulator`: resumed with 0.5 for 0.1, every updated row jumped 5x; with
  another initial accumulator, rows first updated after the resume restarted from 0."""
  import pytest  # pylint: disable=import-outside-toplevel
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel

  def run(steps, *bindings):
    launch.parse_gin(["configs/dlrm_synthetic.gin"], [
        "ExperimentConfig.batch_size=64", "ExperimentConfig.num_eval_examples=128",
        "ExperimentConfig.eval_batch_size=64", "ExperimentConfig.sparse_optimizer=@FTRL()",
        *bindings])
    options = config_lib.RunOptions(num_steps=steps, mesh="data=8", plan="dp",
                                    progress=False)
    return loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))

  run(2)
  with pytest.raises(ConfigError, match=r"^table 't0': its FTRL lr is 0.5 in this run but was "
                     r"0.1 when its checkpoint was trained: .* every row it updates jumps"):
    run(4, "FTRL.lr=0.5")
  with pytest.raises(ConfigError, match=r"FTRL initial_accumulator is 0.3 .* was 0.1 .* rows "
                     r"it never updated would restart from 0"):
    run(4, "FTRL.initial_accumulator=0.3")
  assert run(4, "FTRL.l1=0.001")["step"] == 4   # takes effect at each row's next update


def test_a_changed_entry_of_a_table_dict_is_named_alone():
  """`embedding_tables.tables` of 300 tables with one table's init_scale changed logged
  both dicts whole (22 KB on one warning line), after gin's line-continuation `\\`."""
  def config(scale):
    tables = ",\n".join(f"     'tab{i:03d}': (50, 8, 'float32', {scale if i == 7 else 0.01})"
                        for i in range(300))
    return (f"embedding_tables.tables = \\\n    {{{tables[5:]}}}\n"
            "embedding_tables.features = \\\n    [('a', 'tab000'),\n     ('b', 'tab001')]\n")
  assert config_changes.bindings(config(0.01))["embedding_tables.tables"].startswith("{'tab000'")
  assert config_changes.changed(config(0.01), config(0.02)) == [
      "embedding_tables.tables['tab007']: (50, 8, 'float32', 0.01) -> (50, 8, 'float32', 0.02)"]
  swapped = config(0.01).replace("('a', 'tab000'),\n     ('b', 'tab001')",
                                 "('b', 'tab001'),\n     ('a', 'tab000')")
  assert config_changes.changed(config(0.01), swapped) == [   # an order change: whole values
      "embedding_tables.features: [('a', 'tab000'), ('b', 'tab001')] -> "
      "[('b', 'tab001'), ('a', 'tab000')]"]
  assert config_changes.changed("X.t = {'m*': @Adagrad()}\n", "X.t = {'m*': @SGD()}\n") == [
      "X.t: {'m*': @Adagrad()} -> {'m*': @SGD()}"]   # not literals: whole values


def test_a_refusal_for_another_model_names_the_checkpoints_model_too(tmp_path):
  """Switched from DLRM to DCNv2, the refusal listed `build_model.name` and DCNv2's
  bindings but not DLRM's (this run never calls it: it was filtered as data's are)."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  before = ("build_model.name = 'dlrm'\nDLRM.bottom_mlp = (128, 64, 16)\n"
            "DLRM.top_mlp = (128, 64, 1)\nmake_train_iterator.path = 'a.tsv'\n")
  after = "build_model.name = 'dcnv2'\nDCNv2.low_rank = 32\n"
  (tmp_path / "meta").mkdir()
  (tmp_path / "meta" / "metadata").write_text(json.dumps({"gin": before}))
  error = ConfigError("'params' in checkpoint does not match the model")
  error.step_dir = str(tmp_path)
  text = str(config_changes.explained(error, after))
  assert "build_model.name: 'dlrm' -> 'dcnv2'" in text
  assert "DCNv2: (not called) -> called (low_rank = 32)" in text
  assert ("DLRM: called (bottom_mlp = (128, 64, 16), top_mlp = (128, 64, 1)) -> (not called)"
          in text), text
  assert "make_train_iterator" not in text


def test_an_evaluation_reading_values_otherwise_than_training_is_refused():
  import pytest  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  check = config_changes.check_read_as
  none, log = ("open_source.dense_transform = 'none'\n", "open_source.dense_transform = 'log'\n")
  with pytest.raises(ConfigError, match="checkpoint 7 was trained on dense values read with "
                     "open_source.dense_transform = 'none', but this run reads"):
    check({"gin": none}, log, "/d/eval.tsv", 7)
  with pytest.raises(ConfigError, match="= 'log', but this run reads .* = 'none'"):
    check({"gin": "DLRM.dim = 8\n"}, none, "/d/eval.tsv", 7)
  check({"gin": none}, none, "/d/eval.tsv", 7)
  check({"gin": none}, log, "synthetic", 7)   # ignores it
  check({}, log, "/d/eval.tsv", 7)   # nothing recorded
  decimal = "open_source.id_format = 'decimal'\n"   # ids: other rows looked up
  with pytest.raises(ConfigError, match="trained on categorical ids read with "
                     "open_source.id_format = 'decimal', but this run reads its eval data "
                     "with open_source.id_format = 'hex': the model would score ids mapped to "
                     "other rows"):
    check({"gin": decimal}, "", "/d/eval.tsv", 7)
  check({"gin": decimal + none}, none + decimal, "/d/eval.tsv", 7)
  with pytest.raises(ConfigError, match="but this run reads its training data with "
                     r"open_source.dense_transform = 'log': the model would train on inputs of "
                     r"another scale; bind open_source.dense_transform "
                     "= 'none' \\(gin\\) to train on from it"):   # (said "other data")
    check({"gin": none}, log, "/d/train.tsv", 7, trains=True)
