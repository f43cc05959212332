"""scripts/build_vocab.py, then preprocess.py and train.py reading through its vocabulary
(`open_source.vocab`, bound by the vocab.gin it writes)."""

import json
import os
import shutil

import numpy as np
import pytest

from jaxrec import signals
from jaxrec.data import binary, vocab
from jaxrec.train import config_changes
from tests.scripts.in_process import run_script
from tests.scripts.test_train import TINY_TSV_CONFIG as CONFIG, read_metrics, train

def _tsv(path, n=160, seed=0):
  """`n` lines of 13 counts and 8 categorical columns of Zipf hex ids (f3 and f5 bags)."""
  rng = np.random.default_rng(seed)
  z = lambda: f"{int(rng.zipf(1.4)) % 3000:x}"   # noqa: E731
  lines = []
  for i in range(n):
    cats = [z() for _ in range(8)]
    cats[3] = ",".join(z() for _ in range(rng.integers(0, 5)))
    cats[5] = ",".join(z() for _ in range(rng.integers(0, 9)))
    lines.append("\t".join([str(i % 2)] + [str(k) for k in range(13)] + cats))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.fixture
def built(tmp_path):
  config = tmp_path / "c.gin"
  config.write_text(CONFIG)
  data = _tsv(tmp_path / "train.tsv")
  out = tmp_path / "vocab"
  r = run_script("build_vocab.py", f"--input={data}", f"--output={out}", "--min_count=2",
                 f"--gin_file={config}")
  assert r.returncode == 0, r.stderr
  return config, data, out, r.stdout


def test_build_then_preprocess_and_train_through_the_vocabulary(tmp_path, built):
  """The tool prints each table's kept ids and rows and writes vocab.gin (the vocabulary and
  `uniform_tables.rows`); preprocess.py with it records the vocabulary; train.py reads the
  TSV and the dataset through it (config.gin records it), and a run without it is refused
  by the dataset naming both."""
  config, data, out, stdout = built
  m = json.load(open(out / vocab.MANIFEST))
  assert m["min_count"] == 2 and m["id_format"] == "hex" and len(m["tables"]) == 8
  assert m["inputs"] == [{"path": data, "bytes": os.path.getsize(data)}]
  assert f"table 't0': {m['tables'][0]['size']} ids kept of" in stdout
  assert f"train with --gin_file={out}/vocab.gin" in stdout
  rows = tuple(t["rows"] for t in m["tables"])
  assert (out / vocab.GIN).read_text().splitlines()[2:] == [
      f"open_source.vocab = '{out}'", f"uniform_tables.rows = {rows}"]
  gins = [f"--gin_file={config}", f"--gin_file={out / vocab.GIN}"]
  r = run_script("preprocess.py", f"--input={data}", f"--output={tmp_path / 'bin'}", *gins)
  assert r.returncode == 0, r.stderr
  stored = json.load(open(tmp_path / "bin" / binary.MANIFEST))["vocab"]
  assert stored == {"path": str(out), "fingerprint": m["fingerprint"]}
  r = run_script("preprocess.py", f"--input={data}", f"--output={tmp_path / 'bin2'}",
                 "--num_categorical=8", "--max_len=1,1,1,4,1,8,1,1", "--rows=64",
                 f"--vocab={out}")   # the flag, without gin
  assert r.returncode == 0, r.stderr
  assert json.load(open(tmp_path / "bin2" / binary.MANIFEST))["vocab"] == stored
  common = ["--num_steps=2", "--log_every=1", "--noprogress"]
  for name, train_data in (("w", data), ("wb", tmp_path / "bin")):
    r = run_script("train.py", f"--workdir={tmp_path / name}", *gins, *common,
                   f"--train_data={train_data}", f"--eval_data={train_data}")
    assert r.returncode == 0, r.stderr[-3000:]
  recorded = config_changes.bindings((tmp_path / "w" / "config.gin").read_text())
  assert recorded["open_source.vocab"] == repr(str(out))
  r = run_script("train.py", f"--workdir={tmp_path / 'w2'}", f"--gin_file={config}", *common,
                 f"--train_data={tmp_path / 'bin'}", f"--eval_data={tmp_path / 'bin'}")
  assert r.returncode == 1 and "preprocessed with vocabulary" in r.stderr and \
      "this run reads them with no vocabulary" in r.stderr, r.stderr[-3000:]


def test_too_few_rows_stop_train_py_before_it_compiles(tmp_path, built):
  config, data, out, _ = built
  r = run_script("train.py", f"--workdir={tmp_path / 'w'}", f"--gin_file={config}",
                 f"--gin_bindings=open_source.vocab = '{out}'",
                 "--gin_bindings=uniform_tables.rows = 5", "--num_steps=2",
                 f"--train_data={data}", f"--eval_data={data}", "--noprogress")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 1 and lines[-1].startswith(
      f"error: --gin_bindings: open_source.vocab = '{out}': table 't0' has 5 rows, needs "
      ), r.stderr[-3000:]
  assert lines[-1].endswith(f"+4 more; give the tables the rows its vocab.gin binds "
                            f"(--gin_file={out}/vocab.gin)")
  assert "compil" not in r.stderr.lower()


def test_a_resume_with_another_vocabulary_names_the_binding(tmp_path, built):
  """Tables of the same rows, the ids read through another vocabulary: refused, naming
  both vocabularies (path and fingerprint), both when training on and when only evaluating;
  the same vocabulary copied elsewhere is the same one (compared by fingerprint)."""
  config, data, out, _ = built
  r = run_script("build_vocab.py", f"--input={data}", f"--output={tmp_path / 'v3'}",
                 "--min_count=3", f"--gin_file={config}")
  assert r.returncode == 0, r.stderr
  flags = [f"--gin_file={config}", f"--workdir={tmp_path / 'w'}", f"--train_data={data}",
           f"--eval_data={data}", "--noprogress", "--log_every=1",
           "--gin_bindings=uniform_tables.rows = 64"]
  r = run_script("train.py", *flags, "--num_steps=2",
                 f"--gin_bindings=open_source.vocab = '{out}'")
  assert r.returncode == 0, r.stderr[-3000:]
  fp = {v: vocab.load(str(v)).fingerprint for v in (out, tmp_path / "v3")}
  for steps, data_word in (("4", "training data"), ("2", "eval data")):
    r = run_script("train.py", *flags, f"--num_steps={steps}",
                   f"--gin_bindings=open_source.vocab = '{tmp_path / 'v3'}'")
    assert r.returncode == 1 and (
        f"checkpoint 2 was trained on categorical ids read through vocabulary '{out}' "
        f"(fingerprint {fp[out]}), but this run reads its {data_word} through vocabulary "
        f"'{tmp_path / 'v3'}' (fingerprint {fp[tmp_path / 'v3']})") in r.stderr, \
        r.stderr[-3000:]
  shutil.copytree(out, tmp_path / "copy")
  r = run_script("train.py", *flags, "--num_steps=2",
                 f"--gin_bindings=open_source.vocab = '{tmp_path / 'copy'}'")
  assert r.returncode == 0 and "evaluating that checkpoint" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("flags,message", [
    (["--min_count=0"], "error: --min_count must be a whole number >= 1 (ids seen fewer "
     "times share the out-of-vocabulary row), got 0"),
    (["--max_size=0"], "error: --max_size must be a whole number >= 1, got 0"),
    (["--num_categorical=7"], "error: --num_categorical=7: the TSV data has 7 categorical "
     "columns but 8 sparse features are configured; make them agree"),
])
def test_bad_flags_are_one_line(tmp_path, built, flags, message):
  config, data, _, _ = built
  r = run_script("build_vocab.py", f"--input={data}", f"--output={tmp_path / 'v2'}",
                 f"--gin_file={config}", *flags)
  assert r.returncode == 1 and r.stderr.strip() == message, r.stderr
  assert not (tmp_path / "v2").exists()


def test_input_errors_and_an_existing_output(tmp_path, built):
  _, data, out, _ = built
  bad = tmp_path / "bad.tsv"
  bad.write_text("1\t" + "\t".join(["1"] * 13) + "\t" + "\t".join(["a"] * 7 + ["q!"]) + "\n")
  r = run_script("build_vocab.py", f"--input={bad}", f"--output={tmp_path / 'v2'}",
                 "--num_categorical=8")
  assert r.returncode == 1 and r.stderr.startswith(
      f"error: {bad}:1: column 22 (C8): feature 'f7': categorical value is not"), r.stderr
  r = run_script("build_vocab.py", f"--input={data}", f"--output={out}", "--num_categorical=8",
                 "--max_len=1,1,1,4,1,8,1,1")
  assert r.returncode == 1 and "exists and is not an empty directory" in r.stderr, r.stderr
  # before the input is read: a malformed one is not reached (1M lines took 13.9 s to learn)
  r = run_script("build_vocab.py", f"--input={bad}", f"--output={out}", "--num_categorical=8")
  assert r.returncode == 1 and r.stderr.strip() == (
      f"error: --output {out}: exists and is not an empty directory; remove it or choose "
      "another"), r.stderr
  assert not (tmp_path / "v2").exists()


def test_an_interrupt_leaves_no_output(tmp_path, built, monkeypatch):
  _, data, _, _ = built
  def stop():
    raise KeyboardInterrupt
  monkeypatch.setattr(signals, "check", stop)
  r = run_script("build_vocab.py", f"--input={data}", f"--output={tmp_path / 'v2'}",
                 "--num_categorical=8", "--max_len=1,1,1,4,1,8,1,1")
  assert r.returncode == 130 and r.stderr.strip() == (
      f"interrupted (Ctrl-C): no vocabulary written to {tmp_path / 'v2'}"), r.stderr
  assert sorted(os.listdir(tmp_path)) == ["c.gin", "train.tsv", "vocab"]


@pytest.mark.slow   # two train.py processes (~30 s)
def test_one_device_and_an_8_device_mesh_give_the_same_losses(tmp_path, built):
  config, data, out, _ = built
  flags = [f"--gin_file={config}", f"--gin_file={out / vocab.GIN}", "--num_steps=10",
           "--log_every=1", f"--train_data={data}", f"--eval_data={data}", "--noprogress"]
  train(str(tmp_path / "one"), *flags, "--mesh=data=1", devices=1)
  train(str(tmp_path / "eight"), *flags, "--mesh=data=2,row=4", "--plan=twrw", devices=8)
  losses = [np.array([l["loss"] for l in read_metrics(str(tmp_path / w)) if "loss" in l])
            for w in ("one", "eight")]
  assert len(losses[0]) == 10
  np.testing.assert_allclose(losses[1], losses[0], rtol=0, atol=1e-4)


OWN_TABLES = CONFIG + """ExperimentConfig.embedding = @embedding_tables()
embedding_tables.tables = {'s': (4, 16), 'a': (5000, 16), 'b': (5000, 16), 'c': (5000, 16),
                           'd': (5000, 16), 'e': (5000, 16), 'g': (5000, 16)}
embedding_tables.features = [('f0', 's'), ('f1', 's'), ('f2', 'a'), ('f3', ('b', 4)),
                             ('f4', 'c'), ('f5', ('d', 8)), ('f6', 'e'), ('f7', 'g')]
"""


def test_a_config_listing_its_own_tables_is_told_which_rows_to_set(tmp_path):
  """vocab.gin binds no rows for a configuration that lists its own tables: the tool said
  it did, and the rows refusal said to give the vocab.gin already given (a circle); now
  the tool names the tables configured too small, and the refusal says where to set them."""
  config = tmp_path / "own.gin"
  config.write_text(OWN_TABLES)
  data = _tsv(tmp_path / "train.tsv")
  out = tmp_path / "vocab"
  r = run_script("build_vocab.py", f"--input={data}", f"--output={out}", "--min_count=2",
                 f"--gin_file={config}")
  assert r.returncode == 0, r.stderr
  needs = json.load(open(out / vocab.MANIFEST))["tables"][0]
  assert needs["name"] == "s" and needs["rows"] > 4
  assert "(binds open_source.vocab only: this configuration lists its own tables; give each " \
      "table at least the rows above)" in r.stdout, r.stdout
  assert f"warning: configured with too few rows: table 's' (4 rows, needs {needs['rows']})" \
      in r.stderr, r.stderr
  r = run_script("train.py", f"--gin_file={config}", f"--gin_file={out / vocab.GIN}",
                 f"--train_data={data}", f"--workdir={tmp_path / 'w'}", "--num_steps=1")
  assert r.returncode == 1 and (
      f"table 's' has 4 rows, needs {needs['rows']} ({needs['rows'] - 1} ids + 1 "
      f"out-of-vocabulary row); set these tables' rows in the configuration (their TableSpec "
      f"/ embedding_tables entries: {out / vocab.GIN} lists each table's rows in comments, "
      "and binds none for a configuration that lists its own tables)") in r.stderr, \
      r.stderr[-2000:]


def test_a_table_that_keeps_no_id_is_warned_of(tmp_path, built):
  """A --min_count above every count of a table kept no id and said only '0 ids kept':
  every example's id of it then trains the one row 0 (a run at SGD.lr = 20 diverged)."""
  config, data, _, _ = built
  r = run_script("build_vocab.py", f"--input={data}", f"--output={tmp_path / 'v2'}",
                 f"--gin_file={config}", "--min_count=100000")
  assert r.returncode == 0, r.stderr
  assert ("warning: table 't0', 't1', 't2', 't3', +4 more keeps no id (none seen "
          "--min_count=100000 times or more): every id of it reads the out-of-vocabulary row "
          "0") in r.stderr, r.stderr
