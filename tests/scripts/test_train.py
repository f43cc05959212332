"""End-to-end: the real scripts/train.py on tiny configs, and its bad-input errors."""

import json
import os
import subprocess
import sys
import tempfile
import types

import jax
import numpy as np
import pytest

from tests import xla_env
from tests.scripts import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["ExperimentConfig.batch_size=256", "ExperimentConfig.num_eval_examples=16384"]
# A gin file's text for TSV files of 8 categorical columns and a tiny DLRM (batches of 16)
TINY_TSV_CONFIG = """include 'configs/dlrm_synthetic.gin'
open_source.num_categorical = 8
ExperimentConfig.batch_size = 16
ExperimentConfig.eval_batch_size = 16
DLRM.bottom_mlp = (8, 16)
DLRM.top_mlp = (8, 1)
"""


def train(workdir, *flags, devices=1, check=True, env=None):
  """`scripts/train.py --workdir=WORKDIR FLAGS` on `devices` CPU devices: the stdout, stderr
  and exit code of a `subprocess.CompletedProcess`. A run on as many devices as this test
  process has (tests/conftest.py: 8, with the same XLA flags a subprocess gets) and no
  `env` but `NO_COMPILE` runs in this process (`in_process.run_script`), which saves the
  ~3-4 s a process spends importing jax and flax; the others (one device, other
  variables) start one."""
  if devices == len(jax.devices()) and (env or {}) in ({}, NO_COMPILE):
    with jax.log_compiles(bool(env)):   # as JAX_LOG_COMPILES=1: "Compiling ..." on stderr
      proc = in_process.run_script("train.py", f"--workdir={workdir}", *flags)
  else:
    env = xla_env.script_env(devices, **(env or {}))
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--workdir={workdir}",
           *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def train_many(cases, devices=1, env=None):
  """`train.py` run once per flag list in `cases`, all in one process (tests/scripts/
  train_many.py): `[SimpleNamespace(returncode, stderr)]`, for cases that stop before training
  (each separate process would spend ~3 s importing jax)."""
  with tempfile.TemporaryDirectory() as tmp:
    cases_path, results_path = os.path.join(tmp, "cases.json"), os.path.join(tmp, "out.json")
    with open(cases_path, "w") as f:
      json.dump([list(c) for c in cases], f)
    env = xla_env.script_env(devices, **(env or {}))
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "train_many.py"),
                    cases_path, results_path], check=True, env=env, cwd=ROOT, timeout=600)
    with open(results_path) as f:
      return [types.SimpleNamespace(**r) for r in json.load(f)]


def assert_one_line_error(proc, message):
  """Exit code != 0, no traceback, nothing compiled (the run must set JAX_LOG_COMPILES=1),
  and stderr ends with exactly one `error: ...` line that contains `message`."""
  assert proc.returncode != 0, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert "Compiling" not in proc.stderr, proc.stderr
  lines = proc.stderr.rstrip("\n").splitlines()
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
  assert message in errors[0], errors[0]
  return errors[0]


NO_COMPILE = {"JAX_LOG_COMPILES": "1"}


def assert_results_line_lists_the_workdir(proc, workdir, others=()):
  """train.py's last line `results in W (A, B/, ...)` names everything in W but its lock
  and the test's own files `others` (it named a fixed list: `profile.jsonl` and the offload
  directories were missing)."""
  last = proc.stdout.rstrip().splitlines()[-1]
  assert last.startswith(f"results in {os.path.abspath(workdir)} ("), proc.stdout
  listed = last.rsplit(" (", 1)[-1].rstrip(")").split(", ")
  written = {n + "/" * os.path.isdir(os.path.join(workdir, n)) for n in os.listdir(workdir)}
  assert sorted(listed) == sorted(written - {".jaxrec.lock", *others}), (last, written)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def export(workdir, name="final"):
  """The workdir's last checkpoint as `{npz key: array}` (with `metadata`), exported
  in-process by the library call behind scripts/convert_checkpoint.py --format=npz (the
  script itself is tested in tests/checkpoint/test_convert.py); a subprocess per export
  cost ~3.5 s of jax start-up."""
  from jaxrec.checkpoint import convert   # pylint: disable=import-outside-toplevel
  out = os.path.join(workdir, f"{name}.npz")
  convert.export_npz(os.path.join(workdir, "checkpoints"), out)
  with np.load(out) as z:
    return {k: z[k] for k in z.files}


# dcnv2 and deepfm (~15 s each) run in the slow target; tests/models checks their forward,
# initial loss and first steps in the default suite.
@pytest.mark.parametrize("model", ["dlrm", pytest.param("dcnv2", marks=pytest.mark.slow),
                                   pytest.param("deepfm", marks=pytest.mark.slow), "two_tower"])
def test_every_model_learns(tmp_path, model):
  w = str(tmp_path / model)
  proc = train(w, f"--gin_file=configs/{model}_synthetic.gin", "--num_steps=300", "--log_every=50",
               "--eval_every=100", "--plan=dp", *[f"--gin_bindings={b}" for b in SMALL])
  assert "done:" in proc.stdout and os.path.abspath(w) in proc.stdout
  assert_results_line_lists_the_workdir(proc, w)
  lines = read_metrics(w)
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == [50, 100, 150, 200, 250, 300]
  assert all(l["examples_per_sec"] > 0 for l in train_lines)
  assert train_lines[-1]["loss"] < train_lines[0]["loss"]
  evals = [l for l in lines if "eval_auc" in l]
  assert [e["step"] for e in evals] == [100, 200, 300]
  assert all(e["eval_examples"] == 16384 for e in evals)
  assert evals[-1]["eval_auc"] > evals[0]["eval_auc"] + 0.01, evals   # AUC rises
  assert evals[-1]["eval_auc"] > 0.7, evals
  for name in ("config.gin", "plan.json"):
    assert os.path.getsize(os.path.join(w, name)) > 0
  assert "build_model.name" in open(os.path.join(w, "config.gin")).read()
  assert os.listdir(os.path.join(w, "tb"))


BAD = [
    (["--gin_file=configs/nope.gin"], "--gin_file: cannot read 'configs/nope.gin'"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--gin_bindings=Nope.x=1"], "--gin_bindings: 'Nope.x=1'"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--mesh=data=3"], "--mesh: data=3,table=1,row=1,col=1 has 3 devices but 2 are available"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--mesh=dta=2"], "--mesh: 'dta=2' is not AXIS=SIZE"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--plan=zz"], "--plan: unknown plan 'zz'"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--plan=nope.json"], "--plan: cannot read 'nope.json'"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--num_steps=0"], "--num_steps must be positive"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--gin_bindings=ExperimentConfig.batch_size=0"], "ExperimentConfig.batch_size must be positive"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--gin_bindings=ExperimentConfig.batch_size=7"], "batch_size=7 is not divisible by the 2 devices"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--gin_bindings=ExperimentConfig.nope=1"], "--gin_bindings: 'ExperimentConfig.nope=1'"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--gin_bindings=ExperimentConfig.eval_batch_size=-4"], "ExperimentConfig.eval_batch_size must be positive"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--num_steps=-3"], "--num_steps must be positive, got -3"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--keep_checkpoints=0"], "--keep_checkpoints must be at least 1, got 0"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--gin_bindings=GpuTuning.num_warps=6"], "GpuTuning.num_warps must be a power of two (Triton), got 6"),
    (["--gin_file=configs/dlrm_synthetic.gin", "--predictions=no/such/dir/p.tsv"], "--predictions=no/such/dir/p.tsv: its directory"),
    # Raised inside a gin configurable: gin's "In call to configurable" lines must not follow.
    (["--gin_file=configs/dlrm_synthetic.gin", "--gin_bindings=dense_optimizer.name='sgdd'"], "dense_optimizer.name: unknown 'sgdd'"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
  """Every BAD case's run (2 devices), in one process: `(workdir, result)` per case."""
  workdirs = [str(tmp_path_factory.mktemp("bad") / "w") for _ in BAD]
  results = train_many([[f"--workdir={w}", *flags] for w, (flags, _) in zip(workdirs, BAD)],
                       devices=2, env=NO_COMPILE)
  return list(zip(workdirs, results))


@pytest.mark.parametrize("case", range(len(BAD)), ids=[m.split(":")[0].split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_one_line_error(bad_runs, case):
  """A refused run (gin typo, bad --mesh, ...) left its new workdir behind, empty but for
  `.jaxrec.lock`: it was created before the gin files and the mesh were checked."""
  workdir, proc = bad_runs[case]
  assert_one_line_error(proc, BAD[case][1])
  assert not os.path.exists(workdir), os.listdir(workdir)


def test_gin_file_with_an_error(tmp_path):
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'configs/dlrm_synthetic.gin'\nExperimentConfig.batch_size = = 3\n")
  proc = train(str(tmp_path / "w"), f"--gin_file={bad}", check=False, env=NO_COMPILE,
               devices=8)
  assert_one_line_error(proc, f"--gin_file: {bad}:")


def test_workdir_that_is_a_file(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  proc = train(str(f), "--gin_file=configs/dlrm_synthetic.gin", check=False, env=NO_COMPILE,
               devices=8)
  assert_one_line_error(proc, f"--workdir: '{f}' exists and is not a directory")


@pytest.mark.slow   # 10-25 s of script runs: kept out of the default suite for its time
def test_workdir_that_is_a_checkpoint_directory(tmp_path):
  """`--workdir=W/checkpoints` (or one step of it, as `convert_checkpoint.py` takes them)
  must not start a fresh run that writes its files among W's checkpoints."""
  w = tmp_path / "w"
  flags = ["--gin_file=configs/dlrm_synthetic.gin", "--num_steps=2", "--noprogress",
           *[f"--gin_bindings={b}" for b in SMALL]]
  train(str(w), *flags)
  for wrong in (w / "checkpoints", w / "checkpoints" / "2"):
    before = sorted(os.listdir(wrong))
    proc = train(str(wrong), *flags, check=False, env=NO_COMPILE, devices=8)
    assert_one_line_error(proc, f"--workdir: '{wrong}' is a checkpoint directory")
    assert f"--workdir={w}" in proc.stderr
    assert sorted(os.listdir(wrong)) == before


@pytest.mark.slow   # 10-25 s of script runs: kept out of the default suite for its time
def test_a_run_its_checkpoint_refuses_leaves_the_last_runs_files(tmp_path):
  """A rerun whose tables no longer match the checkpoint stops before training; the run's
  `plan.json` and `config.gin` must still be the ones of the run that wrote it."""
  w = tmp_path / "w"
  flags = ["--gin_file=configs/dlrm_synthetic.gin", "--num_steps=2", "--noprogress",
           *[f"--gin_bindings={b}" for b in SMALL]]
  train(str(w), *flags, "--plan=dp")
  before = {n: (w / n).read_text() for n in ("plan.json", "config.gin")}
  rows = "uniform_tables.rows=[100000, 50000, 20000, 10000, 5000, 2000, 1000, 600]"
  proc = train(str(w), *flags, "--plan=tw", "--num_steps=4", f"--gin_bindings={rows}",
               check=False)
  assert proc.returncode != 0 and "t7" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
  assert {n: (w / n).read_text() for n in before} == before


def test_gin_file_missing_a_required_binding(tmp_path):
  bad = tmp_path / "no_model.gin"
  bad.write_text("ExperimentConfig.embedding = @uniform_tables()\nuniform_tables.num_tables = 2\n"
                 "uniform_tables.rows = 100\nuniform_tables.dim = 16\n")
  proc = train(str(tmp_path / "w"), f"--gin_file={bad}", check=False, env=NO_COMPILE,
               devices=8)
  assert_one_line_error(proc, "--gin_file: Required bindings for `ExperimentConfig` not "
                              "provided in config: ['model']")
