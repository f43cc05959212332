"""Offloaded table through scripts/train.py: exact (S=0) vs on-device, the checkpoint
export holds the whole table, resume on another device count and plan."""

import numpy as np
import pytest

from tests.scripts.test_train import (assert_results_line_lists_the_workdir, export,
                                      read_metrics, train)

FLAGS = ["--gin_file=configs/dlrm_synthetic.gin", "--log_every=5",
         "--gin_bindings=ExperimentConfig.batch_size=128",
         "--gin_bindings=ExperimentConfig.num_eval_examples=4096",
         "--gin_bindings=ExperimentConfig.sparse_optimizer=@Adagrad()"]   # state offloaded too
OFFLOAD = "--gin_bindings=OffloadConfig.tables={'t0': {'cache_rows': 20000}}"


def losses(workdir):
  return np.array([l["loss"] for l in read_metrics(workdir) if "loss" in l])


def assert_close(got, want, atol):
  got, want = ({k: v for k, v in x.items() if k != "metadata"} for x in (got, want))
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].shape == want[k].shape, k
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol, err_msg=k)


@pytest.mark.slow
def test_offloaded_equals_on_device_and_resumes_elsewhere(tmp_path):
  """Both runs: 15 steps on 1 device (dp), then resumed on 2 devices (rw, the cache is
  sharded) to step 30. S=0: the offloaded run stays equal to the on-device one."""
  runs = {}
  for name, extra in (("dev", []), ("off", [OFFLOAD])):
    w = str(tmp_path / name)
    train(w, *FLAGS, *extra, "--plan=dp", "--num_steps=15", "--checkpoint_every=10")
    at15 = export(w, "step15")
    proc = train(w, *FLAGS, *extra, "--plan=rw", "--mesh=row=2", "--num_steps=30",
                 "--checkpoint_every=10", devices=2)
    # with offload/ and offload_snapshots/ for "off" (step15.npz: `export` wrote it)
    assert_results_line_lists_the_workdir(proc, w, others={"step15.npz"})
    lines = read_metrics(w)
    assert [l["checkpoint_step"] for l in lines if l.get("event") == "resume"] == [15]
    runs[name] = (losses(w), at15, export(w))
  (dev_loss, dev15, dev30), (off_loss, off15, off30) = runs["dev"], runs["off"]
  np.testing.assert_allclose(off_loss, dev_loss, rtol=0, atol=1e-6)
  # The export holds the whole offloaded table (from its snapshot), not the 20,000-row cache.
  assert off15["tables/t0"].shape == (100_000, 16) and "table_opt/t0/accum" in off15
  assert_close(off15, dev15, 1e-6)
  assert_close(off30, dev30, 1e-6)
  assert not np.array_equal(off30["tables/t0"], off15["tables/t0"])   # it kept training
