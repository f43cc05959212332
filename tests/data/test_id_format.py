"""`open_source.id_format`: TSV categorical ids in hex (Criteo's, the default) or in decimal
(ids already made contiguous), recorded in preprocessed data and checked there."""

import json
import logging
import os

import numpy as np
import pytest

import data_testlib as lib
from jaxrec.data import binary, binary_write, pipeline, synthetic, tsv, tsv_ids
from jaxrec.data.source import make_layout
from jaxrec.errors import ConfigError, DataError
from jaxrec.train import config_changes
from tests.scripts.in_process import run_script
from tests.scripts.test_train import TINY_TSV_CONFIG as CONFIG

MAX = 2**64 - 1
BAG, WEIGHTED = 3, 5   # f3 multi-hot (max_len 4), f5 weighted multi-hot
HEX = lib.layout({BAG: 4, WEIGHTED: 2}, {WEIGHTED})
DECIMAL = make_layout(lib.features({BAG: 4, WEIGHTED: 2}, {WEIGHTED}), lib.rows(),
                      id_format="decimal")


def _cats(**given):
  """26 decimal ids (k * 37 for column k), `f<k>=value` replacing some."""
  cats = [str(k * 37) for k in range(26)]
  for name, value in given.items():
    cats[int(name[1:])] = value
  return cats


def test_decimal_ids_are_int_mod_rows(tsv_file):
  """One-hot, multi-hot and weighted fields, empty ones (id 0 / an empty bag), leading
  zeros and 20 digits up to 2**64-1, each `int(id) % rows`."""
  rows = [_cats(f0=str(MAX), f1="0" * 17 + "123", f2="", f3="1,22,333", f4="99999999",
                f5="77:0.5,1000", f6="123456789012345678", f7="10000000000000000000"),
          _cats(f0="18446744073709550999", f3="", f5="", f7="0")]
  b = tsv.read_tsv([tsv_file([lib.line(cats=c) for c in rows])], DECIMAL).examples
  for r, cats in enumerate(rows):
    for k, value in enumerate(cats):
      if k in (BAG, WEIGHTED):
        continue
      assert b.ids[f"f{k}"][r, 0] == int(value or 0) % 1000, (r, k)
  assert b.ids["f0"][:, 0].tolist() == [MAX % 1000, 999]
  assert b.ids["f3"].tolist() == [[1, 22, 333, -1], [-1] * 4]
  assert b.ids["f5"].tolist() == [[77, 0], [-1, -1]]
  assert b.weights["f5"].tolist() == [[0.5, 1.0], [0.0, 0.0]]


def test_contiguous_ids_fill_their_rows_only_as_decimal(tsv_file):
  """`0 .. 999` fill all 1,000 rows read as decimal, 712 read as hex."""
  path = tsv_file([lib.line(cats=_cats(f0=str(i))) for i in range(1000)])
  dec = tsv.read_tsv([path], DECIMAL).examples.ids["f0"][:, 0]
  assert sorted(dec.tolist()) == list(range(1000))
  assert len(np.unique(tsv.read_tsv([path], HEX).examples.ids["f0"])) == 712


@pytest.mark.parametrize("id_format", ["hex", "decimal"])
def test_synthetic_data_written_in_either_format_reads_back_exactly(tmp_path, id_format):
  """`synthetic.write_tsv` writes ids as the layout reads them (`%x` or `%d`), multi-hot and
  weighted ones too: the same batch either way."""
  lay = make_layout(lib.features({1: 3, 2: 2}, {2}), lib.rows(), id_format=id_format)
  src = synthetic.SyntheticSource(lay, seed=5)
  path = str(tmp_path / "s.tsv")
  synthetic.write_tsv(path, src, 400)
  got, want = tsv.read_tsv([path], lay).examples, src.gather(np.arange(400))
  for k in want.ids:
    np.testing.assert_array_equal(got.ids[k], want.ids[k])
  np.testing.assert_array_equal(got.weights["f2"], want.weights["f2"])


def test_the_parser_matches_int_on_generated_values():
  """Every width from 1 to 20 digits (leading zeros too), the edges of uint64 and of the
  8-digit groups, and values past 2**64-1, against Python's `int()`."""
  rng = np.random.default_rng(0)
  vals = [str(int(rng.integers(0, 10)) * 10**w + int(rng.integers(0, 10**min(w, 18))))
          for w in range(20) for _ in range(50)]
  vals += [str(v) for v in (0, 9, 10**8 - 1, 10**8, 10**16 - 1, 10**16, 2**63 - 1, 2**63,
                            10**19 - 1, 10**19, MAX - 1, MAX, MAX + 1, 10**20 - 1,
                            1844 * 10**16 + 6744073709551616, 1845 * 10**16)]
  vals += ["007", "0" * 20, "0" * 19 + "1", "00018446744073709551615"]
  for width in (5, 12, 20):   # the three window sizes: a chunk's widest token picks one
    chunk = [v for v in vals if len(v) <= width]
    buf = b"\t".join(v.encode() for v in chunk) + b"\n"
    a = np.concatenate([np.zeros(16, np.uint8), np.frombuffer(buf, np.uint8)])
    n = np.array([len(v) for v in chunk], np.int32)
    s = (16 + np.concatenate([[0], np.cumsum(n + 1)[:-1]])).astype(np.int32)
    raw, why = tsv_ids.parse(a, s, s + n, "decimal")
    for v, r, w in zip(chunk, raw, why):
      if len(v) > 20:
        assert w == tsv_ids.DECIMAL_TOO_LONG, v
      elif int(v) > MAX:
        assert w == tsv_ids.TOO_LARGE, v
      else:
        assert w == 0 and int(r) == int(v), v


@pytest.mark.parametrize("value, what", [
    ("-5", "is not a decimal id: '-5' (ids are not negative: 0 to 2**64-1)"),
    ("a3f", "is not a decimal id: 'a3f' (a hex id? ids are read as decimal here: "
     "open_source.id_format = 'decimal'; 'hex' reads hex ones)"),
    ("5.0", "is not a decimal id: '5.0' (a float: ids are whole numbers, written without "
     "'.' or an exponent)"),
    ("+5", "is not a decimal id: '+5'"),
    (" 5", "is not a decimal id: ' 5'"),
    ("5 ", "is not a decimal id: '5 '"),
    ("0x1f", "is not a decimal id: '0x1f'"),
    ("\u0665", "is not a decimal id: '\u0665'"),   # int() reads non-ASCII digits
    ("18446744073709551616", "is beyond 2**64-1 (18446744073709551615): "
     "'18446744073709551616'"),
    ("99999999999999999999", "is beyond 2**64-1 (18446744073709551615): "
     "'99999999999999999999'"),
    ("1" * 21, "has more than 20 decimal digits: '111111111111111111111'"),
    ("5:1", "is not a decimal id: '5:1' (ID:WEIGHT values need a weighted feature: "
     "FeatureSpec.weighted = True)"),
])
def test_a_bad_decimal_id_names_file_line_and_column(tsv_file, value, what):
  path = tsv_file([lib.line(cats=_cats())] * 3 + [lib.line(cats=_cats(f4=value))] +
                  [lib.line(cats=_cats(f2=""))])
  with pytest.raises(DataError) as e:
    tsv.read_tsv([path], DECIMAL)
  msg = str(e.value)
  assert msg.startswith(f"{path}:4: column 19 (C5): feature 'f4': categorical value ") and \
      msg.endswith(what), msg
  src = tsv.read_tsv([path], DECIMAL, bad_rows="skip")   # dropped and counted as any bad row
  assert src.num_examples == 4 and src.bad_row_counts() == {os.path.abspath(path): 1}


@pytest.mark.parametrize("column, value, what", [
    (BAG, "1,-2", "categorical value is not a decimal id: '1,-2' (ids are not negative"),
    (BAG, "1,,2", "empty id: '1,,2'"),
    (BAG, "1,2,3,4,5", "bag has more ids than max_len=4: '1,2,3,4,5'"),
    (WEIGHTED, "7:x", "bad weight (expected ID:FLOAT): '7:x'"),
    (WEIGHTED, "7:0.5,f:1", "categorical value is not a decimal id: '7:0.5,f:1' (a hex id?"),
])
def test_bad_lists_and_weights_under_decimal(tsv_file, column, value, what):
  path = tsv_file([lib.line(cats=_cats()), lib.line(cats=_cats(**{f"f{column}": value}))])
  with pytest.raises(DataError) as e:
    tsv.read_tsv([path], DECIMAL)
  assert str(e.value).startswith(
      f"{path}:2: column {15 + column} (C{column + 1}): feature 'f{column}': {what}"), e.value


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if "decimal ids" in r.getMessage()]


def test_the_decimal_ids_warning_names_the_option_and_is_off_under_decimal(tsv_file, caplog):
  path = tsv_file([lib.line(cats=_cats(f3=str(i), f7=str(i * 3))) for i in range(100)])
  with caplog.at_level(logging.WARNING):
    tsv.read_tsv([path], DECIMAL)
  assert _warnings(caplog) == []
  with caplog.at_level(logging.WARNING):
    tsv.read_tsv([path], lib.layout())
  assert _warnings(caplog) == [
      f"{path}: features 'f3' (column C4), 'f7' (column C8) hold decimal ids only (64 or more "
      "distinct at the start of the file, none with a hex letter): ids are read as hex "
      "(int(id, 16) % rows), so decimal ids collide (0 .. 999 fill 712 of 1,000 rows); if "
      "they are decimal (already made contiguous), read them as such with "
      "open_source.id_format = 'decimal' (scripts/preprocess.py: --id_format=decimal), or "
      "write them in hex ('%x')"]


@pytest.mark.parametrize("value", ["dec", "Decimal", "int", None, 10])
def test_an_unknown_id_format_names_the_binding(tsv_file, value):
  path = tsv_file([lib.line()])
  with pytest.raises(ConfigError, match=r"^open_source.id_format must be one of 'hex', "
                     r"'decimal' \('hex': Criteo's hashed ids, read as int\(id, 16\) % rows; "
                     r"'decimal': ids written in decimal, read as int\(id\) % rows\), got "):
    pipeline.open_source(path, lib.features(), lib.rows(), id_format=value)


def _decimal_tsv(tsv_file, n=40, num_sparse=26):
  lines = ["\t".join([str(i % 2)] + [str(k) for k in range(13)] +
                     [str(i * 1009 + k) for k in range(num_sparse)]) for i in range(n)]
  return tsv_file(lines)


def test_preprocessed_decimal_ids_are_read_and_the_format_is_recorded(tmp_path, tsv_file):
  path = _decimal_tsv(tsv_file)
  out = str(tmp_path / "bin")
  m = binary_write.preprocess(path, out, lib.features(), lib.rows(), id_format="decimal")
  assert m["id_format"] == "decimal"
  assert json.load(open(os.path.join(out, binary.MANIFEST)))["id_format"] == "decimal"
  src = pipeline.open_source(out, lib.features(), lib.rows(), id_format="decimal")
  want = pipeline.open_source(path, lib.features(), lib.rows(), id_format="decimal")
  got, want = src.gather(np.arange(40)), want.gather(np.arange(40))
  for k in want.ids:
    np.testing.assert_array_equal(got.ids[k], want.ids[k])
  assert got.ids["f1"][3, 0] == (3 * 1009 + 1) % 1000
  m = binary_write.preprocess(tsv_file([lib.line()]), str(tmp_path / "hex"), lib.features(),
                              lib.rows())
  assert m["id_format"] == "hex"


def test_data_of_another_id_format_is_refused_naming_both(tmp_path, tsv_file):
  out = str(tmp_path / "bin")
  binary_write.preprocess(_decimal_tsv(tsv_file), out, lib.features(), lib.rows(),
                          id_format="decimal")
  with pytest.raises(DataError, match=(
      r"manifest.json: the data's ids were preprocessed with id_format 'decimal' but this "
      r"run is configured with open_source.id_format = 'hex'; bind open_source.id_format = "
      r"'decimal' \(gin\) to train on this data, or re-run scripts/preprocess.py with "
      r"--id_format=hex")):
    pipeline.open_source(out, lib.features(), lib.rows())


def test_a_dataset_from_before_the_field_is_hex(tmp_path, tsv_file):
  out = str(tmp_path / "bin")
  binary_write.preprocess(tsv_file([lib.line()]), out, lib.features(), lib.rows())
  path = os.path.join(out, binary.MANIFEST)
  m = json.load(open(path))
  del m["id_format"]
  open(path, "w").write(json.dumps(m))
  assert pipeline.open_source(out, lib.features(), lib.rows()).num_examples == 1
  with pytest.raises(DataError, match="preprocessed with id_format 'hex' but .* 'decimal'"):
    pipeline.open_source(out, lib.features(), lib.rows(), id_format="decimal")
  m["id_format"] = "octal"
  open(path, "w").write(json.dumps(m))
  with pytest.raises(DataError, match=r'manifest.json: id_format is "octal", not one of '
                     r'"hex", "decimal"'):
    pipeline.open_source(out, lib.features(), lib.rows())


def test_preprocess_script_then_train_on_decimal_ids(tmp_path, tsv_file):
  """preprocess.py takes the id format from the gin (as training reads the TSV) or its
  flag, and without either warns of the decimal ids naming the flag; train.py on that data
  records it in W/config.gin, and a run configured otherwise is refused before it trains."""
  config = tmp_path / "c.gin"
  config.write_text(CONFIG)
  path = _decimal_tsv(tsv_file, n=80, num_sparse=8)
  out = tmp_path / "bin"
  binding = "--gin_bindings=open_source.id_format = 'decimal'"
  r = run_script("preprocess.py", f"--input={path}", f"--output={out}", f"--gin_file={config}",
                 binding)
  assert r.returncode == 0 and "decimal ids" not in r.stderr, r.stderr
  assert json.load(open(out / binary.MANIFEST))["id_format"] == "decimal"
  r = run_script("preprocess.py", f"--input={path}", f"--output={tmp_path / 'b2'}",
                 f"--gin_file={config}", "--id_format=dec")
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: --id_format must be one of 'hex', 'decimal' ('hex': Criteo's hashed ids, read "
      "as int(id, 16) % rows; 'decimal': ids written in decimal, read as int(id) % rows), "
      "got 'dec'")
  r = run_script("preprocess.py", f"--input={path}", f"--output={tmp_path / 'b3'}",
                 f"--gin_file={config}")   # hex: written, with the warning naming the flag
  assert r.returncode == 0 and "hold decimal ids only" in r.stderr and \
      "--id_format=decimal" in r.stderr, r.stderr
  assert json.load(open(tmp_path / "b3" / binary.MANIFEST))["id_format"] == "hex"
  r = run_script("preprocess.py", f"--input={path}", f"--output={tmp_path / 'b4'}",
                 f"--rows=1000", "--num_categorical=8", "--id_format=decimal")   # no gin
  assert r.returncode == 0, r.stderr
  assert json.load(open(tmp_path / "b4" / binary.MANIFEST))["id_format"] == "decimal"
  flags = [f"--gin_file={config}", f"--train_data={out}", f"--eval_data={out}",
           "--num_steps=2", "--log_every=1", "--noprogress"]
  r = run_script("train.py", f"--workdir={tmp_path / 'w'}", *flags, binding)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "open_source.id_format = 'decimal'" in (tmp_path / "w" / "config.gin").read_text()
  r = run_script("train.py", f"--workdir={tmp_path / 'w2'}", *flags)
  assert r.returncode == 1 and "preprocessed with id_format 'decimal' but this run is " \
      "configured with open_source.id_format = 'hex'" in r.stderr, r.stderr[-3000:]


def test_a_bad_gin_binding_is_named_where_it_is_bound(tmp_path, tsv_file):
  config = tmp_path / "c.gin"
  config.write_text(CONFIG + "open_source.id_format = 'octal'\n")
  r = run_script("preprocess.py", f"--input={_decimal_tsv(tsv_file, num_sparse=8)}",
                 f"--output={tmp_path / 'b'}", f"--gin_file={config}")
  assert r.returncode == 1 and r.stderr.strip() == (
      f"error: --gin_file: {config}:7: open_source.id_format must be one of 'hex', "
      "'decimal' ('hex': Criteo's hashed ids, read as int(id, 16) % rows; 'decimal': ids "
      "written in decimal, read as int(id) % rows), got 'octal'"), r.stderr


def test_a_resume_of_a_run_from_before_the_binding_is_no_change():
  """Runs before it read TSV ids as hex and their config.gin has no such line: not a
  change at a resume; 'decimal' is one."""
  before = "open_source.num_categorical = 26\nopen_source.verify_checksums = True\n"
  now = before + "open_source.dense_transform = 'log'\nopen_source.id_format = 'hex'\n"
  assert config_changes.changed(before, now) == []
  assert config_changes.changed(before, now.replace("'hex'", "'decimal'")) == [
      "open_source.id_format: (unbound) -> 'decimal'"]
