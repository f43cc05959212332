"""Criteo TSV parsing: conventions, multi-hot, and one clear error per kind of bad input."""

import bz2
import gzip
import logging
import lzma
import os
import re
import threading
import time

import numpy as np
import pytest

import data_testlib as lib
from jaxrec.data import synthetic, tsv
from jaxrec.data.source import make_layout
from jaxrec.errors import ConfigError, DataError


def read(paths, lay=None, **kw):
  return tsv.read_tsv(paths if isinstance(paths, list) else [paths], lay or lib.layout(), **kw)


def test_conventions(tsv_file):
  dense = ["0", "", "-5", "7", "1000000", "3", "", "", "", "", "", "", "12"]
  cats = ["ff", "", "1A", "3e9", "FFFFFFFFFFFFFFFF"] + [f"{k:x}" for k in range(5, 26)]
  path = tsv_file([lib.line("0", dense, cats), lib.line()])
  b = read(path, lib.layout(n=1000)).examples
  np.testing.assert_array_equal(b.labels, [0, 1])
  expect = np.log1p([0, 0, 0, 7, 1e6, 3, 0, 0, 0, 0, 0, 0, 12]).astype(np.float32)
  np.testing.assert_allclose(b.dense[0], expect, rtol=1e-6)
  np.testing.assert_allclose(b.dense[1], np.log1p(np.arange(1, 14)), rtol=1e-6)
  assert b.ids["f0"][0, 0] == 255
  assert b.ids["f1"][0, 0] == 0  # empty one-hot -> 0
  assert b.ids["f2"][0, 0] == 0x1A % 1000
  assert b.ids["f3"][0, 0] == 0x3E9 % 1000
  assert b.ids["f4"][0, 0] == 0xFFFFFFFFFFFFFFFF % 1000
  assert all(b.ids[f"f{k}"].dtype == np.int32 and b.ids[f"f{k}"].shape == (2, 1)
             for k in range(26))
  assert b.dense.dtype == np.float32 and b.labels.dtype == np.float32


def test_multi_hot_and_weights(tsv_file):
  cats = [f"{k:x}" for k in range(26)]
  cats[0], cats[1], cats[2] = "a,b,c", "", "5:0.5,6"
  lay = lib.layout(max_lens={0: 4, 1: 3, 2: 2}, weighted={2})
  b = read(tsv_file([lib.line(cats=cats)]), lay).examples
  np.testing.assert_array_equal(b.ids["f0"], [[10, 11, 12, -1]])
  np.testing.assert_array_equal(b.ids["f1"], [[-1, -1, -1]])  # empty bag
  np.testing.assert_array_equal(b.ids["f2"], [[5, 6]])
  np.testing.assert_array_equal(b.weights["f2"], [[0.5, 1.0]])
  assert list(b.weights) == ["f2"]


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_of_synthetic_data(tmp_path, compress):
  lay = lib.layout(max_lens={0: 3, 5: 2}, weighted={5}, n=5000)
  src = synthetic.SyntheticSource(lay, seed=3)
  path = str(tmp_path / "syn.tsv")
  synthetic.write_tsv(path, src, 700, compress=compress)
  got = tsv.read_tsv([path], lay, chunk_bytes=4096).examples  # many chunks
  want = src.gather(np.arange(700))
  np.testing.assert_array_equal(got.labels, want.labels)
  np.testing.assert_allclose(got.dense, want.dense, rtol=1e-6)
  for k in want.ids:
    np.testing.assert_array_equal(got.ids[k], want.ids[k])
  np.testing.assert_array_equal(got.weights["f5"], want.weights["f5"])


def test_crlf_and_missing_final_newline(tsv_file):
  path = tsv_file([lib.line("0"), lib.line("1")], newline="\r\n", final_newline=False)
  b = read(path).examples
  np.testing.assert_array_equal(b.labels, [0, 1])
  assert b.ids["f25"][1, 0] == 25


@pytest.mark.parametrize("compress", [False, True])
def test_a_utf8_bom_at_the_start_of_a_file_is_skipped(tmp_path, compress):
  """Windows tools write one; it was 'label must be 0 or 1, got '\\ufeff1''."""
  path = tmp_path / "bom.tsv"
  data = b"\xef\xbb\xbf" + ("\r\n".join([lib.line("1"), lib.line("0")]) + "\r\n").encode()
  path.write_bytes(gzip.compress(data) if compress else data)
  np.testing.assert_array_equal(read(str(path)).examples.labels, [1, 0])
  path.write_bytes(b"\xef\xbb\xbf")
  with pytest.raises(DataError, match=f"^{path}: empty file$"):
    read(str(path))


def test_a_utf8_bom_inside_a_file_is_named(tsv_file):
  """Only byte 0 may hold one (files joined with `cat` keep the second file's)."""
  path = tsv_file([lib.line("1"), "\ufeff" + lib.line("0")])
  with pytest.raises(DataError, match=f"^{re.escape(path)}:2: column 1 \\(label\\): label must be "
                     "0 or 1, got '\\\\ufeff0' \\(a UTF-8 byte order mark: one is skipped only at "
                     "the start of a file\\)$"):
    read(path)


@pytest.mark.parametrize("bad_rows", ["error", "skip"])
def test_lines_ending_in_cr_alone_are_named(tsv_file, bad_rows):
  """Classic Mac line endings made one line of the file: 'expected 40 columns, found 196',
  and `skip` dropped all its rows as '1 malformed row'."""
  path = tsv_file([lib.line("0"), lib.line("1"), lib.line("0")], newline="\r")
  with pytest.raises(DataError, match=f"^{path}:1: lines end in '\\\\r' alone"):
    tsv.read_tsv([path], lib.layout(), bad_rows)
  one = tsv_file([lib.line("1")], newline="\r")   # a last line ending in \r: as \r\n
  assert read(one).examples.labels.tolist() == [1]


@pytest.mark.parametrize("compress,name", [(lzma.compress, "xz"), (bz2.compress, "bzip2")])
def test_other_compressions_are_named(tmp_path, compress, name):
  """Only gzip is decompressed; xz and bzip2 files said 'not a text file (control byte
  0x00)' without naming the compression."""
  path = tmp_path / "day_0.tsv.z"
  path.write_bytes(compress((lib.line() + "\n").encode() * 3))
  with pytest.raises(DataError, match=f"^{path}: {name}-compressed; only plain text and gzip"):
    read(str(path))


def test_parquet_and_binary_files_say_what_is_read(tmp_path):
  """A Parquet file (NVTabular's output, HugeCTR's Parquet format) said only 'not a text
  file (control byte 0x15)', and a HugeCTR Norm/Raw binary file only that: neither said
  what jaxrec reads instead."""
  parquet = tmp_path / "part_0.parquet"
  parquet.write_bytes(b"PAR1\x15\x04\x15\x80\x01" + bytes(200) + b"PAR1")
  with pytest.raises(DataError, match=f"^{parquet}: a Parquet file; jaxrec reads Criteo TSV .*preprocess"):
    read(str(parquet))
  binary = tmp_path / "train_data.bin"
  binary.write_bytes(np.arange(1000, dtype=np.int32).tobytes())
  with pytest.raises(DataError, match=re.escape(
      f"{binary}:1: not a text file (control byte 0x00): jaxrec reads Criteo TSV")):
    read(str(binary))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_text_is_named(tmp_path, encoding):
  """Excel's 'Unicode Text' (with a byte-order mark) or PowerShell's `>`: 'not a text file
  (control byte 0x00)'."""
  path = tmp_path / "day_0.tsv"
  path.write_bytes(((lib.line() + "\n") * 3).encode(encoding))
  with pytest.raises(DataError, match=f"^{path}: UTF-16 text; only UTF-8 .*iconv -f UTF-16"):
    read(str(path))


def test_files_dirs_and_globs(tmp_path):
  d = tmp_path / "d"
  d.mkdir()
  lib.write(d / "b.tsv", [lib.line("1")])
  lib.write(d / "a.tsv.gz", [lib.line("0")], compress=True)
  (d / ".hidden").write_text("junk")
  for path in [str(d), str(d / "*")]:
    files = tsv.list_files(path)
    assert [os.path.basename(f) for f in files] == ["a.tsv.gz", "b.tsv"]
    np.testing.assert_array_equal(read(files).examples.labels, [0, 1])


def test_files_are_read_in_byte_wise_name_order(tmp_path):
  """Not natural order: checkpoints' data positions depend on it (see README "Data" and
  docs/data.md)."""
  d = tmp_path / "days"
  d.mkdir()
  names = ["day_2", "day_10", "day_1.tsv", "day_1", "Day_3", "day_02"]
  for n in names:
    lib.write(d / n, [lib.line()])
  want = ["Day_3", "day_02", "day_1", "day_1.tsv", "day_10", "day_2"]
  assert want == sorted(names, key=str.encode)
  for path in [str(d), str(d / "*")]:
    assert [os.path.basename(f) for f in tsv.list_files(path)] == want


def test_a_glob_that_matches_only_directories_says_so(tmp_path):
  """It said 'no files match this pattern', as if nothing matched."""
  for day in ["day_1", "day_0"]:
    (tmp_path / day).mkdir()
    lib.write(tmp_path / day / "part.tsv", [lib.line()])
  pattern = str(tmp_path / "day_*")
  with pytest.raises(DataError) as e:
    tsv.list_files(pattern)
  assert str(e.value) == (f"{pattern}: matches only directories (e.g. {tmp_path / 'day_0'}), "
                          "no files; to read the files inside them, end the pattern with /*")
  assert tsv.list_files(pattern + "/*") == [str(tmp_path / d / "part.tsv")
                                            for d in ["day_0", "day_1"]]


def test_a_glob_that_matches_preprocessed_datasets_says_to_give_one(tmp_path):
  """The advice to end the pattern with /* led to 'manifest.json: part of the preprocessed
  dataset ...; give the directory', in a circle."""
  for day in ["day_1", "day_0"]:
    (tmp_path / day).mkdir()
    (tmp_path / day / "manifest.json").write_text('{"format": "jaxrec.binary"}')
  pattern = str(tmp_path / "day_*")
  with pytest.raises(DataError) as e:
    tsv.list_files(pattern)
  assert str(e.value) == (f"{pattern}: matches only directories, no files; "
                          f"{tmp_path / 'day_0'}, {tmp_path / 'day_1'} are preprocessed "
                          "datasets: give one of them (a run reads one preprocessed dataset)")


def test_a_directory_of_only_subdirectories_names_them(tmp_path):
  """It said 'directory holds no files', as if it were empty."""
  for day in ["day_2", "day_0", "day_1", "day_3"]:
    (tmp_path / day).mkdir()
    lib.write(tmp_path / day / "part.tsv", [lib.line()])
  with pytest.raises(DataError) as e:
    tsv.list_files(str(tmp_path))
  assert str(e.value) == (
      f"{tmp_path}: directory holds only subdirectories (day_0, day_1, day_2, ...), no files; "
      "expected TSV files (plain or gzip) directly in it; to read the files inside the "
      f"subdirectories, pass the glob {tmp_path / '*' / '*'}")
  assert len(tsv.list_files(str(tmp_path / "*" / "*"))) == 4


def test_existing_paths_with_glob_characters_are_literal(tmp_path):
  d = tmp_path / "run[1]"
  d.mkdir()
  lib.write(d / "day_0", [lib.line("0")])
  (tmp_path / "run1").mkdir()  # what `run[1]` means as a pattern
  lib.write(tmp_path / "run1" / "day_0", [lib.line("1")])
  assert tsv.list_files(str(d)) == [str(d / "day_0")]
  assert tsv.list_files(str(d / "day_0")) == [str(d / "day_0")]
  assert tsv.list_files(str(tmp_path / "run[0-9]" / "*")) == [str(tmp_path / "run1" / "day_0")]


def test_named_pipes_are_read(tmp_path):
  """`--train_data=<(zcat day_0.gz)` and /dev/null exist: they were 'no such file or
  directory'."""
  pipe = str(tmp_path / "pipe")
  os.mkfifo(pipe)
  data = ("\n".join([lib.line("1"), lib.line("0")]) + "\n").encode()
  files = tsv.list_files(pipe)   # before the writer, which blocks until a reader opens it
  writer = threading.Thread(target=lambda: open(pipe, "wb").write(data), daemon=True)
  writer.start()
  np.testing.assert_array_equal(read(files).examples.labels, [1, 0])
  writer.join()
  with pytest.raises(DataError, match="^/dev/null: empty file$"):
    read(tsv.list_files("/dev/null"))


def test_gzip_through_a_pipe_that_brings_its_first_byte_alone(tmp_path):
  """`<(ssh host cat day.gz)` can deliver one byte first: the gzip check peeked once, saw
  one byte and read the file as text ('not a text file (control byte 0x1f)')."""
  import gzip  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  pipe = str(tmp_path / "pipe")
  os.mkfifo(pipe)
  data = gzip.compress(("\n".join([lib.line("1"), lib.line("0")]) + "\n").encode())

  def write():
    with open(pipe, "wb", buffering=0) as f:
      f.write(data[:1])
      time.sleep(0.3)
      f.write(data[1:])
  writer = threading.Thread(target=write, daemon=True)
  writer.start()
  np.testing.assert_array_equal(read([pipe]).examples.labels, [1, 0])
  writer.join()


def _bad(label="1", dense=None, cats=None, col=None, value=None):
  dense = dense or [str(i) for i in range(13)]
  cats = cats or [f"{k:x}" for k in range(26)]
  if col is not None:
    if col < 13:
      dense[col] = value
    else:
      cats[col - 13] = value
  return lib.line(label, dense, cats)


@pytest.mark.parametrize("bad_line, where, what", [
    (_bad(col=2, value="nan"), "column 4 (I3)", "not an integer: 'nan'"),
    (_bad(col=0, value="inf"), "column 2 (I1)", "not an integer: 'inf'"),
    (_bad(col=12, value="1.5"), "column 14 (I13)", "not an integer"),
    # normalised float features (NVTabular, HugeCTR's Parquet): the error gave no reason
    (_bad(col=1, value="0.25"), "column 3 (I2)",
     "not an integer: '0.25' (dense columns hold raw integer counts"),
    (_bad(col=1, value="-1.5e-3"), "column 3 (I2)", "'-1.5e-3' (dense columns hold raw"),
    (_bad(col=3, value="-"), "column 5 (I4)", "not an integer"),
    (_bad(col=3, value="1" * 19), "column 5 (I4)", "more than 18 digits"),
    (_bad(col=13, value="xyz"), "column 15 (C1)", "not hex: 'xyz'"),
    (_bad(col=20, value="12 3"), "column 22 (C8)", "not hex"),
    (_bad(col=20, value="1" * 17), "column 22 (C8)", "more than 16 hex digits"),
    (_bad(col=14, value="1,2"), "column 16 (C2)", "one-hot"),
    (_bad(label="2"), "column 1 (label)", "label must be 0 or 1, got '2'"),
    (_bad(label=""), "column 1 (label)", "label must be 0 or 1"),
    (_bad(label="1.0"), "column 1 (label)", "label must be 0 or 1"),
    ("\t".join(["1"] * 39), "", "expected 40 tab-separated columns"),
    ("\t".join(["1"] * 41), "", "found 41"),
    # one column more, empty: the error said only "found 41"
    (lib.line() + "\t", "", "found 41 (the line ends in a tab)"),
    (lib.line() + "\t\r", "", "found 41 (the line ends in a tab)"),
    ("", "", "empty line, expected 40 tab-separated columns"),   # was "found 1"
    ("\r", "", "empty line, expected 40"),
])
def test_malformed_rows_name_file_line_and_column(tsv_file, bad_line, where, what):
  path = tsv_file([lib.line()] * 3 + [bad_line] + [lib.line()])
  with pytest.raises(DataError) as e:
    read(path)
  msg = str(e.value)
  assert msg.startswith(f"{path}:4: "), msg
  assert where in msg and what in msg, msg


def test_data_of_another_categorical_count_says_how_many_columns_it_has(tsv_file):
  """An 8-feature config on Criteo's 26 columns said only 'expected 22 tab-separated
  columns (...), found 40' (preprocess.py reads as many columns as there are features)."""
  lay = make_layout(lib.features()[:8], lib.rows())
  path = tsv_file([lib.line()] * 3)
  with pytest.raises(DataError) as e:
    read(path, lay)
  assert str(e.value) == (
      f"{path}:1: expected 22 tab-separated columns (label, 13 integer, 8 categorical), found "
      "40, as do all 3 lines read with it: 26 categorical columns after the 13 integer ones? "
      "the configuration has 8 sparse features, one per categorical column (the FeatureSpecs of "
      "ExperimentConfig.embedding, e.g. uniform_tables.num_tables)")
  for lines in ([lib.line()], [lib.line(), "\t".join(["1"] * 22), lib.line()],
                ["\t".join(["1"] * 10)] * 2):   # one line, one good line, too few columns
    with pytest.raises(DataError) as e:
      read(tsv_file(lines), lay)
    assert "as do all" not in str(e.value), str(e.value)
  # Criteo lines whose last field is empty end in a tab: they said '(the line ends in a
  # tab)' instead, as if a stray tab made 18 columns too many
  empty_last = lib.line().rsplit("\t", 1)[0] + "\t"
  with pytest.raises(DataError, match="found 40, as do all 3 lines read with it: 26 "):
    read(tsv_file([empty_last] * 3), lay)


def test_unlabeled_and_comma_separated_files_are_named_as_such(tsv_file):
  """Criteo's test.txt has no label column: 39 columns read as '25 categorical columns
  after the 13 integer ones?'; a CSV file said only 'found 1'. The hint names train.py's
  flag: scripts/preprocess.py, which has none, pointed at '--noeval_labels' too."""
  lay = make_layout(lib.features(), lib.rows())
  unlabeled = lib.line().split("\t", 1)[1]
  with pytest.raises(DataError, match=r":1: expected 40 .* found 39, as do all 3 lines read "
                     r"with it: no label column \(as Criteo's unlabeled test.txt: training "
                     r"and preprocessed files need labels; eval files to be scored only are "
                     r"read as TSV by scripts/train.py --noeval_labels\)\? or 25 categorical "
                     r"columns"):
    read(tsv_file([unlabeled] * 3), lay)
  with pytest.raises(DataError, match=r":1: expected 40 .* found 1 \(no tab, 39 commas: "
                     r"comma-separated\? the columns must be tab-separated\)$"):
    read(tsv_file([lib.line().replace("\t", ",")] * 2), lay)


def test_the_trailing_tab_hint_is_only_for_one_column_too_many(tsv_file):
  """A 39-column line whose last field is empty said '(the line ends in a tab)': a tab
  cannot explain a column too few."""
  path = tsv_file([lib.line(), "\t".join(["1"] * 38) + "\t"])
  with pytest.raises(DataError, match="found 39$"):
    read(path)


@pytest.mark.parametrize("value, max_len, weighted, what", [
    ("1,2,3", 2, False, "more ids than max_len=2"),
    ("1,,3", 3, False, "empty id"),
    ("1,", 3, False, "empty id"),
    ("1:x", 2, True, "bad weight"),
    ("1:nan", 2, True, "bad weight"),
    ("1:1e39", 2, True, r"bad weight \(expected HEXID:FLOAT\): '1:1e39' \(weight 1e39 is "
     r"beyond float32's range"),  # finite as float64, inf as float32
    ("1:0.5:2", 2, True, "bad weight"),
    ("1:1_0", 2, True, "bad weight"),   # Python's float() reads these: 10 and 1
    ("1: 1", 2, True, "bad weight"),
    ("1:0.5", 2, False, r"not hex: '1:0.5' \(HEXID:WEIGHT values need a weighted feature: "
     r"FeatureSpec.weighted = True\)$"),
    ("1:nan,2:1e40", 2, True, r"\(weight 1e40 is beyond float32's range, \+-3.4e38\)$"),
])
def test_malformed_bags(tsv_file, value, max_len, weighted, what):
  cats = [f"{k:x}" for k in range(26)]
  cats[3] = value
  lay = lib.layout(max_lens={3: max_len}, weighted={3} if weighted else ())
  path = tsv_file([lib.line(), lib.line(cats=cats)])
  with pytest.raises(DataError, match=f"^{re.escape(path)}:2: column 18 \\(C4\\): .*{what}"):
    read(path, lay)


@pytest.mark.parametrize("raw, shown", [
    (b"19\r", "'19\\r'"),            # a line ending in \r\r\n: the value looked like hex
    (b"\xe9", "'\\xe9'"),             # not UTF-8: the byte, not a replacement character
    (b"a\x1bb", "'a\\x1bb'"),          # a control byte (an escape sequence's start)
    (b"\xc3\xa9", "'\u00e9'"),          # UTF-8 text is shown as it is
])
def test_quoted_values_show_invisible_characters(tmp_path, raw, shown):
  """The quoted value of an error escapes what a terminal would not show (or would act on)."""
  path = tmp_path / "bad.tsv"
  good = (lib.line() + "\n").encode() * 1000   # past the text check's first 64 KiB
  path.write_bytes(good + lib.line().encode()[:-3] + b"\t" + raw + b"\r\n")   # C26 replaced
  with pytest.raises(DataError) as e:
    read(str(path))
  msg = str(e.value)
  assert msg == (f"{path}:1001: column 40 (C26): feature 'f25': categorical value is not hex: "
                 f"{shown}")


def test_a_file_without_newlines_is_read_in_linear_time(tmp_path):
  """Each read copied the whole unfinished line (`rest + data`): 32 MiB without a newline in
  4 KiB reads copied ~128 GiB (~15 s) before the error. CPU time, not wall time: ~0.1 s,
  where the wall clock of a loaded machine gave 2-3 s of a 5 s bound."""
  path = tmp_path / "one_line.txt"
  path.write_bytes(b"x" * (32 << 20))
  start = time.process_time()
  chunks = [chunk for _, chunk in tsv.read_chunks(str(path), chunk_bytes=4096)]
  assert time.process_time() - start < 5
  assert chunks == [b"x" * (32 << 20) + b"\n"]


@pytest.mark.parametrize("compress", [False, True])
def test_lines_longer_than_the_limit_are_refused(tsv_file, monkeypatch, compress):
  """Naming file and line, after reading no more than the limit and one chunk."""
  long = "0" * 5000
  path = tsv_file([lib.line(), lib.line(), long, lib.line()], compress=compress)
  with pytest.raises(DataError) as e:
    list(tsv.read_chunks(path, chunk_bytes=512, max_line_bytes=4096))
  assert str(e.value) == (f"{path}:3: a line longer than 4096 bytes (no newline in its first "
                          "4096 bytes): not Criteo TSV"), e.value
  monkeypatch.setattr(tsv, "MAX_LINE_BYTES", 4096)
  with pytest.raises(DataError, match=f"^{re.escape(path)}:3: a line longer than 4096 bytes"):
    read(path, chunk_bytes=512, bad_rows="skip")
  ok = tsv_file([lib.line(), "1" + "\t" * 39 + "0" * 3000, lib.line("0")], compress=compress)
  with pytest.raises(DataError, match=f"^{re.escape(ok)}:2: column 40 \\(C26\\): .* more than 16"):
    read(ok, chunk_bytes=512)   # 3 KiB, under the limit: parsed as usual


def test_line_numbers_across_chunks(tsv_file):
  lines = [lib.line()] * 60
  lines[47] = _bad(col=5, value="oops")
  path = tsv_file(lines, compress=True)
  with pytest.raises(DataError, match=f"^{path}:48: column 7 \\(I6\\)"):
    tsv.read_tsv([path], lib.layout(), chunk_bytes=300)


def test_first_error_wins(tsv_file):
  lines = [lib.line()] * 5
  lines[3] = "1\t2"
  lines[2] = _bad(col=20, value="zz")
  path = tsv_file(lines)
  with pytest.raises(DataError, match=f"^{path}:3: column 22"):
    read(path)


def test_skip_counts_logs_and_keeps_order(tsv_file, caplog):
  good = [lib.line(label=str(i % 2), dense=[str(i)] + ["1"] * 12) for i in range(10)]
  lines = list(good)
  lines.insert(2, _bad(col=0, value="nan"))
  lines.insert(6, "1\t2\t3")
  lines.insert(9, _bad(label="7"))
  a = tsv_file(lines)
  b = tsv_file([good[0], _bad(col=13, value="q")])
  with caplog.at_level(logging.WARNING):
    src = read([a, b], bad_rows="skip")
  assert src.bad_row_counts() == {a: 3, b: 1}
  np.testing.assert_allclose(src.examples.dense[:10, 0], np.log1p(np.arange(10)), rtol=1e-6)
  assert src.num_examples == 11
  logged = caplog.text
  assert f"{a}:3:" in logged and f"{a}:7:" in logged and f"{a}:10:" in logged
  assert f"{b}:2:" in logged


def test_bad_rows_are_counted_by_absolute_path(tsv_file, monkeypatch):
  """Train on `a.tsv` and evaluate on `./a.tsv` (or on shards preprocessed from it, which
  record absolute paths): `bad_rows` named one file twice, `{'a.tsv': 1, './a.tsv': 1}`."""
  import os  # pylint: disable=import-outside-toplevel
  from jaxrec.train import data_adapter  # pylint: disable=import-outside-toplevel
  path = tsv_file([lib.line(), _bad(col=0, value="x"), lib.line()])
  monkeypatch.chdir(os.path.dirname(path))
  name = os.path.basename(path)
  train, eval_ = (read(p, bad_rows="skip") for p in (name, os.path.join(".", name)))
  assert train.bad_row_counts() == {path: 1}
  assert data_adapter.bad_row_metrics(train, eval_) == {"bad_rows": {path: 1}}


def test_a_nul_byte_in_one_field_is_a_bad_row_wherever_it_is(tsv_file):
  """Within the first 64 KiB a NUL in one field called the whole file 'not a text file',
  also under --bad_rows=skip; past it the row was skipped. Now it is a bad row: skipped,
  or (error) named with its line and column."""
  lines = [lib.line(label=str(i % 2)) for i in range(10)]
  lines[4] = _bad(col=20, value="ab\x00cd")
  path = tsv_file(lines)
  src = read(path, bad_rows="skip")
  assert src.bad_row_counts() == {path: 1} and src.num_examples == 9
  with pytest.raises(DataError, match=f"^{path}:5: "):
    read(path)
  short = tsv_file([lib.line(), _bad(col=20, value="ab\x00cd")])   # a few lines: one NUL was
  assert read(short, bad_rows="skip").num_examples == 1            # over 1% of the file


def test_skip_everything_bad_is_an_error(tsv_file):
  path = tsv_file(["1\t2"] * 3)
  with pytest.raises(DataError, match="no valid rows"):
    read(path, bad_rows="skip")


def test_bad_rows_value_is_checked(tsv_file):
  with pytest.raises(ConfigError, match="bad_rows"):
    read(tsv_file([lib.line()]), bad_rows="ignore")


def test_bad_files(tmp_path):
  empty = tmp_path / "empty.tsv"
  empty.write_bytes(b"")
  with pytest.raises(DataError, match=f"^{empty}: empty file"):
    read(str(empty))
  gz_empty = tmp_path / "empty.gz"
  gz_empty.write_bytes(gzip.compress(b""))
  with pytest.raises(DataError, match="empty file"):
    read(str(gz_empty))
  binary = tmp_path / "model.bin"
  binary.write_bytes(np.arange(1000, dtype=np.float32).tobytes())
  with pytest.raises(DataError, match=f"^{binary}:1: not a text file"):
    read(str(binary))
  truncated = tmp_path / "t.tsv.gz"
  truncated.write_bytes(gzip.compress(("\n".join([lib.line()] * 200) + "\n").encode())[:-30])
  with pytest.raises(DataError, match=f"^{truncated}: truncated gzip"):
    read(str(truncated))
  corrupt = tmp_path / "c.gz"
  data = bytearray(gzip.compress(("\n".join([lib.line()] * 200) + "\n").encode()))
  data[20:40] = b"\xff" * 20
  corrupt.write_bytes(bytes(data))
  with pytest.raises(DataError, match=f"^{corrupt}: (corrupt|truncated) gzip"):
    read(str(corrupt))
  with pytest.raises(DataError, match="no such file or directory"):
    tsv.list_files(str(tmp_path / "missing.tsv"))
  with pytest.raises(DataError, match="no files match"):
    tsv.list_files(str(tmp_path / "nothing*"))
  (tmp_path / "void").mkdir()
  with pytest.raises(DataError, match="holds no files"):
    tsv.list_files(str(tmp_path / "void"))


def test_decimal_ids_are_warned_about(tsv_file, caplog):
  """Ids already made contiguous (0 .. N-1, NVTabular's Categorify) written in decimal were
  read as hex without a word: 0 .. 999 fell on 712 of 1,000 rows. Features whose first
  chunk holds 64 or more distinct ids without a hex letter are named; random hex ids, and
  a few small decimal-looking ones, are not."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(200):
    cats = [f"{rng.integers(0, 2**32):08x}" for _ in range(26)]
    cats[3], cats[7] = str(i), str(i % 10)   # f3: 200 decimal ids; f7: 10 of them
    lines.append(lib.line(cats=cats))
  path = tsv_file(lines)
  with caplog.at_level(logging.WARNING):
    b = read(path, lib.layout(n=1000)).examples
  assert b.ids["f3"][11, 0] == 0x11   # read as hex, as before
  warned = [r.getMessage() for r in caplog.records if "decimal ids" in r.getMessage()]
  assert warned == [f"{path}: feature 'f3' (column C4) holds decimal ids only (64 or more "
                    "distinct at the start of the file, none with a hex letter): ids are "
                    "read as hex (int(id, 16) % rows), so decimal ids collide (0 .. 999 "
                    "fill 712 of 1,000 rows); if they are decimal (already made contiguous), "
                    "read them as such with open_source.id_format = 'decimal' "
                    "(scripts/preprocess.py: --id_format=decimal), or write them in hex "
                    "('%x')"]


def test_unlabeled_lines_read_as_labeled_ones_and_errors_name_the_files_columns(tsv_file):
  """`labeled=False` (the trainer's --noeval_labels): each line is the labeled line less
  its label (CRLF, no final newline and blank-field lines too), read with labels of 0; a
  bad value names the file's own column number; a wrong count says what is expected."""
  lines = [lib.line("1", [str(k) for k in range(13)], [f"{k:x}" for k in range(26)]),
           lib.line(), lib.line("0", [""] * 13, [""] * 26)]
  labeled = read(tsv_file(lines)).examples
  unlabeled = [line.split("\t", 1)[1] for line in lines]
  for text in ("\n".join(unlabeled) + "\n", "\r\n".join(unlabeled)):
    path = tsv_file([])
    with open(path, "w", newline="") as f:
      f.write(text)
    got = read(path, labeled=False)
    assert got.labeled is False
    np.testing.assert_array_equal(got.examples.labels, [0, 0, 0])
    np.testing.assert_array_equal(got.examples.dense, labeled.dense)
    for k in labeled.ids:
      np.testing.assert_array_equal(got.examples.ids[k], labeled.ids[k])
  bad = unlabeled[1].split("\t")
  bad[13 + 2] = "zz"   # C3: the file's column 16 (the labeled file's 17)
  with pytest.raises(DataError, match=r":2: column 16 \(C3\): feature 'f2': categorical "
                     r"value is not hex: 'zz'"):
    read(tsv_file([unlabeled[0], "\t".join(bad)]), labeled=False)
  with pytest.raises(DataError, match=r":2: expected 39 tab-separated columns \(13 integer, "
                     r"26 categorical; no label\), found 38$"):
    read(tsv_file([unlabeled[0], unlabeled[1].rsplit("\t", 1)[0]]), labeled=False)
