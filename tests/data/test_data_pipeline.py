"""The trainer-facing builders: determinism, process slices, resume, epochs, eval."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags

import data_testlib as lib
from jaxrec.data import binary, binary_write, pipeline, synthetic
from jaxrec.data.batch import Batch, concatenate
from jaxrec.data.source import ArraySource
from jaxrec.embedding.specs import uniform_tables
from jaxrec.errors import ConfigError, DataError


def numbered_source(n):
  """A finite source whose example i has dense[:, 0] == i."""
  lay = lib.layout()
  dense = np.zeros((n, 13), np.float32)
  dense[:, 0] = np.arange(n)
  ex = Batch(dense=dense, labels=np.zeros(n, np.float32),
             ids={k: np.zeros((n, 1), np.int32) for k in lay.names})
  return ArraySource(ex, lay)


def ids_of(batches):
  return np.concatenate([b.dense[:, 0] for b in batches]).astype(int)


def take(it, k):
  return [next(it) for _ in range(k)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("pipe")
  lay = lib.layout(max_lens={2: 3})
  path = str(d / "train.tsv")
  synthetic.write_tsv(path, synthetic.SyntheticSource(lay, seed=9), 203)
  out = str(d / "bin")
  binary_write.preprocess(path, out, lib.features({2: 3}), lib.rows(), shard_examples=64)
  return {"tsv": path, "binary": out, "synthetic": "synthetic"}


@pytest.mark.parametrize("kind", ["synthetic", "tsv", "binary"])
def test_same_seed_same_batches_on_any_process_count(files, kind):
  feats = lib.features({2: 3})
  ref = take(pipeline.make_train_iterator(files[kind], feats, lib.rows(), 32, seed=4), 9)
  again = take(pipeline.make_train_iterator(files[kind], feats, lib.rows(), 32, seed=4,
                                            prefetch=0), 9)
  for procs in [2, 4]:
    its = [pipeline.make_train_iterator(files[kind], feats, lib.rows(), 32, seed=4,
                                        process_index=p, process_count=procs)
           for p in range(procs)]
    for k in range(9):
      parts = [next(it) for it in its]
      assert all(p.size == 32 // procs for p in parts)
      joined = concatenate(parts)
      for name in ref[k].ids:
        np.testing.assert_array_equal(joined.ids[name], ref[k].ids[name])
        np.testing.assert_array_equal(again[k].ids[name], ref[k].ids[name])
      np.testing.assert_array_equal(joined.dense, ref[k].dense)
      np.testing.assert_array_equal(joined.labels, ref[k].labels)
  other = take(pipeline.make_train_iterator(files[kind], feats, lib.rows(), 32, seed=5), 2)
  assert not np.array_equal(other[1].dense, ref[1].dense)


def test_epochs_see_every_example_once_in_a_new_order():
  it = pipeline.TrainIterator(numbered_source(50), batch_size=10, seed=1)
  seen = ids_of(take(it, 15))  # 3 epochs
  for e in range(3):
    np.testing.assert_array_equal(np.sort(seen[e * 50:(e + 1) * 50]), np.arange(50))
  assert not np.array_equal(seen[:50], seen[50:100])
  # An epoch boundary inside a batch: batch 7 of size 7 straddles 49 -> 50.
  seen = ids_of(take(pipeline.TrainIterator(numbered_source(50), batch_size=7, seed=1), 14))
  np.testing.assert_array_equal(np.sort(seen[:50]), np.arange(50))
  assert len(np.unique(seen[50:98])) == 48
  unshuffled = ids_of(take(pipeline.TrainIterator(numbered_source(50), 10, shuffle=False), 6))
  np.testing.assert_array_equal(unshuffled, np.arange(60) % 50)


@pytest.mark.parametrize("procs_before, procs_after, batch_after", [
    (1, 1, 12), (2, 3, 12), (4, 1, 12), (3, 2, 6)])
def test_resume_loses_and_repeats_nothing(procs_before, procs_after, batch_after):
  src = numbered_source(40)
  full = ids_of(take(pipeline.TrainIterator(src, 12, seed=3), 10))
  before = [pipeline.TrainIterator(src, 12, seed=3, process_index=p,
                                   process_count=procs_before) for p in range(procs_before)]
  consumed = np.concatenate([ids_of(take(it, 4)) for it in before])
  state = json.loads(json.dumps(before[0].get_state()))
  assert state["position"] == 48 and all(it.get_state() == state for it in before)
  after = [pipeline.TrainIterator(src, batch_after, seed=3, process_index=p,
                                  process_count=procs_after) for p in range(procs_after)]
  for it in after:
    it.set_state(state)
  rest = [ids_of(take(it, 72 // batch_after)) for it in after]
  per_batch = batch_after // procs_after
  cont = np.concatenate([np.concatenate([r[k * per_batch:(k + 1) * per_batch] for r in rest])
                         for k in range(72 // batch_after)])
  np.testing.assert_array_equal(np.sort(consumed), np.sort(full[:48]))
  np.testing.assert_array_equal(cont, full[48:120])


def test_set_state_checks():
  it = pipeline.TrainIterator(numbered_source(40), 8, seed=3)
  take(it, 2)
  state = it.get_state()
  with pytest.raises(ConfigError, match="seed=3"):
    pipeline.TrainIterator(numbered_source(40), 8, seed=4).set_state(state)
  with pytest.raises(DataError, match="trained on 40 examples per epoch, this training data "
                     "is 41 examples per epoch"):
    pipeline.TrainIterator(numbered_source(41), 8, seed=3).set_state(state)
  with pytest.raises(DataError, match="trained on an endless synthetic stream, this training "
                     "data is 40 examples per epoch"):
    pipeline.TrainIterator(numbered_source(40), 8, seed=3).set_state(
        dict(state, num_examples=None))
  with pytest.raises(DataError, match="not a jaxrec iterator state"):
    it.set_state({"step": 3})
  it.set_state(state)
  np.testing.assert_array_equal(next(it).dense, it.batch_at(16).dense)


def test_other_data_of_the_same_size_is_refused():
  """The next day's file with the same number of examples resumed at the old position,
  silently skipping its first examples."""
  it = pipeline.TrainIterator(numbered_source(300), 8, seed=3)
  take(it, 2)
  state = it.get_state()
  other = numbered_source(300)
  other.examples.labels[299] = 1.0            # one label of the last example differs
  with pytest.raises(DataError, match=r"other data of the same size \(300 examples.*"
                     r"resuming at its position 16.*--restart_data"):
    pipeline.TrainIterator(other, 8, seed=3).set_state(state)
  same = pipeline.TrainIterator(numbered_source(300), 8, seed=3)
  same.set_state(state)                       # the same data (another object) resumes
  np.testing.assert_array_equal(next(same).dense, it.batch_at(16).dense)
  legacy = {k: v for k, v in state.items() if k != "fingerprint"}   # older checkpoints
  pipeline.TrainIterator(other, 8, seed=3).set_state(legacy)
  endless = pipeline.make_train_iterator("synthetic", lib.features(), lib.rows(), 8, seed=0)
  assert "fingerprint" not in endless.get_state()


def test_bad_process_arguments():
  with pytest.raises(ConfigError, match="not divisible"):
    pipeline.TrainIterator(numbered_source(4), 10, process_count=3)
  with pytest.raises(ConfigError, match="process_index 2"):
    pipeline.TrainIterator(numbered_source(4), 10, process_index=2, process_count=2)


@pytest.mark.parametrize("procs", [1, 2, 4])
def test_eval_reads_everything_once_with_a_padded_last_batch(procs):
  src = numbered_source(45)
  seen = []
  evals = [pipeline.EvalData(src, 16, p, procs) for p in range(procs)]
  assert all(len(e) == 3 for e in evals)
  for _ in range(2):  # re-iterable
    seen = []
    for parts in zip(*evals):
      for batch, mask in parts:
        assert batch.size == 16 // procs and mask.dtype == np.float32
        seen.extend(batch.dense[mask > 0, 0].astype(int))
        assert (batch.labels[mask == 0] == 0).all()
        assert all((v[mask == 0] == -1).all() for v in batch.ids.values())
    np.testing.assert_array_equal(sorted(seen), np.arange(45))
  assert sum(m.sum() for e in evals for _, m in e) == 45
  last = list(evals[0])[-1]
  assert last.num_valid == {1: 13, 2: 8, 4: 4}[procs]
  assert (last.mask[:last.num_valid] == 1).all() and (last.mask[last.num_valid:] == 0).all()


class _CountingSource:
  """`numbered_source(n)` counting its `gather` calls."""

  def __init__(self, n):
    self.inner, self.gathers = numbered_source(n), 0
    self.num_examples = n

  def gather(self, indices):
    self.gathers += 1
    return self.inner.gather(indices)


def test_a_small_eval_set_is_built_once_and_kept_read_only():
  """Every evaluation built the eval set again (synthetic generation, file reads, grain's
  threads: 1-3x the eval's compute on dlrm_synthetic). A set within `cache_bytes` is now
  kept after its first complete pass; a bigger one, `cache_bytes=0`, or an interrupted first
  pass keeps nothing."""
  src = _CountingSource(45)
  ev = pipeline.EvalData(src, 16, prefetch=0)
  first = list(ev)
  assert src.gathers == 3
  for _ in range(2):
    again = list(ev)
    assert src.gathers == 3 and [b.batch for b in again] == [b.batch for b in first]
  assert sum(m.sum() for _, m in ev) == 45
  with pytest.raises(ValueError, match="read-only"):
    first[0].batch.dense[0, 0] = 7.0       # the next eval's data cannot be changed
  per_batch = 16 * (13 * 4 + 4 + 4) + 16 * 4 * len(lib.layout().names)
  for cache_bytes, passes, gathers in [(3 * per_batch - 1, 2, 6), (0, 2, 6),
                                       (3 * per_batch, 2, 3)]:
    src = _CountingSource(45)
    ev = pipeline.EvalData(src, 16, prefetch=0, cache_bytes=cache_bytes)
    for _ in range(passes):
      assert sum(m.sum() for _, m in ev) == 45
    assert src.gathers == gathers, cache_bytes
  src = _CountingSource(45)
  ev = pipeline.EvalData(src, 16, prefetch=0)
  for _ in zip(range(2), ev):              # a pass stopped after 2 batches (e.g. SIGTERM)
    pass
  assert sum(m.sum() for _, m in ev) == 45 and src.gathers == 2 + 3
  assert sum(m.sum() for _, m in ev) == 45 and src.gathers == 5


def test_eval_builders(files):
  feats = lib.features({2: 3})
  ev = pipeline.make_eval_batches(files["tsv"], feats, lib.rows(), 64)
  assert len(ev) == 4 and ev.num_examples == 203
  syn = pipeline.make_eval_batches("synthetic", feats, lib.rows(), 64, synthetic_examples=100)
  assert len(syn) == 2 and sum(m.sum() for _, m in syn) == 100
  train = pipeline.make_train_iterator("synthetic", feats, lib.rows(), 100, seed=0)
  assert not np.array_equal(next(iter(syn)).batch.ids["f0"], next(train).ids["f0"][:64])
  part = pipeline.make_eval_batches(files["binary"], feats, lib.rows(), 64, num_examples=70)
  assert len(part) == 2 and sum(m.sum() for _, m in part) == 70


def test_gin_knobs_are_checked(files):
  """A string (`'x'`, `'False'`) or fraction bound to a pipeline knob is a ConfigError naming
  the binding: it was a traceback, or `shuffle='False'` silently shuffled."""
  feats = lib.features({2: 3})
  for kwargs in [dict(prefetch="x"), dict(num_threads=1.5), dict(num_workers=-1),
                 dict(shuffle="False")]:
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"make_train_iterator.{name} must be"):
      pipeline.make_train_iterator("synthetic", feats, lib.rows(), 8, **kwargs)
  for kwargs in [dict(num_examples="x"), dict(num_examples=0), dict(prefetch="2"),
                 dict(cache_bytes=-1)]:
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"make_eval_batches.{name} must be"):
      pipeline.make_eval_batches(files["tsv"], feats, lib.rows(), 8, **kwargs)
  for kwargs in [dict(num_categorical="26"), dict(verify_checksums="False")]:
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"open_source.{name} must be"):
      pipeline.open_source(files["binary"], feats, lib.rows(), **kwargs)
  it = pipeline.make_train_iterator("synthetic", feats, lib.rows(), 8, prefetch=2.0)
  assert next(it).size == 8


def test_parts_of_a_preprocessed_dataset_are_named(files, tmp_path):
  """A dataset's manifest or shard given as TSV, or shards a killed preprocess left: the
  error said 'expected 40 tab-separated columns' or 'not a text file'."""
  feats, d = lib.features({2: 3}), files["binary"]
  for path in [f"{d}/manifest.json", f"{d}/shard-00001.bin", f"{d}/*"]:
    with pytest.raises(DataError, match=f"part of the preprocessed dataset {d}; give the "
                       "directory"):
      pipeline.open_source(path, feats, lib.rows())
  killed = tmp_path / "killed"
  killed.mkdir()
  shutil.copy(f"{d}/shard-00000.bin", killed)
  with pytest.raises(DataError, match="shard-00000.bin: a shard without manifest.json beside "
                     "it: a scripts/preprocess.py run that did not finish"):
    pipeline.open_source(str(killed), feats, lib.rows())
  with pytest.raises(DataError, match="part of the preprocessed dataset"):
    binary_write.preprocess(f"{d}/*", str(tmp_path / "out"), feats, lib.rows())
  parent = tmp_path / "days"   # the hint to read its subdirectories' files led to the above
  for day in ["day_1", "day_0"]:
    shutil.copytree(d, parent / day)
  with pytest.raises(DataError) as e:
    pipeline.open_source(str(parent), feats, lib.rows())
  assert str(e.value).splitlines()[0] == (  # then gin's "In call to configurable" line
      f"{parent}: directory holds only subdirectories (day_0, day_1), no "
                          "files; day_0, day_1 are preprocessed datasets: give one of them")
  lib.write(tmp_path / "shard-00000.bin", [lib.line()])   # TSV that happens to be named so
  assert pipeline.open_source(str(tmp_path / "shard-00000.bin"), feats,
                              lib.rows()).num_examples == 1


def test_source_detection_and_errors(files, tmp_path):
  feats = lib.features({2: 3})
  assert isinstance(pipeline.open_source(files["synthetic"], feats, lib.rows()),
                    synthetic.SyntheticSource)
  assert isinstance(pipeline.open_source(files["binary"], feats, lib.rows()),
                    binary.BinarySource)
  assert isinstance(pipeline.open_source(files["tsv"], feats, lib.rows()), ArraySource)
  tables, uniform = uniform_tables(26, 1000, max_len=[1, 1, 3] + [1] * 23)
  assert pipeline.open_source(files["tsv"], uniform, tables).num_examples == 203
  with pytest.raises(ConfigError, match="26 categorical columns .* but 3 sparse features"):
    pipeline.make_train_iterator(files["tsv"], feats[:3], lib.rows(), 8)
  with pytest.raises(DataError, match="no such file"):
    pipeline.make_train_iterator(str(tmp_path / "nope"), feats, lib.rows(), 8)
  with pytest.raises(DataError, match="no such file"):   # not the column count
    pipeline.make_train_iterator(str(tmp_path / "nope"), feats[:3], lib.rows(), 8)
  with pytest.raises(ConfigError, match="bad_rows"):
    pipeline.make_train_iterator("synthetic", feats, lib.rows(), 8, bad_rows="warn")
  with pytest.raises(ConfigError, match="no row count"):
    pipeline.make_train_iterator("synthetic", feats, {"t0": 5}, 8)


def test_bad_row_counts_reach_the_iterator(tsv_file):
  path = tsv_file([lib.line(), lib.line("2"), lib.line("0")])
  it = pipeline.make_train_iterator(path, lib.features(), lib.rows(), 2, bad_rows="skip")
  assert it.bad_row_counts() == {path: 1}
  assert next(it).size == 2
  with pytest.raises(DataError, match=":2: column 1 \\(label\\)"):
    pipeline.make_train_iterator(path, lib.features(), lib.rows(), 2)


def test_worker_processes_give_the_same_batches(files):
  if not flags.FLAGS.is_parsed():  # grain reads its absl flags in the workers
    flags.FLAGS.mark_as_parsed()
  feats = lib.features({2: 3})
  ref = take(pipeline.make_train_iterator(files["binary"], feats, lib.rows(), 16, seed=2,
                                          prefetch=0), 4)
  it = pipeline.make_train_iterator(files["binary"], feats, lib.rows(), 16, seed=2,
                                    num_workers=1)
  got = take(it, 4)
  it.close()
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(a.dense, b.dense)


_KILLED_TRAINER = """
import multiprocessing, os, signal, sys
sys.path[:0] = {paths!r}
def main():
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  import data_testlib as lib
  from jaxrec.data import pipeline
  it = pipeline.make_train_iterator({path!r}, lib.features({{2: 3}}), lib.rows(), 16,
                                    num_workers=2)
  for _ in range(3):   # a batch from each worker: both have run their init function
    next(it)
  pids = [p.pid for p in multiprocessing.active_children()]
  for pid in pids:   # a job-wide SIGTERM (preemption), SIGHUP (the terminal closed): the
    os.kill(pid, {sig})   # trainer checkpoints first
  import time
  time.sleep(1.0)
  for _ in range(4):
    next(it)
  with open({pids!r}, "w") as f:
    f.write(" ".join(map(str, pids)))
  os.kill(os.getpid(), signal.SIGKILL)
if __name__ == "__main__":
  main()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_worker_processes_exit_when_the_trainer_is_killed(files, tmp_path, sig):
  """kill -9 of the trainer left grain's worker processes running, idle, each holding its
  copy of the source, for good (and one more set per restart). A SIGTERM that reaches the
  workers too (sent to the whole job) leaves them running: the trainer still needs batches
  for the checkpoint it saves on SIGTERM. So does a SIGHUP (a closed terminal hangs up the
  whole foreground job), which the trainer takes as SIGTERM: it killed the workers."""
  script = tmp_path / "killed_trainer.py"
  here = os.path.dirname(os.path.abspath(__file__))
  pid_file, log = tmp_path / "workers", tmp_path / "log"
  script.write_text(_KILLED_TRAINER.format(paths=[here, os.path.dirname(os.path.dirname(here))],
                                           path=files["binary"], pids=str(pid_file),
                                           sig=int(sig)))
  with open(log, "w") as out:   # not a pipe: the workers hold it open as long as they live
    proc = subprocess.run([sys.executable, str(script)], stdout=out, stderr=out, timeout=120)
  assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
  pids = [int(p) for p in pid_file.read_text().split()]
  assert len(pids) >= 2, pids
  deadline = time.monotonic() + 20
  while time.monotonic() < deadline and any(_alive(p) for p in pids):
    time.sleep(0.2)
  alive = [p for p in pids if _alive(p)]
  for p in alive:   # do not leave them behind when the test fails
    os.kill(p, signal.SIGKILL)
  assert not alive, f"worker processes {alive} outlived their killed trainer"


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _run_script(script, template: str) -> subprocess.CompletedProcess:
  """Writes `template` (its `{paths}`: this folder and the repository root) to `script` and
  runs it in a Python process of its own, output captured."""
  here = os.path.dirname(os.path.abspath(__file__))
  script.write_text(template.format(paths=[here, os.path.dirname(os.path.dirname(here))]))
  return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120)


_HUNG_UP_TRACKER = """
import os, signal, sys, time
sys.path[:0] = {paths!r}
def main():
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  import data_testlib as lib
  from multiprocessing import resource_tracker
  from jaxrec.data import pipeline
  it = pipeline.make_train_iterator("synthetic", lib.features(), lib.rows(), 64, num_workers=1)
  next(it)
  pid = resource_tracker._resource_tracker._pid
  signal.signal(signal.SIGHUP, signal.SIG_IGN)   # the trainer's own handler
  os.kill(pid, signal.SIGHUP)   # a closed terminal hangs up the whole job
  time.sleep(0.5)
  print("tracker", "died" if os.waitpid(pid, os.WNOHANG)[0] else "alive")
  it.close()
if __name__ == "__main__":
  main()
"""


def test_a_hang_up_leaves_the_resource_tracker_running(tmp_path):
  """SIGHUP to the whole job (the trainer takes it as SIGTERM and saves) killed
  multiprocessing's resource tracker: its relaunch printed a KeyError traceback for each
  shared memory block the workers' batches unregistered (45 in a run stopped by it)."""
  proc = _run_script(tmp_path / "hung_up.py", _HUNG_UP_TRACKER)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "tracker alive" in proc.stdout, proc.stdout + proc.stderr[-2000:]
  assert "died unexpectedly" not in proc.stderr and "KeyError" not in proc.stderr, proc.stderr[-2000:]


_LAST_BATCHES = """
import sys
sys.path[:0] = {paths!r}
def main():
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  import data_testlib as lib
  from jaxrec.data import pipeline
  it = pipeline.make_train_iterator("synthetic", lib.features(), lib.rows(), 64, num_workers=2)
  held = [next(it) for _ in range(3)]   # the trainer's last batches, freed as it returns
  it.close()
  assert all(b.dense.sum() != 0 for b in held)   # still readable after the close
if __name__ == "__main__":
  main()
"""


def test_worker_batches_leave_no_shared_memory_at_exit(tmp_path):
  """grain hands worker batches over in shared memory and unlinks a block when its array
  is collected, on a thread that stops at exit: the last batches' blocks (30-50 of them)
  were left to Python's resource tracker, which warned 'There appear to be N leaked
  shared_memory objects' at every exit of a run with num_workers > 0."""
  proc = _run_script(tmp_path / "last_batches.py", _LAST_BATCHES)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "leaked shared_memory" not in proc.stderr, proc.stderr[-2000:]
  assert "Exception ignored" not in proc.stderr, proc.stderr[-2000:]


def test_a_shuffle_change_is_refused_only_where_it_changes_the_order():
  """An endless synthetic stream maps position g to example g whatever `shuffle` says: a
  rerun with `make_train_iterator.shuffle=False` was refused ('the checkpoint's data order
  used ... shuffle=True') though its batches are the same."""
  endless = lambda: synthetic.SyntheticSource(lib.layout({}, set(), n=100), seed=1)
  it = pipeline.TrainIterator(endless(), 8, seed=3, shuffle=True)
  take(it, 2)
  other = pipeline.TrainIterator(endless(), 8, seed=3, shuffle=False)
  other.set_state(it.get_state())
  np.testing.assert_array_equal(next(other).dense, next(it).dense)
  finite = pipeline.TrainIterator(numbered_source(40), 8, seed=3)
  with pytest.raises(ConfigError, match="shuffle=True; this run has seed=3, shuffle=False"):
    pipeline.TrainIterator(numbered_source(40), 8, seed=3, shuffle=False).set_state(
        finite.get_state())


def test_worker_processes_from_plain_python():
  """`make_train_iterator(num_workers=2)` outside an absl app (a notebook, the Python API)
  was grain's UnparsedFlagAccessError: its workers read absl flags nobody had parsed."""
  code = ("from jaxrec.data import pipeline\n"
          "from jaxrec.embedding.specs import uniform_tables\n"
          "t, f = uniform_tables(2, 1000, dim=4)\n"
          "it = pipeline.make_train_iterator('synthetic', f, t, 64, num_workers=1)\n"
          "print(next(it).labels.shape); it.close()\n")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, check=False, env=dict(os.environ, PYTHONPATH=root))
  assert proc.returncode == 0 and proc.stdout.strip() == "(64,)", proc.stderr[-2000:]


def test_a_synthetic_eval_size_given_twice_says_which_is_used(caplog):
  """`make_eval_batches.num_examples=1000` beside `ExperimentConfig.num_eval_examples=4096`
  evaluated 1000 examples without a word."""
  feats = lib.features()
  with caplog.at_level("WARNING"):
    ev = pipeline.make_eval_batches("synthetic", feats, lib.rows(), 64, num_examples=70,
                                    synthetic_examples=100)
  assert ev.num_examples == 70 and sum(m.sum() for _, m in ev) == 70
  assert ("make_eval_batches.num_examples = 70 sets the synthetic eval set's size; "
          "ExperimentConfig.num_eval_examples = 100 is not used") in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):   # from Python, one size given: it is the one (no word of
    ev = pipeline.make_eval_batches("synthetic", feats, lib.rows(), 64,   # a binding nobody
                                    num_examples=70)                      # made)
  assert ev.num_examples == 70 and "is not used" not in caplog.text, caplog.text
  assert pipeline.make_eval_batches("synthetic", feats, lib.rows(), 64).num_examples == (
      pipeline.SYNTHETIC_EVAL_EXAMPLES)


def test_an_eval_size_beyond_the_file_says_all_are_evaluated(tsv_file, caplog):
  """`make_eval_batches.num_examples=10000` on a 237-example file evaluated 237 without a
  word."""
  path = tsv_file([lib.line()] * 5)
  with caplog.at_level("WARNING"):
    ev = pipeline.make_eval_batches(path, lib.features(), lib.rows(), 4, num_examples=9)
  assert ev.num_examples == 5
  assert (f"make_eval_batches.num_examples = 9, but the eval data {path} holds 5 examples: "
          "all 5 are evaluated") in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert pipeline.make_eval_batches(path, lib.features(), lib.rows(), 4,
                                      num_examples=3).num_examples == 3
  assert "holds" not in caplog.text
