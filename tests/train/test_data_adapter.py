"""The trainer's data builders (`data_adapter`): what gin may bind and what it may not."""

import pytest

from jaxrec import launch
from jaxrec.errors import ConfigError, DataPathError
from jaxrec.train import config as config_lib, data_adapter


@pytest.mark.parametrize("binding", [
    "make_eval_batches.synthetic_examples=100",   # ExperimentConfig.num_eval_examples
    "make_eval_batches.bad_rows='skip'",          # --bad_rows
    "make_eval_batches.seed=7",                   # --seed
    "make_train_iterator.bad_rows='skip'",
    "make_train_iterator.num_dense=3",            # ExperimentConfig.num_dense
    "make_train_iterator.source='x.tsv'",         # --train_data
    "open_source.seed=7",
    "open_source.bad_rows='skip'",
    "open_source.split=0",
    "CheckpointManager.max_to_keep=5",             # --keep_checkpoints
    "CheckpointManager.save_every=10",             # --checkpoint_every
])
def test_bindings_the_trainer_overrides_are_refused(binding):
  """The trainer passes these itself: a binding of them was silently ignored."""
  with pytest.raises(ConfigError, match=rf"--gin_bindings: '{binding}'.*denylisted"):
    launch.parse_gin(["configs/dlrm_synthetic.gin"], [binding])


def test_refused_binding_says_where_to_set_it(tmp_path):
  with pytest.raises(ConfigError, match=r"denylisted kwarg 'seed'.*\(the trainer passes it; "
                     r"set it with --seed\)$"):
    launch.parse_gin(["configs/dlrm_synthetic.gin"], ["make_eval_batches.seed=7"])
  path = tmp_path / "x.gin"
  path.write_text("include 'configs/dlrm_synthetic.gin'\n"
                  "make_eval_batches.synthetic_examples = 5\n")
  with pytest.raises(ConfigError, match=r"set it with ExperimentConfig.num_eval_examples\)$"):
    launch.parse_gin([str(path)], [])
  with pytest.raises(ConfigError, match=r"set it with --keep_checkpoints\)$"):
    launch.parse_gin(["configs/dlrm_synthetic.gin"], ["CheckpointManager.max_to_keep=5"])


def test_data_bindings_that_apply():
  launch.parse_gin(["configs/dlrm_synthetic.gin"],
                   ["make_eval_batches.num_examples=100", "make_train_iterator.shuffle=False",
                    "ExperimentConfig.num_eval_examples=300", "open_source.verify_checksums=False"])
  config, options = config_lib.ExperimentConfig(), config_lib.RunOptions(seed=3)
  ev = data_adapter.eval_data(config, options)
  assert ev.num_examples == 100 and ev.source.seed == 3
  assert data_adapter.train_iterator(config, options).get_state()["shuffle"] is False


def test_tsv_column_count_error_names_the_binding(tmp_path):
  """A config of 8 features on TSV data: the error says how to read 8-column data."""
  path = tmp_path / "eval.tsv"
  path.write_text("\t".join(["1"] * 22) + "\n")
  launch.parse_gin(["configs/dlrm_synthetic.gin"], [])
  options = config_lib.RunOptions(eval_data=str(path))
  with pytest.raises(ConfigError, match=r"read as 26 categorical columns \(open_source."
                     r"num_categorical, its default: not bound\) but 8 sparse features .*"
                     "bind open_source.num_categorical=8"):
    data_adapter.eval_data(config_lib.ExperimentConfig(), options)
  launch.parse_gin(["configs/dlrm_synthetic.gin"], ["open_source.num_categorical=8"])
  assert data_adapter.eval_data(config_lib.ExperimentConfig(), options).num_examples == 1
  # bound wrong: where (it said only 'bound')
  config = tmp_path / "c.gin"
  config.write_text("include 'configs/dlrm_synthetic.gin'\nopen_source.num_categorical = 26\n")
  launch.parse_gin([str(config)], [])
  with pytest.raises(ConfigError, match=rf"\(open_source.num_categorical, bound at {config}:2\)"):
    data_adapter.eval_data(config_lib.ExperimentConfig(), options)
  launch.parse_gin(["configs/dlrm_synthetic.gin"], ["open_source.num_categorical=26"])
  with pytest.raises(ConfigError, match=r"\(open_source.num_categorical, bound by --gin_bindings"):
    data_adapter.eval_data(config_lib.ExperimentConfig(), options)


class _Source:
  def __init__(self, counts):
    self.counts = counts

  def bad_row_counts(self):
    return self.counts


def test_rows_dropped_at_preprocessing_are_said_under_bad_rows_error(caplog):
  """Binary data preprocessed with --bad_rows=skip: a run under --bad_rows=error cannot
  stop on the dropped rows, so it says they were dropped (once, at the start)."""
  train, ev = _Source({"a.tsv": 2, "b.tsv": 0}), _Source({"e.tsv": 1})
  with caplog.at_level("WARNING", logger="jaxrec"):
    data_adapter.warn_preprocessed_skips("skip", train, ev)   # counted in metrics.jsonl
    data_adapter.warn_preprocessed_skips("error", _Source({}), _Source({"c.tsv": 0}))
    assert not caplog.records
    data_adapter.warn_preprocessed_skips("error", train, ev)
  assert [r.getMessage() for r in caplog.records] == [
      "--bad_rows=error, but the data were preprocessed with --bad_rows=skip: 3 malformed "
      "rows dropped then (a.tsv: 2, e.tsv: 1); they are also in metrics.jsonl "
      "('bad_rows')"]


def test_a_data_path_naming_no_file_says_which_flag_or_binding(tmp_path):
  """`error: /x: no such file or directory` named only the path, not whether --train_data,
  --eval_data or the gin config's ExperimentConfig.eval_data gave it."""
  missing = str(tmp_path / "day_9.tsv")
  launch.parse_gin(["configs/dlrm_synthetic.gin"], [])
  config = config_lib.ExperimentConfig()
  with pytest.raises(DataPathError) as e:
    data_adapter.train_iterator(config, config_lib.RunOptions(train_data=missing))
  assert str(e.value) == f"--train_data: {missing}: no such file or directory"
  with pytest.raises(DataPathError) as e:
    data_adapter.eval_data(config, config_lib.RunOptions(eval_data=str(tmp_path / "*.tsv")))
  assert str(e.value) == f"--eval_data: {tmp_path / '*.tsv'}: no files match this pattern"
  launch.parse_gin(["configs/dlrm_synthetic.gin"], [f"ExperimentConfig.eval_data='{missing}'"])
  with pytest.raises(DataPathError) as e:
    data_adapter.eval_data(config_lib.ExperimentConfig(), config_lib.RunOptions())
  assert str(e.value) == f"ExperimentConfig.eval_data: {missing}: no such file or directory"


@pytest.mark.parametrize("typo", ["synthetc", "Synthetic", "syntetic"])
def test_a_misspelled_synthetic_is_suggested(typo):
  """`--train_data=synthetc` said only `synthetc: no such file or directory`."""
  launch.parse_gin(["configs/dlrm_synthetic.gin"], [])
  with pytest.raises(DataPathError) as e:
    data_adapter.train_iterator(config_lib.ExperimentConfig(),
                                config_lib.RunOptions(train_data=typo))
  assert str(e.value) == (f"--train_data: {typo}: no such file or directory "
                          "(did you mean 'synthetic'?)")
  for path in ("day_0.tsv", "synthetic.tsv", "data/synthetic"):   # file names: no hint
    with pytest.raises(DataPathError) as e:
      data_adapter.train_iterator(config_lib.ExperimentConfig(),
                                  config_lib.RunOptions(train_data=path))
    assert str(e.value) == f"--train_data: {path}: no such file or directory"


def test_a_bound_num_eval_examples_with_a_file_eval_set_is_said_to_do_nothing(tmp_path):
  """`ExperimentConfig.num_eval_examples=1000` with `--eval_data=FILE` evaluated the whole
  file without a word: the binding sizes synthetic eval sets only."""
  launch.parse_gin(["configs/dcnv2_synthetic.gin"], ["ExperimentConfig.num_eval_examples=1000"])
  config = config_lib.ExperimentConfig()
  options = config_lib.RunOptions(eval_data="day_1.tsv")
  assert data_adapter.eval_count_warning(config, options) == (
      "warning: ExperimentConfig.num_eval_examples = 1000 (--gin_bindings) has no effect: it "
      "sizes a synthetic eval set, and the eval data day_1.tsv (--eval_data) is read whole")
  assert data_adapter.eval_count_warning(config, config_lib.RunOptions()) is None   # synthetic
  launch.parse_gin(["configs/dlrm_criteo.gin"], [])   # not bound: nothing to say
  assert data_adapter.eval_count_warning(config_lib.ExperimentConfig(), options) is None


def test_an_eval_set_among_the_training_files_is_warned_about(tmp_path):
  """`--eval_data` equal to `--train_data`, or a file inside its directory, was accepted
  without a word: its metrics measured the fit on the training examples."""
  import types  # pylint: disable=import-outside-toplevel
  train = tmp_path / "train"
  train.mkdir()
  for name in ("day_0.tsv", "day_1.tsv"):
    (train / name).write_text("1\n")
  (tmp_path / "held_out.tsv").write_text("1\n")
  config = types.SimpleNamespace(train_data=str(train), eval_data="synthetic")

  def warning(eval_data):
    return data_adapter.eval_in_train_warning(
        config, config_lib.RunOptions(eval_data=eval_data))
  assert warning(str(train / "day_1.tsv")) == (
      f"warning: the eval data {train}/day_1.tsv (--eval_data) shares 1 file(s) with the "
      f"training data {train} (ExperimentConfig.train_data), e.g. {train}/day_1.tsv: its "
      "eval metrics measure the fit on examples the model trains on, not on held-out ones")
  assert "shares 2 file(s)" in warning(str(train / "*.tsv"))
  assert warning(str(tmp_path / "held_out.tsv")) is None
  assert warning("synthetic") is None and warning(str(tmp_path / "missing.tsv")) is None


def test_evaluating_a_checkpoint_with_another_seed_says_the_eval_set_differs():
  """A run that only evaluates draws the synthetic eval set from its --seed: without the
  training run's --seed=3 a walkthrough's re-evaluation scored other examples (AUC 0.6174
  against the 0.6461 of the eval line of that very checkpoint), without a word."""
  import types  # pylint: disable=import-outside-toplevel
  config = types.SimpleNamespace(eval_data="synthetic")

  def warning(seed, trained, eval_data=None):
    return data_adapter.eval_seed_warning(
        config, config_lib.RunOptions(seed=seed, eval_data=eval_data), {"seed": trained})
  assert warning(0, 3) == (
      "warning: --seed=0 draws another synthetic eval set than the --seed=3 that trained "
      "this checkpoint and made its eval lines: pass --seed=3 to evaluate the same examples")
  assert warning(3, 3) is None and warning(0, None) is None
  assert warning(0, 3, eval_data="day_1.tsv") is None   # a file: the same examples
