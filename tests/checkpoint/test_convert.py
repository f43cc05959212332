"""convert_checkpoint: npz / zarr export, copy for another plan (TorchRec interop:
test_convert_torchrec.py)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorstore as ts
from etils import epath

from jaxrec.checkpoint import CheckpointError, CheckpointManager, convert, storage
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError, DataError
from jaxrec.sharding.plan import uniform_plan
from jaxrec.train import evaluation
from tests.checkpoint import ckpt_helpers as h
from tests.scripts.in_process import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  coll = h.collection("grid", 8)
  state = h.train_state(coll, seed=3, step=4)
  path = tmp_path_factory.mktemp("ckpt")
  with CheckpointManager(path) as mgr:
    mgr.save(2, h.train_state(coll, seed=2, step=2), coll, force=True)
    mgr.save(4, state, coll, data_state={"examples_consumed": 256}, meta={"gin": "a=1"},
             force=True)
  return path, coll, state


def _expected(coll, state):
  """Exported name → numpy array, from the live state."""
  tables, opt = jax.device_get(coll.unstack_tables(state["emb"]))
  out = {f"tables/{n}": np.asarray(x) for n, x in tables.items()}
  out.update({f"table_opt/{n}/{k}": np.asarray(x) for n, o in opt.items() for k, x in o.items()})
  dense = {"step": state["step"], "dense": state["params"], "dense_opt": state["opt_state"],
           "rng": jax.random.key_data(state["rng"])}
  from jaxrec.checkpoint.canonical import leaf_names
  out.update({n: np.asarray(x) for n, x in leaf_names(jax.device_get(dense))})
  return out


def test_npz_export(saved, tmp_path):
  path, coll, state = saved
  out = tmp_path / "c.npz"
  assert convert.export_npz(path, out) == 4
  expect = _expected(coll, state)
  with np.load(out) as z:
    assert sorted(z.files) == sorted(list(expect) + ["metadata"])
    for name, x in expect.items():
      np.testing.assert_array_equal(z[name], x, err_msg=name)
      assert z[name].dtype == x.dtype
    meta = json.loads(str(z["metadata"]))
  assert meta["step"] == 4 and meta["data_state"] == {"examples_consumed": 256}
  assert meta["meta"] == {"gin": "a=1"}
  assert convert.export_npz(path, tmp_path / "old.npz", step=2) == 2


def test_zarr_export(saved, tmp_path):
  path, coll, state = saved
  out = tmp_path / "z"
  convert.export_zarr(path, out, step=4)
  for name, x in _expected(coll, state).items():
    got = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(out / name)}}
                  ).result().read().result()
    np.testing.assert_array_equal(got, x, err_msg=name)
  assert json.loads((out / "metadata.json").read_text())["step"] == 4


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_export_low_precision(tmp_path, dtype):
  coll = h.collection("rw", 8, dtype=dtype)
  state = h.train_state(coll, seed=1)
  with CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(1, state, coll, force=True)
  tables, _ = jax.device_get(coll.unstack_tables(state["emb"]))
  convert.export_npz(tmp_path / "ckpt", tmp_path / "c.npz")
  convert.export_zarr(tmp_path / "ckpt", tmp_path / "z")
  with np.load(tmp_path / "c.npz") as z:
    for name, table in tables.items():
      if dtype == "int8":
        for leaf in ("q", "scale", "bias"):
          np.testing.assert_array_equal(z[f"tables/{name}/{leaf}"], getattr(table, leaf))
      else:
        assert z[f"tables/{name}"].dtype == np.float32
        np.testing.assert_array_equal(z[f"tables/{name}"], np.asarray(table, np.float32))
        got = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(
            tmp_path / "z" / "tables" / name)}}).result().read().result()
        assert got.dtype == table.dtype
        np.testing.assert_array_equal(got, table)


def test_checkpoint_for_other_plan_restores_equal(saved, tmp_path):
  path, coll, state = saved
  out = tmp_path / "ckpt6"
  step, layouts = convert.export_checkpoint(path, out, None, convert.parse_mesh("table=3,row=2"),
                                            "twrw")
  assert step == 4 and "twrw" in layouts
  new = h.collection("twrw", 6)
  with CheckpointManager(out) as mgr:
    restored = mgr.restore(h.dense(new.mesh), new)
  h.assert_tables_equal(coll, state, new, restored.state)
  h.assert_dense_equal(state, restored.state)
  assert restored.data_state == {"examples_consumed": 256}


def test_checkpoint_plan_must_fit_mesh(saved, tmp_path):
  """A plan file the mesh cannot hold is refused before anything is written (a dim the
  col axis does not divide is padded: tests/checkpoint/test_col_padding.py)."""
  path, coll, _ = saved
  plan = tmp_path / "plan.json"
  plan.write_text(json.dumps({t.name: {"kind": "tw", "table_slice": 5} for t in coll.tables}))
  with pytest.raises(ConfigError, match="table_slice 5 is outside mesh axis table=2"):
    convert.export_checkpoint(path, tmp_path / "x", None, convert.parse_mesh("table=2"),
                              str(plan))
  assert not (tmp_path / "x").exists()


def test_export_refuses_corrupt_data(saved, tmp_path):
  path, _, _ = saved
  copy = tmp_path / "copy"
  convert.export_checkpoint(path, copy, 4)
  chunk = next(p for p in (copy / "4" / "embeddings" / "tables" / "t3").iterdir()
               if not p.name.startswith("."))
  data = bytearray(chunk.read_bytes())
  data[len(data) // 2] ^= 0x01
  chunk.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="fingerprint"):
    convert.export_npz(copy, tmp_path / "bad.npz", step=4)
  assert not (tmp_path / "bad.npz").exists()


def test_checkpoint_copy_refuses_to_hide_behind_newer_checkpoints(saved, tmp_path):
  """As for an import: a copy of step 2 into a directory holding step 4 would never be
  restored (a run resumes from 4) and was accepted silently."""
  path, _, _ = saved
  out = tmp_path / "ckpt"
  convert.export_checkpoint(path, out, 4)
  with pytest.raises(ConfigError, match=r"holds step 4, which a run would resume from "
                     r"instead of the copied step 2"):
    convert.export_checkpoint(path, out, 2)
  assert sorted(p.name for p in out.iterdir()) == ["4"]


def test_torchrec_import_refuses_to_hide_behind_newer_checkpoints(saved, tmp_path):
  """A run resumes from the newest step: importing as an older one would be ignored."""
  path, coll, _ = saved
  out = tmp_path / "ckpt"
  shutil.copytree(path, out)
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{t.name}.weight": np.zeros((t.rows, t.dim), np.float32)
                   for t in coll.tables})
  with pytest.raises(ConfigError, match=r"step 4,.*--step=5"):
    convert.import_torchrec(npz, out, step=0)
  assert convert.import_torchrec(npz, out, step=5) == sorted(t.name for t in coll.tables)
  with CheckpointManager(out) as mgr:
    assert mgr.all_steps() == [2, 4, 5]


def test_script(saved, tmp_path):
  """The default suite's one real process of scripts/convert_checkpoint.py (the others run
  in this process: `run_script`)."""
  path, coll, state = saved
  out = tmp_path / "c.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_checkpoint.py"),
                         f"--checkpoint_dir={path}", f"--output={out}", "--format=npz"],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote step 4" in proc.stdout
  with np.load(out) as z:
    np.testing.assert_array_equal(z["tables/t0"], _expected(coll, state)["tables/t0"])
  proc = run_script("convert_checkpoint.py", f"--checkpoint_dir={tmp_path / 'none'}",
                    f"--output={out}", "--format=zarr")
  assert proc.returncode == 1 and proc.stderr.startswith("error: --checkpoint_dir: no checkpoint")


def _offloaded_run(tmp_path):
  """`tmp_path/w`: checkpoint 5 of a run with table t0 offloaded; returns its snapshot
  directory, the collection, the state and t0's full arrays."""
  from jaxrec import offload
  coll = h.collection("rw", 8)              # t0 stands for a 13-row cache of a 50-row table
  full = TableSpec("t0", 50, h.DIM)
  store = offload.TableStore(full, offload.OffloadTable("t0", cache_rows=13),
                             coll.optimizer, str(tmp_path / "live" / "t0"))
  store.create(jax.random.key(0))
  rows = np.arange(0, 50, 3)
  values = {"table": np.random.default_rng(0).standard_normal((len(rows), h.DIM)).astype(
      np.float32), "opt.accum": np.full((len(rows), h.DIM), 7.0, np.float32)}
  store.write(rows, values)
  want = {n: store.read_all(n, 0, 50) for n in store.names}
  snaps = tmp_path / "w" / "offload_snapshots"
  offload.snapshots.save(str(snaps), 5, {"t0": store}, keep=None)
  meta = {"offload": {"snapshots": str(snaps),
                      "tables": {"t0": {"rows": 50, "cache_rows": 13}}}}
  state = h.train_state(coll, step=5)
  with CheckpointManager(tmp_path / "w" / "checkpoints") as mgr:
    mgr.save(5, state, coll, meta=meta, force=True)
  return snaps, coll, state, want


def test_a_damaged_device_cache_of_an_offloaded_table_is_a_corrupt_step(tmp_path):
  """Exports take an offloaded table from its snapshot and never read the checkpoint's
  cache array, which a training restore checks: a flipped bit there was exported as the
  step while training fell back. Now the export finds the damage too."""
  _offloaded_run(tmp_path)
  chunk = next(p for p in (tmp_path / "w" / "checkpoints" / "5" / "embeddings" / "tables" /
                           "t0").iterdir() if not p.name.startswith("."))
  data = bytearray(chunk.read_bytes())
  data[len(data) // 2] ^= 0x01
  chunk.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match=r"'tables/t0' .*(fails its fingerprint check|"
                     r"cannot be read)"):
    convert.export_npz(tmp_path / "w" / "checkpoints", tmp_path / "a.npz", 5)


def test_offloaded_table_is_exported_from_its_snapshot(tmp_path):
  """The checkpoint of an offloaded run holds only the device cache of the table; the
  exports take the whole table (and its optimizer state) from the offload snapshot, and a
  checkpoint copy takes the snapshot along."""
  from jaxrec import offload
  snaps, coll, state, want = _offloaded_run(tmp_path)
  convert.export_npz(tmp_path / "w" / "checkpoints", tmp_path / "a.npz")
  expect = _expected(coll, state)
  with np.load(tmp_path / "a.npz") as z:
    np.testing.assert_array_equal(z["tables/t0"], want["table"])
    np.testing.assert_array_equal(z["table_opt/t0/accum"], want["opt.accum"])
    np.testing.assert_array_equal(z["tables/t1"], expect["tables/t1"])   # on-device table
  convert.export_zarr(tmp_path / "w" / "checkpoints", tmp_path / "z")
  got = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(
      tmp_path / "z" / "tables" / "t0")}}).result().read().result()
  np.testing.assert_array_equal(got, want["table"])

  convert.export_checkpoint(tmp_path / "w" / "checkpoints", tmp_path / "w2" / "checkpoints")
  assert offload.snapshots.steps(str(tmp_path / "w2" / "offload_snapshots")) == [5]
  shutil.rmtree(snaps)
  convert.export_npz(tmp_path / "w2" / "checkpoints", tmp_path / "b.npz")
  with np.load(tmp_path / "b.npz") as z:
    np.testing.assert_array_equal(z["tables/t0"], want["table"])
  with pytest.raises(CheckpointError, match=r"offloaded tables \['t0'\] but no offload snapshot"):
    convert.export_npz(tmp_path / "w" / "checkpoints", tmp_path / "c.npz")
  assert not (tmp_path / "c.npz").exists()


def test_outputs_refused_before_any_read(saved, tmp_path):
  """An existing npz --output was found only after the whole export (a traceback, a stray
  `.tmp` left); an --output inside --checkpoint_dir wrote into the source checkpoint."""
  path, _, _ = saved
  (tmp_path / "old.npz").write_bytes(b"keep")
  with pytest.raises(ConfigError, match="old.npz already exists"):
    convert.export_npz(path, tmp_path / "old.npz")
  assert (tmp_path / "old.npz").read_bytes() == b"keep" and len(list(tmp_path.iterdir())) == 1
  for fn, out in [(convert.export_zarr, path / "4" / "z"), (convert.export_npz, path / "x.npz"),
                  (convert.export_checkpoint, path)]:
    with pytest.raises(ConfigError, match="is inside --checkpoint_dir"):
      fn(path, out)
  assert not (path / "4" / "z").exists() and not (path / "x.npz").exists()
  with pytest.raises(ConfigError, match=r"^--output: .*old.npz is a file, not a directory$"):
    convert.export_npz(path, tmp_path / "old.npz" / "c.npz")   # 'cannot create ...: File
  with pytest.raises(CheckpointError, match=r"^--checkpoint_dir: no checkpoint in .*old.npz "
                     r"\(it is a file, not a directory\)$"):   # exists'; 'no checkpoint in'
    convert.export_npz(tmp_path / "old.npz", tmp_path / "d.npz")


def test_checkpoint_output_holding_the_checkpoint_dir_is_refused(saved):
  """`--output=W` for `--checkpoint_dir=W/checkpoints` (the workdir, not its checkpoints)
  wrote W/4 beside W/checkpoints, after which train.py refused W as a checkpoint
  directory."""
  path, _, _ = saved
  for out in (path.parent, path.parent.parent):
    with pytest.raises(ConfigError, match="holds --checkpoint_dir"):
      convert.export_checkpoint(path, out, restart_data=True)
    assert not (out / "4").exists()


def test_a_restart_data_copy_owes_no_eval_of_its_step(saved, tmp_path):
  """Each `--restart_data` day re-ran the copied step's eval ('the run stopped before or
  during that eval') in its new workdir, whose metrics.jsonl has no eval line of it: the
  eval was the old run's. The copy marks the step as not to be evaluated; a plain copy
  keeps the mark."""
  path, _, _ = saved

  def storage_meta(out):
    return storage.read_json(out / "4", storage.META)
  convert.export_checkpoint(path, tmp_path / "day1", restart_data=True)
  assert storage_meta(tmp_path / "day1")["evaluates"] is False
  assert storage_meta(tmp_path / "day1")["gin"] == "a=1"
  convert.export_checkpoint(path, tmp_path / "same")
  assert "evaluates" not in storage_meta(tmp_path / "same")
  no_metrics = str(tmp_path / "metrics.jsonl")   # the new day's workdir, before its run
  assert not evaluation.owed(no_metrics, storage_meta(tmp_path / "day1"), 2, 4)
  assert evaluation.owed(no_metrics, storage_meta(tmp_path / "same"), 2, 4)


def test_a_copy_of_a_step_its_run_evaluated_owes_no_eval(saved, tmp_path):
  """A plain copy into a new workdir re-ran the step's eval there ('the run stopped before
  or during that eval'), though the run's metrics.jsonl had it: a step its run evaluated
  is copied as evaluated; one whose eval is missing there is still owed."""
  _, coll, state = saved
  w = tmp_path / "w"
  with CheckpointManager(w / "checkpoints") as mgr:
    mgr.save(4, state, coll, meta={"evaluates": True}, force=True)
  (w / "metrics.jsonl").write_text('{"step": 4, "loss": 0.5}\n')
  convert.export_checkpoint(w / "checkpoints", tmp_path / "owed")
  assert storage.read_json(tmp_path / "owed" / "4", storage.META)["evaluates"] is True
  (w / "metrics.jsonl").write_text('{"step": 4, "loss": 0.5}\n{"step": 4, "eval_auc": 0.7}\n')
  convert.export_checkpoint(w / "checkpoints", tmp_path / "done")
  assert storage.read_json(tmp_path / "done" / "4", storage.META)["evaluates"] is False


def test_plan_file_of_a_run_is_accepted(saved, tmp_path):
  """`--plan=W/plan.json` (the plan under "plan", as docs/checkpoints.md says --plan takes) was a
  TypeError traceback."""
  path, coll, _ = saved
  plan_json = tmp_path / "plan.json"
  plan_json.write_text(json.dumps({"mesh": {"table": 2, "row": 2}, "plan": {
      t.name: {"kind": "twrw", "table_slice": i % 2} for i, t in enumerate(coll.tables)}}))
  _, layouts = convert.export_checkpoint(path, tmp_path / "c", 4,
                                         convert.parse_mesh("table=2,row=2"), str(plan_json))
  assert "twrw" in layouts
  plan_json.write_text("{")
  with pytest.raises(ConfigError, match=r"plan.json:1: not valid JSON"):
    convert.export_checkpoint(path, tmp_path / "d", 4, convert.parse_mesh("row=2"),
                              str(plan_json))


def test_plan_file_alone_takes_the_mesh_it_records(saved, tmp_path):
  """`--plan=W/plan.json` without `--mesh` stopped with `--mesh and --plan go together`,
  though train.py and plan.py take the mesh a plan file records; a kind still needs one."""
  path, coll, _ = saved
  plan_json = tmp_path / "plan.json"
  plan_json.write_text(json.dumps({"mesh": {"table": 2, "row": 2}, "plan": {
      t.name: {"kind": "twrw", "table_slice": i % 2} for i, t in enumerate(coll.tables)}}))
  _, layouts = convert.export_checkpoint(path, tmp_path / "c", 4, None, str(plan_json))
  assert "split over ('table', 'row'), local shard [26, 8]" in layouts   # table=2,row=2
  with pytest.raises(ConfigError, match=r"^--plan=rw needs --mesh for --format=checkpoint"):
    convert.export_checkpoint(path, tmp_path / "d", 4, None, "rw")
  with pytest.raises(ConfigError, match=r"^--mesh needs --plan for --format=checkpoint"):
    convert.export_checkpoint(path, tmp_path / "d", 4, convert.parse_mesh("row=2"), None)
  assert not (tmp_path / "d").exists()


def test_plan_file_of_other_tables_is_refused(saved, tmp_path):
  """A plan file of another config (dlrm_criteo's 26 tables for dlrm_synthetic's 8) was
  copied as checked; the run resuming the copy then dropped that plan and re-planned."""
  path, _, _ = saved
  plan_json = tmp_path / "plan.json"
  plan_json.write_text(json.dumps({"mesh": {"table": 2}, "plan": {
      n: {"kind": "tw", "table_slice": 0} for n in ("t0", "t1", "t2", "t3", "t9")}}))
  with pytest.raises(ConfigError, match=r"plan.json does not match the checkpoint: plan names "
                     r"unknown tables \['t9'\]"):
    convert.export_checkpoint(path, tmp_path / "d", 4, None, str(plan_json))
  assert not (tmp_path / "d").exists()


def test_a_plan_whose_stacks_the_run_would_refuse_is_refused_before_copying(tmp_path):
  """A plan file placing a table no recorded feature reads unlike every read table: the
  copy printed its stacks and wrote it, and the resuming run then refused them at start
  (`layout.stack_error`)."""
  import dataclasses
  coll = h.collection("rw", 8)
  path = tmp_path / "ckpt"
  features = [dataclasses.asdict(FeatureSpec(f"f{i}", f"t{i}", 2)) for i in range(3)]
  with CheckpointManager(path) as mgr:   # the run's features read t0-t2, not t3
    mgr.save(1, h.train_state(coll, step=1), coll, meta={"features": features}, force=True)
  plan_json = tmp_path / "plan.json"
  plan_json.write_text(json.dumps({"mesh": {"row": 2}, "plan": {
      t.name: {"kind": "dp" if t.name == "t3" else "rw"} for t in coll.tables}}))
  with pytest.raises(ConfigError, match=r"^--plan=.*plan.json on --mesh=data=1,table=1,row=2,"
                     r"col=1: tables \['t3'\] \(dp, dim 8, float32\) are read by no feature"):
    convert.export_checkpoint(path, tmp_path / "copy", None, None, str(plan_json))
  assert not (tmp_path / "copy").exists()
  plan_json.write_text(json.dumps({"mesh": {"row": 2}, "plan": {   # t3 beside a read table
      t.name: {"kind": "dp" if t.name in ("t2", "t3") else "rw"} for t in coll.tables}}))
  _, text = convert.export_checkpoint(path, tmp_path / "copy", None, None, str(plan_json))
  assert "dp_d8" in text, text


def test_unreadable_checkpoint_is_an_error(saved, tmp_path):
  """A damaged manifest with an explicit step, or a truncated array file, was a traceback."""
  path, _, _ = saved
  copy = tmp_path / "copy"
  shutil.copytree(path, copy)
  (copy / "4" / "manifest" / "metadata").write_text("{bad")
  with pytest.raises(CheckpointError, match=r"/4 is corrupt: .*pick another --step"):
    convert.export_npz(copy, tmp_path / "a.npz", step=4)
  shutil.rmtree(copy)
  shutil.copytree(path, copy)
  chunk = next(p for p in (copy / "4" / "embeddings" / "tables" / "t3").iterdir()
               if not p.name.startswith("."))
  chunk.write_bytes(chunk.read_bytes()[:20])
  for fn, out in [(convert.export_npz, tmp_path / "b.npz"), (convert.export_zarr, tmp_path / "z")]:
    with pytest.raises(CheckpointError, match="'tables/t3' .* cannot be read"):
      fn(copy, out, 4)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_a_workdir_as_checkpoint_dir_names_its_checkpoints(saved, tmp_path):
  """--checkpoint_dir=W (the run directory) said only "no checkpoint in W"."""
  path, _, _ = saved
  shutil.copytree(path, tmp_path / "w" / "checkpoints")
  with pytest.raises(CheckpointError, match=r"no checkpoint in .*/w \(did you mean "
                     r"--checkpoint_dir=.*/w/checkpoints\?\)"):
    convert.export_npz(tmp_path / "w", tmp_path / "o.npz")
  with pytest.raises(CheckpointError, match=r"no checkpoint in .*/nowhere \(no such "
                     r"directory\)$"):
    convert.export_npz(tmp_path / "nowhere", tmp_path / "o.npz")
  # only a save killed before it committed: it said just "no checkpoint in DIR"
  (tmp_path / "killed" / "20.orbax-checkpoint-tmp-123").mkdir(parents=True)
  with pytest.raises(CheckpointError, match=r"no checkpoint in .*/killed \(it holds only 1 "
                     r"unfinished save\(s\), e.g. 20.orbax-checkpoint-tmp-123: a save killed "
                     r"before it committed, which no restore or conversion reads\)$"):
    convert.export_npz(tmp_path / "killed", tmp_path / "o.npz")


def test_a_checkpoint_rotated_out_during_the_export_says_so(saved, tmp_path, monkeypatch):
  """A run still saving into the directory deletes old steps: exporting one it deletes
  meanwhile said "--output: cannot write <output>: No such file" or gave a traceback."""
  path, _, _ = saved
  copy = tmp_path / "copy"
  shutil.copytree(path, copy)
  real = convert._write_npz

  def rotated_out(tmp, step_dir, step, output_path):
    shutil.rmtree(step_dir)   # as orbax does once a newer save commits
    real(tmp, step_dir, step, output_path)

  monkeypatch.setattr(convert, "_write_npz", rotated_out)
  with pytest.raises(CheckpointError, match=r"checkpoint .*copy/4 was deleted while it was "
                     r"being read: a run still saving into that directory rotated it out"):
    convert.export_npz(copy, tmp_path / "o.npz", 4)
  assert not (tmp_path / "o.npz").exists()


def test_script_refuses_flags_it_would_ignore(saved, tmp_path):
  path, _, _ = saved
  for flags, match in [
      ([f"--checkpoint_dir={path}", "--format=npz", "--mesh=row=2", "--plan=rw"],
       "error: --mesh and --plan apply to --format=checkpoint only"),
      (["--torchrec_npz=x.npz", f"--checkpoint_dir={path}", "--format=checkpoint"],
       "error: --checkpoint_dir: not used with --torchrec_npz")]:
    proc = run_script("convert_checkpoint.py", *flags, f"--output={tmp_path / 'o'}")
    assert proc.returncode == 1 and proc.stderr.startswith(match), proc.stderr[-2000:]
  assert not (tmp_path / "o").exists()


def test_plan_file_for_another_mesh_warns(tmp_path, caplog):
  """A run's plan.json records its mesh; converting for another mesh keeps the placements
  where they fit and says so (the trainer does the same)."""
  tables = (TableSpec("a", 40, 8), TableSpec("b", 30, 8))
  path = tmp_path / "plan.json"
  plan = uniform_plan("tw", tables, 2)
  path.write_text(json.dumps({"plan": plan.to_json(), "mesh": {"table": 2}}))
  with caplog.at_level("WARNING"):
    assert convert.resolve_plan(str(path), tables, {"table": 2}) == plan
  assert "made for mesh" not in caplog.text
  with caplog.at_level("WARNING"):
    assert convert.resolve_plan(str(path), tables, {"table": 2, "row": 2}) == plan
  assert ("was made for mesh data=1,table=2,row=1,col=1, the mesh here is "
          "data=1,table=2,row=2,col=1") in caplog.text


def _fail_rename_to(monkeypatch, target):
  """`epath.Path.rename` onto `target` raises ENOSPC (a full disk at the final step)."""
  cls = type(epath.Path(target))
  real = cls.rename

  def rename(self, dst):
    if os.fspath(dst) == os.fspath(target):
      raise OSError(28, "No space left on device")
    return real(self, dst)
  monkeypatch.setattr(cls, "rename", rename)


def test_failed_exports_leave_nothing(saved, tmp_path, monkeypatch):
  """A zarr export failing with an OSError was a traceback and left its tmp directory
  behind; a failed checkpoint copy of an offloaded run left the snapshot copy, which then
  refused every retry ('offload snapshot of step 5 already exists')."""
  path, _, _ = saved
  out = tmp_path / "out"
  out.mkdir()
  for fn, name in [(convert.export_zarr, "z"), (convert.export_npz, "c.npz")]:
    with monkeypatch.context() as m:
      _fail_rename_to(m, out / name)
      with pytest.raises(DataError, match=f"--output: cannot write {out / name}: No space"):
        fn(path, out / name)
    assert os.listdir(out) == []
  w = tmp_path / "offloaded"
  _offloaded_run(w)
  dest = w / "w2" / "checkpoints"
  with monkeypatch.context() as m:
    _fail_rename_to(m, dest / "5")
    with pytest.raises(DataError, match=f"cannot write {dest / '5'}: No space"):
      convert.export_checkpoint(w / "w" / "checkpoints", dest)
  assert not (w / "w2").exists()   # created for --output, removed with what it held
  convert.export_checkpoint(w / "w" / "checkpoints", dest)
  assert CheckpointManager(dest, read_only=True).all_steps() == [5]


def test_a_copy_prints_the_stacks_of_the_recorded_features(tmp_path):
  """The printed layout took every feature as one-hot, so it showed one stack where the run
  builds one per bag size; the run now records its features in the checkpoint's meta."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  coll = h.collection("rw", 8)
  lens = [1, 4] + [1] * (len(coll.tables) - 2)
  features = [dataclasses.asdict(FeatureSpec(f"f{i}", t.name, n))
              for i, (t, n) in enumerate(zip(coll.tables, lens))]
  for name, meta in (("with", {"features": features}), ("without", {})):
    path = tmp_path / name / "checkpoints"
    with CheckpointManager(path) as mgr:
      mgr.save(1, h.train_state(coll, step=1), coll, meta=meta, force=True)
    _, layouts = convert.export_checkpoint(path, tmp_path / name / "copy", None,
                                           convert.parse_mesh("row=8"), "rw")
    stacks = [l for l in layouts.splitlines() if l.lstrip().startswith("rw_d")]
    assert len(stacks) == (2 if name == "with" else 1), layouts


def test_a_numpy_bool_weighted_feature_is_stored_as_a_bool():
  """`FeatureSpec(weighted=np.True_)` was checked but kept as numpy's bool, which the
  checkpoint meta's JSON (the recorded features) cannot hold."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  f = FeatureSpec("a", "t", weighted=np.True_)
  assert f.weighted is True
  json.dumps(dataclasses.asdict(f))


def test_a_resume_without_item_freq_is_not_called_a_tables_only_import(tmp_path, caplog):
  """A run saved without TwoTower.logq_correction and resumed with it logged 'holds tables
  only (e.g. a TorchRec import)', though only the item-frequency state was new."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  coll = h.collection("rw", 4)
  with CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(1, h.train_state(coll, step=1), coll, force=True)
  freq = jax.device_put(np.zeros((16,), np.float32), NamedSharding(coll.mesh, PartitionSpec()))
  target = dict(h.dense(coll.mesh, seed=1), item_freq={"last": freq})
  with CheckpointManager(tmp_path / "ckpt") as mgr, caplog.at_level("WARNING"):
    restored = mgr.restore(target, coll)
  assert "holds tables only" not in caplog.text, caplog.text
  assert "holds no item_freq: it starts from its initial values" in caplog.text, caplog.text
  assert int(restored.state["step"]) == 1
