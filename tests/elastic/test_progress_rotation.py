"""Progress files are rotated (`JAXREC_ELASTIC_PROGRESS_BYTES`): a long job wrote one line
per step per process for its whole life (~5 GB a day at 500 steps a second), and the
supervisor still reads every record once, in order, across rotations."""

import os

import numpy as np

from jaxrec.elastic import watching, worker


def _worker(w, limit):
  env = {worker.ENV_GENERATION: "3", worker.ENV_PROCESS_ID: "1", worker.ENV_WORKDIR: w,
         worker.ENV_PROGRESS_BYTES: str(limit)}
  return worker._Worker(env)   # pylint: disable=protected-access


def test_a_full_file_moves_aside_and_at_most_two_stay(tmp_path):
  w = str(tmp_path)
  writer = _worker(w, 1000)
  for step in range(1, 101):
    writer.write(w, {"step": step, "step_time_s": 0.01})
  path = worker.progress_path(w, 1)
  names = sorted(os.listdir(os.path.dirname(path)))
  assert names == ["1.jsonl", "1.jsonl.1"], names
  assert os.path.getsize(path) < 1000 and 1000 <= os.path.getsize(path + ".1") < 1200
  kept = [line for p in (path + ".1", path) for line in open(p)]
  steps = [int(l.split('"step": ')[1].split(",")[0]) for l in kept]
  assert steps == list(range(steps[0], 101)), steps   # the newest, without a gap


def test_the_supervisor_reads_every_record_once_across_rotations(tmp_path):
  """Reads at random moments: between rotations, right after one, several steps apart (at
  least once a rotation: ~7 records a file here; the supervisor polls every 0.1 s, a
  file holds 64 MiB)."""
  w = str(tmp_path)
  path = worker.progress_path(w, 1)
  os.makedirs(os.path.dirname(path))
  with open(path, "w") as f:   # an earlier generation's lines, before the launch
    f.write('{"generation": 2, "process": 1, "step": 7}\n')
  offset, inode = watching.progress_end(w, 1)
  proc = watching.WorkerProc(1, None, None, 0.0, offset=offset, inode=inode)
  writer, rng, seen = _worker(w, 700), np.random.default_rng(0), []
  for step in range(1, 301):
    writer.write(w, {"step": step, "step_time_s": 0.01})
    if rng.random() < 0.3 or step % 5 == 0:
      seen += [r["step"] for r in watching.new_records(w, proc, 3)]
  seen += [r["step"] for r in watching.new_records(w, proc, 3)]
  assert seen == list(range(1, 301))


def test_a_line_being_written_waits_and_a_missing_file_reads_nothing(tmp_path):
  w = str(tmp_path)
  proc = watching.WorkerProc(0, None, None, 0.0)
  assert watching.new_records(w, proc, 0) == [] and watching.progress_end(w, 0) == (0, None)
  path = worker.progress_path(w, 0)
  os.makedirs(os.path.dirname(path))
  with open(path, "w") as f:
    f.write('{"generation": 0, "step": 1}\n[1, 2]\n{"generation": 0, "st')
  assert watching.new_records(w, proc, 0) == [{"generation": 0, "step": 1}]
  with open(path, "a") as f:
    f.write('ep": 2}\n')
  assert watching.new_records(w, proc, 0) == [{"generation": 0, "step": 2}]
