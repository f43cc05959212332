"""scripts/preprocess.py: flags only; errors are one line and exit code 1."""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data_testlib as lib
from jaxrec.data import binary, tsv
from tests.scripts.in_process import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args):
  """scripts/preprocess.py ARGS, in this process (its exit code, stdout and stderr)."""
  return run_script("preprocess.py", *args)


def test_preprocess_and_errors(tmp_path, tsv_file):
  cats = [f"{k:x}" for k in range(26)]
  cats[1] = "a,b"
  path = tsv_file([lib.line(cats=cats), lib.line("0"), lib.line("x")])
  out = str(tmp_path / "out")
  r = run(f"--input={path}", f"--output={out}", "--rows=100", "--max_len=1,2" + ",1" * 24,
          "--bad_rows=skip")
  assert r.returncode == 0, r.stderr
  assert "wrote 2 examples in 1 shard to" in r.stdout and "(1 malformed row skipped)" in r.stdout
  src = binary.BinarySource(out, lib.layout(max_lens={1: 2}, n=100))
  np.testing.assert_array_equal(src.gather(np.arange(2)).ids["f1"], [[10, 11], [1, -1]])

  r = run(f"--input={path}", f"--output={tmp_path / 'o2'}", "--rows=100", "--max_len=1,2" +
          ",1" * 24)
  assert r.returncode == 1
  assert r.stderr.strip() == (f"error: {path}:3: column 1 (label): label must be 0 or 1, "
                              "got 'x'")
  r = run(f"--input={tmp_path / 'missing'}", f"--output={tmp_path / 'o3'}", "--rows=100")
  assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
  assert r.stderr.strip().endswith(f"error: --input: {tmp_path / 'missing'}: no such file or "
                                   "directory")
  r = run(f"--input={path}", f"--output={tmp_path / 'o4'}", "--rows=1,2")
  assert r.returncode == 1 and "--rows: 2 values given, 26" in r.stderr
  r = run(f"--input={path}", f"--output={tmp_path / 'o5'}", "--rows=3000000000")
  assert r.returncode == 1 and r.stderr.strip() == (   # named only "table 't0'"
      "error: --rows: values must be below 2**31, got '3000000000'"), r.stderr
  r = run(f"--input={path}", f"--output={path}", "--rows=100")   # an existing file
  assert r.returncode == 1 and r.stderr.strip() == (
      f"error: --output {path} is a file, not a directory"), r.stderr


def test_shard_examples_must_be_positive(tmp_path, tsv_file):
  path = tsv_file([lib.line(), lib.line("0")])
  for n in ["0", "-5"]:  # used to loop forever, writing empty shard files
    out = tmp_path / f"o{n}"
    r = run(f"--input={path}", f"--output={out}", "--rows=100", f"--shard_examples={n}")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: --shard_examples must be positive, got {n}"), r.stderr
    assert not os.path.exists(out)


def test_an_input_directory_of_datasets_says_to_train_on_one(tmp_path, tsv_file):
  """`--input=DIR` holding only a preprocessed dataset said "give one of them", which
  preprocess then refuses as not TSV."""
  path = tsv_file([lib.line(), lib.line("0")])
  days = tmp_path / "days"
  assert run(f"--input={path}", f"--output={days / 'day_0'}", "--rows=100").returncode == 0
  r = run(f"--input={days}", f"--output={tmp_path / 'o'}", "--rows=100")
  assert r.returncode == 1 and r.stderr.strip() == (
      f"error: --input {days} holds preprocessed datasets, not TSV files (day_0): train on "
      f"one directly (--train_data={days / 'day_0'})"), r.stderr


def test_gin_file_sets_the_column_count_and_refuses_rows(tmp_path, tsv_file):
  """The two-tower config has 8 features: its TSV has 8 categorical columns, with no
  `--num_categorical=8` needed; `--rows` next to `--gin_file` was silently ignored."""
  cats = [f"{k:x}" for k in range(8)]
  path = tsv_file([lib.line(cats=cats), lib.line("0", cats=cats)])
  gin_file = "--gin_file=configs/two_tower_synthetic.gin"
  r = run(f"--input={path}", f"--output={tmp_path / 'o'}", gin_file)
  assert r.returncode == 0, r.stderr
  assert "wrote 2 examples" in r.stdout
  r = run(f"--input={path}", f"--output={tmp_path / 'o2'}", gin_file, "--rows=100")
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: --rows: the tables come from --gin_file here; give one or the other"), r.stderr
  r = run(f"--input={path}", f"--output={tmp_path / 'o3'}", "--rows=100",
          "--gin_bindings=uniform_tables.num_tables=8")   # said "from --gin_file", not given
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: --rows: the tables come from --gin_bindings here; give one or the other")


def test_dense_column_count_from_gin_file_or_flag(tmp_path, tsv_file):
  """A config with `ExperimentConfig.num_dense = 5` trains on TSV with 5 integer columns;
  preprocess ignored the binding and refused every row of that data (13 expected)."""
  cats = [f"{k:x}" for k in range(8)]
  path = tsv_file([lib.line(dense=list("12345"), cats=cats), lib.line("0", dense=[""] * 5,
                                                                      cats=cats)])
  gin_file = tmp_path / "dense5.gin"
  gin_file.write_text("include 'configs/two_tower_synthetic.gin'\n"
                      "ExperimentConfig.num_dense = 5\n")
  r = run(f"--input={path}", f"--output={tmp_path / 'o'}", f"--gin_file={gin_file}")
  assert r.returncode == 0, r.stderr
  assert binary.read_manifest(str(tmp_path / "o"))["num_dense"] == 5
  r = run(f"--input={path}", f"--output={tmp_path / 'o2'}", "--rows=100", "--num_categorical=8",
          "--num_dense=5")
  assert r.returncode == 0, r.stderr
  r = run(f"--input={path}", f"--output={tmp_path / 'o3'}", "--rows=100", "--num_categorical=8",
          "--num_dense=-1")
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: --num_dense must be an integer >= 0, got -1"), r.stderr


def test_wrong_column_count_without_gin_names_the_flags(tmp_path, tsv_file):
  """Without a gin file the column counts come from --num_categorical / --num_dense; a
  wrong count's hint named the training config ('the FeatureSpecs of
  ExperimentConfig.embedding, e.g. uniform_tables.num_tables'), which this run has none of."""
  path = tsv_file([lib.line(), lib.line("0")])   # 13 integer + 26 categorical columns
  r = run(f"--input={path}", f"--output={tmp_path / 'o'}", "--rows=100", "--num_categorical=25")
  assert r.returncode == 1
  assert r.stderr.strip().endswith(
      "26 categorical columns after the 13 integer ones? --num_categorical=25 (given) sets "
      "the categorical columns and --num_dense=13 (default) the integer ones"), r.stderr
  r = run(f"--input={path}", f"--output={tmp_path / 'o2'}", "--rows=100", "--num_dense=12")
  assert r.returncode == 1
  assert r.stderr.strip().endswith(
      "--num_categorical=26 (default) sets the categorical columns and --num_dense=12 "
      "(given) the integer ones"), r.stderr


def test_failed_run_leaves_no_shards(tmp_path, tsv_file):
  """A bad row in a later file, or a write failing (here: the file size limit), left the
  shards written so far in --output; a write error was '[Errno 27] File too large',
  naming neither the flag nor the directory."""
  inputs = tmp_path / "in"
  inputs.mkdir()
  lib.write(inputs / "a.tsv", [lib.line(), lib.line("0")] * 4)
  lib.write(inputs / "b.tsv", [lib.line(), lib.line("x")])
  out = tmp_path / "out"
  r = run(f"--input={inputs}", f"--output={out}", "--rows=100", "--shard_examples=2")
  assert r.returncode == 1 and "label must be 0 or 1" in r.stderr, r.stderr
  assert not out.exists()
  out.mkdir()
  (out / "keep").write_text("")
  # the limit is set by the child itself before it execs the script: a `preexec_fn` would
  # run Python in a fork of this multithreaded process (a possible deadlock)
  limited = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300));"
             " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
  r = subprocess.run([sys.executable, "-c", limited, os.path.join(ROOT, "scripts", "preprocess.py"),
                      f"--input={inputs / 'a.tsv'}", f"--output={out}", "--rows=100"],
                     capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 1 and r.stderr.strip() == (
      f"error: --output {out}: cannot write the dataset: File too large"), r.stderr
  assert os.listdir(out) == ["keep"]


def _fifo_writer(fifo, proc, timeout=60):
  """`fifo` opened for writing once `proc` opens it to read; fails (does not block) when
  `proc` exits first or does not open it in `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)   # ENXIO while there is no reader
      break
    except OSError as e:
      if e.errno != errno.ENXIO:
        raise
    assert proc.poll() is None, f"exited {proc.returncode} before reading: {proc.stderr.read()}"
    assert time.monotonic() < deadline, f"did not open {fifo} in {timeout} s"
    time.sleep(0.05)
  os.set_blocking(fd, True)
  return os.fdopen(fd, "w")


# Ctrl-C takes the same path with its own words (signals.defer): in the slow target
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 signal.SIGTERM])
def test_interrupted_run_leaves_no_shards(tmp_path, sig):
  """Ctrl-C printed a traceback; SIGTERM (a scheduler) left shards without a manifest in
  --output. Both now remove them and say so in one line."""
  fifo, out = tmp_path / "in.tsv", tmp_path / "out"
  os.mkfifo(fifo)
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "preprocess.py"),
                           f"--input={fifo}", f"--output={out}", "--rows=100",
                           "--shard_examples=1000"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    with _fifo_writer(fifo, proc) as f:   # over one read chunk: the first shards are written
      f.write("\n".join([lib.line()] * ((tsv.CHUNK_BYTES // len(lib.line())) + 10)) + "\n")
      deadline = time.monotonic() + 60
      while not (out / "shard-00001.bin").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
      assert (out / "shard-00001.bin").exists()
      proc.send_signal(sig)   # while it writes shards or waits for more input
      _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 128 + sig, err
  assert err.strip() == (f"interrupted ({'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'}): "
                         f"no dataset written to {out} (the shards written so far were "
                         "removed)"), err
  assert not out.exists()


def test_gin_file_features_come_from_experiment_config_embedding(tmp_path, tsv_file):
  """Preprocess read only `uniform_tables` bindings: a config binding its own tables and
  features in `ExperimentConfig.embedding` got the included base's uniform tables (or a
  missing-binding error), not the features its training run reads."""
  cats = ["1f", "a,b", "7"]
  path = tsv_file([lib.line(cats=cats), lib.line("0", cats=["", "c", "9"])])
  gin_file = tmp_path / "explicit.gin"
  gin_file.write_text(
      "include 'configs/dlrm_synthetic.gin'\n"   # binds uniform_tables: 8 tables
      "ExperimentConfig.embedding = ((@a/TableSpec(), @b/TableSpec()),\n"
      "    (@u/FeatureSpec(), @i/FeatureSpec(), @c/FeatureSpec()))\n"
      "a/TableSpec.name = 'ta'\na/TableSpec.rows = 16\na/TableSpec.dim = 4\n"
      "b/TableSpec.name = 'tb'\nb/TableSpec.rows = 5\nb/TableSpec.dim = 4\n"
      "u/FeatureSpec.name = 'user'\nu/FeatureSpec.table = 'ta'\n"
      "i/FeatureSpec.name = 'item'\ni/FeatureSpec.table = 'ta'\ni/FeatureSpec.max_len = 2\n"
      "c/FeatureSpec.name = 'ctx'\nc/FeatureSpec.table = 'tb'\n")
  out = str(tmp_path / "o")
  r = run(f"--input={path}", f"--output={out}", f"--gin_file={gin_file}")
  assert r.returncode == 0, r.stderr
  feats = binary.read_manifest(out)["features"]
  assert [(f["name"], f["table"], f["rows"], f["max_len"]) for f in feats] == [
      ("user", "ta", 16, 1), ("item", "ta", 16, 2), ("ctx", "tb", 5, 1)]


def test_categorical_column_count_flag_then_gin_binding_then_features(tmp_path, tsv_file):
  """`open_source.num_categorical` (what training reads that TSV with) was ignored: only
  `--num_categorical` or the feature count was used. Each must match the features."""
  cats = [f"{k:x}" for k in range(8)]
  path = tsv_file([lib.line(cats=cats), lib.line("0", cats=cats)])
  gin = ["--gin_file=configs/two_tower_synthetic.gin"]   # 8 features
  r = run(f"--input={path}", f"--output={tmp_path / 'o1'}", *gin,
          "--gin_bindings=open_source.num_categorical=26")
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: --gin_bindings: open_source.num_categorical=26: the TSV data has 26 categorical columns but 8 "
      "sparse features are configured; make them agree"), r.stderr
  r = run(f"--input={path}", f"--output={tmp_path / 'o2'}", *gin, "--num_categorical=8",
          "--gin_bindings=open_source.num_categorical=26")   # the flag first
  assert r.returncode == 0 and "wrote 2 examples" in r.stdout, r.stderr
  r = run(f"--input={path}", f"--output={tmp_path / 'o3'}", *gin, "--num_categorical=9")
  assert r.returncode == 1 and r.stderr.startswith(
      "error: --num_categorical=9: the TSV data has 9 categorical columns but 8"), r.stderr
  r = run(f"--input={path}", f"--output={tmp_path / 'o4'}", *gin,
          "--gin_bindings=open_source.num_categorical='x'")
  assert r.returncode == 1 and r.stderr.startswith(
      "error: --gin_bindings: open_source.num_categorical must be an integer >= 0, got "
      "'x'"), r.stderr
  assert not any((tmp_path / o).exists() for o in ("o1", "o3", "o4"))
