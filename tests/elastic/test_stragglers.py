"""Straggler detection: medians per window, threshold, consecutive windows."""

import pytest

from jaxrec.elastic.stragglers import Detector, feed_records


def feed(det, times, steps, start=1):
  """`times`: entity -> seconds per step (or a function of the step)."""
  for step in range(start, start + steps):
    for e, t in times.items():
      det.add(e, step, t(step) if callable(t) else t)


def test_flags_a_process_after_three_slow_windows():
  det = Detector("process", threshold=1.5, patience=3, window_steps=10)
  feed(det, {"0": 0.01, "1": 0.01, "2": 0.02}, 10)     # window 0: compile, skipped
  feed(det, {"0": 0.01, "1": 0.01, "2": 0.02}, 21, start=11)
  assert det.poll() == []                               # windows 1 and 2 judged: 2 slow
  feed(det, {"0": 0.01, "1": 0.01, "2": 0.02}, 10, start=32)
  found = det.poll()
  assert [(s.kind, s.entity, s.windows) for s in found] == [("process", "2", 3)]
  assert found[0].ratio == pytest.approx(2.0) and found[0].step == 40
  feed(det, {"0": 0.01, "1": 0.01, "2": 0.02}, 20, start=42)
  assert det.poll() == []                               # reported once per episode


def test_below_threshold_or_not_consecutive_is_not_flagged():
  det = Detector("process", threshold=1.5, patience=3, window_steps=5)
  feed(det, {"0": 0.01, "1": 0.014}, 60)                # 1.4x: below the threshold
  assert det.poll() == []
  det = Detector("process", threshold=1.5, patience=3, window_steps=5)
  slow_every_other = lambda s: 0.03 if ((s - 1) // 5) % 2 else 0.01
  feed(det, {"0": 0.01, "1": slow_every_other}, 60)
  assert det.poll() == []


def test_single_entity_and_medians_ignore_outliers():
  det = Detector("shard", window_steps=5)
  feed(det, {"d0": 1.0}, 50)
  assert det.poll() == []
  det = Detector("process", window_steps=5)
  spiky = lambda s: 0.5 if s % 5 == 0 else 0.01          # one slow step per window
  feed(det, {"0": 0.01, "1": spiky}, 50)
  assert det.poll() == []


def test_waits_for_lagging_entities():
  det = Detector("process", patience=1, window_steps=5)
  feed(det, {"0": 0.01, "1": 0.05}, 10)
  feed(det, {"0": 0.01}, 3, start=11)                   # 1 has not reported step 11 yet
  assert det.poll() == []                                # window 1 (steps 6-10) waits
  feed(det, {"0": 0.01}, 8, start=14)                   # 2 windows later: judged without 1
  assert [s.entity for s in det.poll()] == ["1"]
  assert det.poll() == []


def test_feed_records_uses_host_time_and_shards():
  proc, shard = Detector("process", patience=1, window_steps=2), Detector(
      "shard", patience=1, window_steps=2)
  recs = []
  for step in range(1, 9):
    for p in (0, 1):
      recs.append({"process": p, "step": step, "step_time_s": 0.1,
                   "host_time_s": 0.05 if p else 0.01,
                   "shard_times_s": {f"{p}/device:0": 0.001, f"{p}/device:1": 0.001}})
  recs.append({"process": 0, "phase": "initialized"})
  feed_records(proc, shard, recs)
  assert [s.entity for s in proc.poll()] == ["1"]
  assert shard.poll() == []
