"""A run resumed with another gin config than the one that trained its checkpoint: it said
nothing, and `W/config.gin` claimed to rerun steps it never trained."""

import dataclasses
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
      "SGD.lr: (unbound) -> 1", "big/SGD.lr: 0.3 -> 0.5"]


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
