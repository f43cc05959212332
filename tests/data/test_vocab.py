"""`open_source.vocab`: TSV ids read through a vocabulary built by `vocab_build` (kept id ->
row 1..V of its table, any other -> row 0), against a plain-Python reference
(`collections.Counter` over the same files); its checks and its record in preprocessed
data and checkpoints."""

import collections
import gzip
import json
import os
import pickle
import shutil

import numpy as np
import pytest

import data_testlib as lib
from jaxrec.data import binary, binary_write, pipeline, tsv, vocab, vocab_build
from jaxrec.data.source import make_layout
from jaxrec.embedding.specs import FeatureSpec
from jaxrec.errors import ConfigError, DataError
from jaxrec.train import config_changes

BAG, WEIGHTED = 3, 5   # f3 multi-hot (max_len 4), f5 weighted multi-hot (max_len 3)


def features(shared=False):
  """lib's 26 features, f3 multi-hot, f5 weighted; `shared`: f0, f1 and f3 read table 's'."""
  out = lib.features({BAG: 4, WEIGHTED: 3}, {WEIGHTED})
  if shared:
    out = [FeatureSpec(f.name, "s" if k in (0, 1, BAG) else f.table, f.max_len,
                       weighted=f.weighted) for k, f in enumerate(out)]
  return out


def zipf_lines(n, seed=0):
  """`n` lines of Zipf-distributed hex ids (many rare ones), f3 bags of 0-4, f5 `id:w`."""
  rng = np.random.default_rng(seed)
  z = lambda: f"{int(rng.zipf(1.3)) % 5000:x}"   # noqa: E731
  lines = []
  for _ in range(n):
    cats = [z() if rng.random() > 0.05 else "" for _ in range(26)]
    cats[BAG] = ",".join(z() for _ in range(rng.integers(0, 5)))
    cats[WEIGHTED] = ",".join(f"{z()}:{rng.integers(1, 9) / 4}"
                              for _ in range(rng.integers(0, 4)))
    lines.append(lib.line(cats=cats))
  return lines


def reference(paths, feats, min_count, max_size=None):
  """Per table {raw id: row}, counted with `collections.Counter` over the lines."""
  counters = collections.defaultdict(collections.Counter)
  for path in paths:
    gz = open(path, "rb").read(2) == b"\x1f\x8b"
    for line in (gzip.open(path, "rt") if gz else open(path)):
      for f, field in zip(feats, line.rstrip("\n").split("\t")[14:]):
        for token in filter(None, field.split(",")):
          counters[f.table][int(token.split(":")[0], 16)] += 1
  rows = {}
  for table, c in counters.items():
    kept = [i for i, n in c.items() if n >= min_count]
    if max_size is not None:
      kept = sorted(kept, key=lambda i: (-c[i], i))[:max_size]
    rows[table] = {i: r + 1 for r, i in enumerate(sorted(kept))}
  return rows


def expected_ids(line, feats, rows):
  """A line's ids per feature as the vocabulary reads them (an empty one-hot field: 0)."""
  out = {}
  for f, field in zip(feats, line.split("\t")[14:]):
    tokens = [int(t.split(":")[0], 16) for t in filter(None, field.split(","))]
    ids = [rows.get(f.table, {}).get(t, 0) for t in tokens]
    out[f.name] = (ids or [0]) if f.max_len == 1 else ids + [-1] * (f.max_len - len(ids))
  return out


def build(tmp_path, paths, feats, min_count=1, max_size=None, name="v", chunk_bytes=4096):
  """Counts `paths` in small chunks (merged many times) and writes the vocabulary."""
  lay = make_layout(feats, {f.table: 1 for f in feats})
  counts, _ = vocab_build.count(paths, lay, chunk_bytes=chunk_bytes)
  out = str(tmp_path / name)
  m = vocab_build.write(out, counts, min_count, max_size, {"id_format": "hex"}, None)
  return out, m


@pytest.mark.parametrize("shared", [False, True], ids=["own-tables", "shared-table"])
@pytest.mark.parametrize("min_count,max_size", [(1, None), (3, None), (2, 7)])
def test_rows_match_a_counter_reference(tmp_path, tsv_file, shared, min_count, max_size):
  """One-hot, multi-hot and weighted features (three of them on one table with `shared`),
  two files (one gzip), counted in 4 KiB chunks: every id's row is the reference's."""
  lines = zipf_lines(600)
  paths = [tsv_file(lines[:350]), tsv_file(lines[350:], compress=True)]
  feats = features(shared)
  out, m = build(tmp_path, paths, feats, min_count, max_size)
  ref = reference(paths, feats, min_count, max_size)
  sizes = {t["name"]: t["size"] for t in m["tables"]}
  assert sizes == {t: len(r) for t, r in ref.items()}
  assert max_size is None or max(sizes.values()) == max_size
  first = m["tables"][0]
  assert first["size"] > 0 and (first["distinct"] > first["size"]) == (min_count > 1)
  rows = {t["name"]: t["rows"] for t in m["tables"]}
  got = tsv.read_tsv(paths, make_layout(feats, rows, vocab=vocab.load(out))).examples
  for r, line in enumerate(lines):
    want = expected_ids(line, feats, ref)
    for name, ids in want.items():
      assert got.ids[name][r].tolist() == ids, (r, name)
  assert got.weights[f"f{WEIGHTED}"].shape == (600, 3)


def test_max_size_keeps_the_most_frequent_ties_to_the_smaller_id():
  ids = np.array([3, 5, 9, 12, 20], np.uint64)
  counts = np.array([4, 2, 4, 2, 9])
  kept, n = vocab_build.select(ids, counts, 1, 3)
  assert kept.tolist() == [3, 9, 20] and n.tolist() == [4, 4, 9]
  kept, _ = vocab_build.select(ids, counts, 1, 4)
  assert kept.tolist() == [3, 5, 9, 20]   # 5 and 12 tie at 2: the smaller
  kept, _ = vocab_build.select(ids, counts, 3, 4)
  assert kept.tolist() == [3, 9, 20]


def test_counts_merge_across_chunks_like_one_count():
  rng = np.random.default_rng(1)
  raw = rng.zipf(1.2, 20000).astype(np.uint64) * np.uint64(2**40)
  c = vocab_build.Counts(["t"])
  for part in np.array_split(raw, 37):
    c.add("t", part)
  u, n = np.unique(raw, return_counts=True)
  assert c.ids["t"].tolist() == u.tolist() and c.counts["t"].tolist() == n.tolist()


def _vocab(tmp_path, tsv_file, n=80, min_count=2, name="v", feats=None):
  feats = feats or lib.features()
  lines = [lib.line(cats=[f"{(i * (k + 1)) % 13:x}" for k in range(26)]) for i in range(n)]
  path = tsv_file(lines)
  out, m = build(tmp_path, [path], feats, min_count, name=name)
  return path, out, {t["name"]: t["rows"] for t in m["tables"]}


def test_preprocessed_with_a_vocabulary_reads_as_the_tsv_and_records_it(tmp_path, tsv_file):
  path, out, rows = _vocab(tmp_path, tsv_file)
  data = str(tmp_path / "bin")
  m = binary_write.preprocess(path, data, lib.features(), rows, vocab=out)
  assert m["vocab"] == {"path": out, "fingerprint": vocab.load(out).fingerprint}
  assert json.load(open(os.path.join(data, binary.MANIFEST)))["vocab"] == m["vocab"]
  got = pipeline.open_source(data, lib.features(), rows, vocab=out).gather(np.arange(80))
  want = pipeline.open_source(path, lib.features(), rows, vocab=out).gather(np.arange(80))
  for k in want.ids:
    np.testing.assert_array_equal(got.ids[k], want.ids[k])
  assert want.ids["f1"].max() < rows["t1"] and (want.ids["f1"] > 0).any()
  bigger = {t: r * 3 for t, r in rows.items()}   # more rows than the vocabulary needs: read
  got = pipeline.open_source(data, lib.features(), bigger, vocab=out).gather(np.arange(80))
  np.testing.assert_array_equal(got.ids["f1"], want.ids["f1"])


def test_data_of_another_vocabulary_or_none_is_refused_naming_both(tmp_path, tsv_file):
  path, out, rows = _vocab(tmp_path, tsv_file)
  _, other, _ = _vocab(tmp_path, tsv_file, min_count=7, name="v1")   # 2 ids of 13 kept
  data = str(tmp_path / "bin")
  binary_write.preprocess(path, data, lib.features(), rows, vocab=out)
  fp, fp1 = vocab.load(out).fingerprint, vocab.load(other).fingerprint
  with pytest.raises(DataError, match=(
      rf"manifest.json: the data's ids were preprocessed with vocabulary {out} \(fingerprint "
      rf"{fp}\) but this run reads them with vocabulary {other} \(fingerprint {fp1}\); bind "
      rf"open_source.vocab = '{out}' \(gin\) to train on this data")):
    pipeline.open_source(data, lib.features(), {t: 1000 for t in rows}, vocab=other)
  with pytest.raises(DataError, match=r"preprocessed with vocabulary .* but this run reads "
                     r"them with no vocabulary \(ids % rows\)"):
    pipeline.open_source(data, lib.features(), rows)
  plain = str(tmp_path / "plain")
  binary_write.preprocess(path, plain, lib.features(), lib.rows())
  with pytest.raises(DataError, match=r"preprocessed with no vocabulary \(ids % rows\) but this "
                     r"run reads them with vocabulary .*; unbind open_source.vocab"):
    pipeline.open_source(plain, lib.features(), lib.rows(), vocab=out)


def test_a_dataset_from_before_the_field_has_no_vocabulary(tmp_path, tsv_file):
  path, out, _ = _vocab(tmp_path, tsv_file)
  data = str(tmp_path / "bin")
  binary_write.preprocess(path, data, lib.features(), lib.rows())
  mpath = os.path.join(data, binary.MANIFEST)
  m = json.load(open(mpath))
  del m["vocab"]
  open(mpath, "w").write(json.dumps(m))
  assert pipeline.open_source(data, lib.features(), lib.rows()).num_examples == 80
  with pytest.raises(DataError, match="preprocessed with no vocabulary"):
    pipeline.open_source(data, lib.features(), lib.rows(), vocab=out)
  m["vocab"] = "yes"
  open(mpath, "w").write(json.dumps(m))
  with pytest.raises(DataError, match=r'manifest.json: malformed manifest \(TypeError: vocab '
                     r'is "yes", not null or \{path, fingerprint\}\)'):
    pipeline.open_source(data, lib.features(), lib.rows())


def test_too_few_rows_are_refused_naming_the_table_and_numbers(tmp_path, tsv_file):
  path, out, rows = _vocab(tmp_path, tsv_file)
  small = dict(rows, t2=rows["t2"] - 1)
  with pytest.raises(ConfigError, match=(
      rf"^open_source.vocab = '{out}': table 't2' has {rows['t2'] - 1} rows, needs "
      rf"{rows['t2']} \({rows['t2'] - 1} ids \+ 1 out-of-vocabulary row\); set these tables' "
      rf"rows in the configuration \(their TableSpec / embedding_tables entries: "
      rf"{out}/vocab.gin lists each table's rows in comments")):   # (built for listed tables)
    pipeline.open_source(path, lib.features(), small, vocab=out)
  with pytest.raises(ConfigError, match="table 't2' has"):   # synthetic data: checked too
    pipeline.open_source("synthetic", lib.features(), small, vocab=out)


def test_tables_the_vocabulary_lacks_or_has_extra_are_named(tmp_path, tsv_file):
  path, out, rows = _vocab(tmp_path, tsv_file)
  feats = features(shared=True)   # f0, f1, f3 on 's': no t0, t1, t3; 's' missing
  rows = dict(rows, s=1000)
  with pytest.raises(ConfigError, match=(
      rf"^open_source.vocab = '{out}': the vocabulary has no table 's' that the configuration "
      r"reads and has table 't0', 't1', 't3' that no configured feature reads \(its tables: "
      r"'t0', 't1', 't2', .*\); build one for this configuration")):
    pipeline.open_source(path, feats, rows, vocab=out)


def test_another_id_format_is_refused(tmp_path, tsv_file):
  path, out, rows = _vocab(tmp_path, tsv_file)
  with pytest.raises(ConfigError, match="vocabulary's ids were parsed with id_format 'hex' "
                     "but this run reads ids with id_format 'decimal'"):
    pipeline.open_source(path, lib.features(), rows, vocab=out, id_format="decimal")


def test_a_missing_or_corrupt_vocabulary_names_the_file(tmp_path, tsv_file):
  path, out, rows = _vocab(tmp_path, tsv_file)
  open_it = lambda v: pipeline.open_source(path, lib.features(), rows, vocab=v)  # noqa: E731
  with pytest.raises(ConfigError, match=(   # named as bound (and so where: `locate`)
      rf"^open_source.vocab = '{tmp_path}/nope': no such vocabulary directory \(scripts/"
      r"build_vocab.py writes one; bind the path of one moved elsewhere\)")):
    open_it(str(tmp_path / "nope"))
  with pytest.raises(ConfigError, match=rf"^--vocab: {tmp_path}/nope: no such vocabulary"):
    vocab.load_binding(str(tmp_path / "nope"), "--vocab")
  with pytest.raises(DataError, match=f"^{tmp_path}/nope: no such vocabulary directory"):
    vocab.load(str(tmp_path / "nope"))
  with pytest.raises(ConfigError, match=r"open_source.vocab must be a vocabulary directory "
                     r"\(a string\) or None, got 3"):
    open_it(3)
  table = os.path.join(out, "table-00004.npz")
  data = open(table, "rb").read()
  open(table, "wb").write(data[:len(data) // 2])
  with pytest.raises(DataError, match=f"^{table}: not a vocabulary table"):
    open_it(out)
  ids, counts = np.array([1, 2, 3], np.uint64), np.ones(3, np.int64)
  np.savez(table, ids=ids, counts=counts)
  with pytest.raises(DataError, match=rf"^{table}: ids are uint64 \[3\], expected uint64"):
    open_it(out)
  m = json.load(open(os.path.join(out, vocab.MANIFEST)))
  np.savez(table, ids=np.arange(m["tables"][4]["size"]).astype(np.uint64) + 100, counts=counts)
  with pytest.raises(DataError, match=f"^{table}: its ids do not match the manifest's sha256"):
    open_it(out)
  os.remove(table)
  with pytest.raises(DataError, match=rf"^{table}: missing \(table 't4' of the vocabulary\)"):
    open_it(out)
  open(os.path.join(out, vocab.MANIFEST), "w").write("{")
  with pytest.raises(DataError, match=f"^{out}/vocab.json: not a valid vocabulary manifest"):
    open_it(out)
  os.remove(os.path.join(out, vocab.MANIFEST))
  with pytest.raises(DataError, match=rf"^{out}/vocab.json: missing \(not a vocabulary "
                     r"directory: scripts/build_vocab.py writes one\)"):
    open_it(out)


def test_an_unparsable_id_names_file_line_and_column(tmp_path, tsv_file):
  path = tsv_file([lib.line(), lib.line(cats=["1"] * 7 + ["xyz"] + ["2"] * 18)])
  lay = make_layout(lib.features(), lib.rows())
  with pytest.raises(DataError, match=rf"^{path}:2: column 22 \(C8\): feature 'f7': "):
    vocab_build.count([path], lay)
  counts, skipped = vocab_build.count([path], lay, bad_rows="skip")
  assert skipped == {path: 1} and counts.counts["t7"].tolist() == [1]


def test_a_failed_write_leaves_nothing(tmp_path, tsv_file, monkeypatch):
  path = tsv_file([lib.line()])
  lay = make_layout(lib.features(), lib.rows())
  counts, _ = vocab_build.count([path], lay)
  real, calls = np.savez, []

  def savez(*a, **k):   # the third table's write fails
    calls.append(1)
    if len(calls) == 3:
      raise OSError(28, "No space left on device")
    real(*a, **k)
  monkeypatch.setattr(np, "savez", savez)
  with pytest.raises(DataError, match=rf"^--output {tmp_path}/v: cannot write the vocabulary: "
                     "No space left on device$"):
    vocab_build.write(str(tmp_path / "v"), counts, 1, None, {"id_format": "hex"}, "t")
  calls.clear()

  def interrupted(*a, **k):
    raise KeyboardInterrupt
  monkeypatch.setattr(np, "savez", interrupted)
  with pytest.raises(KeyboardInterrupt):
    vocab_build.write(str(tmp_path / "v"), counts, 1, None, {"id_format": "hex"}, "t")
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]
  os.makedirs(tmp_path / "full")
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(DataError, match="full: exists and is not an empty directory"):
    vocab_build.write(str(tmp_path / "full"), counts, 1, None, {"id_format": "hex"}, "t")


@pytest.mark.parametrize("min_count", [0, -1, 1.5])
def test_min_count_below_1_is_refused(min_count):
  with pytest.raises(ConfigError, match=r"^--min_count must be a whole number >= 1"):
    vocab_build.check_min_count(min_count)
  with pytest.raises(ConfigError, match=r"^--max_size must be a whole number >= 1, got 0"):
    vocab_build.check_min_count(1, 0)


def test_a_checkpoint_read_through_another_vocabulary_is_refused():
  gin = "open_source.id_format = 'hex'\nopen_source.vocab = {}\n"
  before, after = gin.format("'/v1'"), gin.format("'/v2'")
  with pytest.raises(ConfigError, match=(
      r"^checkpoint 7 was trained on categorical ids read with open_source.vocab = '/v1', but "
      r"this run reads its eval data with open_source.vocab = '/v2': the model would score ids "
      r"mapped to other rows than it learned them in; bind open_source.vocab = '/v1' \(gin\) "
      r"to evaluate it$")):
    config_changes.check_read_as({"gin": before}, after, "/data/eval.tsv", 7)
  with pytest.raises(ConfigError, match=r"open_source.vocab = None, but this run reads its "
                     r"training data with open_source.vocab = '/v2'"):
    config_changes.check_read_as({"gin": "open_source.id_format = 'hex'\n"}, after,
                                 "/data/t.tsv", 7, trains=True)
  config_changes.check_read_as({"gin": before}, before, "/data/eval.tsv", 7)
  config_changes.check_read_as({"gin": before}, after, "synthetic", 7)


def test_a_resume_of_a_run_from_before_the_binding_is_no_change():
  before = "open_source.num_categorical = 26\nopen_source.verify_checksums = True\n"
  now = before + "open_source.vocab = None\n"
  assert config_changes.changed(before, now) == []
  assert config_changes.changed(before, now.replace("None", "'/v'")) == [
      "open_source.vocab: (unbound) -> '/v'"]


def test_sources_of_one_directory_share_its_loaded_vocabulary_until_it_changes(tmp_path,
                                                                               tsv_file):
  """A run's training and eval sources (and its checkpoints' record) read one vocabulary:
  loaded once while in use (each load read and hashed every table, and each source held its
  own ids and lookup table); a directory rebuilt in place is read again."""
  path, out, rows = _vocab(tmp_path, tsv_file)
  train = pipeline.open_source(path, lib.features(), rows, vocab=out)
  held = pipeline.open_source(path, lib.features(), rows, vocab=out)
  assert held.layout.vocab is train.layout.vocab
  shutil.rmtree(out)
  _, again, _ = _vocab(tmp_path, tsv_file, min_count=7)   # the same path, fewer ids kept
  assert again == out and vocab.load(out) is not train.layout.vocab
  assert vocab.load(out).fingerprint != train.layout.vocab.fingerprint


def test_a_pickled_vocabulary_holds_no_ids_and_reloads_them(tmp_path, tsv_file):
  """grain's worker processes get the source, its layout and so its vocabulary pickled:
  without the ids (read again from the directory if used)."""
  path, out, rows = _vocab(tmp_path, tsv_file)
  v = vocab.load(out)
  data = pickle.dumps(v)
  assert len(data) < 500
  back = pickle.loads(data)
  assert back == v and back.size("t3") == v.size("t3")
  raw = np.arange(20, dtype=np.uint64)
  np.testing.assert_array_equal(back.lookup("t3", raw), v.lookup("t3", raw))
  src = pipeline.open_source(path, lib.features(), rows, vocab=out)
  assert len(pickle.dumps(src.layout)) < 2000


@pytest.mark.parametrize("wide", [False, True], ids=["one-search", "per-table"])
def test_lookup_of_features_on_several_tables(wide):
  """Ids of 64 bits (no room for the table number beside them: a search per table) or
  fewer (one hash table of `table << shift | id` keys) give the same rows as each table's
  own search; an id past the widest kept one, or another table's, is out of vocabulary."""
  big = np.uint64(2**63 + 7) if wide else np.uint64(2**20)
  tables = {"a": np.array([1, 5, big], np.uint64), "b": np.array([3, 5], np.uint64),
            "c": np.zeros(0, np.uint64)}
  v = vocab.Vocab("d", vocab.fingerprint(tables), "hex", tables)
  assert (v._hashed[2] is None) == wide
  feature_tables = ["b", "a", "c", "a"]
  raw = np.array([1, 3, 5, big, 2**64 - 1, 0, 3, 2**21, 5, 1], np.uint64)
  tfeat = np.array([1, 0, 0, 1, 1, 3, 1, 3, 2, 3])
  got = v.lookup_features(feature_tables, tfeat, raw)
  assert got.tolist() == [1, 1, 2, 3, 0, 0, 0, 0, 0, 1]


def test_hashed_lookup_matches_each_tables_search_on_random_ids():
  rng = np.random.default_rng(3)
  tables = {t: np.unique(rng.integers(0, 2**m, n, dtype=np.uint64))
            for t, m, n in (("a", 32, 5000), ("b", 12, 3000), ("c", 40, 1))}
  v = vocab.Vocab("d", vocab.fingerprint(tables), "hex", tables)
  assert v._hashed[2] is not None
  feature_tables = ["a", "b", "c", "b"]
  tfeat = rng.integers(0, 4, 20_000)
  pool = np.concatenate(list(tables.values()))
  raw = np.where(rng.random(20_000) < 0.7, pool[rng.integers(0, len(pool), 20_000)],
                 rng.integers(0, 2**41, 20_000, dtype=np.uint64))
  want = np.array([v.lookup(feature_tables[f], raw[i:i + 1])[0] for i, f in enumerate(tfeat)])
  np.testing.assert_array_equal(v.lookup_features(feature_tables, tfeat, raw), want)
  assert (want > 0).mean() > 0.2


def test_a_checkpoint_compares_its_recorded_vocabulary_by_fingerprint(tmp_path, tsv_file,
                                                                      monkeypatch):
  """A checkpoint's meta records the vocabulary (path and fingerprint): the same one at
  another path (moved, or bound as a relative path) is accepted; another one built in place
  at the recorded path is refused naming both fingerprints (an eval-only run scored every
  row moved without a word: it compared the bound paths)."""
  path, out, _ = _vocab(tmp_path, tsv_file)
  v = vocab.load(out)
  meta_gin = f"open_source.id_format = 'hex'\nopen_source.vocab = '{out}'\n"
  meta = {"gin": meta_gin, "vocab": vocab.record(v)}
  moved = str(tmp_path / "moved")
  os.rename(out, moved)
  bound = {"open_source.vocab": moved}
  monkeypatch.setattr("jaxrec.launch.bound_value", lambda sel, d=None: bound.get(sel, d))
  after = meta_gin.replace(out, moved)
  config_changes.check_read_as(meta, after, "/data/eval.tsv", 7)
  config_changes.check_read_as(meta, after, "/data/t.tsv", 7, trains=True)
  # rebuilt at the recorded path from other lines: same rows, other ids
  lines = [lib.line(cats=[f"{(i * (k + 3)) % 13 + 20:x}" for k in range(26)])
           for i in range(80)]
  build(tmp_path, [tsv_file(lines)], lib.features(), 2, name="v")
  bound["open_source.vocab"] = out
  fp = vocab.load(out).fingerprint
  for trains, words in ((False, "score"), (True, "train on")):
    with pytest.raises(ConfigError, match=(
        rf"^checkpoint 7 was trained on categorical ids read through vocabulary '{out}' "
        rf"\(fingerprint {v.fingerprint}\), but this run reads its (eval|training) data "
        rf"through vocabulary '{out}' \(fingerprint {fp}\) \(rebuilt in place: the same "
        rf"path holds another vocabulary\): the model would {words} ids mapped to other rows "
        rf"than it learned them in; bind open_source.vocab to a directory holding vocabulary "
        rf"{v.fingerprint} \(it was '{out}'; a copy anywhere will do\)")):
      config_changes.check_read_as(meta, meta_gin, "/data/x.tsv", 7, trains=trains)
  bound["open_source.vocab"] = None
  with pytest.raises(ConfigError, match=r"reads its eval data through no vocabulary \(ids % "
                     r"rows\): .*; bind open_source.vocab to a directory holding"):
    config_changes.check_read_as(meta, "", "/data/x.tsv", 7)
  bound["open_source.vocab"] = moved
  with pytest.raises(ConfigError, match=r"trained on categorical ids read through no "
                     r"vocabulary \(ids % rows\), .*; unbind open_source.vocab \(gin\)"):
    config_changes.check_read_as({"gin": "", "vocab": None}, meta_gin, "/data/x.tsv", 7)


def test_a_copy_without_its_data_position_warns_of_another_vocabulary(tmp_path, tsv_file,
                                                                      monkeypatch, caplog):
  """convert_checkpoint.py --restart_data's copy may read the next day as it likes; another
  vocabulary (rows renumbered) is warned of, the same one at another path is not."""
  path, out, _ = _vocab(tmp_path, tsv_file)
  meta = {"gin": f"open_source.vocab = '{out}'\n", "vocab": vocab.record(vocab.load(out))}
  bound = {"open_source.vocab": out}
  monkeypatch.setattr("jaxrec.launch.bound_value", lambda sel, d=None: bound.get(sel, d))
  config_changes.check_read_as(meta, "", "/data/t.tsv", 3, trains=True, position=False)
  assert "warning" not in caplog.text
  bound["open_source.vocab"] = None
  reported = []   # under launch.py: on its stderr too
  monkeypatch.setattr("jaxrec.elastic.report_warning", reported.append)
  config_changes.check_read_as(meta, "", "/data/t.tsv", 3, trains=True, position=False)
  assert len(reported) == 1 and reported[0].startswith("warning: checkpoint 3's tables")
  assert (f"warning: checkpoint 3's tables were trained on ids read through vocabulary "
          f"'{out}'") in caplog.text and "no vocabulary (ids % rows)" in caplog.text
