"""The worker side: no-op outside the supervisor, progress records, stop requests, probe."""

import json
import os

from jaxrec.elastic import worker


def use_env(monkeypatch, env):
  monkeypatch.setattr(worker, "_WORKER", worker._Worker(env))   # pylint: disable=protected-access


def test_no_op_without_the_supervisor(tmp_path, monkeypatch):
  use_env(monkeypatch, {})
  assert not worker.is_supervised() and not worker.initialize_from_env()
  assert worker.report_progress(str(tmp_path), 10, 0.1) is False
  assert not os.path.exists(tmp_path / "workers")


def test_records_and_stop_request(tmp_path, monkeypatch):
  w = str(tmp_path)
  use_env(monkeypatch, {worker.ENV_GENERATION: "3", worker.ENV_PROCESS_ID: "0",
                        worker.ENV_NUM_PROCESSES: "1", worker.ENV_WORKDIR: w,
                        worker.ENV_CHECK_EVERY: "2", worker.ENV_INJECT_DELAY: "0:0.01"})
  assert worker.initialize_from_env() is False       # one process: no jax.distributed
  assert worker.report_progress(w, 1, 0.5, host_time_s=0.2) is False
  os.makedirs(os.path.join(w, "elastic"))
  open(worker.stop_path(w, 2), "w").close()           # another generation's request
  assert worker.report_progress(w, 2, 0.5) is False
  open(worker.stop_path(w, 3), "w").close()
  assert worker.report_progress(w, 3, 0.5) is False   # only checked every 2 steps
  assert worker.report_progress(w, 4, 0.5, shard_times_s={"d": 0.1}) is True
  recs = [json.loads(l) for l in open(worker.progress_path(w, 0))]
  assert recs[0]["phase"] == "initialized" and recs[0]["generation"] == 3
  assert [r["step"] for r in recs[1:]] == [1, 2, 3, 4]
  assert recs[1]["host_time_s"] == 0.2 and recs[1]["step_time_s"] == 0.5
  assert abs(recs[2]["host_time_s"] - 0.51) < 1e-6     # the injected 0.01 s, next step
  assert recs[4]["shard_times_s"] == {"d": 0.1}


def test_probe_times_every_local_device():
  import jax  # pylint: disable=import-outside-toplevel
  times = worker.probe_local_devices(size=16, repeats=1)
  assert sorted(times) == sorted(f"device:{d.id}" for d in jax.local_devices())
  assert all(t > 0 for t in times.values())
