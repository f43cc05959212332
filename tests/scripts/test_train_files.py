"""scripts/train.py on Criteo TSV files and preprocessed shards; bad rows stop the run."""

import os
import re

import pytest

from jaxrec.data import source as source_lib
from jaxrec.data.synthetic import SyntheticSource, write_tsv
from jaxrec.embedding.specs import uniform_tables
from tests.scripts.in_process import run_script
from tests.scripts.test_train import NO_COMPILE, ROOT, assert_one_line_error, read_metrics, train

SMALL = ["uniform_tables.rows=1000", "DLRM.bottom_mlp=(32,16)", "DLRM.top_mlp=(32,1)",
         "ExperimentConfig.batch_size=128", "ExperimentConfig.eval_batch_size=256"]
FLAGS = ["--gin_file=configs/dlrm_criteo.gin", "--plan=dp", "--log_every=10"] + [
    f"--gin_bindings={b}" for b in SMALL]


def write_data(path, n, start=0):
  tables, features = uniform_tables(num_tables=26, rows=1000)
  layout = source_lib.make_layout(features, {t.name: t.rows for t in tables})
  write_tsv(str(path), SyntheticSource(layout, seed=3), n, start=start)


def test_train_on_tsv_reads_eval_once(tmp_path):
  write_data(tmp_path / "train.tsv", 2000)
  write_data(tmp_path / "eval.tsv", 300, start=5000)
  w = str(tmp_path / "w")
  rel = lambda name: os.path.relpath(tmp_path / name, ROOT)   # train.py runs in ROOT
  train(w, *FLAGS, "--num_steps=30", f"--train_data={rel('train.tsv')}", "--seed=3",
        f"--gin_bindings=ExperimentConfig.eval_data='{rel('eval.tsv')}'")
  evals = [l for l in read_metrics(w) if "eval_auc" in l]
  assert evals and evals[-1]["eval_examples"] == 300     # whole file, once, padding masked
  # W/config.gin named the config's 'synthetic', not the files the flags gave, and then
  # relative paths as typed (a rerun from another directory read no file); no --seed
  text = open(f"{w}/config.gin").read()
  assert text.startswith("# The operative config of a jaxrec run, which had --seed=3 "
                         "--num_steps=30 --bad_rows=error --on_nan=stop.\n")
  recorded = re.sub(r"\\\n\s+", "", text)   # gin wraps lines
  assert f"ExperimentConfig.train_data = '{tmp_path}/train.tsv'" in recorded, recorded
  assert f"ExperimentConfig.eval_data = '{tmp_path}/eval.tsv'" in recorded, recorded


def test_training_on_files_with_a_synthetic_eval_warns(tmp_path):
  """Every shipped config sets eval_data = 'synthetic': `--train_data=FILE` alone scored
  the model on random examples without a word."""
  write_data(tmp_path / "train.tsv", 500)
  proc = train(str(tmp_path / "w"), *FLAGS, "--num_steps=2", f"--train_data={tmp_path}/train.tsv")
  assert (f"warning: this run trains on {tmp_path}/train.tsv (--train_data) but evaluates on "
          "synthetic examples (ExperimentConfig.eval_data = 'synthetic'): its eval metrics say "
          "nothing about that data; pass --eval_data (e.g. a held-out day)") in proc.stderr
  # rerun at --num_steps, it only evaluates: it said it 'trains on' data it never opened
  proc = train(str(tmp_path / "w"), *FLAGS, "--num_steps=2", "--train_data=synthetc")
  assert "this run trains on" not in proc.stderr, proc.stderr


@pytest.mark.slow   # 10-25 s of script runs: kept out of the default suite for its time
def test_bad_row_names_file_line_column(tmp_path):
  write_data(tmp_path / "train.tsv", 50)
  lines = open(tmp_path / "train.tsv").read().splitlines()
  cols = lines[6].split("\t")
  cols[20] = "xyz!"
  lines[6] = "\t".join(cols)
  open(tmp_path / "train.tsv", "w").write("\n".join(lines) + "\n")
  proc = train(str(tmp_path / "w"), *FLAGS, "--num_steps=5", f"--train_data={tmp_path}/train.tsv",
               check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert f"{tmp_path}/train.tsv:7" in proc.stderr, proc.stderr
  # --bad_rows=skip: the row is logged with file:line, counted per file in every metrics
  # line, and dropped from training and eval alike.
  path = f"{tmp_path}/train.tsv"
  skip = train(str(tmp_path / "w2"), *FLAGS, "--num_steps=5", "--bad_rows=skip",
               f"--train_data={path}", f"--eval_data={path}")
  assert f"skipping malformed row {path}:7: column 21 (C7)" in skip.stderr, skip.stderr
  lines = read_metrics(str(tmp_path / "w2"))
  assert lines and all(l.get("bad_rows") == {path: 1} for l in lines if "loss" in l), lines
  assert [l for l in lines if "eval_auc" in l][-1]["eval_examples"] == 49


@pytest.mark.slow   # 10-25 s of script runs: kept out of the default suite for its time
def test_a_trained_run_evaluates_new_data_without_its_training_data(tmp_path):
  """Re-evaluating a finished run on new --eval_data needs no training data: the TSV it
  trained on may be gone (it was opened, indexed and checked against the checkpoint's
  data position: without --train_data, 'trained on 2000 examples per epoch, this training
  data is an endless synthetic stream'). A restore that falls back below --num_steps opens
  it again and trains on."""
  write_data(tmp_path / "train.tsv", 2000)
  write_data(tmp_path / "eval.tsv", 300, start=5000)
  write_data(tmp_path / "eval2.tsv", 200, start=9000)
  w = str(tmp_path / "w")
  train(w, *FLAGS, "--num_steps=20", "--checkpoint_every=10", f"--train_data={tmp_path}/train.tsv",
        f"--eval_data={tmp_path}/eval.tsv")
  (tmp_path / "train.tsv").rename(tmp_path / "moved.tsv")
  train(w, *FLAGS, "--num_steps=20", f"--eval_data={tmp_path}/eval2.tsv")
  resume = [l for l in read_metrics(w) if l.get("event") == "resume"]
  assert len(resume) == 1 and resume[0]["checkpoint_step"] == 20
  assert resume[0]["eval_examples"] == 200
  # checkpoint 20 damaged: the restore falls back to 10, which needs the training data
  for f in (tmp_path / "w" / "checkpoints" / "20" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b"\0" * f.stat().st_size)
  proc = train(w, *FLAGS, "--num_steps=20", f"--eval_data={tmp_path}/eval2.tsv", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "endless synthetic stream" in proc.stderr, proc.stderr[-2000:]
  train(w, *FLAGS, "--num_steps=20", f"--train_data={tmp_path}/moved.tsv",
        f"--eval_data={tmp_path}/eval2.tsv")
  steps = [l["step"] for l in read_metrics(w) if "loss" in l]
  assert steps[-1] == 20 and steps.count(20) == 2   # trained 11..20 again


@pytest.mark.slow   # 25-45 s of script runs: kept out of the default suite for its time
def test_continue_training_on_new_data_from_a_copy_without_the_data_position(tmp_path):
  """Daily incremental training: a checkpoint of day 0's run resumes on day 1's file only
  from a copy made with `--restart_data` (the workdir's own checkpoint refuses other data,
  naming that way out); the copy keeps the model and step, and day 1 is read from its
  start."""
  import json  # pylint: disable=import-outside-toplevel
  write_data(tmp_path / "day0.tsv", 2000)
  write_data(tmp_path / "day1.tsv", 1500, start=2000)
  w, w2 = tmp_path / "w", tmp_path / "w2"
  train(str(w), *FLAGS, "--num_steps=20", f"--train_data={tmp_path}/day0.tsv")
  proc = train(str(w), *FLAGS, "--num_steps=30", f"--train_data={tmp_path}/day1.tsv",
               check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert ("trained on 2000 examples per epoch, this training data is 1500 examples per "
          "epoch; resuming would repeat and skip examples; to continue training on other "
          "data, copy the checkpoint with `scripts/convert_checkpoint.py --checkpoint_dir="
          f"{w}/checkpoints --output=W2/checkpoints --format=checkpoint --restart_data` and "
          "train in W2 (a new workdir)") in proc.stderr, proc.stderr[-2000:]
  write_data(tmp_path / "day1_same_size.tsv", 2000, start=2000)   # resumed silently before
  proc = train(str(w), *FLAGS, "--num_steps=30", f"--train_data={tmp_path}/day1_same_size.tsv",
               check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert ("the checkpoint was trained on other data of the same size (2000 examples"
          in proc.stderr and "--restart_data" in proc.stderr), proc.stderr[-2000:]

  # at --num_steps it only evaluates: nothing trains on day 1, and the line says the way on
  proc = train(str(w), *FLAGS, "--num_steps=20", f"--train_data={tmp_path}/day1.tsv")
  assert (f"warning: nothing trains on --train_data={tmp_path}/day1.tsv: checkpoint 20 was "
          f"trained on {tmp_path}/day0.tsv and this run only evaluates it (--num_steps=20 is "
          "at or below its step)" in proc.stderr and "--restart_data" in proc.stderr), (
              proc.stderr[-2000:])

  def convert(*flags):
    return run_script("convert_checkpoint.py", f"--checkpoint_dir={w}/checkpoints", *flags)
  bad = convert(f"--output={tmp_path}/a.npz", "--format=npz", "--restart_data")
  assert bad.returncode == 1 and "--restart_data applies to --format=checkpoint only" in bad.stderr
  out = convert(f"--output={w2}/checkpoints", "--format=checkpoint", "--restart_data")
  assert out.returncode == 0, out.stderr
  manifest = json.loads((w2 / "checkpoints" / "20" / "manifest" / "metadata").read_text())
  assert manifest["data_restarted"] is True
  # --num_steps is a total: the day's 10 steps as --num_steps=10 train nothing, and say so
  proc = train(str(w2), *FLAGS, "--num_steps=10", f"--train_data={tmp_path}/day1.tsv")
  assert ("warning: checkpoint 20 holds no data position (a --restart_data copy or an "
          "import, made to train on new data), but --num_steps=10 is at or below its step: nothing of "
          f"--train_data={tmp_path}/day1.tsv is trained" in proc.stderr), proc.stderr[-2000:]
  train(str(w2), *FLAGS, "--num_steps=30", f"--train_data={tmp_path}/day1.tsv")
  lines = read_metrics(str(w2))
  assert [l["checkpoint_step"] for l in lines if l.get("event") == "resume"] == [20, 20]
  assert [l["step"] for l in lines if "loss" in l] == [30]
  state = json.loads((w2 / "checkpoints" / "30" / "data_state" / "metadata").read_text())
  assert state["num_examples"] == 1500 and state["position"] == 10 * 128   # from day 1's start


EXPLICIT_GIN = """include 'configs/dlrm_criteo.gin'
ExperimentConfig.embedding = ((@a/TableSpec(), @b/TableSpec()),
    (@u/FeatureSpec(), @i/FeatureSpec(), @c/FeatureSpec()))
a/TableSpec.name = 'ta'
a/TableSpec.rows = 64
a/TableSpec.dim = 16
b/TableSpec.name = 'tb'
b/TableSpec.rows = 64
b/TableSpec.dim = 16
u/FeatureSpec.name = 'user'
u/FeatureSpec.table = 'ta'
i/FeatureSpec.name = 'item'
i/FeatureSpec.table = 'ta'
i/FeatureSpec.max_len = 3
c/FeatureSpec.name = 'ctx'
c/FeatureSpec.table = 'tb'
"""


@pytest.mark.slow
def test_preprocess_then_train_with_a_gin_config_of_its_own_features(tmp_path):
  """Preprocess read only `uniform_tables` (here dlrm_criteo's 26 tables: every row was
  refused); training then accepted the features listed in another order (ctx's ids read as
  item's: the tables have one size)."""
  lines = [f"{k % 2}\t" + "\t".join(["1"] * 13) + f"\t{k:x}\t{k + 1:x},{k + 2:x}\t{k % 7:x}"
           for k in range(256)]
  (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n")
  (tmp_path / "x.gin").write_text(EXPLICIT_GIN)
  swapped = EXPLICIT_GIN.replace("(@u/FeatureSpec(), @i/FeatureSpec(), @c/FeatureSpec())",
                                 "(@u/FeatureSpec(), @c/FeatureSpec(), @i/FeatureSpec())")
  (tmp_path / "swapped.gin").write_text(swapped)
  out = tmp_path / "bin"
  proc = run_script("preprocess.py", f"--input={tmp_path}/d.tsv", f"--output={out}",
                    f"--gin_file={tmp_path}/x.gin")
  assert proc.returncode == 0, proc.stderr
  flags = ["--plan=dp", "--num_steps=2", f"--train_data={out}", f"--eval_data={out}",
           "--gin_bindings=ExperimentConfig.batch_size=64"]
  train(str(tmp_path / "w"), f"--gin_file={tmp_path}/x.gin", *flags)
  assert read_metrics(str(tmp_path / "w"))[-1]["eval_examples"] == 256
  proc = train(str(tmp_path / "w2"), f"--gin_file={tmp_path}/swapped.gin", *flags,
               check=False, env=NO_COMPILE, devices=8)
  assert_one_line_error(proc, f"error: {out}/manifest.json: configured feature 1 'ctx' is "
                              "data feature 2;")


def test_the_passes_line_counts_the_examples_a_run_reads():
  from jaxrec.train.data_adapter import passes_lines  # pylint: disable=import-outside-toplevel
  line, warning = passes_lines(2000, "day1.tsv", 128, 20, 50, early_stop=True)
  assert line == ("training data: 2,000 examples (day1.tsv); this run trains steps 21-50, "
                  "fewer if early stopping stops it: up to 30 x 128 = 3,840 examples, 1.92 "
                  "pass(es) (epochs) over the data (examples repeat: each pass in a new "
                  "shuffled order)") and warning is None
  line, warning = passes_lines(5000, "d.tsv", 128, 0, 10)
  assert line.endswith("10 steps: up to 10 x 128 = 1,280 examples, 0.256 pass(es) (epochs) "
                       "over the data") and warning is None
  line, _ = passes_lines(300, "d.tsv", 128, 0, 10, shuffle=False)
  assert line.endswith("4.27 pass(es) (epochs) over the data (examples repeat, in the same "
                       "order: shuffle is off)")
  line, warning = passes_lines(None, "synthetic", 64, 0, 40)
  assert line == ("training data: synthetic, endless; this run trains 40 steps: up to 40 x "
                  "64 = 2,560 examples") and warning is None


def test_a_run_says_how_many_passes_over_its_training_data_it_makes(tmp_path):
  """A 100-row file trained 5 steps x 128 (6.4 passes, each batch holding examples more
  than once) without a word; a rerun that only evaluates reads none of it, and says
  nothing of it."""
  write_data(tmp_path / "train.tsv", 100)
  w = str(tmp_path / "w")
  flags = [*FLAGS, "--num_steps=5", f"--train_data={tmp_path}/train.tsv", "--mesh=data=8",
           "--noprogress", "--gin_bindings=ExperimentConfig.num_eval_examples=256"]
  proc = run_script("train.py", f"--workdir={w}", *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (f"training data: 100 examples ({tmp_path}/train.tsv); this run trains 5 steps: up "
          "to 5 x 128 = 640 examples, 6.4 pass(es) (epochs) over the data (examples repeat"
          in proc.stderr), proc.stderr[-3000:]
  assert (f"warning: the training data (100 examples, {tmp_path}/train.tsv) is smaller than "
          "one batch (ExperimentConfig.batch_size = 128): every batch holds examples more "
          "than once; this run reads it 6.4 times") in proc.stderr
  again = run_script("train.py", f"--workdir={w}", *flags)
  assert again.returncode == 0 and "training data:" not in again.stderr, again.stderr[-3000:]
