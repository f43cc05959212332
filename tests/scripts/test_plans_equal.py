"""Every plan on 8 devices gives the 1-device run's losses (and tables), via scripts/train.py."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.scripts.test_train import ROOT, export, read_metrics, train

# Every plan of the list, in the default suite (since 2026-12-06, when the CPU dedup
# and the pooling's reorder halved the suite's CPU time: ~10 s each). Every plan and
# optimizer is also compared with one device in-process in tests/embedding/test_collection.py.
_SLOW = pytest.mark.slow
PLANS = [("dp", "data=8"), ("tw", "table=8"), ("rw", "row=8"), ("cw", "col=8"),
         ("twrw", "data=2,table=2,row=2"), ("twcw", "data=2,table=2,col=2"),
         ("grid", "table=2,row=2,col=2")]
# Dims the col axis does not divide: stored padded (docs/planner.md, "Column padding").
PADDED = [pytest.param(*case, marks=_SLOW) for case in [
    ("cw", "col=8", 12), ("cw", "col=8", 20), ("twcw", "data=2,table=2,col=2", 7),
    ("grid", "table=2,row=2,col=2", 7)]]
SMALL = ["ExperimentConfig.batch_size=64", "ExperimentConfig.eval_batch_size=512",
         "ExperimentConfig.num_eval_examples=1024"]


def run(workdir, plan, mesh, devices, dim=16, users_xla=False):
  """Trains 20 steps with tables of `dim`; returns (per-step losses, final tables exported
  to npz). `users_xla`: compiled at XLA's default optimisation level, as users run (the
  tests' -O0, `tests/xla_env.py`, can hide a compiled-rounding difference)."""
  dims = [] if dim == 16 else [f"uniform_tables.dim={dim}", f"DLRM.bottom_mlp=(128,64,{dim})"]
  flags = ["--gin_file=configs/dlrm_synthetic.gin", "--num_steps=20", "--log_every=1",
           f"--plan={plan}", f"--mesh={mesh}", *[f"--gin_bindings={b}" for b in SMALL + dims]]
  if users_xla:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                    f"--workdir={workdir}", "--compilation_cache=none", *flags],
                   check=True, capture_output=True, env=env, cwd=ROOT, timeout=900)
  else:
    train(workdir, *flags, devices=devices)
  losses = np.array([l["loss"] for l in read_metrics(workdir) if "loss" in l])
  return losses, {k: v for k, v in export(workdir).items() if k.startswith("tables/")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """`reference(dim)`: the 1-device run with tables of `dim` (each run once)."""
  runs = {}

  def get(dim=16):
    if dim not in runs:
      runs[dim] = run(str(tmp_path_factory.mktemp(f"ref{dim}") / "w"), "dp", "data=1", 1, dim)
    return runs[dim]
  return get


def _check(got, want, dim):
  (losses, tables), (ref_losses, ref_tables) = got, want
  assert len(losses) == 20
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-4)
  assert sorted(tables) == sorted(ref_tables) and len(tables) == 8
  for name, ref in ref_tables.items():
    assert tables[name].shape[1] == dim, name
    np.testing.assert_allclose(tables[name], ref, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("plan,mesh", PLANS)
def test_plan_matches_single_device(tmp_path, reference, plan, mesh):
  _check(run(str(tmp_path / "w"), plan, mesh, devices=8), reference(), 16)


@pytest.mark.slow   # eight runs compiled at XLA's default level (~2.5 min)
def test_every_plan_matches_single_device_as_users_compile(tmp_path):
  """The issue's criterion as users run it: XLA's default optimisation level, where the
  suite's other runs compile at -O0."""
  want = run(str(tmp_path / "ref"), "dp", "data=1", 1, users_xla=True)
  for param in PLANS:
    plan, mesh = param.values if hasattr(param, "values") else param
    _check(run(str(tmp_path / plan), plan, mesh, 8, users_xla=True), want, 16)


@pytest.mark.parametrize("plan,mesh,dim", PADDED)
def test_padded_columns_match_single_device(tmp_path, reference, plan, mesh, dim):
  _check(run(str(tmp_path / "w"), plan, mesh, 8, dim), reference(dim), dim)


# DCNv2 over tables of three dims: pooled activations padded to 16 (models/test_mixed_dims).
MIXED_DIMS = "uniform_tables.dim=[16,8,16,4,8,16,8,4]"


def run_gin(workdir, gin_file, bindings, plan, mesh, devices, keep="tables/"):
  """Trains 20 steps of `gin_file` with `bindings`; returns (per-step losses, the final
  checkpoint's npz arrays whose keys start with `keep`)."""
  train(workdir, f"--gin_file={gin_file}", "--num_steps=20", "--log_every=1",
        f"--plan={plan}", f"--mesh={mesh}",
        *[f"--gin_bindings={b}" for b in SMALL + bindings], devices=devices)
  losses = np.array([l["loss"] for l in read_metrics(workdir) if "loss" in l])
  return losses, {k: v for k, v in export(workdir).items() if k.startswith(keep)}


def eight_and_one(runner, tmp_path, plan, mesh):
  """`runner(workdir, plan, mesh, devices)` on 8 devices with `plan` on `mesh`, and on one."""
  return (runner(str(tmp_path / "w"), plan, mesh, 8),
          runner(str(tmp_path / "ref"), "dp", "data=1", 1))


def run_mixed(workdir, plan, mesh, devices):
  return run_gin(workdir, "configs/dcnv2_synthetic.gin", [MIXED_DIMS], plan, mesh, devices)


# In the slow target (two train.py runs, ~45 s): the default suite checks mixed dims on every
# mesh in-process (tests/embedding/test_collection.py) and the models in tests/models.
@pytest.mark.parametrize("plan,mesh", [pytest.param("grid", "table=2,row=2,col=2", marks=_SLOW),
                                       pytest.param("tw", "table=8", marks=_SLOW),
                                       pytest.param("twcw", "data=2,table=2,col=2", marks=_SLOW)])
def test_mixed_dims_match_single_device(tmp_path, plan, mesh):
  (losses, tables), (ref_losses, ref_tables) = eight_and_one(run_mixed, tmp_path, plan, mesh)
  assert len(losses) == 20
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-4)
  assert sorted(tables) == sorted(ref_tables) and len(tables) == 8
  for i, dim in enumerate([16, 8, 16, 4, 8, 16, 8, 4]):
    assert tables[f"tables/t{i}"].shape[1] == dim
    np.testing.assert_allclose(tables[f"tables/t{i}"], ref_tables[f"tables/t{i}"], rtol=0,
                               atol=1e-5, err_msg=f"t{i}")


# Per-table optimizers (`ExperimentConfig.table_optimizers`): the multi-hot t3 and t5 and the
# largest table each train with their own optimizer in their own stack; the rest SGD. t4
# shares t0's stack at another rate, t1 the default SGD's at another rate (each row stepped
# at its table's).
TABLE_OPTIMIZERS = ["ExperimentConfig.table_optimizers={'t0': @RowWiseAdagrad(), "
                    "'t3': @Adam(), 't5': @Adagrad(), 't4': @other/RowWiseAdagrad(), "
                    "'t1': @other/SGD()}", "Adam.lr=0.01", "Adagrad.lr=0.1",
                    "RowWiseAdagrad.lr=0.1", "other/RowWiseAdagrad.lr=0.03",
                    "other/SGD.lr=0.3",
                    # a zero start makes a first update ~lr whatever the gradient's size: a
                    # near-zero gradient summed in another order moved by ~lr (README)
                    "RowWiseAdagrad.initial_accumulator=0.01",
                    "Adagrad.initial_accumulator=0.01"]


def run_table_optimizers(workdir, plan, mesh, devices):
  """(per-step losses, `{npz key: array}` of the tables and their optimizer state)."""
  return run_gin(workdir, "configs/dlrm_synthetic.gin", TABLE_OPTIMIZERS, plan, mesh, devices,
                 keep="table")


# In the slow target (two train.py runs each, ~30 s): the default suite compares every plan
# in-process (tests/embedding/test_table_optimizers.py) and saves and resumes per-table
# optimizers through train.py (tests/scripts/test_table_optimizers.py).
@pytest.mark.parametrize("plan,mesh", [pytest.param("grid", "table=2,row=2,col=2", marks=_SLOW),
                                       pytest.param("twrw", "data=2,table=2,row=2", marks=_SLOW),
                                       pytest.param("cw", "col=8", marks=_SLOW)])
def test_per_table_optimizers_match_single_device(tmp_path, plan, mesh):
  (losses, arrays), (ref_losses, ref_arrays) = eight_and_one(run_table_optimizers, tmp_path,
                                                             plan, mesh)
  # each table saved its own optimizer's state (the SGD ones none)
  assert sorted(k for k in ref_arrays if k.startswith("table_opt/")) == [
      "table_opt/t0/accum", "table_opt/t3/m", "table_opt/t3/v", "table_opt/t4/accum",
      "table_opt/t5/accum"]
  assert ref_arrays["table_opt/t0/accum"].shape == (100000,)   # row-wise
  assert ref_arrays["table_opt/t5/accum"].shape == (2000, 16)
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-4)
  assert sorted(arrays) == sorted(ref_arrays)
  for name, ref in ref_arrays.items():
    np.testing.assert_allclose(arrays[name], ref, rtol=0, atol=1e-5, err_msg=name)
