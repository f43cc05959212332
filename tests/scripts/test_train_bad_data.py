"""Bad input files through the real scripts/train.py: one line naming file, line and column,
exit code != 0, no traceback, nothing compiled. (`tests/data` covers each case in the library.)"""

import gzip
import json
import os

import pytest

from jaxrec.data import binary, binary_write
from jaxrec.embedding.specs import uniform_tables
from tests.scripts.test_train import NO_COMPILE, assert_one_line_error, train
from tests.scripts.test_train_files import FLAGS, write_data

BAD_LINE = 7   # 1-based line of the damaged row in a 50-line file


def damage_row(path, fn):
  """Applies `fn` to the tab-split columns of line BAD_LINE of `path`."""
  lines = open(path).read().splitlines()
  cols = lines[BAD_LINE - 1].split("\t")
  lines[BAD_LINE - 1] = "\t".join(fn(cols))
  open(path, "w").write("\n".join(lines) + "\n")


def set_col(k, value):
  def fn(cols):
    cols[k] = value
    return cols
  return fn


def preprocessed(d):
  tables, features = uniform_tables(num_tables=26, rows=1000)
  binary_write.preprocess(str(d / "train.tsv"), str(d / "bin"), features, tables, shard_examples=20)
  return d / "bin"


def _row(fn):
  def make(d):
    damage_row(d / "train.tsv", fn)
    return d / "train.tsv"
  return make


def _empty(d):
  (d / "empty.tsv").write_bytes(b"")
  return d / "empty.tsv"


def _not_text(d):
  (d / "table.bin").write_bytes(bytes(range(256)) * 8)
  return d / "table.bin"


def _truncated(d):
  (d / "t.tsv.gz").write_bytes(gzip.compress((d / "train.tsv").read_bytes())[:-40])
  return d / "t.tsv.gz"


def _checksum(d):
  out = preprocessed(d)
  with open(out / "shard-00001.bin", "r+b") as f:
    f.seek(100)
    f.write(b"\x07\x07")
  return out


def _manifest(d):
  out = preprocessed(d)
  m = json.loads((out / binary.MANIFEST).read_text())
  m["shards"][0]["bytes"] += 1
  (out / binary.MANIFEST).write_text(json.dumps(m))
  return out


def _manifest_vs_config(d):   # preprocessed for 1000-row tables; FLAGS config has 999 below
  return preprocessed(d)


# (id, make(dir) -> path, expected message with {p} = the path, extra flags, slow)
CASES = [
    ("columns", _row(lambda c: c[:-1]),
     "{p}:7: expected 40 tab-separated columns (label, 13 integer, 26 categorical), found 39",
     [], False),
    ("not_hex", _row(set_col(21, "xyz!")), "{p}:7: column 22 (C8): feature 'f7': "
     "categorical value is not hex: 'xyz!'", [], True),
    ("dense_nan", _row(set_col(3, "nan")),
     "{p}:7: column 4 (I3): dense value is not an integer: 'nan'", [], False),
    ("dense_inf", _row(set_col(1, "inf")),
     "{p}:7: column 2 (I1): dense value is not an integer: 'inf'", [], True),
    ("dense_float", _row(set_col(13, "2.5")),
     "{p}:7: column 14 (I13): dense value is not an integer: '2.5' (dense columns hold raw "
     "integer counts, which jaxrec turns into log(1 + max(x, 0)); already normalised float "
     "features are not read: open_source.dense_transform = 'none' reads them as written "
     "(scripts/preprocess.py: --dense_transform=none))", [], True),
    ("label", _row(set_col(0, "2")), "{p}:7: column 1 (label): label must be 0 or 1, got '2'",
     [], True),
    ("empty", _empty, "{p}: empty file", [], True),
    ("not_text", _not_text, "{p}:1: not a text file (control byte 0x00): jaxrec reads "
     "Criteo TSV (plain or gzip) and directories scripts/preprocess.py wrote from it (not "
     "Parquet, TFRecord or HugeCTR's Norm / Raw binary files)", [], True),
    ("truncated_gzip", _truncated,
     "{p}: truncated gzip file (the compressed stream ends early)", [], False),
    ("missing", lambda d: d / "missing.tsv", "--train_data: {p}: no such file or directory",
     [], True),
    ("checksum", _checksum, "{p}/shard-00001.bin: sha256 checksum does not match manifest.json",
     [], False),
    ("manifest", _manifest,
     "{p}/shard-00000.bin: 3140 bytes, the manifest says 20 records of 157 bytes (3141 bytes)",
     [], True),
    ("manifest_vs_config", _manifest_vs_config,
     "{p}/manifest.json: feature f4 (configured as 'f4'): ids were reduced to 1000 rows, "
     "its table 't4' has 999",
     ["--gin_bindings=uniform_tables.rows=" + str([1000] * 4 + [999] + [1000] * 21)], True),
]


@pytest.mark.parametrize(
    "make,message,extra",
    [pytest.param(m, msg, x, id=i, marks=[pytest.mark.slow] if slow else [])
     for i, m, msg, x, slow in CASES])
def test_bad_train_data(tmp_path, make, message, extra):
  write_data(tmp_path / "train.tsv", 50)
  path = str(make(tmp_path))
  proc = train(str(tmp_path / "w"), *FLAGS, "--num_steps=3", f"--train_data={path}", *extra,
               check=False, env=NO_COMPILE, devices=8)
  assert_one_line_error(proc, "error: " + message.format(p=path))
  assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")
  # the data are checked before the plan's 20+ line report is printed above the error
  assert "plan (--plan=" not in proc.stderr, proc.stderr


def test_bad_eval_data(tmp_path):
  write_data(tmp_path / "train.tsv", 50)
  write_data(tmp_path / "eval.tsv", 50)
  damage_row(tmp_path / "eval.tsv", set_col(0, "-1"))
  path = str(tmp_path / "eval.tsv")
  proc = train(str(tmp_path / "w"), *FLAGS, "--num_steps=3", f"--train_data={tmp_path}/train.tsv",
               f"--eval_data={path}", check=False, env=NO_COMPILE, devices=8)
  assert_one_line_error(proc, f"error: {path}:7: column 1 (label): label must be 0 or 1, got '-1'")
