"""convert_checkpoint errors that say what to pass instead, and leave nothing behind."""

import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointError, CheckpointManager, convert, rotation
from jaxrec.embedding.specs import TableSpec
from jaxrec.errors import ConfigError, DataError
from tests.checkpoint import ckpt_helpers as h

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _quick_corrupt_verdict(monkeypatch):
  """A step that fails to read is corrupt, not rotated out, once its entries stay put for
  `settle` s (`rotation._gone`, timed in test_steps.py): 0.5 s at each read of a damaged
  step, two or more per case here, where nothing deletes anything. 0.05 s (one poll) tells
  these steps alike."""
  # pylint: disable-next=protected-access
  monkeypatch.setattr(rotation, "_gone", functools.partial(rotation._gone, settle=0.05))


def _offloaded_steps(w, steps):
  """Checkpoints `steps` in `w/checkpoints` of a run with table t0 offloaded, each with its
  offload snapshot in `w/offload_snapshots`; returns that snapshot directory."""
  from jaxrec import offload
  coll = h.collection("rw", 8)              # t0 stands for a 13-row cache of a 50-row table
  store = offload.TableStore(TableSpec("t0", 50, h.DIM), offload.OffloadTable("t0", 13),
                             coll.optimizer, str(w / "live" / "t0"))
  store.create(jax.random.key(0))
  snaps = w / "offload_snapshots"
  meta = {"offload": {"snapshots": str(snaps),
                      "tables": {"t0": {"rows": 50, "cache_rows": 13}}}}
  with CheckpointManager(w / "checkpoints") as mgr:
    for step in steps:
      offload.snapshots.save(str(snaps), step, {"t0": store}, keep=None)
      mgr.save(step, h.train_state(coll, step=step), coll, meta=meta, force=True)
  return snaps


def test_latest_without_its_snapshot_falls_back_like_a_restore(tmp_path, caplog):
  """A training restore falls back to the step before; the export refused, naming it."""
  snaps = _offloaded_steps(tmp_path / "w", [3, 5])
  shutil.rmtree(snaps / "5")
  with caplog.at_level("WARNING"):
    assert convert.export_npz(tmp_path / "w" / "checkpoints", tmp_path / "a.npz") == 3
  assert any("checkpoints/5 is corrupt or unreadable" in r.getMessage() and "no offload "
             "snapshot of step 5" in r.getMessage() for r in caplog.records), caplog.text
  shutil.rmtree(snaps / "3")
  with pytest.raises(CheckpointError, match=r"^no valid checkpoint in .*checkpoints \(step 5: "
                     r".*no offload snapshot of step 5 .*; step 3: .*no offload snapshot of "
                     r"step 3 .*\)$"):
    convert.export_checkpoint(tmp_path / "w" / "checkpoints", tmp_path / "w2" / "checkpoints")
  assert not (tmp_path / "w2").exists()


def test_a_snapshot_left_by_a_killed_copy_is_replaced(tmp_path, caplog):
  """A kill (or a second signal) between a copy's renames, its offload snapshot's then its
  step's, left `offload_snapshots/5` with no step 5, and every later copy of step 5 was
  refused ('already exists'). A snapshot that a checkpoint uses is still refused."""
  from jaxrec import offload
  snaps = _offloaded_steps(tmp_path / "w", [5])
  w2 = tmp_path / "w2"
  leftover = w2 / "offload_snapshots" / "5"
  shutil.copytree(snaps / "5", leftover)
  (leftover / "stale").write_text("")
  with caplog.at_level("WARNING"):
    convert.export_checkpoint(tmp_path / "w" / "checkpoints", w2 / "checkpoints")
  assert CheckpointManager(w2 / "checkpoints", read_only=True).all_steps() == [5]
  assert not (leftover / "stale").exists()
  assert offload.snapshots.steps(str(w2 / "offload_snapshots")) == [5]
  assert [r.getMessage() for r in caplog.records if "no checkpoint holds" in r.getMessage()
          ] == [f"--output: removing {leftover}, an offload snapshot of step 5 that no "
                "checkpoint holds (left by a conversion stopped before its step was written)"]
  with pytest.raises(ConfigError, match=f"^--output: {leftover} .* belongs to step directory "
                     f"{w2 / 'checkpoints' / '5'}: pick another --output$"):
    convert.export_checkpoint(tmp_path / "w" / "checkpoints", w2 / "other")
  shutil.move(tmp_path / "w" / "checkpoints", tmp_path / "alone")   # reads the recorded one
  with pytest.raises(ConfigError, match="belongs to the checkpoint converted"):
    convert.export_checkpoint(tmp_path / "alone", tmp_path / "w" / "copy")
  assert offload.snapshots.steps(str(snaps)) == [5]


def test_import_onto_an_existing_step_names_the_flags(tmp_path):
  """It said only '<dir>/<step> already exists'."""
  coll = h.collection("rw", 8)
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{t.name}.weight": np.zeros((t.rows, t.dim), np.float32)
                   for t in coll.tables})
  out = tmp_path / "w" / "checkpoints"
  convert.import_torchrec(npz, out, step=2)
  with pytest.raises(ConfigError, match=rf"^{out}/2 already exists: pass --step=3 \(the "
                     r"import's step\) or a fresh --output$"):
    convert.import_torchrec(npz, out, step=2)
  assert convert.import_torchrec(npz, out, step=3)


def test_a_failed_conversion_removes_the_directories_it_created(tmp_path):
  """`--output=W2/checkpoints` of a refused conversion left an empty W2 behind."""
  snaps = _offloaded_steps(tmp_path / "w", [3])
  f = max((p for p in (snaps / "3").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  f.write_bytes(f.read_bytes()[:-1])   # a damaged array file: found, then refused
  src = tmp_path / "w" / "checkpoints"
  for fn, out in [(convert.export_checkpoint, tmp_path / "w2" / "checkpoints"),
                  (convert.export_npz, tmp_path / "w2" / "e" / "a.npz"),
                  (convert.export_zarr, tmp_path / "w2" / "z")]:
    with pytest.raises(CheckpointError, match=r"^no valid checkpoint in .*checkpoints \(step 3: "
                       r".*the snapshot is damaged\)$"):
      fn(src, out)
    assert not (tmp_path / "w2").exists(), fn
  (tmp_path / "w3").mkdir()
  with pytest.raises(CheckpointError, match="damaged; .*checkpoints holds no other step$"):
    convert.export_checkpoint(src, tmp_path / "w3" / "checkpoints", 3)
  assert os.listdir(tmp_path / "w3") == []   # it existed before: kept


def test_an_explicit_step_without_its_snapshot_lists_the_steps_that_have_one(tmp_path):
  """`--step=5` whose offload snapshot is gone said only that it was missing."""
  snaps = _offloaded_steps(tmp_path / "w", [3, 5])
  shutil.rmtree(snaps / "5")
  src = tmp_path / "w" / "checkpoints"
  with pytest.raises(CheckpointError, match=r"no offload snapshot of step 5 .*; pick another "
                     r"--step: 3$"):
    convert.export_npz(src, tmp_path / "a.npz", 5)
  assert not (tmp_path / "a.npz").exists()
  shutil.rmtree(snaps / "3")
  with pytest.raises(CheckpointError, match=r"no offload snapshot of step 5 .*; no other step "
                     r"has its offload snapshot either \(steps: 3, 5\)$"):
    convert.export_checkpoint(src, tmp_path / "w2" / "checkpoints", 5)
  assert not (tmp_path / "w2").exists()


def test_a_checkpoint_directory_copied_alone_exports_with_a_warning(tmp_path, caplog):
  """Conversion still reads the snapshot where the checkpoint was saved, but says so (a
  training restore refuses it: `tests/offload/test_snapshot_integrity.py`)."""
  snaps = _offloaded_steps(tmp_path / "w", [3])
  copy = shutil.copytree(tmp_path / "w" / "checkpoints", tmp_path / "elsewhere" / "checkpoints")
  with caplog.at_level("WARNING"):
    assert convert.export_npz(copy, tmp_path / "a.npz") == 3
  want = f"offload snapshot {snaps}/3: read from where checkpoint {copy}/3 was saved"
  assert any(want in r.getMessage() for r in caplog.records), caplog.text


def _two_steps(path):
  """Steps 2 and 4 saved in `path` (a copy of one checkpoint saved once)."""
  shutil.copytree(_saved_two_steps(), path)


@functools.cache
def _saved_two_steps() -> str:
  """`_two_steps`'s checkpoint, saved once per worker (a dozen cases damage a copy each)."""
  saved = os.path.join(tempfile.mkdtemp(prefix="jaxrec_two_steps_"), "c")
  atexit.register(shutil.rmtree, os.path.dirname(saved), ignore_errors=True)
  coll = h.collection("rw", 8)
  with CheckpointManager(saved) as mgr:
    for step in (2, 4):
      mgr.save(step, h.train_state(coll, seed=step, step=step), coll, force=True)
  return saved


def _flipped_latest(path):
  """`_two_steps`, one bit of a table chunk of step 4 flipped (silent corruption: only the
  fingerprint check of a full read finds it)."""
  _two_steps(path)
  chunk = next(p for p in (path / "4" / "embeddings" / "tables" / "t3").iterdir()
               if not p.name.startswith("."))
  data = bytearray(chunk.read_bytes())
  data[len(data) // 2] ^= 0x01
  chunk.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", ["npz", "zarr", "checkpoint"])
def test_a_corrupt_explicit_step_names_the_steps_to_pick(tmp_path, fmt):
  """A flipped bit is found only while the arrays are read: the error said 'pick another
  --step' without naming one."""
  _flipped_latest(tmp_path / "c")
  export = {"npz": convert.export_npz, "zarr": convert.export_zarr,
            "checkpoint": convert.export_checkpoint}[fmt]
  with pytest.raises(CheckpointError, match=r"c/4.* corrupt.*; pick another --step: 2$"):
    export(tmp_path / "c", tmp_path / "out" / "checkpoints", 4)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["npz", "zarr", "checkpoint"])
def test_a_corrupt_latest_falls_back_like_a_restore(tmp_path, fmt, caplog):
  """Without --step, a latest step with a flipped bit was refused ('pick another --step:
  2') where a training restore falls back to step 2."""
  _flipped_latest(tmp_path / "c")
  out = tmp_path / "out" / "checkpoints"
  export = {"npz": convert.export_npz, "zarr": convert.export_zarr,
            "checkpoint": lambda s, o: convert.export_checkpoint(s, o)[0]}[fmt]
  with caplog.at_level("WARNING"):
    assert export(tmp_path / "c", out) == 2
  (warning,) = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
  assert re.fullmatch(r"checkpoint .*c/4 is corrupt or unreadable \(CheckpointError: .*"
                      r"'tables/t3'.* fingerprint check.*\); falling back to the previous one",
                      warning), warning
  if fmt == "npz":
    with np.load(out) as z:
      assert int(z["step"]) == 2 and json.loads(str(z["metadata"]))["step"] == 2
  elif fmt == "zarr":
    assert json.loads((out / "metadata.json").read_text())["step"] == 2
  else:
    assert CheckpointManager(out, read_only=True).all_steps() == [2]


@pytest.mark.slow   # runs the script
def test_the_script_warns_once_and_prints_the_step_it_exported(tmp_path):
  _flipped_latest(tmp_path / "c")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_checkpoint.py"),
                         f"--checkpoint_dir={tmp_path / 'c'}", f"--output={tmp_path / 'a.npz'}",
                         "--format=npz"], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
  assert re.search(r"checkpoint .*c/4 is corrupt or unreadable \(.*'tables/t3'.*fingerprint "
                   r"check.*\); falling back to the previous one$", line), proc.stderr
  assert proc.stdout.startswith(f"wrote step 2 of {tmp_path / 'c'} to {tmp_path / 'a.npz'}")


@pytest.mark.parametrize("item,text,match", [
    ("meta", "{bad", r"c/4/meta/metadata:1: not valid JSON \(Expecting property name"),
    ("data_state", "\n[1]", r"c/4/data_state/metadata: holds \[1\], expected a JSON object"),
    ("manifest", "null", r"c/4/manifest/metadata: holds null, expected a JSON object")])
def test_a_damaged_json_item_is_named_by_its_file(tmp_path, item, text, match):
  """The error gave the JSON parser's message alone ('Expecting property name enclosed in
  double quotes: line 1 column 2'), or "'list' object has no attribute 'get'", without
  saying which file."""
  _two_steps(tmp_path / "c")
  (tmp_path / "c" / "4" / item / "metadata").write_text(text)
  with pytest.raises(CheckpointError, match=rf"c/4 is corrupt: .*{match}.*pick another "
                     r"--step: 2$"):
    convert.export_npz(tmp_path / "c", tmp_path / "a.npz", 4)


_PRINTS = "embeddings/fingerprints.0.json"


@pytest.mark.parametrize("path,text,match", [
    (_PRINTS, None, r"No such file or directory: '.*c/4/embeddings/fingerprints.0.json'"),
    (_PRINTS, "{not json", r"c/4/embeddings/fingerprints.0.json:1: not valid JSON"),
    (_PRINTS, "{}", r"c/4/embeddings/fingerprints.0.json: no integer fingerprint for array "
                    r"'\S+' \(null\)"),
    (_PRINTS, '{"tables/t0": "abc"}', r"fingerprints.0.json: no integer fingerprint"),
    ("embeddings/index.json", "{oops", r"c/4/embeddings/index.json:1: not valid JSON"),
    ("state/_METADATA", "{oops", r"c/4/state/_METADATA:1: not valid JSON")])
@pytest.mark.parametrize("fmt", ["npz", "zarr"])
def test_a_damaged_fingerprint_or_index_file_is_a_corrupt_step(tmp_path, fmt, path, text,
                                                                match):
  """An export read the tables' fingerprint files outside the step check: a missing one
  was 'error: --output: cannot write OUT: No such file or directory', a damaged one a
  traceback (JSONDecodeError, KeyError, ValueError); index.json's and orbax's parse errors
  named no file. Now each is a corrupt step, named by its file, like any other damage."""
  _two_steps(tmp_path / "c")
  target = tmp_path / "c" / "4" / path
  target.unlink() if text is None else target.write_text(text)
  export = {"npz": convert.export_npz, "zarr": convert.export_zarr}[fmt]
  with pytest.raises(CheckpointError, match=rf"c/4 is corrupt: .*{match}.*pick another "
                     r"--step: 2$"):
    export(tmp_path / "c", tmp_path / "out", 4)
  assert export(tmp_path / "c", tmp_path / "out") == 2   # the latest usable step


@pytest.mark.parametrize("dropped,match", [
    ("tables/t3", r"embeddings/index.json lists no array of table 't3' \(the manifest's "
                  r"tables: \['t0', 't1', 't2', 't3'\]\)"),
    ("table_opt/t2/accum", r"embeddings/index.json does not list the sparse optimizer array "
                           r"'accum' of table 't2' \(the manifest records \['accum'\]\)")])
@pytest.mark.parametrize("fmt", ["npz", "checkpoint"])
def test_an_array_lost_from_the_index_is_a_corrupt_step(tmp_path, dropped, match, fmt):
  """index.json is the list of table arrays every reader goes by: an entry lost from it
  (with its fingerprint, or not) dropped that table or its optimizer state from exports,
  and `--format=checkpoint` copied the step as verified; training then stopped with a
  table-set error instead of falling back."""
  _two_steps(tmp_path / "c")
  for name in ("index.json", "fingerprints.0.json"):
    path = tmp_path / "c" / "4" / "embeddings" / name
    data = json.loads(path.read_text())
    (data["arrays"] if name == "index.json" else data).pop(dropped)
    path.write_text(json.dumps(data))
  out = tmp_path / ("a.npz" if fmt == "npz" else "copy")
  export = {"npz": convert.export_npz, "checkpoint": convert.export_checkpoint}[fmt]
  with pytest.raises(CheckpointError, match=rf"c/4 is corrupt: {match}.*pick another "
                     r"--step: 2$"):
    export(tmp_path / "c", out, 4)


@pytest.mark.parametrize("fmt", ["npz", "checkpoint"])
def test_an_int8_part_lost_from_the_index_is_a_corrupt_step(tmp_path, fmt):
  """Any one of an int8 table's `q`, `scale`, `bias` counted as the table: with `scale`
  lost, an npz export wrote t3 without it and exited 0, and a resume stopped on a
  'cannot change a table's rows or dim' that named two equal shapes."""
  coll = h.collection("rw", 8, dtype="int8")
  with CheckpointManager(tmp_path / "c") as mgr:
    for step in (2, 4):
      mgr.save(step, h.train_state(coll, seed=step, step=step), coll, force=True)
  path = tmp_path / "c" / "4" / "embeddings" / "index.json"
  data = json.loads(path.read_text())
  data["arrays"].pop("tables/t3/scale")
  path.write_text(json.dumps(data))
  out = tmp_path / ("a.npz" if fmt == "npz" else "copy")
  export = {"npz": convert.export_npz, "checkpoint": convert.export_checkpoint}[fmt]
  with pytest.raises(CheckpointError, match=r"c/4 is corrupt: .*embeddings/index.json lists "
                     r"table 't3' \(int8\) as \['bias', 'q'\], not \['bias', 'q', 'scale'\]"
                     r".*pick another --step: 2$"):
    export(tmp_path / "c", out, 4)
  step = export(tmp_path / "c", out)   # the step a restore would pick
  assert (step if fmt == "npz" else step[0]) == 2


def test_a_torchrec_table_name_that_cannot_be_stored_is_refused(tmp_path):
  """`e/q` was imported and exported as `tables/e/q`, the name of int8 table `e`'s codes."""
  np.savez(tmp_path / "n.npz", **{"embedding_bags.e.weight": np.ones((4, 2), np.float32),
                                   "embedding_bags.e/q.weight": np.ones((4, 2), np.float32)})
  with pytest.raises(DataError, match=r"n.npz: 'embedding_bags.e/q.weight' names table 'e/q': "
                     r"table names with '/' or a leading '.' cannot be stored$"):
    convert.import_torchrec(tmp_path / "n.npz", tmp_path / "ck")
  assert not (tmp_path / "ck").exists()
  long = "t" * 256   # a file name's limit: 'cannot write ...: File name too long'
  np.savez(tmp_path / "n.npz", **{f"embedding_bags.{long}.weight": np.ones((4, 2))})
  with pytest.raises(DataError, match=rf"names table '{'t' * 80}': table a name of 256 bytes "
                     r"cannot be stored \(at most 255: it names a directory of each "
                     r"checkpoint\)$"):
    convert.import_torchrec(tmp_path / "n.npz", tmp_path / "ck")
  assert not (tmp_path / "ck").exists()


def test_a_table_name_two_collections_share_says_what_to_do(tmp_path):
  """A two-tower's user and item collections both with a table `t0`: refused, without a
  word of how to import them."""
  np.savez(tmp_path / "n.npz", **{"user.embedding_bags.t0.weight": np.ones((4, 2)),
                                   "item.embedding_bags.t0.weight": np.ones((4, 2))})
  with pytest.raises(DataError, match=r"table 't0' appears twice \(user.embedding_bags.t0."
                     r"weight, item.embedding_bags.t0.weight\): jaxrec names tables alone, "
                     r"so give one key another table name"):
    convert.import_torchrec(tmp_path / "n.npz", tmp_path / "ck")


@pytest.mark.parametrize("name,why", [
    ("a/b", "names with '/' or a leading '.' cannot be stored"),
    (".t", "names with '/' or a leading '.' cannot be stored"),
    ("é" * 128, r"a name of 256 bytes cannot be stored \(at most 255")])
def test_a_table_name_that_cannot_be_stored_is_refused_when_configured(name, why):
  """Such a table trained every step, then the first save failed ('File name too long'),
  or after compiling ('/')."""
  from jaxrec.embedding.specs import TableSpec  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=rf"^table '{name[:80]}.*': {why}"):
    TableSpec(name, 10, 4)
  TableSpec("é" * 127, 10, 4)   # 254 bytes


def test_a_step_directory_as_checkpoint_dir_names_the_flags(tmp_path):
  """`--checkpoint_dir=W/checkpoints/4` said only 'no checkpoint in W/checkpoints/4'."""
  _two_steps(tmp_path / "c")
  with pytest.raises(CheckpointError, match=rf"^--checkpoint_dir: no checkpoint in {tmp_path}/c/4 "
                     rf"\(it is the directory of step 4: pass --checkpoint_dir={tmp_path}/c "
                     rf"--step=4\)$"):
    convert.export_npz(tmp_path / "c" / "4", tmp_path / "a.npz")
  assert not (tmp_path / "a.npz").exists()


def test_an_index_that_lost_every_optimizer_array_is_a_corrupt_step(tmp_path):
  """With every table's optimizer arrays gone from index.json (their fingerprints kept),
  the tables agreed with each other: the export wrote no optimizer state and a resume
  started it fresh, where the fingerprint file still named the arrays."""
  _two_steps(tmp_path / "c")
  path = tmp_path / "c" / "4" / "embeddings" / "index.json"
  data = json.loads(path.read_text())
  data["arrays"] = {k: v for k, v in data["arrays"].items() if not k.startswith("table_opt/")}
  path.write_text(json.dumps(data))
  # the manifest records each table's optimizer arrays: that check comes first (without
  # it, in a checkpoint saved before, the fingerprint file's: `storage`)
  with pytest.raises(CheckpointError, match=r"c/4 is corrupt: embeddings/index.json does not "
                     r"list the sparse optimizer array '\S+' of table 't0' .*pick "
                     r"another --step: 2$"):
    convert.export_npz(tmp_path / "c", tmp_path / "a.npz", 4)
