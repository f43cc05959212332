"""TorchRec interop of scripts/convert_checkpoint.py: importing a TorchRec npz (dtypes, bad
arrays, training from it) and the export-then-import round trip."""

import json
import logging
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointManager, convert
from jaxrec.errors import ConfigError, DataError
from tests import xla_env
from tests.checkpoint import ckpt_helpers as h

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_torchrec_import(tmp_path, caplog):
  coll = h.collection("rw", 4)
  rng = np.random.default_rng(0)
  weights = {t.name: rng.standard_normal((t.rows, t.dim)).astype(np.float32)
             for t in coll.tables}
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"sparse_arch.embedding_bag_collection.embedding_bags.{n}.weight": w
                   for n, w in weights.items()}, **{"dense_arch.0.weight": np.ones((2, 2))})
  out = tmp_path / "ckpt"
  assert convert.import_torchrec(npz, out) == sorted(weights)
  target = h.dense(coll.mesh, seed=1)   # dense values come from the new run
  with CheckpointManager(out) as mgr:
    with caplog.at_level("WARNING"):
      restored = mgr.restore(target, coll)
    # an import into a trained workdir resumed with fresh dense values, said only as
    # 'resumed from step N'
    assert "holds tables only (e.g. a TorchRec import): params, opt_state, rng start from " \
        "their initial values" in caplog.text, caplog.text
    with pytest.raises(ConfigError, match="pass initial values"):
      mgr.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target), coll)
  tables, opt = jax.device_get(coll.unstack_tables(restored.state["emb"]))
  for name, w in weights.items():
    np.testing.assert_array_equal(tables[name], w)
    np.testing.assert_array_equal(opt[name]["accum"], 0.0)   # fresh Adagrad state
  assert int(restored.state["step"]) == 0
  h.assert_dense_equal(dict(target, step=restored.state["step"]), restored.state)


@pytest.mark.parametrize("kind,devices", [("rw", 1), ("grid", 8)])
def test_torchrec_float16_import_widens_to_float32(tmp_path, caplog, kind, devices):
  """float16 TorchRec tables restore exactly into the default float32 tables (fingerprints
  checked on the stored float16 bits), with fresh optimizer state; one log line a table."""
  coll = h.collection(kind, devices)
  rng = np.random.default_rng(1)
  weights = {t.name: rng.standard_normal((t.rows, t.dim)).astype(np.float16)
             for t in coll.tables}
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{n}.weight": w for n, w in weights.items()})
  convert.import_torchrec(npz, tmp_path / "ckpt")
  with CheckpointManager(tmp_path / "ckpt") as mgr:
    assert {a["dtype"] for a in mgr.check(0)["tables"].values()} == {"float16"}
    with caplog.at_level(logging.INFO):
      restored = mgr.restore(h.dense(coll.mesh), coll)
  tables, opt = jax.device_get(coll.unstack_tables(restored.state["emb"]))
  for name, w in weights.items():
    assert tables[name].dtype == np.float32
    np.testing.assert_array_equal(tables[name], w.astype(np.float32), err_msg=name)
    np.testing.assert_array_equal(opt[name]["accum"], 0.0)
  widened = [r for r in caplog.records if "widening" in r.getMessage()]
  assert len(widened) == len(weights) and "float16 → float32" in widened[0].getMessage()
  # on jaxrec's logger, which scripts/train.py shows at INFO (absl's INFO it hides)
  assert {r.name for r in widened} == {"jaxrec.checkpoint.compatible"}, widened
  # and one warning: a resume that forgot its dtype binding grew 2-4x in memory, said only
  # at INFO
  [grown] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
             and "restore wider" in r.getMessage()]
  assert grown.startswith(f"{len(weights)} table(s) ('t0', ") and "(float16 → float32): " \
      "they take more memory than in the run that saved them" in grown, grown


def test_bfloat16_checkpoint_restores_into_float32(tmp_path):
  """A bfloat16-table checkpoint (stored optimizer state) restores exactly into float32
  tables on another plan and mesh."""
  coll = h.collection("rw", 8, dtype="bfloat16")
  state = h.train_state(coll, seed=4, step=3)
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(3, state, coll, force=True)
    new = h.collection("twcw", 4)
    restored = mgr.restore(h.dense(new.mesh), new)
  want, want_opt = jax.device_get(coll.unstack_tables(state["emb"]))
  got, got_opt = jax.device_get(new.unstack_tables(restored.state["emb"]))
  for name in want:
    assert got[name].dtype == np.float32
    np.testing.assert_array_equal(got[name], np.asarray(want[name], np.float32))
    np.testing.assert_array_equal(got_opt[name]["accum"], want_opt[name]["accum"])


@pytest.mark.parametrize("raw", ["uint16", "ml_dtypes"])
def test_bfloat16_tables_named_in_jaxrec_dtypes_import_as_bfloat16(tmp_path, raw):
  """A bfloat16 TorchRec model (export_torchrec.py widened it to float32) could only be
  imported as float32, which a bfloat16 run refused as narrowing: its tables' raw bits,
  named in `jaxrec_dtypes`, restore into bfloat16 tables bit for bit."""
  coll = h.collection("grid", 8, dtype="bfloat16")
  rng = np.random.default_rng(2)
  weights = {t.name: rng.standard_normal((t.rows, t.dim)).astype(ml_dtypes.bfloat16)
             for t in coll.tables}
  keys = {n: f"embedding_bags.{n}.weight" for n in weights}
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{keys[n]: w.view(np.uint16) if raw == "uint16" else w
                   for n, w in weights.items()},
           jaxrec_dtypes=json.dumps({k: "bfloat16" for k in keys.values()}))
  assert convert.import_torchrec(npz, tmp_path / "ckpt") == sorted(weights)
  with CheckpointManager(tmp_path / "ckpt") as mgr:
    assert {a["dtype"] for a in mgr.check(0)["tables"].values()} == {"bfloat16"}
    restored = mgr.restore(h.dense(coll.mesh), coll)
  tables, _ = jax.device_get(coll.unstack_tables(restored.state["emb"]))
  for name, w in weights.items():
    assert tables[name].dtype == w.dtype
    np.testing.assert_array_equal(tables[name].view(np.uint16), w.view(np.uint16))


@pytest.mark.parametrize("dtypes,array,match", [
    ({"embedding_bags.t.weight": "bfloat16"}, np.ones((4, 2), np.float32),
     r"'embedding_bags.t.weight' has dtype float32; its 'jaxrec_dtypes' entry says bfloat16, "
     r"stored as 2-byte raw bits \(uint16\)"),
    ({"embedding_bags.u.weight": "bfloat16"}, np.ones((4, 2), np.uint16),
     r"'jaxrec_dtypes' names 'embedding_bags.u.weight', not a table key of the file"),
    ({"embedding_bags.t.weight": "float8"}, np.ones((4, 2), np.uint16),
     r"'jaxrec_dtypes' gives 'embedding_bags.t.weight' dtype 'float8'; it records only "
     "bfloat16"),
    (["embedding_bags.t.weight"], np.ones((4, 2), np.uint16),
     r"'jaxrec_dtypes' is not a JSON object of table keys and dtypes: \["),
    ("{", np.ones((4, 2), np.uint16), r"'jaxrec_dtypes' is not a JSON object .*\(Expecting"),
    ({}, np.full((4, 2), 0x7fc0, np.uint16), None),   # uint16 without an entry: not a float
    ({"embedding_bags.t.weight": "bfloat16"}, np.full((4, 2), 0x7fc0, np.uint16),
     r"'embedding_bags.t.weight' holds 8 NaN/inf values in 4 rows")])
def test_jaxrec_dtypes_errors_name_the_file_and_key(tmp_path, dtypes, array, match):
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{"embedding_bags.t.weight": array},
           jaxrec_dtypes=dtypes if isinstance(dtypes, str) else json.dumps(dtypes))
  with pytest.raises(DataError, match=match or "'embedding_bags.t.weight' has dtype uint16, "
                     "expected a float dtype") as e:
    convert.import_torchrec(npz, tmp_path / "ckpt")
  assert str(e.value).startswith(f"{npz}: ")
  assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("stored,configured", [("float32", "bfloat16"), ("float32", "float16"),
                                               ("float16", "bfloat16")])
def test_narrowing_restore_is_refused(tmp_path, stored, configured):
  coll = h.collection("rw", 4, dtype=configured)
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{t.name}.weight": np.ones((t.rows, t.dim), stored)
                   for t in coll.tables})
  convert.import_torchrec(npz, tmp_path / "ckpt")
  with CheckpointManager(tmp_path / "ckpt") as mgr:
    with pytest.raises(ConfigError, match=rf"table 't0': .* stores 'tables/t0' as {stored}, "
                       rf"which does not convert exactly to the configured {configured} .*"
                       rf"configure the table's dtype as {stored}"):
      mgr.restore(h.dense(coll.mesh), coll)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_train_starts_from_torchrec_import(tmp_path, dtype):
  """scripts/train.py on a workdir holding only an imported checkpoint (tables, no dense
  part, no data state) trains from the imported tables with its own dense initialisation
  (float16 tables: widened to the configured float32)."""
  rows = (300, 50)
  weights = {f"t{i}": np.random.default_rng(i).standard_normal((r, 16)).astype(dtype)
             for i, r in enumerate(rows)}
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{n}.weight": w for n, w in weights.items()})
  work = tmp_path / "w"
  convert.import_torchrec(npz, work / "checkpoints")
  bindings = ["uniform_tables.num_tables=2", f"uniform_tables.rows={list(rows)}",
              "uniform_tables.max_len=[1, 2]", "ExperimentConfig.batch_size=16",
              "ExperimentConfig.eval_batch_size=32", "ExperimentConfig.num_eval_examples=32",
              "DLRM.bottom_mlp=(8,16)", "DLRM.top_mlp=(8,1)"]
  env = xla_env.script_env(2)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                         f"--workdir={work}", "--gin_file=configs/dlrm_synthetic.gin",
                         "--num_steps=2", "--mesh=row=2", "--plan=rw", "--progress=false",
                         *[f"--gin_bindings={b}" for b in bindings]],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "final.npz"
  assert convert.export_npz(work / "checkpoints", out) == 2
  with np.load(out) as z:
    assert json.loads(str(z["metadata"]))["data_state"]["position"] == 2 * 16
    for name, w in weights.items():   # SGD: rows no batch touched keep their imported value
      same = np.all(z[f"tables/{name}"] == w, axis=1)
      assert same.sum() >= rows[int(name[1:])] - 2 * 16 * 2, name


TORCH_PYTHON = os.path.join(ROOT, "third_party", "torchrec_reference", ".venv", "bin", "python")


EXPORT = os.path.join(ROOT, "third_party", "torchrec_export", "export_torchrec.py")
needs_torch = pytest.mark.skipif(not os.path.exists(TORCH_PYTHON), reason="no TorchRec venv "
                                 "(make -C third_party/torchrec_reference venv)")


def export_torchrec(*args):
  return subprocess.run([TORCH_PYTHON, EXPORT, *args], capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torchrec_export_then_import(tmp_path, dtype):
  """The real helper, in the torch venv, on a fresh EmbeddingBagCollection (bfloat16: its
  raw bits, restored into bfloat16 tables)."""
  npz = tmp_path / "ebc.npz"
  proc = export_torchrec("--demo_tables=4", "--demo_rows=32", "--demo_dim=8",
                         f"--demo_dtype={dtype}", f"--output={npz}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert convert.import_torchrec(npz, tmp_path / "ckpt") == ["t0", "t1", "t2", "t3"]
  coll = h.collection("twrw", 8, rows=(32,) * 4, dtype=dtype)
  with CheckpointManager(tmp_path / "ckpt") as mgr:
    restored = mgr.restore(h.dense(coll.mesh), coll)
  tables, _ = jax.device_get(coll.unstack_tables(restored.state["emb"]))
  with np.load(npz) as z:
    for i in range(4):
      want = z[f"embedding_bags.t{i}.weight"]
      np.testing.assert_array_equal(tables[f"t{i}"].view(want.dtype), want)


@pytest.mark.slow
@needs_torch
def test_torchrec_export_refuses_what_it_would_lose_or_misname(tmp_path):
  """--output=ebc wrote ebc.npz and printed ebc; an existing npz was overwritten; a missing
  or unreadable --state_dict was a traceback."""
  (tmp_path / "old.npz").write_bytes(b"kept")
  (tmp_path / "junk.pt").write_text("not a torch file")
  for args, message in [
      ([f"--output={tmp_path}/ebc"], f"--output: {tmp_path}/ebc: name the file with .npz at "
       "the end"),
      ([f"--output={tmp_path}/old.npz"], f"--output: {tmp_path}/old.npz exists; remove it or "
       "pick another name"),
      ([f"--state_dict={tmp_path}/no.pt", f"--output={tmp_path}/x.npz"],
       f"--state_dict: {tmp_path}/no.pt: no such file"),
      ([f"--state_dict={tmp_path}/junk.pt", f"--output={tmp_path}/x.npz"],
       f"--state_dict: {tmp_path}/junk.pt is not a file torch.save wrote (")]:
    proc = export_torchrec(*args, *([] if any("state_dict" in a for a in args)
                                    else ["--demo_tables=1"]))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), proc.stderr
  assert sorted(os.listdir(tmp_path)) == ["junk.pt", "old.npz"]
  assert (tmp_path / "old.npz").read_bytes() == b"kept"


@pytest.mark.parametrize("arrays,match", [
    ({"embedding_bags.t.weight": np.ones((4, 2), np.int32)}, "dtype int32, expected a float"),
    ({"embedding_bags.t.weight": np.ones((4, 2), np.float64)},
     "'embedding_bags.t.weight' has dtype float64, which no table can have"),
    ({"embedding_bags.t.weight": np.ones((4, 2), ml_dtypes.bfloat16)},
     r"ebc.npz: 'embedding_bags.t.weight' has dtype \|V2 \(2-byte raw data, e.g. bfloat16, "
     r"which npz cannot hold\): name it in a 'jaxrec_dtypes' entry as "
     r"third_party/torchrec_export writes it \(\{\"embedding_bags.t.weight\": \"bfloat16\"\}\), "
     r"or export the table as float32"),
    ({"embedding_bags.t.weight": np.ones((0, 2), np.float32)}, r"shape \(0, 2\)"),
    ({"embedding_bags.t.weight": np.array([[1, 2], [3, np.nan], [np.inf, 0]], np.float32)},
     r"'embedding_bags.t.weight' holds 2 NaN/inf values in 2 rows \(first: row 1\)"),
    ({"embedding_bags.t.weight": np.array([None], object)}, "not a readable npz"),
    (None, r"ebc.npz is not an npz file \(not a zip archive\)$"),
    # a text file: np.load called it pickled data, to load with allow_pickle=
    ("# jaxrec\n", r"ebc.npz is not an npz file \(not a zip archive\)$")])
def test_torchrec_import_refuses_bad_npz(tmp_path, arrays, match):
  npz = tmp_path / "ebc.npz"
  if arrays is None:
    npz.write_bytes(b"PK\x03\x04 truncated")
  elif isinstance(arrays, str):
    npz.write_text(arrays)
  else:
    np.savez(npz, **arrays)
  with pytest.raises((ConfigError, DataError), match=match):
    convert.import_torchrec(npz, tmp_path / "ckpt")
  with pytest.raises(ConfigError, match="--step must be >= 0"):
    convert.import_torchrec(npz, tmp_path / "ckpt", step=-1)
  assert not (tmp_path / "ckpt").exists()


def test_keys_an_import_ignores_are_named(tmp_path, caplog):
  """A key not named like a table (a misspelt `embedding_bag.t1.weight`, a model's dense
  weights) was logged at INFO, not shown: `imported 2 tables (t0, t2)` said nothing of it."""
  npz = tmp_path / "ebc.npz"
  w = np.ones((10, 4), np.float32)
  np.savez(npz, **{"ebc.embedding_bags.t0.weight": w, "ebc.embedding_bag.t1.weight": w,
                   "ebc.embedding_bags.t2.weight": w, "dense_arch.0.bias": w[0]})
  with caplog.at_level("WARNING"):
    assert convert.import_torchrec(npz, tmp_path / "ckpt") == ["t0", "t2"]
  assert (f"{npz}: ignoring 2 keys not named like '[...]embedding_bags.<table>.weight' or "
          "'[...]embeddings.<table>.weight' (a model's dense weights, or a table under another "
          "name, which is not imported): 'dense_arch.0.bias', 'ebc.embedding_bag.t1.weight'"
          ) in caplog.text, caplog.text


DMP_STATE_DICT = """
import os, sys, torch, torch.distributed as dist, torchrec
from torchrec.distributed.model_parallel import DistributedModelParallel
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
torch.manual_seed(3)
ebc = torchrec.EmbeddingBagCollection(tables=[torchrec.EmbeddingBagConfig(
    name=f"t{i}", embedding_dim=8, num_embeddings=r, feature_names=[f"f{i}"])
    for i, r in enumerate((1000, 300))], device=torch.device("meta"))
sd = DistributedModelParallel(ebc, device=torch.device("cpu")).state_dict()
assert any(hasattr(v, "local_shards") for v in sd.values()), {k: type(v) for k, v in sd.items()}
torch.save(sd, sys.argv[1])
torch.save({k: v.local_shards()[0].tensor if hasattr(v, "local_shards") else v
            for k, v in sd.items()}, sys.argv[2])
"""


@pytest.mark.slow
@needs_torch
def test_torchrec_export_of_a_saved_distributed_model_parallel_state_dict(tmp_path):
  """A DistributedModelParallel state_dict (ShardedTensors) saved at world size 1, as the
  export's docs say to: torch.load needs a process group to unpickle it (a traceback)."""
  sd, plain = tmp_path / "dmp.pt", tmp_path / "plain.pt"
  proc = subprocess.run([TORCH_PYTHON, "-c", DMP_STATE_DICT, str(sd), str(plain)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for source, out in ((sd, "dmp.npz"), (plain, "plain.npz")):
    proc = export_torchrec(f"--state_dict={source}", f"--output={tmp_path / out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(tmp_path / "dmp.npz") as got, np.load(tmp_path / "plain.npz") as want:
    assert sorted(got.files) == ["embedding_bags.t0.weight", "embedding_bags.t1.weight"]
    for key in want.files:
      np.testing.assert_array_equal(got[key], want[key])
