"""convert_checkpoint --format=checkpoint and --torchrec_npz into a run's directory; a copy
that cannot be written."""

import errno
import os
import re

import numpy as np
import pytest
import tensorstore as ts
from etils import epath

from jaxrec import tree_copy
from jaxrec.checkpoint import CheckpointManager, convert, torchrec_npz
from jaxrec.errors import ConfigError, DataError
from tests.checkpoint import ckpt_helpers as h


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  coll = h.collection("rw", 4)
  path = tmp_path_factory.mktemp("w") / "checkpoints"
  with CheckpointManager(path) as mgr:
    mgr.save(4, h.train_state(coll, seed=2, step=4), coll, force=True)
  return path, coll


def _workdir(tmp_path):
  """Another run's directory W2 (its checkpoints/ and a file it wrote)."""
  w2 = tmp_path / "w2"
  (w2 / "checkpoints").mkdir(parents=True)
  (w2 / "metrics.jsonl").write_text("")
  return w2


def test_a_copy_into_a_runs_directory_is_refused(saved, tmp_path):
  """`--output=W2` (not W2/checkpoints) wrote W2/4 beside W2/checkpoints: no run read it,
  and train.py refused W2 as a checkpoint directory from then on."""
  path, _ = saved
  w2 = _workdir(tmp_path)
  with pytest.raises(ConfigError, match=rf"is a run's directory .* --output={w2}/checkpoints"):
    convert.export_checkpoint(path, w2)
  assert sorted(p.name for p in w2.iterdir()) == ["checkpoints", "metrics.jsonl"]
  assert convert.export_checkpoint(path, w2 / "checkpoints")[0] == 4


def test_an_import_into_a_runs_directory_is_refused(saved, tmp_path):
  """As for a copy: the import wrote W2/<step> beside W2/checkpoints."""
  _, coll = saved
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{t.name}.weight": np.zeros((t.rows, t.dim), np.float32)
                   for t in coll.tables})
  w2 = _workdir(tmp_path)
  with pytest.raises(ConfigError, match=rf"is a run's directory .* --output={w2}/checkpoints"):
    convert.import_torchrec(npz, w2, step=20)
  assert sorted(p.name for p in w2.iterdir()) == ["checkpoints", "metrics.jsonl"]
  assert convert.import_torchrec(npz, w2 / "checkpoints", step=20) == sorted(
      t.name for t in coll.tables)


class _Broken:
  """A file whose `read` (or `write`) raises `error`."""

  def __init__(self, f, op, error):
    self.f, self.op, self.error = f, op, error

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.f.close()

  def __getattr__(self, name):
    if name == self.op:
      def fail(*args):
        raise self.error
      return fail
    return getattr(self.f, name)


def _break_files(monkeypatch, mode, op, error):
  """Files `tree_copy` opens in `mode` fail at `op` with `error`."""
  def broken_open(path, m, *args, **kwargs):
    f = open(path, m, *args, **kwargs)   # pylint: disable=unspecified-encoding
    return _Broken(f, op, error) if m == mode else f
  monkeypatch.setattr(tree_copy, "open", broken_open, raising=False)


@pytest.mark.parametrize("mode, op, error, message", [
    ("wb", "write", OSError(errno.ENOSPC, "No space left on device"),
     "--output: cannot write {out}/4/\\S+: No space left on device"),
    ("rb", "read", OSError(errno.EIO, "Input/output error"),
     "--checkpoint_dir: cannot read {path}/4/\\S+: Input/output error"),
])
def test_a_failed_copy_names_the_file_and_the_side(saved, tmp_path, monkeypatch, mode, op,
                                                    error, message):
  """shutil.copytree gathered every file's error as '--output: cannot write <output>: ...
  (copying <source>, and 19 more files)', for an unreadable source (EIO) too; now the first
  file, read under --checkpoint_dir or written under --output (not its temporary name)."""
  path, _ = saved
  _break_files(monkeypatch, mode, op, error)
  out = tmp_path / "w2" / "checkpoints"
  with pytest.raises(DataError) as e:
    convert.export_checkpoint(path, out)
  assert re.fullmatch(message.format(out=out, path=path), str(e.value)), str(e.value)
  assert not os.path.exists(tmp_path / "w2")


def test_a_zarr_export_onto_a_full_disk_names_the_output(saved, tmp_path, monkeypatch):
  """tensorstore's write error named the temporary directory (`OUT.tmp-<ns>/...`, removed
  by then), not --output."""
  path, _ = saved
  real_open = ts.open

  class Full:   # what tensorstore raises when a chunk cannot be written
    def __init__(self, spec):
      self.path = spec["kvstore"]["path"]

    def result(self):   # of the open
      return self

    def __getitem__(self, index):
      return self

    def write(self, block):
      raise ValueError(f'UNKNOWN: Error writing local file "{self.path}/0.0": Failed to '
                       "write 648 bytes to file 4: No space left on device "
                       "[os_error_code='28']")

  def ts_open(spec, *args, **kwargs):
    if not kwargs.get("create"):
      return real_open(spec, *args, **kwargs)
    real_open(spec, *args, **kwargs).result()   # checks the spec; done before the write fails
    return Full(spec)
  monkeypatch.setattr(ts, "open", ts_open)
  out = tmp_path / "z"
  with pytest.raises(DataError) as e:
    convert.export_zarr(path, out)
  assert re.fullmatch(rf"--output: cannot write {out}/\S+: No space left on device",
                      str(e.value)), str(e.value)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("export", ["export_npz", "export_zarr"])
@pytest.mark.parametrize("error, file", [
    (OSError(errno.EIO, "Input/output error"), "{path}/4/embeddings/tables/t1"),
    (ValueError('UNKNOWN: Error reading local file "/x/t1/0.0": Failed to read 64 bytes: '
                "Input/output error [os_error_code='5']"), "/x/t1/0.0"),
])
def test_an_export_that_cannot_read_names_the_file_not_a_corrupt_checkpoint(
    saved, tmp_path, monkeypatch, export, error, file):
  """An OSError (EIO) reading an array was '--output: cannot write <output>', tensorstore's
  read error 'the checkpoint is corrupt': the disk failed, not the checkpoint or the output."""
  from jaxrec.checkpoint import storage   # pylint: disable=import-outside-toplevel
  path, _ = saved
  real = storage.row_blocks

  def row_blocks(array, *args, **kwargs):
    if array.kvstore.path.rstrip("/").endswith("tables/t1"):
      raise error
    yield from real(array, *args, **kwargs)
  monkeypatch.setattr(storage, "row_blocks", row_blocks)
  with pytest.raises(DataError) as e:
    getattr(convert, export)(path, tmp_path / "out")
  want = (f"--checkpoint_dir: cannot read {file.format(path=path)}: Input/output error "
          "(array 'tables/t1')")
  assert str(e.value) == want
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("export", ["export_npz", "export_checkpoint"])
@pytest.mark.parametrize("broken", ["manifest", "table"])
def test_a_step_that_cannot_be_opened_names_the_file_not_a_corrupt_checkpoint(
    saved, tmp_path, monkeypatch, export, broken):
  """EIO while checking a step (`storage.check_step`: its manifest, or opening an array)
  was 'checkpoint ... is corrupt: [Errno 5] ...' (and the step before it converted)."""
  from jaxrec.checkpoint import storage, tables   # pylint: disable=import-outside-toplevel
  path, _ = saved
  bad = path / "4" / ("manifest/metadata" if broken == "manifest" else "embeddings/tables/t1")
  eio = OSError(errno.EIO, "Input/output error", str(bad))
  if broken == "manifest":
    real_json = storage.read_json

    def read_json(step_dir, item):
      if item == storage.MANIFEST:
        raise eio
      return real_json(step_dir, item)
    monkeypatch.setattr(storage, "read_json", read_json)
  else:
    real_open = tables.open_many

    def open_many(directory, names, context=None):
      if "tables/t1" in names:
        raise eio
      return real_open(directory, names, context)
    monkeypatch.setattr(tables, "open_many", open_many)
  with pytest.raises(DataError) as e:
    getattr(convert, export)(path, tmp_path / "out")
  assert str(e.value) == (f"--checkpoint_dir: cannot read {bad}: Input/output error "
                          f"(checkpoint {path / '4'})")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("failed,expect", [
    ("src/4/x.json", "cannot convert: {tmp}/src/4/x.json: No such file or directory"),
    ("out.npz", "--output: cannot write {tmp}/out.npz: No such file or directory"),
    ("out.npz.tmp-1", "--output: cannot write {tmp}/out.npz: No such file or directory"),
    ("out.npz/a/b", "--output: cannot write {tmp}/out.npz: No such file or directory")])
def test_a_file_error_names_the_output_only_when_it_is_the_outputs(tmp_path, failed, expect):
  """Every OSError of an export was '--output: cannot write OUT', also a file of the
  source checkpoint that was missing."""
  made = tmp_path / "made"
  with pytest.raises(DataError) as info:
    # pylint: disable-next=protected-access
    with convert._removed_on_error(tmp_path / "out.npz", [made]):
      made.write_text("partial")
      raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(tmp_path / failed))
  assert str(info.value) == expect.format(tmp=tmp_path)
  assert not made.exists()


def test_a_torchrec_import_holds_one_table_at_a_time(tmp_path):
  """The import read every table of the npz, then wrote them: all in memory at once, and
  2x the biggest while it was checked (a helper's 1.3 GB table peaked at 2.7 GB). Tables
  are checked and written one after the other; the checkpoint holds the same values."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  weights = {f"t{i}": rng.standard_normal((60_000, 16)).astype(np.float32) for i in range(4)}
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{n}.weight": w for n, w in weights.items()})
  one = weights["t0"].nbytes   # 3.84 MB
  tracemalloc.start()
  try:
    convert.import_torchrec(npz, tmp_path / "ckpt")
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 3.5 * one, (peak, one)   # all four at once: 5.8x (the load and the
                                         # fingerprint take a table-sized temporary each)
  for name, w in weights.items():
    stored = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(
        tmp_path / "ckpt" / "0" / "embeddings" / "tables" / name)}}).result()
    np.testing.assert_array_equal(stored.read().result(), w)


def test_an_npz_changed_during_the_import_is_named(tmp_path, monkeypatch):
  """The import reads each table again when it writes it: an npz replaced or damaged in
  between gave the save's error ('saving checkpoint 0 ... failed') or a raw BadZipFile."""
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{"embedding_bags.t.weight": np.ones((4, 2), np.float32)})
  (table,) = torchrec_npz.read_tables(npz).values()
  np.savez(npz, **{"embedding_bags.t.weight": np.ones((5, 2), np.float32)})
  with pytest.raises(DataError, match=r"ebc.npz changed during the import: "
                     r"'embedding_bags.t.weight' is now float32 \[5, 2\], was float32 \[4, 2\]"):
    table.load()
  npz.write_bytes(b"not a zip")
  with pytest.raises(DataError, match=r"ebc.npz became unreadable during the import "):
    table.load()
  np.savez(npz, **{"embedding_bags.t.weight": np.full((4, 2), np.nan, np.float32)})
  with pytest.raises(DataError, match=r"'embedding_bags.t.weight' holds 8 NaN/inf values"):
    table.load()   # replaced alike, but with values the first read never saw
  np.savez(npz, **{"embedding_bags.t.weight": np.ones((4, 2), np.float32)})
  real = torchrec_npz.read_tables

  def then_removed(path):
    tables = real(path)
    os.unlink(path)
    return tables
  monkeypatch.setattr(torchrec_npz, "read_tables", then_removed)
  with pytest.raises(DataError, match=r"ebc.npz became unreadable during the import "
                     r"\('embedding_bags.t.weight': .*No such file"):
    convert.import_torchrec(npz, tmp_path / "out")


def test_a_step_directory_as_the_output_is_refused(saved, tmp_path):
  """`--output=W2/checkpoints/4` wrote a checkpoint tree inside step 4 (a copy's `4/4`, an
  import's `4/0`): no run read it, and rotating step 4 out deleted it."""
  path, coll = saved
  w2 = _workdir(tmp_path) / "checkpoints"
  assert convert.export_checkpoint(path, w2)[0] == 4
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{t.name}.weight": np.zeros((t.rows, t.dim), np.float32)
                   for t in coll.tables})
  for convert_into in (lambda out: convert.export_checkpoint(path, out),
                       lambda out: convert.import_torchrec(npz, out, step=7)):
    with pytest.raises(ConfigError, match=rf"^--output {w2}/4 is a step of a checkpoint "
                       rf"directory: checkpoints go into the directory, --output={w2}$"):
      convert_into(w2 / "4")
  assert sorted(p.name for p in (w2 / "4").iterdir()) == sorted(
      p.name for p in (path / "4").iterdir())
  # a step not there yet, in a directory of steps or a run's checkpoints/: the copy went
  # into W2/checkpoints/9/4, which the next run warned about and rotated away; in the
  # checkpoints/ of a workdir not made yet (NEW/checkpoints/3/4: `train.py --workdir=NEW`
  # found no valid checkpoint)
  (tmp_path / "fresh").mkdir()
  (tmp_path / "fresh" / "config.gin").write_text("")   # a run's directory, no steps yet
  for out in (w2 / "9", tmp_path / "fresh" / "checkpoints" / "3",
              tmp_path / "new" / "checkpoints" / "3"):
    with pytest.raises(ConfigError, match=rf"^--output {out} is a step of a checkpoint "
                       rf"directory: checkpoints go into the directory, --output={out.parent}$"):
      convert.export_checkpoint(path, out)
    assert not out.exists()
  assert not (tmp_path / "new").exists()
  for out in (tmp_path / "copies" / "9", tmp_path / "exports" / "run42"):
    assert convert.export_checkpoint(path, out)[0] == 4   # not a step


def test_a_zarr_export_that_cannot_make_its_directory_names_the_output(saved, tmp_path,
                                                                       monkeypatch):
  """A read-only location: the error named the temporary directory (`OUT.tmp-<ns>`)."""
  path, _ = saved
  real = type(epath.Path(tmp_path)).mkdir

  def read_only(self, *args, **kwargs):
    if ".tmp-" in self.name:
      raise OSError(errno.EROFS, "Read-only file system", str(self))
    return real(self, *args, **kwargs)
  monkeypatch.setattr(type(epath.Path(tmp_path)), "mkdir", read_only)
  with pytest.raises(ConfigError, match=rf"^--output: cannot create directory {tmp_path}/z: "
                     "Read-only file system$"):
    convert.export_zarr(path, tmp_path / "z")


def test_an_import_onto_a_full_disk_is_one_line_naming_the_output(tmp_path, monkeypatch):
  """It said 'saving checkpoint 0 in OUT failed: ...; no earlier checkpoint exists' (the
  training save's words) and left `0.orbax-checkpoint-tmp-*` in --output."""
  from jaxrec.checkpoint import tables as tables_lib  # pylint: disable=import-outside-toplevel
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{"embedding_bags.t.weight": np.ones((4, 2), np.float32)})

  async def full(directory, arrays, pieces, chunk_bytes=tables_lib.CHUNK_BYTES):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory / "t"))
  monkeypatch.setattr(tables_lib, "write_pieces", full)
  out = tmp_path / "ckpt"
  with pytest.raises(DataError, match=rf"^--output: cannot write {out}/0: No space left on "
                     r"device$"):   # (not the file, in the tmp directory removed by then)
    convert.import_torchrec(npz, out)
  assert not out.exists() or not os.listdir(out)


def test_a_directory_of_other_files_as_the_output_is_refused(saved, tmp_path):
  """`--output=~/Documents` put the step among the user's files (exit 0): a copy or import
  goes into a new or empty directory or one holding checkpoint steps only (a run's
  `checkpoints/`, with its `rejected/` and a killed save's tmp directory)."""
  path, coll = saved
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{t.name}.weight": np.zeros((t.rows, t.dim), np.float32)
                   for t in coll.tables})
  docs = tmp_path / "docs"
  docs.mkdir()
  for name in ("notes.txt", "photos", ".hidden"):
    (docs / name).write_text("")
  for convert_into in (lambda out: convert.export_checkpoint(path, out),
                       lambda out: convert.import_torchrec(npz, out, step=7)):
    with pytest.raises(ConfigError, match=rf"^--output {docs} is not a checkpoint directory: "
                       r"it holds 'notes.txt', 'photos', not checkpoint steps; pick a new or "
                       r"empty directory, or a run's checkpoints/$"):
      convert_into(docs)
  assert sorted(p.name for p in docs.iterdir()) == [".hidden", "notes.txt", "photos"]
  ckpts = tmp_path / "w2" / "checkpoints"
  for name in ("rejected", "2", "3.orbax-checkpoint-tmp-1700000000"):
    (ckpts / name).mkdir(parents=True)
  assert convert.export_checkpoint(path, ckpts)[0] == 4
  assert convert.import_torchrec(npz, ckpts, step=7)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert convert.export_checkpoint(path, empty)[0] == 4
