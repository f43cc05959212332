"""The `embeddings` item as one OCDBT database (a one-process save of many arrays)."""

import asyncio
import logging
import os

import jax
import numpy as np
import pytest
from etils import epath

from jaxrec.checkpoint import CheckpointManager, convert, storage
from jaxrec.checkpoint import tables as tables_lib
from jaxrec.checkpoint.canonical import fingerprint_np
from tests.checkpoint import ckpt_helpers as h


def _small_arrays(n, rng, lazy=False):
  arrays, pieces, values = {}, [], {}
  for i in range(n):
    for name, shape in ((tables_lib.table_name(f"t{i:03d}"), (50, 4)),
                        (tables_lib.opt_name(f"t{i:03d}", "accum"), (50,))):
      arrays[name] = (shape, "float32")
      values[name] = rng.standard_normal(shape).astype(np.float32)
      pieces += [tables_lib.Piece(name, (0,) + (0,) * (len(shape) - 1), values[name][:30]),
                 tables_lib.Piece(name, (30,) + (0,) * (len(shape) - 1),
                                  (lambda v=values[name]: v[30:]) if lazy else values[name][30:])]
  return arrays, pieces, values


def _files(directory):
  return [os.path.join(d, f) for d, _, files in os.walk(directory) for f in files]


def test_many_small_arrays_are_one_database_written_in_two_commits(tmp_path, monkeypatch):
  """3,000 tables wrote 12,000 files, one array at a time: 31 s for 1,000-row tables where
  one database and one commit per ~128 MB of rows took 7 s."""
  arrays, pieces, values = _small_arrays(40, np.random.default_rng(0))   # 80 arrays
  commits, real = [], tables_lib.ts.Transaction
  monkeypatch.setattr(tables_lib.ts, "Transaction", lambda: commits.append(1) or real())
  asyncio.run(tables_lib.write_pieces(epath.Path(tmp_path), arrays, pieces))
  assert len(commits) == 2   # the arrays' metadata, then every row
  assert tables_lib.uses_database(tmp_path)
  assert len(_files(tmp_path)) < 10 and not (tmp_path / "tables").exists()
  context = tables_lib.read_context()
  for name, want in values.items():
    got = tables_lib.open_stored(tmp_path, name, context).read().result()
    np.testing.assert_array_equal(got, want, err_msg=name)
  assert tables_lib.saved_fingerprints(tmp_path) == {
      name: fingerprint_np(v, v.shape, (0,) * v.ndim) for name, v in values.items()}
  (tmp_path / "lazy").mkdir()
  commits.clear()   # an import's lazily read tables: one at a time, an array a commit
  arrays, pieces, values = _small_arrays(40, np.random.default_rng(0), lazy=True)
  asyncio.run(tables_lib.write_pieces(epath.Path(tmp_path / "lazy"), arrays, pieces))
  assert len(commits) == 1 + 80


def test_few_arrays_keep_a_directory_each(tmp_path):
  arrays, pieces, values = _small_arrays(3, np.random.default_rng(1), lazy=True)
  asyncio.run(tables_lib.write_pieces(epath.Path(tmp_path), arrays, pieces))
  assert not tables_lib.uses_database(tmp_path)
  assert (tmp_path / "tables" / "t000" / ".zarray").exists()
  got = tables_lib.open_stored(tmp_path, "tables/t002").read().result()
  np.testing.assert_array_equal(got, values["tables/t002"])


def _save_as_database(path, coll, states, data_state=False):
  """Saves `states` (steps 1, 2, ...) of `coll` to `path`, their tables in a database
  (`DATABASE_ARRAYS` lowered: a few tables); `data_state`: each step's `{"n": step}`."""
  with pytest.MonkeyPatch.context() as m:
    m.setattr(tables_lib, "DATABASE_ARRAYS", 1)
    with CheckpointManager(path) as mgr:
      for s, state in enumerate(states, 1):
        mgr.save(s, state, coll, data_state={"n": s} if data_state else None, force=True)
        mgr.wait()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Steps 1 and 2 of an 8-device `twrw` collection, its tables in a database."""
  path = tmp_path_factory.mktemp("db")
  coll = h.collection("twrw", 8)
  states = [h.train_state(coll, seed=s, step=s) for s in (1, 2)]
  _save_as_database(path, coll, states, data_state=True)
  assert tables_lib.uses_database(path / "2" / "embeddings")
  return path, coll, states


@pytest.mark.parametrize("kind,devices", [("twrw", 8), ("rw", 4), ("cw", 4), ("dp", 1)])
def test_a_database_restores_bitwise_on_any_mesh(saved, kind, devices):
  path, coll, states = saved
  new = h.collection(kind, devices)
  with CheckpointManager(path) as mgr:
    assert mgr.latest_valid_step(full=True) == 2
    restored = mgr.restore(h.dense(new.mesh), new)
  h.assert_tables_equal(coll, states[1], new, restored.state)


def test_a_database_exports_to_npz(saved, tmp_path):
  path, coll, states = saved
  convert.export_npz(path, tmp_path / "c.npz", step=2)
  tables, _ = jax.device_get(coll.unstack_tables(states[1]["emb"]))
  with np.load(tmp_path / "c.npz") as z:
    for name, table in tables.items():
      np.testing.assert_array_equal(z[f"tables/{name}"], table)
  opened = storage.open_arrays(path / "2")
  np.testing.assert_array_equal(opened["tables/t1"].read().result(), tables["t1"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_database_falls_back_to_the_step_before(tmp_path, caplog):
  coll = h.collection("rw", 8)
  s1, s2 = (h.train_state(coll, seed=s, step=s) for s in (1, 2))
  _save_as_database(tmp_path, coll, [s1, s2])
  data = tmp_path / "2" / "embeddings" / "d"
  h.flip_middle_byte(max(data.iterdir(), key=os.path.getsize))   # silent corruption
  with CheckpointManager(tmp_path) as mgr, caplog.at_level(logging.WARNING):
    restored = mgr.restore(h.dense(coll.mesh), coll)
    assert int(restored.state["step"]) == 1
    assert mgr.all_steps() == [1]
  assert f"{tmp_path}/2" in caplog.text and "corrupt" in caplog.text
  h.assert_tables_equal(coll, s1, coll, restored.state)


@pytest.mark.parametrize("odd", ["run%41", "run#1", "run?x", "a b"])
def test_a_database_under_a_path_with_url_characters(tmp_path, odd):
  """The database's base was a `file://` URL: a workdir with `#` or `?` failed every save,
  one with `%41` wrote the database into `.../runA` and every step lost its tables."""
  directory = tmp_path / odd / "embeddings"
  directory.mkdir(parents=True)
  arrays, pieces, values = _small_arrays(40, np.random.default_rng(2))
  asyncio.run(tables_lib.write_pieces(epath.Path(directory), arrays, pieces))
  assert tables_lib.uses_database(directory)
  assert sorted(os.listdir(tmp_path)) == [odd]
  opened = tables_lib.open_many(directory, list(values), tables_lib.read_context())
  for name, want in values.items():
    np.testing.assert_array_equal(opened[name].read().result(), want, err_msg=name)


def test_a_checkpoint_under_a_path_with_url_characters_exports(tmp_path):
  """`convert_checkpoint.py` opened the dense `state` item at a `file://` URL: every step
  of a workdir with a `#` was "corrupt" (a training restore, through orbax, read them)."""
  coll = h.collection("dp", 1)
  state = h.train_state(coll, seed=1, step=1)
  path = tmp_path / "run#1" / "checkpoints"
  _save_as_database(path, coll, [state])
  convert.export_npz(path, tmp_path / "c.npz", step=1)
  with np.load(tmp_path / "c.npz") as z:
    assert any(n.startswith("dense/") for n in z.files)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_database_without_its_manifest_is_named_so(tmp_path, caplog):
  """Without `manifest.ocdbt` the item was read as files: the step was rejected for a
  missing `.../tables/t0/.zarray`, a file such a step never had."""
  coll = h.collection("dp", 1)
  s1, s2 = (h.train_state(coll, seed=s, step=s) for s in (1, 2))
  _save_as_database(tmp_path, coll, [s1, s2])
  (tmp_path / "2" / "embeddings" / "manifest.ocdbt").unlink()
  with CheckpointManager(tmp_path) as mgr, caplog.at_level(logging.WARNING):
    restored = mgr.restore(h.dense(coll.mesh), coll)
    assert int(restored.state["step"]) == 1
  assert f"{tmp_path}/2/embeddings/manifest.ocdbt is missing" in caplog.text
  assert ".zarray" not in caplog.text


def _save_in_two_processes(path, tables, dtype="float32", mode="save"):
  """`two_process_save.py` as processes 0 and 1 of a job (4 CPU devices each); the last
  line process 0 printed (`layout=...`; `restored=N` with `mode="restore"`)."""
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from tests import xla_env  # pylint: disable=import-outside-toplevel
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = xla_env.script_env(4, PYTHONPATH=os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH")) if p))
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(root, "tests", "checkpoint", "two_process_save.py"),
       str(p), str(port), str(path), str(tables), dtype, mode], env=env, cwd=root,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (0, 1)]
  outs = [proc.communicate(timeout=300) for proc in procs]
  for proc, (_, err) in zip(procs, outs):
    assert proc.returncode == 0, err[-3000:]
  return outs[0][0].strip().splitlines()[-1]


@pytest.mark.slow
def test_two_processes_save_one_database_that_restores_bitwise_on_one(tmp_path):
  """A multi-process save wrote a directory of files per array and chunk (one database
  took one writer): now the processes share OCDBT's coordinator. Each table here is one
  stored chunk, and the processes' devices take turns along the stack's rows: 7 of the 40
  tables (14 chunks, with their Adagrad state) hold rows of both processes."""
  from tests.checkpoint import two_process_save as two  # pylint: disable=C0415
  assert _save_in_two_processes(tmp_path, 40) == "layout=database"   # 80 arrays
  item = tmp_path / "1" / "embeddings"
  assert tables_lib.uses_database(item) and not (item / "tables").exists()
  assert len(_files(tmp_path / "1")) < 60
  for devices in (8, 1):
    new = two.two_process_collection(h, 40, devices=devices)
    with CheckpointManager(tmp_path) as mgr:   # fingerprints checked: bit for bit
      restored = mgr.restore(h.dense(new.mesh, 3), new)
    h.assert_tables_equal(new, h.train_state(new, seed=3, step=1), new, restored.state)
  # and in two processes again, on another plan (each reads parts of shared chunks)
  assert _save_in_two_processes(tmp_path, 40, mode="restore") == "restored=40"
