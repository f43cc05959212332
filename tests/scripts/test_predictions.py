"""`scripts/train.py --predictions`: the final eval's per-example scores, in the eval data's
order, written by a training run and by an evaluate-only rerun on another device count."""

import gzip
import os

import numpy as np
import pytest

from jaxrec.errors import ConfigError, OutputError
from jaxrec.train import metrics, predictions
from jaxrec.train.config import RunOptions
from tests.scripts.in_process import run_script
from tests.scripts.test_train import read_metrics, train
from tests.scripts.test_train_files import FLAGS, write_data


def _labels(tsv_path):
  with open(tsv_path) as f:
    return np.array([float(line.split("\t", 1)[0]) for line in f], np.float32)


def _train_here(*flags):
  """scripts/train.py run in this process (8 devices; no ~4 s jax import); fails loudly."""
  proc = run_script("train.py", *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _read_tsv(path):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt") as f:
    assert f.readline() == "label\tscore\tlogit\n"
    return np.loadtxt(f, np.float64, delimiter="\t", ndmin=2)


def test_a_run_and_an_evaluate_only_rerun_write_every_eval_example_in_file_order(tmp_path):
  """300 eval lines in batches of 256 (the second one padded): 300 scores, the labels the
  file's own in its order, scoring to the run's eval_auc and eval_logloss; written once,
  for the last step (not for step 10's eval). An evaluate-only rerun on 8 devices of the
  1-device checkpoint writes the same logits."""
  write_data(tmp_path / "train.tsv", 2000)
  write_data(tmp_path / "eval.tsv", 300, start=5000)
  w, first, again = str(tmp_path / "w"), tmp_path / "p.npz", tmp_path / "p.tsv.gz"
  proc = train(w, *FLAGS, "--num_steps=20", "--eval_every=10",
               f"--train_data={tmp_path}/train.tsv", f"--eval_data={tmp_path}/eval.tsv",
               f"--predictions={first}")
  assert proc.stderr.count("wrote the scores of step") == 1, proc.stderr
  final = [l for l in read_metrics(w) if "eval_auc" in l][-1]
  with np.load(first) as z:
    assert int(z["step"]) == 20 and z["logit"].dtype == np.float32
    label, score, logit = z["label"], z["score"], z["logit"]
  np.testing.assert_array_equal(label, _labels(tmp_path / "eval.tsv"))
  assert len(set(logit.tolist())) > 250   # scores of distinct examples, not one repeated
  np.testing.assert_allclose(score, metrics.sigmoid(logit), rtol=1e-6)
  assert metrics.roc_auc(label, score) == pytest.approx(final["eval_auc"], abs=1e-7)
  assert metrics.log_loss(label, score) == pytest.approx(final["eval_logloss"], rel=1e-5)

  proc = _train_here(f"--workdir={w}", *FLAGS, "--num_steps=20",
                     f"--eval_data={tmp_path}/eval.tsv", f"--predictions={again}")
  assert f"wrote the scores of step 20's eval (300 examples) to {again}" in proc.stderr
  table = _read_tsv(again)
  np.testing.assert_array_equal(table[:, 0], label)
  np.testing.assert_allclose(table[:, 2], logit, atol=1e-5)
  np.testing.assert_allclose(table[:, 1], score, atol=1e-6)


def test_the_formats_hold_the_same_values(tmp_path):
  logits = np.array([-100.0, -1.5, 0.0, 2.25, 90.0], np.float32)
  labels = np.array([0, 1, 0, 1, 1], np.float32)
  for name in ("s.npz", "s.tsv", "s.txt.gz"):
    line = predictions.write(str(tmp_path / name), logits, labels, step=7)
    assert line == f"wrote the scores of step 7's eval (5 examples) to {tmp_path / name}"
  with np.load(tmp_path / "s.npz") as z:
    np.testing.assert_array_equal(z["logit"], logits)
    np.testing.assert_array_equal(z["label"], labels)
    assert z["score"][0] > 0 and z["score"][-1] == 1.0   # no overflow warning, no nan
  for name in ("s.tsv", "s.txt.gz"):   # %.9g: float32 round trips exactly
    table = _read_tsv(tmp_path / name)
    np.testing.assert_array_equal(table[:, 2].astype(np.float32), logits)
    np.testing.assert_array_equal(table[:, 1].astype(np.float32),
                                  metrics.sigmoid(logits).astype(np.float32))
  assert sorted(os.listdir(tmp_path)) == ["s.npz", "s.tsv", "s.txt.gz"]   # no temporaries


def test_the_format_goes_by_the_name_in_any_case_and_gzip_names_the_file(tmp_path):
  """`S.NPZ` was written as text (np.load failed on it), `S.TSV.GZ` as plain text; a gzip
  header named the temporary file (`gunzip -N` restored `S.tsv.gz.tmp-<pid>-<ns>`)."""
  logits, labels = np.array([-1.5, 2.25], np.float32), np.array([0, 1], np.float32)
  for name in ("S.NPZ", "S.TSV.GZ", "s.tsv.gz"):
    predictions.write(str(tmp_path / name), logits, labels, step=7)
  with np.load(tmp_path / "S.NPZ") as z:
    np.testing.assert_array_equal(z["logit"], logits)
  for name in ("S.TSV.GZ", "s.tsv.gz"):
    with gzip.open(tmp_path / name, "rt") as f:
      assert f.readline() == "label\tscore\tlogit\n"
    header = (tmp_path / name).read_bytes()[10:]   # FNAME: after the fixed 10-byte header
    assert header[:header.index(b"\0")] == name[:-3].encode()


def test_a_failed_write_keeps_the_earlier_file_and_names_the_flag(tmp_path, monkeypatch):
  """A full disk mid-write: an `OutputError` naming the flag; the earlier file stays whole
  and no temporary file is left."""
  path = tmp_path / "p.tsv"
  path.write_text("earlier\n")

  def disk_full(f, *args, **kwargs):
    f.write("0\t0.5\t0\n")
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(np, "savetxt", disk_full)
  with pytest.raises(OutputError, match=r"--predictions=.*p\.tsv: writing the eval's scores "
                                        r"failed: .*No space left on device"):
    predictions.write(str(path), np.zeros(2), np.zeros(2), step=1)
  assert path.read_text() == "earlier\n"
  assert os.listdir(tmp_path) == ["p.tsv"]


@pytest.mark.parametrize("path,message", [
    ("", "--predictions: empty"),
    ("{tmp}", "is a directory; give a file name inside it"),
    ("{tmp}/no/p.tsv", "its directory {tmp}/no does not exist"),
    ("~/nowhere-jaxrec/p.tsv", "the shell does not expand '~'"),
    ("{tmp}/p.npz.gz", "an .npz file is not gzipped; name it .npz"),   # was gzipped text
])
def test_a_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, path, message):
  with pytest.raises(ConfigError, match=message.format(tmp=tmp_path).replace(".", r"\.")):
    RunOptions(predictions=path.format(tmp=tmp_path)).validate()


def test_rows_skipped_as_malformed_are_named_in_a_warning(tmp_path, caplog, monkeypatch):
  """With --bad_rows=skip a dropped row has no entry: the lines then follow the files' good
  lines only, which a warning says with the counts (a join on line numbers would shift);
  under launch.py on its stderr too (it was only in W/workers/0.log: a scoring job's
  launcher printed nothing of it)."""
  from jaxrec.train import evaluation   # pylint: disable=import-outside-toplevel
  reported = []
  monkeypatch.setattr(evaluation.elastic, "report_warning", reported.append)

  class EvalData:
    def bad_row_counts(self):
      return {"/d/a.tsv": 2, "/d/b.tsv": 0}
  acc = metrics.EvalAccumulator()
  acc.add(np.array([0.5, -0.5, 1.0]), np.array([1, 0, 1]), np.array([True, True, False]))
  with caplog.at_level("INFO"):
    # pylint: disable-next=protected-access
    evaluation._write_predictions(acc, EvalData(), str(tmp_path / "p.npz"), 3)
  assert ("--predictions: the eval data's malformed rows (/d/a.tsv: 2) were skipped and "
          "have no score") in caplog.text
  assert reported == ["warning: --predictions: the eval data's malformed rows (/d/a.tsv: 2) "
                      "were skipped and have no score: the entries follow the files' good "
                      "lines only"]
  with np.load(tmp_path / "p.npz") as z:
    np.testing.assert_array_equal(z["logit"], [0.5, -0.5])   # the padding left out


def test_eval_files_without_labels_are_scored(tmp_path):
  """Criteo's test.txt has no label column: --noeval_labels reads such files and the eval
  writes only their scores (no label entry) and `eval_examples`; the scores are the
  labeled copy's. Without --predictions, or on data that has labels, it is refused."""
  write_data(tmp_path / "train.tsv", 1000)
  write_data(tmp_path / "eval.tsv", 300, start=5000)
  with open(tmp_path / "eval.tsv") as f, open(tmp_path / "test.tsv", "w") as out:
    out.writelines(line.split("\t", 1)[1] for line in f)
  w = str(tmp_path / "w")
  _train_here(f"--workdir={w}", *FLAGS, "--num_steps=10", f"--train_data={tmp_path}/train.tsv",
              f"--eval_data={tmp_path}/eval.tsv", f"--predictions={tmp_path}/labeled.npz")
  proc = _train_here(f"--workdir={w}", *FLAGS, "--num_steps=10",
                     f"--eval_data={tmp_path}/test.tsv", "--noeval_labels",
                     f"--predictions={tmp_path}/test.tsv.gz")
  assert "done: eval_examples=300, step=10" in proc.stdout, proc.stdout
  resume = [l for l in read_metrics(w) if l.get("event") == "resume"][-1]
  assert not [k for k in resume if k.startswith("eval_") and k != "eval_examples"], resume
  with gzip.open(tmp_path / "test.tsv.gz", "rt") as f:
    assert f.readline() == "score\tlogit\n"
    table = np.loadtxt(f, np.float64, delimiter="\t", ndmin=2)
  with np.load(tmp_path / "labeled.npz") as z:
    np.testing.assert_array_equal(table[:, 1].astype(np.float32), z["logit"])
  refused = run_script("train.py", f"--workdir={w}", *FLAGS, "--num_steps=10",
                       f"--eval_data={tmp_path}/eval.tsv", "--noeval_labels",
                       f"--predictions={tmp_path}/x.npz")
  assert refused.returncode == 1 and "expected 39 tab-separated columns (13 integer, 26 " \
      "categorical; no label), found 40, as do all 300 lines read with it: a label column " \
      "first (read without --noeval_labels)?" in refused.stderr, refused.stderr[-2000:]


def test_unlabeled_eval_data_refused_where_it_cannot_be(tmp_path):
  """Without --predictions the eval of unlabeled data computes nothing; synthetic data and
  preprocessed datasets hold labels (read without them, the labels would be taken for I1)."""
  from jaxrec.data import pipeline   # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import uniform_tables   # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match="--noeval_labels: eval data without labels gives no "
                     "metrics, only each example's score: add --predictions=PATH"):
    RunOptions(eval_labels=False).validate()
  tables, features = uniform_tables(num_tables=26, rows=1000)
  with pytest.raises(ConfigError, match="synthetic: synthetic data holds labels; reading it "
                     r"without them \(--noeval_labels\) is for TSV files"):
    pipeline.make_eval_batches("synthetic", features, tables, 256, labeled=False)


@pytest.mark.slow   # 15-25 s of script runs: kept out of the default suite for its time
def test_scoring_with_another_dense_transform_than_the_model_trained_with_is_refused(
    tmp_path):
  """A model trained on floats (`dense_transform = 'none'`) scored integer-valued files
  read as log counts without a word: another scale, plausible-looking scores."""
  for name, n, start in (("train.tsv", 1000, 0), ("eval.tsv", 300, 5000)):
    write_data(tmp_path / name, n, start=start)   # dense values 0, 1, 2: a finite loss
    rows = [l.split("\t") for l in (tmp_path / name).read_text().splitlines()]
    (tmp_path / name).write_text("".join(
        "\t".join(r[:1] + [str(int(v or 0) % 3) for v in r[1:14]] + r[14:]) + "\n"
        for r in rows))
  w, none = str(tmp_path / "w"), "--gin_bindings=open_source.dense_transform = 'none'"
  train(w, *FLAGS, none, "--num_steps=10", f"--train_data={tmp_path}/train.tsv",
        f"--eval_data={tmp_path}/eval.tsv")
  proc = train(w, *FLAGS, "--num_steps=10", f"--eval_data={tmp_path}/eval.tsv",
               f"--predictions={tmp_path}/p.npz", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert ("error: checkpoint 10 was trained on dense values read with "
          "open_source.dense_transform = 'none', but this run reads its eval data with "
          "open_source.dense_transform = 'log': the model would score inputs of another "
          "scale; bind open_source.dense_transform = 'none' (gin) to evaluate it"
          ) in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "p.npz").exists()
  train(w, *FLAGS, none, "--num_steps=10", f"--eval_data={tmp_path}/eval.tsv",
        f"--predictions={tmp_path}/p.npz")
  assert (tmp_path / "p.npz").exists()


def test_the_scores_are_not_written_over_or_among_the_eval_data(tmp_path):
  """`--eval_data=test.tsv --predictions=test.tsv` replaced the data with its scores; a
  file inside an eval directory of TSV files was read as eval data by the next run."""
  from jaxrec.train import data_adapter   # pylint: disable=import-outside-toplevel
  import types   # pylint: disable=import-outside-toplevel
  (tmp_path / "d").mkdir()
  for name in ("a.tsv", "d/b.tsv"):
    (tmp_path / name).write_text("0\n")
  config = types.SimpleNamespace(eval_data="synthetic", train_data="synthetic")

  def check(eval_data, path):
    options = RunOptions(eval_data=str(tmp_path / eval_data), predictions=str(tmp_path / path))
    data_adapter.check_predictions_path(config, options)
  with pytest.raises(ConfigError, match=r"a\.tsv is a file of the eval data \(--eval_data = "
                     r".*a\.tsv\): writing the scores would replace it"):
    check("a.tsv", "a.tsv")
  with pytest.raises(ConfigError, match=r"d/b\.tsv is a file of the eval data"):
    check("d", "d/b.tsv")
  with pytest.raises(ConfigError, match=r"d/s\.tsv is inside the eval data's directory"):
    check("d", "d/s.tsv")
  check("a.tsv", "s.tsv")
  check("d/b.tsv", "d/s.tsv")   # a file given: the directory's others are not read
  with pytest.raises(ConfigError, match=r"a\.tsv is a file of the training data \("
                     r"--train_data = .*a\.tsv\)"):
    data_adapter.check_predictions_path(config, RunOptions(
        train_data=str(tmp_path / "a.tsv"), predictions=str(tmp_path / "a.tsv")))
