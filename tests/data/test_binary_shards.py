"""Preprocessed binary shards: same examples as the TSV, random access, strict checks."""

import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest

import data_testlib as lib
from jaxrec.data import binary, binary_write, synthetic, tsv
from jaxrec.data.source import make_layout
from jaxrec.embedding.specs import FeatureSpec
from jaxrec.errors import ConfigError, DataError

MAX_LENS, WEIGHTED = {0: 3, 4: 2}, {4}


@pytest.fixture
def dataset(tmp_path):
  """(tsv path, preprocessed dir, layout): 300 synthetic examples in 3 shards."""
  lay = lib.layout(MAX_LENS, WEIGHTED, n=1000)
  path = str(tmp_path / "train.tsv")
  synthetic.write_tsv(path, synthetic.SyntheticSource(lay, seed=2), 300)
  out = str(tmp_path / "bin")
  binary_write.preprocess(path, out, lib.features(MAX_LENS, WEIGHTED), lib.rows(1000),
                    shard_examples=128)
  return path, out, lay


def assert_same(a, b):
  np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_array_equal(a.dense, b.dense)
  assert list(a.ids) == list(b.ids) and list(a.weights) == list(b.weights)
  for k in a.ids:
    np.testing.assert_array_equal(a.ids[k], b.ids[k])
  for k in a.weights:
    np.testing.assert_array_equal(a.weights[k], b.weights[k])


def test_same_examples_as_tsv_in_any_order(dataset):
  path, out, lay = dataset
  ref = tsv.read_tsv([path], lay)
  src = binary.BinarySource(out, lay)
  assert src.num_examples == 300 and len(src.manifest["shards"]) == 3
  idx = np.random.default_rng(0).permutation(300)
  assert_same(src.gather(idx), ref.gather(idx))
  assert src.bad_row_counts() == {path: 0}
  assert_same(pickle.loads(pickle.dumps(src)).gather(idx[:7]), ref.gather(idx[:7]))


def test_manifest_contents(dataset):
  _, out, _ = dataset
  m = json.load(open(os.path.join(out, binary.MANIFEST)))
  assert m["format"] == binary.FORMAT and m["num_examples"] == 300
  assert [s["num_examples"] for s in m["shards"]] == [128, 128, 44]
  assert m["features"][0] == {"name": "f0", "table": "t0", "rows": 1000, "max_len": 3,
                              "weighted": False}
  assert m["record_bytes"] == 1 + 4 * 13 + 4 * (24 + 3 + 2) + 4 * 2


def test_compatible_config_changes(dataset):
  path, out, _ = dataset
  # Bigger bags pad with -1; a table whose size divides the stored one re-reduces ids.
  feats = lib.features({0: 5, 4: 2}, WEIGHTED)
  rows = lib.rows(1000)
  rows["t1"] = 250
  got = binary.BinarySource(out, make_layout(feats, rows)).gather(np.arange(300))
  ref = tsv.read_tsv([path], lib.layout(MAX_LENS, WEIGHTED, n=1000)).gather(np.arange(300))
  np.testing.assert_array_equal(got.ids["f0"][:, :3], ref.ids["f0"])
  assert (got.ids["f0"][:, 3:] == -1).all()
  np.testing.assert_array_equal(got.ids["f1"], ref.ids["f1"] % 250)


@pytest.mark.parametrize("feats, rows, what", [
    (lib.features(MAX_LENS, WEIGHTED)[:25], None, "the data has 26 sparse features but 25"),
    (lib.features({0: 2, 4: 2}, WEIGHTED), None, "bags of up to 3 ids, max_len is 2"),
    (lib.features({0: 3, 1: 2, 4: 2}, WEIGHTED), None,
     "f1.* preprocessed one-hot .* configured multi-hot \\(max_len 2"),
    (lib.features(MAX_LENS, {4, 5}), None, "not weighted in the data but weighted"),
    (lib.features(MAX_LENS, WEIGHTED), {"t3": 300},
     "reduced to 1000 rows, its table 't3' has 300"),
])
def test_incompatible_config(dataset, feats, rows, what):
  _, out, _ = dataset
  r = lib.rows(1000)
  r.update(rows or {})
  with pytest.raises(DataError, match=what):
    binary.BinarySource(out, make_layout(feats, r))


def _config_error(out, feats) -> str:
  with pytest.raises(DataError) as e:
    binary.BinarySource(out, make_layout(feats, lib.rows(1000)))
  return str(e.value)


def test_a_missing_or_extra_feature_is_named(dataset):
  """The error gave only the two counts, not which feature was left over."""
  _, out, _ = dataset
  where = os.path.join(out, binary.MANIFEST)
  feats = lib.features(MAX_LENS, WEIGHTED)
  assert _config_error(out, feats[:24]) == (
      f"{where}: the data has 26 sparse features but 24 are configured: data features f24, "
      "f25 have no configured feature (stored features map to the configured ones in order; "
      "re-run scripts/preprocess.py with this configuration)")
  extra = feats + [FeatureSpec("extra", "t0")]
  assert _config_error(out, extra) == (
      f"{where}: the data has 26 sparse features but 27 are configured: configured feature "
      "'extra' has no data feature (stored features map to the configured ones in order; "
      "re-run scripts/preprocess.py with this configuration)")


def test_features_configured_in_another_order_are_refused(dataset):
  """Features map by position: a config listing the data's features in another order read
  f2's ids as f1 (tables of one size: no other check saw it)."""
  _, out, _ = dataset
  feats = lib.features(MAX_LENS, WEIGHTED)   # f1, f2: one-hot, unweighted, 1000 rows
  swapped = [feats[0], feats[2], feats[1]] + feats[3:]
  assert _config_error(out, swapped) == (
      f"{os.path.join(out, binary.MANIFEST)}: configured feature 1 'f2' is data feature 2; "
      "stored features map to the configured ones in order: list the features in the data's "
      "order (f0, f1, f2, ...) or re-run scripts/preprocess.py with this configuration")


def _corrupt_manifest(out, fn):
  p = os.path.join(out, binary.MANIFEST)
  m = json.load(open(p))
  fn(m)
  json.dump(m, open(p, "w"))


@pytest.mark.parametrize("damage, what", [
    (lambda out: open(os.path.join(out, "shard-00001.bin"), "r+b").write(b"\x07"),
     "sha256 checksum does not match"),
    (lambda out: os.truncate(os.path.join(out, "shard-00002.bin"), 157), "bytes, the manifest"),
    (lambda out: os.remove(os.path.join(out, "shard-00000.bin")), "shard listed in .* missing"),
    (lambda out: open(os.path.join(out, binary.MANIFEST), "w").write("{not json"),
     "not a valid manifest"),
    (lambda out: _corrupt_manifest(out, lambda m: m.pop("shards")), "malformed manifest"),
    (lambda out: _corrupt_manifest(out, lambda m: m.update(version=9)), "format version 9"),
    (lambda out: _corrupt_manifest(out, lambda m: m.update(num_examples=301)), "do not add up"),
    (lambda out: _corrupt_manifest(out, lambda m: m.update(record_bytes=100)), "record_bytes"),
    (lambda out: _corrupt_manifest(out, lambda m: m["features"][3].pop("rows")),
     "malformed manifest .*'rows'"),
    (lambda out: os.remove(os.path.join(out, binary.MANIFEST)), "missing"),
    (lambda out: _corrupt_manifest(out, lambda m: m.update(num_examples=0, shards=[])),
     "num_examples is 0: the dataset holds no examples"),   # was an IndexError on gather
    # a shard listed twice (its examples read twice, the one it replaced never), a count
    # int() truncated, a weighted that bool() read as true: each was accepted
    (lambda out: _corrupt_manifest(out, lambda m: m.update(
        shards=[m["shards"][0], m["shards"][1], dict(m["shards"][0])], num_examples=384)),
     "shards 0 and 2 are both 'shard-00000.bin'"),
    (lambda out: _corrupt_manifest(out, lambda m: m["features"][1].update(rows=1000.5)),
     r"TypeError: feature f1: rows is 1000.5, not a whole number"),
    (lambda out: _corrupt_manifest(out, lambda m: m["features"][4].update(weighted="false")),
     r"TypeError: feature f4: weighted is \"false\", not true or false"),
])
def test_damaged_dataset(dataset, damage, what):
  _, out, lay = dataset
  damage(out)
  with pytest.raises(DataError, match=what):
    binary.BinarySource(out, lay)


@pytest.mark.parametrize("change, what", [
    (lambda m: m.update(num_examples=301), "shard sizes do not add up to num_examples 301"),
    (lambda m: m.update(record_bytes=100), "record_bytes 100 does not match its features"),
])
def test_manifest_errors_are_not_wrapped_twice(dataset, change, what):
  _, out, lay = dataset
  _corrupt_manifest(out, change)
  with pytest.raises(DataError) as e:
    binary.BinarySource(out, lay)
  assert str(e.value).startswith(f"{os.path.join(out, binary.MANIFEST)}: {what}"), e.value


@pytest.mark.parametrize("bad_rows", [None, [["train.tsv", 1]], {"train.tsv": "many"}])
def test_bad_rows_of_the_manifest_checked_on_open(dataset, bad_rows):
  """`bad_row_counts()` runs at every log step: a damaged entry fails on open, not there."""
  _, out, lay = dataset
  _corrupt_manifest(out, lambda m: m.update(bad_rows=bad_rows))
  with pytest.raises(DataError, match="malformed manifest"):
    binary.BinarySource(out, lay)


def test_checksums_are_hashed_once_per_unchanged_shard(dataset, monkeypatch):
  """A shard whose sha256 matched is not hashed again until its size, mtime or inode
  change: a rewritten shard is hashed (and caught) on the next open."""
  _, out, lay = dataset
  hashed = []
  real = binary._sha256
  monkeypatch.setattr(binary, "_sha256", lambda p: hashed.append(os.path.basename(p)) or real(p))
  binary.BinarySource(out, lay)
  assert sorted(hashed) == ["shard-00000.bin", "shard-00001.bin", "shard-00002.bin"]
  hashed.clear()
  binary.BinarySource(out, lay)
  binary.BinarySource(out, lay, verify_checksums=False)
  assert hashed == []
  shard = os.path.join(out, "shard-00001.bin")
  data = bytearray(open(shard, "rb").read())
  data[5] ^= 0xFF
  st = os.stat(shard)
  open(shard, "wb").write(bytes(data))          # same size; a new mtime
  os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
  with pytest.raises(DataError, match="shard-00001.bin: sha256 checksum does not match"):
    binary.BinarySource(out, lay)
  assert hashed == ["shard-00001.bin"]


def test_output_must_be_new_and_bad_rows(tmp_path, tsv_file):
  path = tsv_file([lib.line(), "1\t2", lib.line("0")])
  with pytest.raises(DataError, match=f"{path}:2: expected 40"):
    binary_write.preprocess(path, str(tmp_path / "o1"), lib.features(), lib.rows())
  assert not os.path.exists(tmp_path / "o1" / binary.MANIFEST)
  m = binary_write.preprocess(path, str(tmp_path / "o2"), lib.features(), lib.rows(),
                        bad_rows="skip")
  assert m["num_examples"] == 2 and m["bad_rows"] == {path: 1}
  src = binary.BinarySource(str(tmp_path / "o2"), lib.layout())
  assert src.bad_row_counts() == {path: 1}
  np.testing.assert_array_equal(src.gather(np.arange(2)).labels, [1, 0])
  with pytest.raises(DataError, match="already holds a preprocessed dataset"):
    binary_write.preprocess(path, str(tmp_path / "o2"), lib.features(), lib.rows(), bad_rows="skip")
  with pytest.raises(ConfigError, match="26 categorical columns but 3 sparse features"):
    binary_write.preprocess(path, str(tmp_path / "o3"), lib.features()[:3], lib.rows())


def test_a_rerun_removes_the_shards_a_killed_run_left(tmp_path, tsv_file, caplog):
  """A kill -9 after 6 shards, then a rerun writing 1: the rerun wrote over shard-00000
  and left shard-00001.. (not in its manifest, disk lost at Criteo scale)."""
  path = tsv_file([lib.line(), lib.line("0")])
  out = tmp_path / "o"
  out.mkdir()
  for i in range(6):
    (out / f"shard-{i:05d}.bin").write_bytes(b"\1" * 100)
  (out / "notes.txt").write_text("mine")
  with caplog.at_level("WARNING"):
    m = binary_write.preprocess(path, str(out), lib.features(), lib.rows(), shard_examples=1)
  assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt", "shard-00000.bin",
                                     "shard-00001.bin"]
  assert [s["file"] for s in m["shards"]] == ["shard-00000.bin", "shard-00001.bin"]
  assert "removed 6 shard file(s) an unfinished run left (shard-00000.bin, " \
      "shard-00001.bin, shard-00002.bin, ...)" in caplog.text


def test_another_programs_manifest_is_not_a_dataset(dataset, tmp_path):
  """A TSV directory holding someone else's manifest.json was called a dataset by one
  check ('give the directory') and refused as one by the reader."""
  _, out, _ = dataset
  assert binary.is_preprocessed(out)
  other = tmp_path / "tsvs"
  other.mkdir()
  for text, ours in (('{"files": ["day_0.tsv"]}', False), ('{"format": "x"}', False),
                     ("[1, 2]", False), ('{"format": "jaxrec.binary"', True),   # cut short
                     ('{"shards": []}', True)):
    (other / binary.MANIFEST).write_text(text)
    assert binary.is_preprocessed(str(other)) == ours, text
  (other / binary.MANIFEST).write_text('{"files": []}')
  (other / "shard-00000.bin").write_bytes(b"theirs")
  with pytest.raises(DataError, match=r"tsvs/manifest.json: a manifest.json among the TSV "
                     r"files, not a jaxrec dataset's; give the TSV files alone \(e\.g\. "
                     r".*tsvs/\*\.tsv\)$"):   # read as TSV: 'expected 40 columns', or skipped
    binary.check_not_part([str(other / "day_0.tsv"), str(other / binary.MANIFEST)])
  with pytest.raises(DataError, match=r"tsvs: holds a manifest.json that is not a jaxrec "
                     r"dataset's \(another program's\?\); choose another --output$"):
    binary_write.write([], str(other), None)   # it removed their shard-*.bin as ours, unfinished
  assert (other / "shard-00000.bin").read_bytes() == b"theirs"


def test_bad_rows_name_the_input_absolutely(tmp_path, tsv_file, monkeypatch):
  """A relative --input was recorded as given: two datasets preprocessed from different
  directories as `data.tsv` shared one key (and one count) in a run's `bad_rows`."""
  path = tsv_file([lib.line(), "1\t2"])
  monkeypatch.chdir(os.path.dirname(path))
  m = binary_write.preprocess(os.path.basename(path), str(tmp_path / "o"), lib.features(),
                        lib.rows(), bad_rows="skip")
  assert m["bad_rows"] == {path: 1}


def test_sources_are_grain_data_sources(dataset):
  import grain
  path, out, lay = dataset
  src = binary.BinarySource(out, lay)
  ex = grain.MapDataset.source(src)[7]
  ref = src.gather(np.array([7]))
  np.testing.assert_array_equal(ex["dense"], ref.dense[0])
  np.testing.assert_array_equal(ex["ids/f0"], ref.ids["f0"][0])
  np.testing.assert_array_equal(ex["weights/f4"], ref.weights["f4"][0])
  assert len(src) == 300 and len(synthetic.SyntheticSource(lay)) > 2**60


def _open_error(out, lay, edit) -> str:
  """The `DataError` message of opening dataset `out` after `edit(manifest)`."""
  _corrupt_manifest(out, edit)
  with pytest.raises(DataError) as e:
    binary.BinarySource(out, lay)
  return str(e.value)


@pytest.mark.parametrize("name", ["/etc/hostname", "../bin/shard-00000.bin", "sub/shard-00000.bin",
                                  "..", ".", ""])
def test_shard_files_must_be_names_inside_the_directory(dataset, name):
  """An absolute or `../` shard path read a file outside the dataset; only the size check
  caught it."""
  _, out, lay = dataset
  message = _open_error(out, lay, lambda m: m["shards"][1].update(file=name))
  assert message == (f"{os.path.join(out, binary.MANIFEST)}: shard 1: file '{name}' must be a "
                     "name inside the dataset directory"), message


@pytest.mark.parametrize("rows", [0, -5])
def test_feature_rows_must_be_positive(dataset, rows):
  """`rows: 0` was accepted (`0 % rows == 0` passed the table check)."""
  _, out, lay = dataset
  message = _open_error(out, lay, lambda m: m["features"][3].update(rows=rows))
  assert message == (f"{os.path.join(out, binary.MANIFEST)}: feature f3: rows is {rows}, must "
                     "be positive"), message


@pytest.mark.parametrize("max_len", [0, -1])
def test_feature_max_len_must_be_positive(dataset, max_len):
  """`max_len: 0` (with a matching record_bytes) read every bag as empty; -1 failed in numpy
  without naming the feature."""
  _, out, lay = dataset

  def edit(m):
    m["features"][1].update(max_len=max_len)
    m["record_bytes"] -= 4 * (1 if max_len == 0 else 0)
  message = _open_error(out, lay, edit)
  assert message == (f"{os.path.join(out, binary.MANIFEST)}: feature f1: max_len is {max_len}, "
                     "must be positive"), message


def test_a_signal_right_after_a_shard_is_opened_leaves_no_file(tmp_path, monkeypatch):
  """SIGTERM/Ctrl-C raise at the first bytecode after `open` returns, before the writer
  holds the new file: the discard missed it and the interrupted preprocess left a shard."""
  writer = binary_write.ShardWriter(str(tmp_path), shard_examples=2)
  recs = np.zeros(3, np.dtype([("x", np.int32)]))
  writer.write(recs[:2])                                            # shard 0 complete

  def open_then_interrupt(path, mode):
    with open(path, mode):   # the file exists, the caller never gets it
      pass
    raise KeyboardInterrupt
  monkeypatch.setattr(binary_write, "open", open_then_interrupt, raising=False)
  with pytest.raises(KeyboardInterrupt):
    writer.write(recs[2:])
  assert sorted(os.listdir(tmp_path)) == ["shard-00000.bin", "shard-00001.bin"]
  writer.discard()
  assert os.listdir(tmp_path) == []


def test_a_first_shard_of_no_examples_is_read_past(dataset):
  """A hand-merged manifest whose first shard holds 0 examples (it has no memmap) was
  accepted, then the first gather raised AttributeError."""
  import hashlib  # pylint: disable=import-outside-toplevel
  _, out, lay = dataset
  want = binary.BinarySource(out, lay).gather(np.arange(0, 300, 7))
  open(os.path.join(out, "shard-00009.bin"), "wb").close()
  _corrupt_manifest(out, lambda m: m["shards"].insert(0, {
      "file": "shard-00009.bin", "num_examples": 0, "bytes": 0,
      "sha256": hashlib.sha256(b"").hexdigest()}))
  got = binary.BinarySource(out, lay).gather(np.arange(0, 300, 7))
  np.testing.assert_array_equal(got.labels, want.labels)
  for name in want.ids:
    np.testing.assert_array_equal(got.ids[name], want.ids[name])


def test_a_run_resumes_on_its_data_re_preprocessed_but_not_on_other_data(dataset, tmp_path):
  """The data state's fingerprint is of the examples read, not of the files: the TSV, its
  shards and a re-preprocessed copy in other shard sizes are one dataset; the same rows in
  another order are not (docs/checkpoints.md, *Continuing on new data*)."""
  from jaxrec.data import pipeline
  path, out, lay = dataset
  it = pipeline.TrainIterator(tsv.read_tsv([path], lay), 16, seed=1, num_threads=0)
  next(it)
  state = it.get_state()
  again = str(tmp_path / "again")
  binary_write.preprocess(path, again, lib.features(MAX_LENS, WEIGHTED), lib.rows(1000),
                    shard_examples=77)
  for d in (out, again):
    resumed = pipeline.TrainIterator(binary.BinarySource(d, lay), 16, seed=1, num_threads=0)
    resumed.set_state(state)
    assert_same(next(resumed), it.batch_at(16))
  lines = open(path).read().splitlines(keepends=True)
  (tmp_path / "rev.tsv").write_text("".join(lines[::-1]))
  other = str(tmp_path / "other")
  binary_write.preprocess(str(tmp_path / "rev.tsv"), other, lib.features(MAX_LENS, WEIGHTED),
                    lib.rows(1000))
  with pytest.raises(DataError, match="other data of the same size \\(300 examples"):
    pipeline.TrainIterator(binary.BinarySource(other, lay), 16, seed=1).set_state(state)


@pytest.mark.parametrize("field,value,what", [
    ("label", 2, "label must be 0 or 1, got 2"),
    ("dense", np.nan, "dense value 3 is nan"),
    ("i0", 1000, "feature 'f0' (table 't0', 1000 rows): id 1000 is out of range [0, 1000) "
     "(-1 marks an empty slot)"),
    ("i0", -7, "feature 'f0' (table 't0', 1000 rows): id -7 is out of range [0, 1000) "
     "(-1 marks an empty slot)"),
    ("w4", np.inf, "feature 'f4': weight inf is not finite")])
def test_a_value_preprocessing_never_writes_names_shard_and_record(dataset, field, value, what):
  """Shards whose checksums match but that hold values preprocess.py never writes (another
  tool's, or edited with the checksum): a label 2 trained silently, a NaN ended in
  'non-finite loss', an out-of-range id was refused naming no file."""
  _, out, lay = dataset
  src = binary.BinarySource(out, lay)
  shard = os.path.join(out, src.manifest["shards"][1]["file"])
  recs = np.memmap(shard, src._dtype, "r+")   # pylint: disable=protected-access
  if field == "dense":
    recs["dense"][5, 3] = value
  elif field == "label":
    recs["label"][5] = value
  else:
    recs[field][5, 1] = value
  recs.flush()
  del recs
  src = binary.BinarySource(out, lay, verify_checksums=False)   # as if the sums matched
  src.gather(np.arange(128 + 5))                                # the records before it
  with pytest.raises(DataError) as e:
    src.gather(np.array([7, 128 + 5, 2]))
  assert str(e.value) == (f"{shard}: record 5: {what} (the shard was not written by "
                          "scripts/preprocess.py, or changed with its checksum)")


def test_a_shard_truncated_during_the_run_is_named_not_a_bus_error(dataset):
  """A shard truncated while a run read it (its map reached past the file's end) killed
  the process with SIGBUS ('Fatal Python error: Bus error', exit 135) naming no file, and
  saved nothing; now its next read is a `DataError` naming it (the trainer saves first).
  The read runs in a forked child, so a SIGBUS fails the test rather than ending pytest."""
  _, out, lay = dataset
  src = binary.BinarySource(out, lay)
  src.gather(np.arange(300))
  shard = os.path.join(out, src.manifest["shards"][1]["file"])
  os.truncate(shard, 1000)
  ctx = multiprocessing.get_context("fork")
  receive, send = ctx.Pipe(duplex=False)

  def gather():
    try:
      src.gather(np.array([3, 250]))
      send.send("no error")
    except DataError as e:
      send.send(str(e))
  child = ctx.Process(target=gather)
  child.start()
  child.join()
  assert child.exitcode == 0            # -7: SIGBUS
  record = src.manifest["record_bytes"]
  assert receive.recv() == (f"{shard}: 1000 bytes now, {128 * record} when the run opened "
                            "it: the shard was truncated or rewritten during the run; re-run "
                            "scripts/preprocess.py, or put the dataset back as it was")


def test_a_second_preprocess_into_the_same_output_is_refused(tmp_path, tsv_file):
  """Two runs into one --output: the second removed the first one's shards as an unfinished
  run's and wrote its own under the same names; both exited 0 over a broken dataset."""
  from jaxrec import files   # pylint: disable=import-outside-toplevel
  path, out = tsv_file([lib.line(), lib.line("0")]), tmp_path / "o"
  with files.workdir_lock(out, ".preprocess.lock", "another scripts/preprocess.py"):
    (out / "shard-00000.bin").write_bytes(b"\1" * 10)   # the running one's
    with pytest.raises(ConfigError, match=rf"--output: {out} is in use by another "
                       rf"scripts/preprocess.py \(pid {os.getpid()}\); wait for it to finish "
                       "or pick another --output"):
      binary_write.preprocess(path, str(out), lib.features(), lib.rows())
    assert (out / "shard-00000.bin").read_bytes() == b"\1" * 10   # left alone
  os.remove(out / "shard-00000.bin")
  binary_write.preprocess(path, str(out), lib.features(), lib.rows())
  assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.bin"]   # no lock file left


def test_an_empty_input_file_is_found_before_any_is_read(tmp_path, monkeypatch):
  """A 0-byte day (a failed download) last among the inputs was found when its turn came:
  at Criteo scale hours of preprocessing were written, then removed."""
  days = tmp_path / "days"
  days.mkdir()
  lib.write(days / "day_0.tsv", [lib.line()] * 5)
  (days / "day_1.tsv").write_bytes(b"")
  parsed = []
  real = tsv.iter_file
  monkeypatch.setattr(tsv, "iter_file", lambda path, *a: parsed.append(path) or real(path, *a))
  with pytest.raises(DataError, match=f"^{days / 'day_1.tsv'}: empty file$"):
    binary_write.preprocess(str(days), str(tmp_path / "o"), lib.features(), lib.rows())
  assert parsed == [] and not (tmp_path / "o").exists()
