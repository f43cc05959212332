"""The warnings of a run that only evaluates where its flags meant something else."""


from jaxrec.train import config as config_lib, rerun_warnings


def test_untrained_copy_warning_names_num_steps_as_a_total():
  """A daily run on a `--restart_data` copy (no data position) with `--num_steps` at or
  below its step (the day's step count, `300`, on a copy at step 800) trained nothing on
  the new day and exited 0, logging only `already trained to step 800`."""
  def warning(data_state, train_data="day_1.tsv"):
    return rerun_warnings.untrained_copy_warning(
        config_lib.RunOptions(num_steps=300, train_data=train_data), data_state, 800)
  assert warning({}) == (
      "warning: checkpoint 800 holds no data position (a --restart_data copy or an "
      "import, made to train on new data), but --num_steps=300 is at or below its step: nothing of "
      "--train_data=day_1.tsv is trained, the checkpoint is only evaluated. --num_steps is "
      "the total step count, counted from 0 (not the steps to add): to train K steps of it, "
      "pass --num_steps=800+K")
  assert warning({"position": 4096}) is None   # a workdir's own checkpoint: a rerun scores
  assert warning({}, train_data=None) is None   # scoring with a copy: no --train_data given


def test_older_step_warning_says_num_steps_does_not_choose_the_checkpoint(tmp_path):
  """Scoring with early stopping's best step by `--num_steps=400` (the README's rule:
  `--num_steps` at or below the checkpoint's step) evaluated the newest, 480, the `done:`
  line's `step=480` the only sign."""
  for step in (400, 440, 480):
    (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)

  def warning(num_steps, step=480):
    return rerun_warnings.older_step_warning(str(tmp_path),
                                           config_lib.RunOptions(num_steps=num_steps), step)
  assert warning(400) == (
      "warning: --num_steps=400 does not choose the checkpoint: this run evaluates the "
      "newest, step 480. To evaluate step 400, copy it into a workdir of its own: "
      f"scripts/convert_checkpoint.py --checkpoint_dir={tmp_path}/checkpoints --step=400 "
      "--output=W_400/checkpoints --format=checkpoint, then rerun with --workdir=W_400")
  assert warning(1) is None and warning(480) is None and warning(401) is None
  assert warning(400, step=400) is None


def test_other_data_warning_names_restart_data(tmp_path):
  """An early-stopped workdir pointed at the next day's file trained nothing, exit 0, told
  to raise --early_stop_patience (which then refused the data): it names --restart_data."""
  gin = "ExperimentConfig.train_data = '/d/day_00'\nSGD.lr = 0.5\n"
  w = str(tmp_path / "W0")

  def warning(train_data, stopped=True, data_state=None, meta=None):
    return rerun_warnings.other_data_warning(
        w, config_lib.RunOptions(num_steps=1000, train_data=train_data),
        {"position": 122880} if data_state is None else data_state,
        {"gin": gin} if meta is None else meta, 480, stopped)
  assert warning("/d/day_01") == (
      "warning: nothing trains on --train_data=/d/day_01: checkpoint 480 was trained on "
      "/d/day_00 and this run only evaluates it (early stopping stopped it). A workdir's "
      "checkpoints go on only with the data they were trained on: to continue on new data, "
      f"copy the checkpoint with `scripts/convert_checkpoint.py --checkpoint_dir={w}/"
      "checkpoints --output=W2/checkpoints --format=checkpoint --restart_data` and train in "
      "W2 with --num_steps above 480")
  assert "(--num_steps=1000 is at or below its step)" in warning("/d/day_01", stopped=False)
  assert warning("/d/day_00") is None and warning("/d/../d/day_00") is None   # the same data
  assert warning(None) is None                               # scoring: no --train_data
  assert warning("/d/day_01", data_state={}) is None        # a copy: untrained_copy_warning
  assert warning("/d/day_01", meta={}) is None               # nothing recorded
