"""The processes of one job started with other flags or gin bindings (by hand, not through
scripts/launch.py) stop at once, each naming what differs and its own value: they hung in a
collective the others never reached, or aborted with a C stack dump."""

import dataclasses
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxrec.train import process_agreement as agreement
from jaxrec.train.config import RunOptions
from tests.elastic import elastic_testlib as t

GIN = "# Parameters for SGD:\nSGD.lr = 1.0\nExperimentConfig.batch_size = 512\n"


def message(mine, theirs, me=0):
  """Process `me`'s error in a job of two whose processes have `mine` and `theirs`
  ((options, gin config) each)."""
  values, lines, array = agreement.local_fingerprint(*mine)
  other = agreement.local_fingerprint(*theirs)[2]
  every = np.stack([array, other] if me == 0 else [other, array])
  return agreement.disagreement(values, lines, every, me)


def test_agreeing_processes_pass():
  options = RunOptions(num_steps=60)
  assert message((options, GIN), (RunOptions(num_steps=60, progress=False), GIN)) is None


def test_differing_flags_are_named_with_this_process_value():
  assert message((RunOptions(num_steps=40, seed=1), GIN), (RunOptions(num_steps=60), GIN),
                 me=1) == (
      "the job's processes were started with different --num_steps, --seed: process 1 has "
      "--num_steps=40, --seed=1; processes [0] have other values. Start every process with "
      "the same flags and gin files (scripts/launch.py does)")


def test_a_differing_binding_is_named_by_its_line():
  other = GIN.replace("512", "256")
  assert message((RunOptions(), GIN), (RunOptions(), other)) == (
      "the job's processes were started with different gin bindings (--gin_file, "
      "--gin_bindings): process 0 has the binding(s) ExperimentConfig.batch_size = 512; "
      "processes [1] have other values. Start every process with the same flags and gin "
      "files (scripts/launch.py does)")
  assert "none of the bindings the others have" in message(
      (RunOptions(), GIN), (RunOptions(), GIN + "SGD.momentum = 0.9\n"))


def test_every_shared_field_is_a_run_option():
  fields = {f.name for f in dataclasses.fields(RunOptions)}
  assert set(agreement.SHARED) == fields - {"progress", "predictions"}


@pytest.mark.slow
def test_two_processes_started_by_hand_with_other_num_steps_stop_at_once(tmp_path):
  """Both hung at step 40 for ever (SIGTERM recorded, never acted on), no checkpoint."""
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  procs = []
  for p, steps in ((0, 60), (1, 40)):
    env = t.env(JAXREC_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXREC_NUM_PROCESSES="2",
                JAXREC_PROCESS_ID=str(p), JAXREC_ELASTIC_GENERATION="0",
                JAXREC_ELASTIC_WORKDIR=str(tmp_path), XLA_FLAGS=
                "--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(t.ROOT, "scripts", "train.py"),
         f"--workdir={tmp_path}", *t.TINY, f"--num_steps={steps}", "--mesh=data=4",
         "--plan=dp"], env=env, cwd=t.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True))
  outs = [proc.communicate(timeout=300) for proc in procs]
  for p, (proc, (_, err)) in enumerate(zip(procs, outs)):
    assert proc.returncode == 1, err[-2000:]
    mine = 60 if p == 0 else 40
    assert (f"error: the job's processes were started with different --num_steps: process "
            f"{p} has --num_steps={mine}; processes [{1 - p}] have other values") in err, err
  assert not os.path.exists(tmp_path / "checkpoints")


class _Source:
  def __init__(self, n, seed=0):
    self.num_examples, self.seed = n, seed

  def gather(self, idx):
    from jaxrec.data.batch import Batch  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(self.seed)
    return Batch(dense=rng.random((len(idx), 2), np.float32),
                 labels=(np.asarray(idx) % 2).astype(np.float32),
                 ids={"f": np.asarray(idx, np.int32)[:, None]})


def _job_of_two(monkeypatch, other_row):
  """This process is 0 of 2; the all-gather stacks its row over `other_row(mine)`."""
  monkeypatch.setattr(agreement.jax, "process_count", lambda: 2)
  monkeypatch.setattr(agreement.jax, "process_index", lambda: 0)
  monkeypatch.setattr(agreement.multihost_utils, "process_allgather",
                      lambda x: np.stack([x, other_row(np.asarray(x))]))


def test_processes_with_other_data_stop_naming_it(monkeypatch):
  """A host's copy short of a file: its process trained on other data, without a word."""
  from jaxrec.errors import DataError  # pylint: disable=import-outside-toplevel
  names = ("--train_data", "--eval_data")
  _job_of_two(monkeypatch, lambda mine: mine)
  got = agreement.opened_data(lambda: (_Source(1000), None), names)
  assert got[0].num_examples == 1000 and got[1] is None
  theirs = agreement.local_data_row((_Source(700), None))
  _job_of_two(monkeypatch, lambda mine: theirs)
  with pytest.raises(DataError, match=r"^the job's processes read different data for "
                     r"--train_data: process 0 has 1000 examples \(fingerprint [0-9a-f]{16}\), "
                     r"processes \[1\] other data"):
    agreement.opened_data(lambda: (_Source(1000), None), names)
  theirs = agreement.local_data_row((_Source(1000), _Source(50, seed=1)))
  with pytest.raises(DataError, match=r"different data for --eval_data: process 0 has 50 "):
    agreement.opened_data(lambda: (_Source(1000), _Source(50)), names)


def test_a_process_that_cannot_open_its_data_stops_the_others(monkeypatch):
  """It stopped with its error; the others waited for it in the next collective forever."""
  from jaxrec.errors import DataError, DataPathError  # pylint: disable=C0415
  _job_of_two(monkeypatch, lambda mine: np.concatenate([[1], mine[1:]]))
  with pytest.raises(DataError, match=r"^process\(es\) \[1\] of the job could not open their "
                     r"data \(their logs say why\)"):
    agreement.opened_data(lambda: (_Source(10),), ("--train_data",))

  def missing():
    raise DataPathError("/data/day_02.tsv: no such file or directory")
  gathered = []
  _job_of_two(monkeypatch, lambda mine: gathered.append(mine) or mine)
  with pytest.raises(DataPathError, match="day_02.tsv"):   # its own error, after the gather
    agreement.opened_data(missing, ("--train_data",))
  assert gathered[0][0] == 1


def test_one_process_does_not_format_the_gin_config(monkeypatch, tmp_path):
  """A job of one process gathers no fingerprint, so it need not format gin's config, 1.2 ms
  a table (3.5 s of each start at 3,000 tables); it did, before anything else. Here the run
  stops at its workdir check (a file), past the agreement."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.train import loop  # pylint: disable=import-outside-toplevel

  def formatted():
    raise AssertionError("gin.config_str called in a job of one process")
  monkeypatch.setattr(gin, "config_str", formatted)
  workdir = tmp_path / "a_file"
  workdir.write_text("")
  with pytest.raises(ConfigError):
    loop.train_and_evaluate(None, RunOptions(), str(workdir))
