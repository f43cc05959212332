"""Tests for jaxrec.train.writers: metrics.jsonl, TensorBoard events, progress bar."""

import glob
import json
import math
import os

import struct
import time

import numpy as np
from tensorboardX.proto.event_pb2 import Event, SessionLog

from jaxrec.train import data_adapter
from jaxrec.train.writers import MetricsWriter, Progress


def _read_events(path):
  """Parses a TFRecord file of `Event` protos (length, crc, data, crc per record)."""
  with open(path, "rb") as f:
    data = f.read()
  events, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    pos += 12
    events.append(Event.FromString(data[pos:pos + length]))
    pos += length + 4
  return events


def tb_scalars(workdir):
  """{(tag, step): value} of the workdir's TensorBoard events files (one per run)."""
  files = glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  assert files
  return {(v.tag, e.step): v.simple_value for f in sorted(files) for e in _read_events(f)
          for v in e.summary.value}


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_jsonl_and_tensorboard(tmp_path):
  w = str(tmp_path / "run")
  with MetricsWriter(w) as mw:
    mw.write(10, {"loss": np.float32(0.5), "examples_per_sec": 1234.5})
    mw.write(20, {"eval_auc": math.nan, "eval_logloss": 0.45, "eval_examples": np.int64(100)})
    mw.write(20, {"event": "resharded", "devices": 4})
  lines = _read_jsonl(os.path.join(w, "metrics.jsonl"))
  assert lines == [
      {"step": 10, "loss": 0.5, "examples_per_sec": 1234.5},
      {"step": 20, "eval_auc": None, "eval_logloss": 0.45, "eval_examples": 100},
      {"step": 20, "event": "resharded", "devices": 4},
  ]
  scalars = tb_scalars(w)
  assert scalars[("loss", 10)] == 0.5
  assert scalars[("eval_logloss", 20)] == np.float32(0.45)
  assert ("eval_auc", 20) not in scalars and ("event", 20) not in scalars


class _Source:
  def __init__(self, counts):
    self.counts = counts

  def bad_row_counts(self):
    return dict(self.counts)


def test_dropped_rows_reach_tensorboard_per_split(tmp_path):
  """`bad_rows` (path -> count) is no number: TB showed nothing of the rows dropped."""
  w = str(tmp_path)
  train, eval_ = _Source({"a.tsv": 2, "b.tsv": 3, "c.tsv": 0}), _Source({"e.tsv": 1,
                                                                         "b.tsv": 4})
  record = {"loss": 0.5, **data_adapter.bad_row_metrics(train, eval_)}
  with MetricsWriter(w) as mw:
    mw.write(7, record, data_adapter.bad_row_scalars(train=train, eval=eval_))
    mw.write(8, {"loss": 0.4}, data_adapter.bad_row_scalars(train=_Source({}),
                                                             eval=_Source({"e.tsv": 0})))
  assert _read_jsonl(os.path.join(w, "metrics.jsonl"))[0]["bad_rows"] == {
      "a.tsv": 2, "b.tsv": 4, "e.tsv": 1}   # b.tsv, read by both splits: once, the larger
  scalars = tb_scalars(w)                 # count (the sum counted its rows twice)
  assert scalars[("bad_rows/train", 7)] == 5 and scalars[("bad_rows/eval", 7)] == 5
  assert {tag for tag, step in scalars if step == 8} == {"loss"}   # nothing dropped


def test_appends_on_resume(tmp_path):
  w = str(tmp_path)
  for step in (1, 2):
    mw = MetricsWriter(w)
    mw.write(step, {"loss": float(step)})
    mw.close()
  assert [r["step"] for r in _read_jsonl(os.path.join(w, "metrics.jsonl"))] == [1, 2]


def test_disabled_writer_writes_nothing(tmp_path):
  mw = MetricsWriter(str(tmp_path / "x"), enabled=False)
  mw.write(1, {"loss": 1.0})
  mw.close()
  assert not os.path.exists(tmp_path / "x")


def test_progress_shows_eta_loss_and_throughput(capsys):
  with Progress(total_steps=10, initial_step=3, enabled=True) as p:
    p.update(5, loss=0.7, examples_per_sec=12345.6)
    p.update(5)
    p.update(10, loss=0.6)
  err = capsys.readouterr().err
  assert "10/10" in err and "loss=0.6000" in err and "ex/s=12,346" in err, err
  assert "<" in err, err   # tqdm's elapsed<remaining (ETA)
  for enabled in (None, False):   # None: only on a TTY (pytest's stderr is not one)
    with Progress(total_steps=10, enabled=enabled) as p:
      p.update(10, loss=0.6)
  assert capsys.readouterr().err == ""


def test_progress_redraw_shows_the_window_just_logged(capsys):
  """The bar redrawn at a log step shows that step's loss and throughput, not the previous
  window's (the postfix used to be set after the redraw, so it lagged one log line)."""
  with Progress(total_steps=10, enabled=True) as p:
    p._bar.mininterval = 0   # redraw on every update, as at log steps seconds apart
    p.update(5, loss=0.7, examples_per_sec=1000.0)
    first = capsys.readouterr().err.split("\r")[-1]
    p.update(10, loss=0.6, examples_per_sec=2000.0)
    second = capsys.readouterr().err.split("\r")[-1]
  assert "5/10" in first and "loss=0.7000" in first and "ex/s=1,000" in first, first
  assert "10/10" in second and "loss=0.6000" in second and "ex/s=2,000" in second, second


class _FullDisk:
  """A file whose writes fail as on a full disk (ENOSPC, no file name)."""

  def __init__(self, inner):
    self.inner = inner

  def write(self, text):
    import errno  # pylint: disable=import-outside-toplevel
    raise OSError(errno.ENOSPC, "No space left on device")

  def flush(self):
    pass

  def close(self):
    self.inner.close()
    self.write("")


def test_a_full_disk_is_one_error_naming_the_metrics_file(tmp_path):
  """Three tracebacks (the write, the close in the loop's `finally`, tensorboardX's
  atexit hook) and no `error:` line; now one OutputError, and closing again is quiet."""
  import pytest  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import OutputError  # pylint: disable=import-outside-toplevel
  w = MetricsWriter(str(tmp_path))
  w.write(1, {"loss": 0.5})
  w._file = _FullDisk(w._file)   # pylint: disable=protected-access
  with pytest.raises(OutputError, match=rf"^cannot write {tmp_path}/metrics.jsonl: No space "
                     r"left on device$"):
    w.write(2, {"loss": 0.4})
  w.close()   # nothing left to close: no second error
  w.write(3, {"loss": 0.3})   # a dropped writer writes nothing
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(l)["step"] for l in f] == [1]


def test_a_close_that_cannot_flush_is_an_output_error_once(tmp_path, monkeypatch):
  import pytest  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import OutputError  # pylint: disable=import-outside-toplevel
  w = MetricsWriter(str(tmp_path))
  w.write(1, {"loss": 0.5})
  event_writer = w._tb.file_writer.event_writer   # pylint: disable=protected-access

  def full():
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(event_writer, "flush", full)
  with pytest.raises(OutputError, match=rf"^cannot write {tmp_path}/tb: No space left"):
    w.close()
  assert event_writer._closed   # pylint: disable=protected-access  (no retry at exit)
  w.close()


def test_tensorboard_is_written_out_by_its_thread_not_at_every_write(tmp_path, monkeypatch):
  """tensorboardX's flush fsyncs (~0.3-0.9 ms): it ran at every write, i.e. every logged
  step. Now its own thread writes the events out every `TB_FLUSH_SECS` (and close does),
  also when no further step is logged (a long eval, a hang); metrics.jsonl at once."""
  from jaxrec.train import writers  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(writers, "TB_FLUSH_SECS", 0.2)
  w = MetricsWriter(str(tmp_path))
  flushes = []
  real = w._tb.flush   # pylint: disable=protected-access
  monkeypatch.setattr(w._tb, "flush", lambda: (flushes.append(1), real()))  # pylint: disable=protected-access
  for step in range(1, 51):
    w.write(step, {"loss": 1.0 / step})
  assert flushes == [] and len(_read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))) == 50
  deadline = time.monotonic() + 10
  while len(tb_scalars(str(tmp_path))) < 50 and time.monotonic() < deadline:
    time.sleep(0.1)
  assert {step for _, step in tb_scalars(str(tmp_path))} == set(range(1, 51))   # before close
  w.write(51, {"loss": 0.01})
  w.close()
  assert {step for _, step in tb_scalars(str(tmp_path))} == set(range(1, 52))


def test_a_resumed_run_purges_tensorboards_later_events(tmp_path):
  """A run killed at step 40 after its checkpoint of step 20 left TB points of 30 and 40
  beside the rerun's (two values a step: 162 points over 142 steps in a walkthrough):
  the rerun's events file starts with TensorBoard's purge marker (a START session log at
  the step it goes on from), which hides the earlier files' events of that step on."""
  w = str(tmp_path)
  with MetricsWriter(w) as mw:
    for step in (10, 20, 30, 40):
      mw.write(step, {"loss": float(step)})
  time.sleep(1.1)   # events files are named by the second
  with MetricsWriter(w, purge_step=20) as mw:
    mw.write(30, {"loss": 3.0})
  first, second = sorted(glob.glob(os.path.join(w, "tb", "events.out.tfevents.*")))
  marks = [(e.step, e.session_log.status) for e in _read_events(second)
           if e.HasField("session_log")]
  assert marks == [(20, SessionLog.START)], marks
  assert not any(e.HasField("session_log") for e in _read_events(first))


def test_flush_events_writes_the_queued_events_out_now(tmp_path, monkeypatch):
  """A run killed (-9) within `TB_FLUSH_SECS` of its checkpoint lost that step's loss and
  eval points from TensorBoard for good (the rerun resumes past them; metrics.jsonl had
  them): a walkthrough's TB held no point of steps 5-40 after a resume from 40.
  `flush_events` (before a save, after an eval line) writes out also the events still in
  tensorboardX's queue, and its thread goes on writing the later ones."""
  from jaxrec.train import writers  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(writers, "TB_FLUSH_SECS", 3600)
  w = MetricsWriter(str(tmp_path))
  w.write(1, {"loss": 1.0})
  time.sleep(0.3)   # the thread's first write is out at once; later ones wait an hour
  for step in range(2, 21):
    w.write(step, {"loss": 1.0 / step})
  w.flush_events()
  assert {step for _, step in tb_scalars(str(tmp_path))} == set(range(1, 21))
  w.write(21, {"eval_auc": 0.7})   # an eval line is written out at once
  assert ("eval_auc", 21) in tb_scalars(str(tmp_path))
  w.write(22, {"loss": 0.01})
  w.close()
  assert ("loss", 22) in tb_scalars(str(tmp_path))


def test_event_lines_put_only_their_eval_values_in_tensorboard(tmp_path):
  """An event line's bookkeeping numbers became TB scalars: every resume drew a
  `checkpoint_step` chart (a rollback `bad_step`, `restored_step`, `skipped_position`).
  An evaluate-only run's resume line still gives its eval values."""
  with MetricsWriter(str(tmp_path)) as mw:
    mw.write(40, {"event": "resume", "checkpoint_step": 40})
    mw.write(50, {"event": "nan_rollback", "bad_step": 53, "restored_step": 50,
                  "skipped_position": 26624})
    mw.write(60, {"event": "resume", "checkpoint_step": 60, "eval_auc": 0.7,
                  "eval_examples": 1000})
  assert set(tb_scalars(str(tmp_path))) == {("eval_auc", 60), ("eval_examples", 60)}
