"""A `--format=checkpoint --plan` copy prints the stacks of the run that resumes it: tables
of different sparse optimizers stack apart (`..._o<g>`), with the optimizers of the config
the checkpoint's run recorded, or of `--gin_file` / `--gin_bindings` (`copy_optimizer`)."""

import os

import gin
import jax
import pytest

from jaxrec import launch
from jaxrec.checkpoint import CheckpointManager, convert, copy_optimizer, storage
from jaxrec.checkpoint.copy_layout import recorded_features, tables as copy_tables
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding import optimizers
from jaxrec.errors import ConfigError
from jaxrec.sharding.mesh import make_mesh
from jaxrec.sharding.plan import uniform_plan
from jaxrec.train.config import ExperimentConfig
from tests.checkpoint import ckpt_helpers as h
from tests.scripts.in_process import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PER_TABLE = ["ExperimentConfig.table_optimizers = {'t0': @big/RowWiseAdagrad(), "
             "'t[23]': @Adam()}", "big/RowWiseAdagrad.lr = 0.05", "Adam.lr = 0.01"]
# what those bindings give the checkpoint's tables t0-t3 (the config's SGD.lr is 1.0)
OPTIMIZER = optimizers.per_table(optimizers.SGD(1.0), {
    "t0": optimizers.RowWiseAdagrad(0.05), "t2": optimizers.Adam(0.01),
    "t3": optimizers.Adam(0.01)})


def _operative_gin() -> str:
  """The operative config a train.py run of configs/dlrm_synthetic.gin with `PER_TABLE`
  records in its checkpoints' meta (`gin`)."""
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], PER_TABLE)
  launch.build(ExperimentConfig).sparse_tx()
  return gin.operative_config_str()


def _save(path, meta):
  coll = h.collection("rw", 8, optimizer=OPTIMIZER)
  with CheckpointManager(path) as mgr:
    mgr.save(1, h.train_state(coll, step=1), coll, meta=meta, force=True)
  return path


def _stacks(text: str) -> list[str]:
  return [l.split(":")[0] for l in text.splitlines() if l.startswith("rw_d")]


def _run_builds(path) -> list[str]:
  """The stacks of the collection a run on row=8 with plan rw and `OPTIMIZER` builds for
  the checkpoint's tables and recorded features."""
  step_dir = path / "1"
  meta = storage.read_json(step_dir, storage.META)
  specs, _ = copy_tables(meta, storage.read_json(step_dir, storage.MANIFEST))
  coll = EmbeddingCollection.create(specs, recorded_features(meta, specs),
                                    uniform_plan("rw", specs, 1),
                                    make_mesh({"row": 8}, devices=jax.devices()[:8]), OPTIMIZER)
  return [l.name for l in coll.layouts]


def test_a_copy_prints_the_stacks_of_the_optimizers_its_checkpoint_recorded(tmp_path):
  """The layout was built without the optimizer: one stack where the resuming run builds
  one per optimizer (`_o1`: t0's row-wise Adagrad, `_o2`: t2's and t3's Adam). Gin's own
  configuration is as it was after the copy."""
  path = _save(tmp_path / "checkpoints", {"gin": _operative_gin()})
  gin.clear_config()
  gin.bind_parameter("Adam.lr", 0.5)   # the caller's config: kept
  _, text = convert.export_checkpoint(path, tmp_path / "copy", None,
                                      convert.parse_mesh("row=8"), "rw")
  assert _stacks(text) == _run_builds(path), text
  assert {s[-3:] for s in _stacks(text)} >= {"_o1", "_o2"}, text
  assert ("sparse optimizer from the config the checkpoint's run recorded (its meta's gin): "
          "SGD(lr=1.0)") in text
  assert "  _o1 stacks: RowWiseAdagrad(lr=0.05, " in text and "(tables t0)" in text
  assert "  _o2 stacks: Adam(lr=0.01, " in text and "(tables t2, t3)" in text
  assert gin.query_parameter("Adam.lr") == 0.5
  with pytest.raises(ValueError):
    gin.query_parameter("ExperimentConfig.table_optimizers")


def test_tables_of_one_family_at_rates_of_their_own_are_shown_in_its_stacks():
  """Tables that differ from others only in `lr` share their family's stacks: the lines
  name each one's own optimizer under the suffix its stacks have (`_o<g>` is a family)."""
  opt = optimizers.per_table(optimizers.SGD(1.0), {
      "t0": optimizers.RowWiseAdagrad(0.05), "t1": optimizers.SGD(0.5),
      "t2": optimizers.Adam(0.01), "t3": optimizers.Adam(0.02)})
  text = copy_optimizer.describe(opt, "here", {"tables": {}})
  assert text.splitlines() == [
      "sparse optimizer from here: SGD(lr=1.0)",
      "  the default's stacks also hold, each table at its own rate: t1: SGD(lr=0.5)",
      f"  _o1 stacks: {optimizers.RowWiseAdagrad(0.05)} (tables t0)",
      f"  _o2 stacks, each table at its own rate: t2: {optimizers.Adam(0.01)}; "
      f"t3: {optimizers.Adam(0.02)}"], text


def test_without_a_recorded_config_the_given_gin_decides(tmp_path):
  """A checkpoint without a gin config (an import, `save_arrays`) prints one optimizer for
  every table and says so; the resuming run's `--gin_file`/`--gin_bindings` give its
  stacks (also over a recorded config); their errors name the flag."""
  path = _save(tmp_path / "checkpoints", {})
  mesh = convert.parse_mesh("row=8")
  _, text = convert.export_checkpoint(path, tmp_path / "a", None, mesh, "rw")
  assert not any(s.endswith(("_o1", "_o2")) for s in _stacks(text)), text
  assert "sparse optimizer: none recorded (no gin config in the checkpoint's meta" in text
  assert ("(its tables hold different optimizer states, t0: accum; t1: none; t2, t3: m, v: "
          "the run that saved it had ExperimentConfig.table_optimizers") in text, text
  bindings = ["ExperimentConfig.sparse_optimizer = @SGD()", "SGD.lr = 1.0", *PER_TABLE]
  _, text = convert.export_checkpoint(path, tmp_path / "b", None, mesh, "rw",
                                      gin_bindings=bindings)
  assert _stacks(text) == _run_builds(path), text
  assert "sparse optimizer from --gin_file/--gin_bindings: SGD(lr=1.0)" in text
  with pytest.raises(ConfigError, match=r"^--gin_bindings: ExperimentConfig.table_optimizers"
                     r"\['t9'\] names no table"):
    convert.export_checkpoint(path, tmp_path / "c", None, mesh, "rw", gin_bindings=[
        "ExperimentConfig.table_optimizers = {'t9': @Adam()}"])
  with pytest.raises(ConfigError, match=r"^--gin_file/--gin_bindings give the resuming run's"):
    convert.export_checkpoint(path, tmp_path / "d", gin_bindings=bindings)


def test_the_script_takes_the_resuming_runs_gin(tmp_path):
  path = _save(tmp_path / "checkpoints", {})
  config = tmp_path / "resume.gin"
  config.write_text("\n".join(["ExperimentConfig.sparse_optimizer = @SGD()", "SGD.lr = 1.0",
                               *PER_TABLE]) + "\n")
  proc = run_script("convert_checkpoint.py", f"--checkpoint_dir={path}",
                    f"--output={tmp_path / 'copy'}", "--format=checkpoint", "--mesh=row=8",
                    "--plan=rw", f"--gin_file={config}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _stacks(proc.stdout) == _run_builds(path), proc.stdout
  assert "sparse optimizer from --gin_file/--gin_bindings: SGD(lr=1.0)" in proc.stdout
  # how a run trains from the copy: it reads only its workdir's checkpoints/
  copy = tmp_path / "copy"
  assert proc.stdout.rstrip().endswith(
      f"(checkpoint); train.py resumes only from the checkpoints/ of its --workdir: to train "
      f"from this copy, move it there (e.g. mkdir W && mv {copy} W/checkpoints) and pass "
      "--workdir=W"), proc.stdout
  proc = run_script("convert_checkpoint.py", f"--checkpoint_dir={path}",
                    f"--output={tmp_path / 'w2' / 'checkpoints'}", "--format=checkpoint",
                    "--mesh=row=8", "--plan=rw", f"--gin_file={config}")
  assert proc.stdout.rstrip().endswith(
      f"(checkpoint); train.py --workdir={tmp_path / 'w2'} resumes from it"), proc.stdout
  proc = run_script("convert_checkpoint.py", f"--checkpoint_dir={path}",
                    f"--output={tmp_path / 'c.npz'}", "--format=npz", f"--gin_file={config}")
  assert proc.returncode == 1 and proc.stderr.startswith(
      "error: --gin_file and --gin_bindings apply to --format=checkpoint --plan only"), \
      proc.stderr


def test_the_resume_hint_moves_the_offload_snapshots_too(tmp_path):
  """A copy of a checkpoint with offloaded tables writes their snapshots beside it: the hint
  said to move the copy only, and the run then stopped for want of the snapshots. (In a
  process of its own: the script defines absl flags at import.)"""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  (tmp_path / "offload_snapshots" / "6").mkdir(parents=True)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  code = (f"import sys; sys.path.insert(0, {os.path.join(root, 'scripts')!r}); "
          "import convert_checkpoint as c; "
          f"print(c._resume_hint({str(tmp_path / 'ck')!r}, 6)); "
          f"print(c._resume_hint({str(tmp_path / 'ck')!r}, 3))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=True).stdout.splitlines()
  assert f"(e.g. mkdir W && mv {tmp_path / 'ck'} W/checkpoints && mv " \
         f"{tmp_path / 'offload_snapshots'} W/) and pass --workdir=W" in out[0], out
  assert f"mv {tmp_path / 'ck'} W/checkpoints) and pass" in out[1], out   # none of step 3


def test_a_mesh_the_checkpoints_batch_does_not_divide_is_refused(tmp_path):
  """`--mesh=col=3` for a batch of 64 was written (exit 0) and the resuming run then refused
  the mesh at its start: 'batch_size=64 is not divisible by the 3 devices'."""
  path = _save(tmp_path / "checkpoints", {"batch_size": 64})
  proc = run_script("convert_checkpoint.py", f"--checkpoint_dir={path}",
                    f"--output={tmp_path / 'copy'}", "--format=checkpoint", "--mesh=col=3",
                    "--plan=cw")
  assert proc.returncode == 1 and not (tmp_path / "copy").exists(), proc.stderr[-2000:]
  assert ("error: --mesh=data=1,table=1,row=1,col=3: the checkpoint's run has "
          "ExperimentConfig.batch_size=64, not divisible by its 3 devices") in proc.stderr
  config = tmp_path / "resume.gin"   # the resuming run's own batch, when given
  config.write_text("\n".join(["ExperimentConfig.batch_size = 90", *PER_TABLE]) + "\n")
  proc = run_script("convert_checkpoint.py", f"--checkpoint_dir={path}",
                    f"--output={tmp_path / 'copy'}", "--format=checkpoint", "--mesh=col=4",
                    "--plan=cw", f"--gin_file={config}")
  assert proc.returncode == 1 and not (tmp_path / "copy").exists(), proc.stderr[-2000:]
  assert ("the resuming run (--gin_file/--gin_bindings) has ExperimentConfig.batch_size=90, "
          "not divisible by its 4 devices") in proc.stderr, proc.stderr[-2000:]
  proc = run_script("convert_checkpoint.py", f"--checkpoint_dir={path}",
                    f"--output={tmp_path / 'copy'}", "--format=checkpoint", "--mesh=col=3",
                    "--plan=cw", f"--gin_file={config}")
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_kind_placed_as_another_on_the_copys_mesh_is_warned_about(caplog):
  """`--mesh=data=8 --plan=tw` copied without a word, where train.py with the same flags
  says the tables are placed as --plan=dp (a plan file on such a mesh was warned about)."""
  from jaxrec.checkpoint import copy_layout  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import TableSpec  # pylint: disable=import-outside-toplevel
  with caplog.at_level("WARNING"):
    copy_layout.resolve_plan("tw", [TableSpec("t0", 10, 4)], {"data": 8})
  assert "--plan=tw splits tables over axis table, which is 1 in mesh data=8" in caplog.text
  assert "placed as --plan=dp" in caplog.text


def test_a_resuming_config_whose_optimizer_does_not_keep_the_state_is_refused(tmp_path):
  """`--gin_file` of a run with SGD for a checkpoint whose t0 holds row-wise Adagrad state:
  the copy was written (exit 0) and that run then refused it at its start."""
  path = _save(tmp_path / "checkpoints", {})
  config = tmp_path / "resume.gin"
  config.write_text("ExperimentConfig.sparse_optimizer = @SGD()\nSGD.lr = 1.0\n")
  proc = run_script("convert_checkpoint.py", f"--checkpoint_dir={path}",
                    f"--output={tmp_path / 'copy'}", "--format=checkpoint", "--mesh=row=8",
                    "--plan=rw", f"--gin_file={config}")
  assert proc.returncode == 1 and not (tmp_path / "copy").exists(), proc.stderr[-2000:]
  assert (f"error: table 't0': checkpoint {path / '1'} holds RowWiseAdagrad sparse optimizer "
          "state, which the resuming run's SGD (--gin_file/--gin_bindings) does not keep"
          ) in proc.stderr, proc.stderr[-2000:]


def test_a_resuming_config_whose_table_dtype_its_restore_refuses_is_refused(tmp_path):
  """`--gin_bindings="uniform_tables.dtype='bfloat16'"` for float32 tables: the copy printed
  the stored float32 stacks, said the run resumes from it (exit 0), and the run then
  refused to narrow the tables. Refused at the copy now, naming the table and both dtypes;
  the same config in float32 copies."""
  path = _save(tmp_path / "checkpoints", {})
  mesh = convert.parse_mesh("row=8")
  synthetic = os.path.join(ROOT, "configs", "dlrm_synthetic.gin")
  with pytest.raises(ConfigError, match=r"^table 't0': checkpoint .*/1 stores it as float32; "
                     r"the resuming run \(--gin_file/--gin_bindings\) configures bfloat16, "
                     r"which its restore refuses"):
    convert.export_checkpoint(path, tmp_path / "a", None, mesh, "rw", gin_files=[synthetic],
                              gin_bindings=["uniform_tables.dtype='bfloat16'"])
  assert not (tmp_path / "a").exists()
  _, text = convert.export_checkpoint(path, tmp_path / "b", None, mesh, "rw",
                                      gin_files=[synthetic], gin_bindings=PER_TABLE)
  assert _stacks(text) and all("float32" in s for s in _stacks(text)), text


def test_a_copy_for_a_run_that_widens_its_tables_says_so(tmp_path):
  """docs/checkpoints.md said a copy whose resuming run widens a table 'prints widened':
  it printed the float32 stacks and nothing else."""
  coll = h.collection("rw", 8, optimizer=OPTIMIZER, dtype="bfloat16")
  with CheckpointManager(tmp_path / "checkpoints") as mgr:
    mgr.save(1, h.train_state(coll, step=1), coll, force=True)
  synthetic = os.path.join(ROOT, "configs", "dlrm_synthetic.gin")
  _, text = convert.export_checkpoint(tmp_path / "checkpoints", tmp_path / "b", None,
                                      convert.parse_mesh("row=8"), "rw",
                                      gin_files=[synthetic], gin_bindings=PER_TABLE)
  assert ("4 table(s) laid out wider than stored, as the resuming run restores them (the "
          "copy keeps the stored values): 't0' bfloat16 → float32, 't1' bfloat16 → float32, "
          "'t2' bfloat16 → float32, 't3' bfloat16 → float32") in text, text
  _, text = convert.export_checkpoint(tmp_path / "checkpoints", tmp_path / "c", None,
                                      convert.parse_mesh("row=8"), "rw")
  assert "wider" not in text   # the recorded config: the stored dtype
