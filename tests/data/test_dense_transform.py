"""`open_source.dense_transform`: TSV dense values as raw integer counts (`log`, the default)
or as floats read as written (`none`), recorded in preprocessed data and checked there."""

import json
import os

import numpy as np
import pytest

import data_testlib as lib
from jaxrec import launch
from jaxrec.data import binary, binary_write, pipeline, synthetic, tsv, tsv_floats
from jaxrec.data.source import make_layout
from jaxrec.errors import ConfigError, DataError
from jaxrec.train import config_changes
from tests.scripts.in_process import run_script
from tests.scripts.test_train import TINY_TSV_CONFIG as CONFIG

FLOATS = lib.layout()   # (log)
NONE = make_layout(lib.features(), lib.rows(), dense_transform="none")
VALUES = ["0.25", "-1.5", "1e-3", "-2.5E+04", ".5", "5.", "+3", "7", "-0.0", "", "1.00000001",
          "3.4028234e38", "1e-50", "0.30000000000000004", "12345678901234567890"]


def _line(dense, label="1"):
  return lib.line(label, dense=list(dense) + ["0"] * (13 - len(dense)))


def test_floats_are_read_as_written(tsv_file):
  """Each as `float(value)` cast to float32 (decimal, exponent, sign, more digits than
  float32 holds, underflow to 0); an empty field is 0, as under `log`."""
  path = tsv_file([_line(VALUES[:13]), _line(VALUES[13:], "0")])
  dense = tsv.read_tsv([path], NONE).examples.dense
  want = [np.float32(float(v or 0)) for v in VALUES] + [np.float32(0)] * 11
  assert dense.tobytes() == np.array(want, np.float32).tobytes()   # -0.0 too
  # the same file read as counts: its first float is refused
  with pytest.raises(DataError, match=r":1: column 2 \(I1\): dense value is not an integer"):
    tsv.read_tsv([path], FLOATS)


def test_integers_read_the_same_either_way_but_log(tsv_file):
  path = tsv_file([lib.line(), _line(["", "-4", "0"])])
  log, none = (tsv.read_tsv([path], lay).examples.dense for lay in (FLOATS, NONE))
  np.testing.assert_array_equal(none[0], np.arange(1, 14, dtype=np.float32))
  np.testing.assert_array_equal(none[1, :3], [0, -4, 0])
  np.testing.assert_array_equal(log, np.log1p(np.maximum(none, 0).astype(np.float64))
                                .astype(np.float32))


def test_synthetic_data_written_as_floats_reads_back_exactly(tmp_path):
  """`synthetic.write_tsv` with a `none` layout writes the floats `gather` gives (it wrote
  the integer counts, read back under `none` without their log)."""
  src = synthetic.SyntheticSource(NONE, seed=3)
  path = str(tmp_path / "f.tsv")
  synthetic.write_tsv(path, src, 300)
  got = tsv.read_tsv([path], NONE).examples.dense
  assert got.tobytes() == src.gather(np.arange(300)).dense.tobytes()
  assert b"." in open(path, "rb").read().split(b"\n")[0]


def test_the_parser_matches_float_on_generated_values():
  """A buffer of formats `repr`, `%e`, `%f`, `%g` write, over float32's range and beyond,
  and malformed ones (the cast that fails checks each value's format)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(3000) * 10.0 ** rng.integers(-44, 44, 3000)
  fmts = ["{!r}", "{:.3e}", "{:.12f}", "{:.7g}", "{:.20g}"]
  vals = [f.format(v).encode() for v, f in zip(x, fmts * 600)]
  vals += [b"1e", b"1.2.3", b"--1", b"1e5e5", b"1-2", b"e5", b".", b"-", b"1e+", b"+.e1"]
  buf = b"\t".join(vals) + b"\n"
  a = np.frombuffer(buf, np.uint8)
  n = np.array([len(v) for v in vals])
  s = np.concatenate([[0], np.cumsum(n + 1)[:-1]])
  got, why = tsv_floats.parse(a, s, s + n)
  for v, g, w in zip(vals, got, why):
    try:
      with np.errstate(over="ignore"):
        want = np.float32(float(v))
    except ValueError:
      assert w == tsv_floats.NOT_A_NUMBER, v
      continue
    if np.isfinite(want):
      assert w == 0 and g.tobytes() == want.tobytes(), v
    else:
      assert w == tsv_floats.OUT_OF_RANGE and g == 0, v


@pytest.mark.parametrize("value, what", [
    ("inf", "dense value is not a number: 'inf' (infinite and NaN values are not read; an "
     "empty field is read as 0)"),
    ("-Infinity", "not a number: '-Infinity' (infinite and NaN"),
    ("nan", "not a number: 'nan' (infinite and NaN"),
    ("1e", "not a number: '1e'"),
    ("1.2.3", "not a number: '1.2.3'"),
    ("0x1f", "not a number: '0x1f'"),
    (" 1", "not a number: ' 1'"),    # float() reads these three
    ("1_0", "not a number: '1_0'"),
    ("1e39", "dense value is beyond float32's range (+-3.4e38): '1e39'"),
    ("-1e400", "beyond float32's range"),
    ("1" * 65, "dense value is longer than 64 characters"),
])
def test_a_bad_float_names_file_line_and_column(tsv_file, value, what):
  path = tsv_file([_line(["1.5"])] * 3 + [_line(["0.5", value])] + [_line([])])
  with pytest.raises(DataError) as e:
    tsv.read_tsv([path], NONE)
  msg = str(e.value)
  assert msg.startswith(f"{path}:4: column 3 (I2): dense value ") and what in msg, msg
  src = tsv.read_tsv([path], NONE, bad_rows="skip")   # dropped and counted as any bad row
  assert src.num_examples == 4 and src.bad_row_counts() == {os.path.abspath(path): 1}


def test_a_float_read_as_a_count_names_the_option(tsv_file):
  path = tsv_file([_line(["0.25"])])
  with pytest.raises(DataError, match=r"already normalised float features are not read: "
                     r"open_source.dense_transform = 'none' reads them as written "
                     r"\(scripts/preprocess.py: --dense_transform=none\)\)$"):
    tsv.read_tsv([path], FLOATS)


def test_a_wrong_column_count_says_dense_not_integer(tsv_file):
  path = tsv_file(["\t".join(["1"] * 39)])
  with pytest.raises(DataError, match="expected 40 tab-separated columns "
                     r"\(label, 13 dense, 26 categorical\), found 39"):
    tsv.read_tsv([path], NONE)


@pytest.mark.parametrize("value", ["sqrt", "None", None, 1])
def test_an_unknown_transform_names_the_binding(tsv_file, value):
  path = tsv_file([lib.line()])
  with pytest.raises(ConfigError, match=r"^open_source.dense_transform must be one of 'log', "
                     r"'none' \('log': raw integer counts.*got "):
    pipeline.open_source(path, lib.features(), lib.rows(), dense_transform=value)


def _float_tsv(tsv_file, n=40, num_sparse=26):
  rng = np.random.default_rng(1)
  lines = []
  for i in range(n):
    dense = [f"{v:.6g}" for v in rng.standard_normal(13) * 100]
    lines.append("\t".join([str(i % 2)] + dense + [f"{k + i:x}" for k in range(num_sparse)]))
  return tsv_file(lines)


def test_preprocessed_floats_are_read_and_the_transform_is_recorded(tmp_path, tsv_file):
  path = _float_tsv(tsv_file)
  out = str(tmp_path / "bin")
  m = binary_write.preprocess(path, out, lib.features(), lib.rows(), dense_transform="none")
  assert m["dense_transform"] == "none"
  assert json.load(open(os.path.join(out, binary.MANIFEST)))["dense_transform"] == "none"
  src = pipeline.open_source(out, lib.features(), lib.rows(), dense_transform="none")
  np.testing.assert_array_equal(src.gather(np.arange(40)).dense,
                                tsv.read_tsv([path], NONE).examples.dense)
  out_log = str(tmp_path / "bin_log")
  m = binary_write.preprocess(tsv_file([lib.line()]), out_log, lib.features(), lib.rows())
  assert m["dense_transform"] == "log"


def test_data_of_another_transform_is_refused_naming_both(tmp_path, tsv_file):
  out = str(tmp_path / "bin")
  binary_write.preprocess(_float_tsv(tsv_file), out, lib.features(), lib.rows(),
                          dense_transform="none")
  with pytest.raises(DataError, match=(
      r"manifest.json: the data's dense values were preprocessed with dense_transform "
      r"'none' but this run is configured with open_source.dense_transform = 'log'; bind "
      r"open_source.dense_transform = 'none' \(gin\) to train on this data, or re-run "
      r"scripts/preprocess.py with --dense_transform=log")):
    pipeline.open_source(out, lib.features(), lib.rows())


def test_a_dataset_from_before_the_field_is_log(tmp_path, tsv_file):
  out = str(tmp_path / "bin")
  binary_write.preprocess(tsv_file([lib.line()]), out, lib.features(), lib.rows())
  path = os.path.join(out, binary.MANIFEST)
  m = json.load(open(path))
  del m["dense_transform"]
  open(path, "w").write(json.dumps(m))
  assert pipeline.open_source(out, lib.features(), lib.rows()).num_examples == 1
  with pytest.raises(DataError, match="preprocessed with dense_transform 'log' but .* 'none'"):
    pipeline.open_source(out, lib.features(), lib.rows(), dense_transform="none")
  m["dense_transform"] = "sqrt"
  open(path, "w").write(json.dumps(m))
  with pytest.raises(DataError, match=r'manifest.json: dense_transform is "sqrt", not one of '
                     r'"log", "none"'):
    pipeline.open_source(out, lib.features(), lib.rows())


def test_preprocess_script_then_train_on_floats(tmp_path, tsv_file):
  """preprocess.py takes the transform from the gin (as training reads the TSV) or its flag;
  train.py on that data records it in W/config.gin, and a run configured otherwise is
  refused before it trains."""
  config = tmp_path / "c.gin"
  config.write_text(CONFIG)
  path = _float_tsv(tsv_file, n=64, num_sparse=8)
  out = tmp_path / "bin"
  binding = "--gin_bindings=open_source.dense_transform = 'none'"
  r = run_script("preprocess.py", f"--input={path}", f"--output={out}", f"--gin_file={config}",
                 binding)
  assert r.returncode == 0, r.stderr
  assert json.load(open(out / binary.MANIFEST))["dense_transform"] == "none"
  r = run_script("preprocess.py", f"--input={path}", f"--output={tmp_path / 'b2'}",
                 f"--gin_file={config}", "--dense_transform=sqrt")
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: --dense_transform must be one of 'log', 'none' ('log': raw integer counts, "
      "read as log(1 + max(x, 0)); 'none': floats, read as written), got 'sqrt'")
  r = run_script("preprocess.py", f"--input={path}", f"--output={tmp_path / 'b3'}",
                 f"--gin_file={config}")   # log: the first float
  assert r.returncode == 1 and "--dense_transform=none)" in r.stderr
  flags = [f"--gin_file={config}", f"--train_data={out}", f"--eval_data={out}",
           "--num_steps=2", "--log_every=1", "--noprogress"]
  r = run_script("train.py", f"--workdir={tmp_path / 'w'}", *flags, binding)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "open_source.dense_transform = 'none'" in (tmp_path / "w" / "config.gin").read_text()
  r = run_script("train.py", f"--workdir={tmp_path / 'w2'}", *flags)
  assert r.returncode == 1 and "preprocessed with dense_transform 'none' but this run is " \
      "configured with open_source.dense_transform = 'log'" in r.stderr, r.stderr[-3000:]


def test_a_bad_gin_binding_is_named_where_it_is_bound(tmp_path, tsv_file):
  config = tmp_path / "c.gin"
  config.write_text(CONFIG + "open_source.dense_transform = 'sqrt'\n")
  r = run_script("preprocess.py", f"--input={_float_tsv(tsv_file, num_sparse=8)}",
                 f"--output={tmp_path / 'b'}", f"--gin_file={config}")
  assert r.returncode == 1 and r.stderr.strip() == (
      f"error: --gin_file: {config}:7: open_source.dense_transform must be one of 'log', "
      "'none' ('log': raw integer counts, read as log(1 + max(x, 0)); 'none': floats, read "
      "as written), got 'sqrt'"), r.stderr


def test_a_resume_of_a_run_from_before_the_binding_is_no_change():
  """Runs before it read TSV as 'log' and their config.gin has no such line: not a change
  at a resume (it listed `(unbound) -> 'log'` and kept a config-until-<step>.gin)."""
  before = "open_source.num_categorical = 26\nopen_source.verify_checksums = True\n"
  log = before + "open_source.dense_transform = 'log'\n"
  assert config_changes.changed(before, log) == []
  assert config_changes.changed(before, log.replace("'log'", "'none'")) == [
      "open_source.dense_transform: (unbound) -> 'none'"]
  assert config_changes.changed("DLRM.dim = 8\n", "DLRM.dim = 8\n" + log) == [
      "open_source: (not called) -> called (dense_transform = 'log', num_categorical = 26, "
      "verify_checksums = True)"]
