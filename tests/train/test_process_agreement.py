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
  assert set(agreement.SHARED) == fields - {"progress"}


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
