"""The worker side: no-op outside the supervisor, progress records, stop requests, probe,
dying with the supervisor."""

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxrec.elastic import worker
from tests.elastic import elastic_testlib as t

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
# A worker: the first use of `jaxrec.elastic.worker` sets up dying with the supervisor.
WORKER = ("import os, time\nfrom jaxrec.elastic import worker\nworker.is_supervised()\n"
          "print('ready', os.getpid(), flush=True)\ntime.sleep({sleep})\n")
# A supervisor: starts WORKER like the real one does, then waits to be killed.
SUPERVISOR = ("import os, sys, time\nfrom jaxrec.elastic import procs, worker\n"
              "env = dict(os.environ, **{worker.ENV_SUPERVISOR_PID: str(os.getpid())})\n"
              "procs.start_worker([sys.executable, '-c', sys.argv[1]], env, "
              "open(sys.argv[2], 'a'))\ntime.sleep(600)\n")


@pytest.fixture(autouse=True)
def _keep_the_sigterm_handler():
  """`initialize_from_env` takes SIGTERM (`report_sigterm`): given back after each test."""
  before = signal.getsignal(signal.SIGTERM)
  yield
  signal.signal(signal.SIGTERM, before)


def use_env(monkeypatch, env):
  monkeypatch.setattr(worker, "_WORKER", worker._Worker(env))   # pylint: disable=protected-access


def test_a_sigterm_is_reported_and_stops_at_the_next_check_step(tmp_path, monkeypatch):
  w = str(tmp_path)
  use_env(monkeypatch, {worker.ENV_GENERATION: "0", worker.ENV_PROCESS_ID: "0",
                        worker.ENV_NUM_PROCESSES: "1", worker.ENV_WORKDIR: w,
                        worker.ENV_CHECK_EVERY: "4"})
  worker.initialize_from_env()
  assert worker.report_progress(w, 1, 0.1) is False
  os.kill(os.getpid(), signal.SIGTERM)                 # recorded, not the end
  assert worker.report_progress(w, 2, 0.1) is False   # told, at the step after it
  assert worker.report_progress(w, 3, 0.1) is False
  assert worker.report_progress(w, 4, 0.1) is True    # the check step: save and stop
  recs = [json.loads(l) for l in open(worker.progress_path(w, 0))]
  (told,) = [r for r in recs if "sigterm" in r]
  assert told["at_step"] == 2 and recs.index(told) == 3   # after step 2's record


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


def test_report_alive_writes_at_most_one_record_per_interval(tmp_path, monkeypatch):
  """Eval batches and saves tell the supervisor the worker is busy, not hung: one record
  per `ALIVE_EVERY_S` however many batches; never a `step` field (it would count as a
  finished step); nothing in a plain run."""
  use_env(monkeypatch, {})
  assert worker.report_alive("eval", batches=1) is False
  w = str(tmp_path)
  use_env(monkeypatch, {worker.ENV_GENERATION: "0", worker.ENV_WORKDIR: w})
  clock = [100.0]
  monkeypatch.setattr(worker.time, "monotonic", lambda: clock[0])
  sent = []
  for batch in range(1, 11):    # 10 batches of 0.5 s: a record at 0, 2 and 4 s
    sent.append(worker.report_alive("eval", batches=batch))
    clock[0] += 0.5
  assert sent == [True, False, False, False, True, False, False, False, True, False]
  recs = [json.loads(l) for l in open(worker.progress_path(w, 0))]
  assert [(r["phase"], r["batches"]) for r in recs] == [("eval", 1), ("eval", 5), ("eval", 9)]
  with pytest.raises(ValueError, match="report_progress"):
    worker.report_alive("save", step=3)


def test_a_torn_last_line_does_not_swallow_the_next_generations_first(tmp_path, monkeypatch):
  """A worker killed mid-line left a fragment without its newline; the next generation's
  `initialized` record was glued onto it, and every line reader skipped both."""
  w = str(tmp_path)
  os.makedirs(os.path.join(w, "workers"))
  path = worker.progress_path(w, 1)
  with open(path, "w") as f:
    f.write('{"time": 1.0, "generation": 0, "process": 1, "step": 7}\n{"time": 2.0, "gen')
  use_env(monkeypatch, {worker.ENV_GENERATION: "1", worker.ENV_PROCESS_ID: "1",
                        worker.ENV_NUM_PROCESSES: "1", worker.ENV_WORKDIR: w})
  assert worker.initialize_from_env() is False
  assert worker.report_progress(w, 8, 0.5) is False
  recs = t.progress(w, 1)
  assert [(r["generation"], r.get("phase"), r.get("step")) for r in recs] == [
      (0, None, 7), (1, "initialized", None), (1, None, 8)], recs
  with open(path) as f:
    assert f.read().splitlines()[1] == '{"time": 2.0, "gen'     # the fragment, left alone


def test_probe_times_every_local_device():
  import jax  # pylint: disable=import-outside-toplevel
  times = worker.probe_local_devices(size=16, repeats=1)
  assert sorted(times) == sorted(f"device:{d.id}" for d in jax.local_devices())
  assert all(t > 0 for t in times.values())


def test_dying_with_the_supervisor_is_a_no_op_without_it(monkeypatch):
  wrong = {worker.ENV_SUPERVISOR_PID: str(os.getpid() + 1)}   # not our parent
  worker.die_with_supervisor({})                               # a plain run
  monkeypatch.setattr(sys, "platform", "darwin")
  worker.die_with_supervisor(wrong)                            # off Linux
  monkeypatch.setattr(sys, "platform", "linux")

  def no_libc(*args, **kwargs):
    raise OSError("no libc")

  monkeypatch.setattr(ctypes, "CDLL", no_libc)
  worker.die_with_supervisor(wrong)                            # no prctl


def _run_worker(supervisor_pid):
  env = t.env(**{worker.ENV_SUPERVISOR_PID: str(supervisor_pid)})
  return subprocess.run([sys.executable, "-c", WORKER.format(sleep=0)], capture_output=True,
                        text=True, env=env, cwd=t.ROOT, timeout=60)


@LINUX
def test_worker_exits_when_the_supervisor_is_gone():
  ok = _run_worker(os.getpid())                          # we are its parent: it runs
  assert ok.returncode == 0 and ok.stdout.startswith("ready"), ok.stderr
  gone = _run_worker(os.getpid() + 1)                    # its parent is not the supervisor
  assert gone.returncode == 1 and not gone.stdout, gone.stdout
  assert f"error: the elastic supervisor (pid {os.getpid() + 1}) is gone" in gone.stderr


@LINUX
def test_worker_dies_when_the_supervisor_is_killed(tmp_path):
  log = str(tmp_path / "worker.log")
  sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, WORKER.format(sleep=600), log],
                         env=t.env(), cwd=t.ROOT)
  pid = None
  try:
    pid = t.wait_for(lambda: os.path.exists(log) and _ready_pid(log), 60, "the worker", sup)
    with open(f"/proc/{pid}/stat") as f:
      assert int(f.read().rsplit(")", 1)[1].split()[1]) == sup.pid     # its parent
    time.sleep(0.2)
    assert t.alive(pid)
    t.kill(sup.pid)
    sup.wait(30)
    t.wait_for(lambda: not t.alive(pid), 20, "the worker to die")
  finally:
    if sup.poll() is None:
      sup.kill()
    if pid is not None and t.alive(pid):
      os.kill(pid, signal.SIGKILL)


def _ready_pid(log):
  words = open(log).read().split()
  return int(words[1]) if len(words) >= 2 and words[0] == "ready" else None


def test_a_sigterm_during_the_vote_is_told_first_and_one_after_the_last_report_at_exit(
    tmp_path, monkeypatch):
  """A SIGTERM between the report and the stop vote (here: in the injected delay) voted to
  stop without the record, and the supervisor called the job finished; one after the last
  report (during the stop's save) was never told, and its slot was used again."""
  w = str(tmp_path)
  use_env(monkeypatch, {worker.ENV_GENERATION: "0", worker.ENV_PROCESS_ID: "0",
                        worker.ENV_NUM_PROCESSES: "1", worker.ENV_WORKDIR: w,
                        worker.ENV_CHECK_EVERY: "2", worker.ENV_INJECT_DELAY: "0:0.01"})
  worker.initialize_from_env()
  sleep = time.sleep
  monkeypatch.setattr(worker.time, "sleep", lambda s: (os.kill(os.getpid(), signal.SIGTERM),
                                                        sleep(s)))
  assert worker.report_progress(w, 2, 0.1) is False   # the vote does not see it yet
  monkeypatch.setattr(worker.time, "sleep", sleep)
  assert worker.report_progress(w, 3, 0.1) is False   # told here
  assert worker.report_progress(w, 4, 0.1) is True
  recs = [json.loads(l) for l in open(worker.progress_path(w, 0))]
  assert [r["at_step"] for r in recs if "sigterm" in r] == [3]
  w2 = str(tmp_path / "w2")
  use_env(monkeypatch, {worker.ENV_GENERATION: "0", worker.ENV_PROCESS_ID: "0",
                        worker.ENV_NUM_PROCESSES: "1", worker.ENV_WORKDIR: w2})
  worker.initialize_from_env()
  worker._worker().sigterm_at = 1.0   # pylint: disable=protected-access
  worker._report_at_exit()            # pylint: disable=protected-access
  recs = [json.loads(l) for l in open(worker.progress_path(w2, 0))]
  assert recs[-1]["sigterm"] == 1.0 and recs[-1]["at_step"] is None


def test_a_gpu_worker_without_a_gpu_is_a_user_error(tmp_path, monkeypatch):
  """`launch.py --platform=gpu` on a machine whose jax has no GPU trained on the CPU
  without a word (one device per process), or failed on a `--mesh` the user never gave."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  use_env(monkeypatch, {worker.ENV_GENERATION: "0", worker.ENV_PROCESS_ID: "0",
                        worker.ENV_NUM_PROCESSES: "1", worker.ENV_WORKDIR: str(tmp_path)})
  monkeypatch.setenv(worker.ENV_PLATFORM, "gpu")
  with pytest.raises(ConfigError, match=r"^--platform=gpu: worker 0 finds no GPU \(jax's "
                     r"backend is 'cpu'\): install jax with its CUDA extra"):
    worker.initialize_from_env()
  monkeypatch.setenv(worker.ENV_PLATFORM, "cpu")
  assert worker.initialize_from_env() is False


def test_an_eval_stops_for_a_preemption_not_for_a_replan(tmp_path, monkeypatch):
  """`stop_eval`: the stop file of the launcher's SIGTERM (`stopping.request`) or of a
  re-plan it came during (`stopping.preempt`) stops an eval; a re-plan's alone does not;
  checked every `check_every` batches from the first with several processes."""
  from jaxrec.elastic import stopping   # pylint: disable=import-outside-toplevel
  from jaxrec.elastic.scaling import Outcome   # pylint: disable=import-outside-toplevel
  w = str(tmp_path)
  use_env(monkeypatch, {worker.ENV_GENERATION: "1", worker.ENV_PROCESS_ID: "0",
                        worker.ENV_NUM_PROCESSES: "2", worker.ENV_WORKDIR: w,
                        worker.ENV_CHECK_EVERY: "3"})
  votes = []
  monkeypatch.setattr(worker, "_agree", lambda flag: votes.append(flag) or flag)
  os.makedirs(os.path.join(w, "elastic"))
  assert worker.stop_eval(10, 1) is False                 # no request
  replan = stopping.request(w, 1, Outcome("planned", "capacity 2 -> 3", detected=0.0), 0.0)
  assert worker.stop_eval(10, 1) is False                 # a re-plan lets the eval end
  assert worker.preempted() == ""                          # and the log says re-plan
  stopping.preempt(w, 1, replan)
  assert worker.preempted() == "SIGTERM"
  assert [worker.stop_eval(10, b) for b in (2, 3, 4)] == [False, False, True]
  assert votes == [False, False, True]                     # batches 1, 1, 4: one vote each
  stopping.clear_requests(w)
  stopping.request(w, 1, Outcome("planned", stopping.terminate_reason("SIGHUP"),
                                  detected=0.0), 0.0)
  assert worker.stop_eval(10, 7) is True and worker.preempted() == "SIGHUP"


def test_an_eval_stops_on_the_workers_own_sigterm(tmp_path, monkeypatch):
  w = str(tmp_path)
  use_env(monkeypatch, {worker.ENV_GENERATION: "0", worker.ENV_PROCESS_ID: "0",
                        worker.ENV_NUM_PROCESSES: "1", worker.ENV_WORKDIR: w})
  worker.initialize_from_env()
  assert worker.stop_eval(8, 1) is False
  os.kill(os.getpid(), signal.SIGTERM)
  assert worker.stop_eval(8, 2) is True                   # one process: every batch
  (told,) = [r for r in map(json.loads, open(worker.progress_path(w, 0))) if "sigterm" in r]
  assert told["at_step"] == 8


def test_stop_eval_is_a_no_op_without_the_supervisor(tmp_path, monkeypatch):
  use_env(monkeypatch, {})
  assert worker.stop_eval(5, 1) is False
  assert worker.preempted() == ""


def test_a_worker_that_printed_nothing_is_said_so_not_the_banner(tmp_path):
  """A --train_script that exits 1 without output: `worker_exit`'s `error` was the
  supervisor's own `=== generation 0, process 0 of 2, ...` line."""
  from jaxrec.elastic import procs  # pylint: disable=import-outside-toplevel
  logs = tmp_path / worker.WORKERS_DIR
  logs.mkdir()
  (logs / "0.log").write_text("=== generation 0, process 0 of 2, 2026-12-07 02:07:46\n"
                              "error: boom\n=== generation 1, process 0 of 2, 2026-12-07\n")
  assert procs.last_line(str(tmp_path), 0) == ""
  assert procs.exit_error(1, procs.last_line(str(tmp_path), 0)) == "exited 1 without output"
  (logs / "1.log").write_text("=== generation 1, process 1 of 2, 2026-12-07\nerror: boom\n")
  assert procs.exit_error(1, procs.last_line(str(tmp_path), 1)) == "error: boom"
  assert procs.exit_error(-9, "") == "killed by SIGKILL"


def test_the_last_log_line_passes_over_the_runtimes_chatter(tmp_path):
  """A SIGKILLed worker's `last_log_line` was gloo's `[Gloo] Rank 6 is connected to 7 peer
  ranks...`, an aborted one's the fault handler's `Extension modules: jaxlib...`."""
  from jaxrec.elastic import procs  # pylint: disable=import-outside-toplevel
  logs = tmp_path / worker.WORKERS_DIR
  logs.mkdir()
  (logs / "0.log").write_text(
      "=== generation 0, process 0 of 2, 2026-12-07\nI1207 loop.py:300] step 40: loss=0.5\n"
      "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks "
      "is : 1\n")
  assert procs.last_line(str(tmp_path), 0) == "I1207 loop.py:300] step 40: loss=0.5"
  (logs / "1.log").write_text(
      "=== generation 0, process 1 of 2, 2026-12-07\nF1207 collective failed: peer gone\n"
      "Fatal Python error: Aborted\n\nCurrent thread 0x00007f (most recent call first):\n"
      '  File "/x/jax/_src/pjit.py", line 1, in _pjit_call\n  <no Python frame>\n\n'
      "Extension modules: jaxlib.cpu_feature_guard, numpy.core (total: 90)\n")
  assert procs.last_line(str(tmp_path), 1) == "Fatal Python error: Aborted"


def test_a_worker_of_several_says_it_is_joining_before_it_waits_for_the_others(
    tmp_path, monkeypatch):
  """Every worker waits in `jax.distributed.initialize` for the last to arrive, reporting
  nothing: the supervisor could not tell the one that never came (and blamed process 0)."""
  import jax  # pylint: disable=import-outside-toplevel
  w = str(tmp_path)
  use_env(monkeypatch, {worker.ENV_GENERATION: "2", worker.ENV_PROCESS_ID: "1",
                        worker.ENV_NUM_PROCESSES: "2", worker.ENV_WORKDIR: w})
  monkeypatch.setenv(worker.ENV_COORDINATOR, "127.0.0.1:1")
  monkeypatch.setenv(worker.ENV_PLATFORM, "gpu")   # no gloo setting in this process
  seen = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.extend(
      json.loads(l) for l in open(worker.progress_path(w, 1))))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert worker.initialize_from_env() is True
  assert [(r["phase"], r["generation"], r["pid"]) for r in seen] == [
      ("joining", 2, os.getpid())]
