"""One run per workdir: a second run in the same workdir stops before touching it."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxrec import launch
from jaxrec.errors import ConfigError
LOCK_NAME = ".jaxrec.lock"   # jaxrec.files.LOCK_NAME
from jaxrec.train import config as config_lib, loop

BINDINGS = ["ExperimentConfig.batch_size=64", "ExperimentConfig.eval_batch_size=512",
            "ExperimentConfig.num_eval_examples=512", "DLRM.bottom_mlp=(16,)",
            "DLRM.top_mlp=(16,1)"]

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(600)
"""


def _run(workdir):
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  options = config_lib.RunOptions(num_steps=4, mesh="data=8", plan="dp", log_every=2,
                                  progress=False)
  return loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(workdir))


def test_a_second_run_in_the_same_workdir_is_refused(tmp_path):
  """Two runs of one workdir (e.g. the same command started twice) wrote over each other's
  checkpoints and offload stores, and one died with a traceback from orbax."""
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / LOCK_NAME)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=rf"--workdir: .* is in use by another run \(pid "
                       rf"{holder.pid}\)"):
      _run(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME]   # nothing written
  finally:
    holder.kill()
    holder.wait()
  result = _run(tmp_path)                 # the holder is gone: the lock is free again
  assert result["step"] == 4 and np.isfinite(result["loss"])
  _run(tmp_path)                          # and released at the end of a run


def test_a_run_outside_the_launcher_is_refused_while_a_launcher_holds_the_workdir(
    tmp_path, monkeypatch):
  """Between a launcher's generations (a worker lost, the job re-planning) no worker holds
  .jaxrec.lock: a bare train.py took the workdir, resumed the job's checkpoint with its own
  config, trained in its workdir, and the launcher stopped on the lock as a user error. Its
  own workers (supervised) are not refused."""
  from jaxrec import elastic  # pylint: disable=import-outside-toplevel
  from jaxrec.elastic import worker  # pylint: disable=import-outside-toplevel
  os.makedirs(tmp_path / "elastic")
  holder = subprocess.Popen([sys.executable, "-c", HOLDER,
                             str(tmp_path / worker.LAUNCH_LOCK)], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=rf"^--workdir: {tmp_path} is in use by a job of "
                       rf"scripts/launch.py \(pid {holder.pid}\); wait for it"):
      _run(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["elastic"]   # nothing written
    monkeypatch.setattr(elastic, "is_supervised", lambda: True)   # its worker: runs
    assert _run(tmp_path)["step"] == 4
  finally:
    holder.kill()
    holder.wait()
