"""scripts/preprocess.py: flags that were ignored or misread, and an output directory that
would swallow its input."""

import os

from tests.scripts.in_process import run_script


def run(*args):
  """scripts/preprocess.py ARGS, in this process (its exit code, stdout and stderr)."""
  return run_script("preprocess.py", *args)


def _tsv(path, n=4):
  with open(path, "w") as f:
    for i in range(n):
      f.write("\t".join([str(i % 2)] + ["1"] * 13 + [f"{i:x}"] * 26) + "\n")
  return str(path)


def test_output_holding_the_input_is_refused(tmp_path):
  """The TSV directory itself as --output became a dataset directory (its manifest then
  hides the TSV files from readers)."""
  _tsv(tmp_path / "a.tsv")
  for inp in (str(tmp_path), str(tmp_path / "a.tsv")):
    r = run(f"--input={inp}", f"--output={tmp_path}", "--rows=100")
    assert r.returncode == 1 and r.stderr.startswith(
        f"error: --output {tmp_path} holds the --input file "), r.stderr
  assert os.listdir(tmp_path) == ["a.tsv"]
  r = run(f"--input={tmp_path}", f"--output={tmp_path / 'bin'}", "--rows=100")
  assert r.returncode == 0 and "wrote 4 examples" in r.stdout, r.stderr


def test_output_holding_links_to_the_input_is_refused(tmp_path):
  """A directory of symbolic links to TSV files elsewhere, as --input and --output: the
  check compared the links' targets' directory; the shards and manifest went among the
  links, and the directory was refused as TSV from then on."""
  (tmp_path / "real").mkdir()
  (tmp_path / "links").mkdir()
  _tsv(tmp_path / "real" / "a.tsv")
  (tmp_path / "links" / "a.tsv").symlink_to(tmp_path / "real" / "a.tsv")
  links = tmp_path / "links"
  r = run(f"--input={links}", f"--output={links}", "--rows=100")
  assert r.returncode == 1 and r.stderr.startswith(
      f"error: --output {links} holds the --input file {links / 'a.tsv'}"), r.stderr
  assert os.listdir(links) == ["a.tsv"]


def test_ignored_or_misread_flags_are_errors(tmp_path):
  """A misspelled --gin_bindings configurable was skipped (skip_unknown), a gin error
  had no `file:line` for a missing file and printed log lines, extra arguments were
  dropped, and --num_categorical=-2 was reported as a --rows count."""
  path = _tsv(tmp_path / "a.tsv")
  bad_gin = tmp_path / "bad.gin"
  bad_gin.write_text("uniform_tables.num_tables = 2\n\nuniform_tables.rows = \n")
  out = f"--output={tmp_path / 'o'}"
  for flags, want in [
      (["--gin_file=configs/dlrm_criteo.gin", "--gin_bindings=uniform_table.rows=5"],
       "error: --gin_bindings: 'uniform_table.rows=5': No configurable matching"),
      ([f"--gin_file={tmp_path / 'none.gin'}"], "error: --gin_file: cannot read"),
      ([f"--gin_file={bad_gin}"], f"error: --gin_file: {bad_gin}:3: "),
      (["--rows=100", "extra"], "error: unexpected arguments ['extra']"),
      (["--rows=100", "--num_categorical=-2"], "error: --num_categorical must be positive")]:
    r = run(f"--input={path}", out, *flags)
    assert r.returncode == 1 and r.stderr.startswith(want), (flags, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert not os.path.exists(tmp_path / "o")


def test_non_positive_rows_or_max_len_name_the_flag(tmp_path):
  """--rows=0 was reported as `uniform_tables.rows`, a binding the user never wrote."""
  path = _tsv(tmp_path / "a.tsv")
  for flags, want in [(["--rows=0"], "error: --rows: values must be positive integers, got '0'"),
                      (["--rows=100,-1" + ",100" * 24], "error: --rows: values must be positive"),
                      (["--rows=100", "--max_len=0"], "error: --max_len: values must be positive")]:
    r = run(f"--input={path}", f"--output={tmp_path / 'o'}", *flags)
    assert r.returncode == 1 and r.stderr.startswith(want), (flags, r.stderr)
  assert not os.path.exists(tmp_path / "o")


def test_a_preprocessed_input_is_named_as_such(tmp_path):
  """A preprocessed directory as --input was read as TSV: 'manifest.json:1: expected 40
  tab-separated columns ..., found 1'."""
  _tsv(tmp_path / "a.tsv")
  r = run(f"--input={tmp_path / 'a.tsv'}", f"--output={tmp_path / 'bin'}", "--rows=100")
  assert r.returncode == 0, r.stderr
  r = run(f"--input={tmp_path / 'bin'}", f"--output={tmp_path / 'bin2'}", "--rows=100")
  assert r.returncode == 1 and r.stderr.strip() == (
      f"error: --input {tmp_path / 'bin'} is a preprocessed dataset (manifest.json), not TSV: "
      "train on it directly (--train_data)"), r.stderr
  assert not os.path.exists(tmp_path / "bin2")
