"""Real multi-process training through scripts/launch.py (jax.distributed, gloo on CPU):
2 processes x 4 devices equal 1 x 8; a killed, a hung worker; the minimum; growing back.

Slow (each runs the trainer several times on 2 shared cores): `make test-slow`.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from jaxrec.elastic.procs import latest_checkpoint
from tests.elastic import elastic_testlib as t

pytestmark = pytest.mark.slow
STEPS = 30
ELASTIC = ["--mesh=data=2,table=2,row=2,col=1", "--plan=auto", f"--num_steps={STEPS}",
           "--log_every=1", "--checkpoint_every=5"]
FAST_FAIL = ["--num_processes=2", "--devices_per_process=4", "--hang_timeout=20",
             "--stop_grace=5"]
SLOW = ["--inject_delay=0:0.15"]   # process 0 (so the job) sleeps 0.15 s a step: time to act


def losses(workdir):
  """`{step: loss}` (a step logged twice, before and after a restart: the later one)."""
  return {m["step"]: m["loss"] for m in t.metrics(workdir) if "loss" in m}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 1 process x 8 devices run of ELASTIC."""
  w = str(tmp_path_factory.mktemp("ref") / "w")
  t.run_train(w, [*t.TINY, *ELASTIC], devices=8)
  return losses(w)


def test_two_processes_equal_one_process(tmp_path):
  flags = [*t.TINY, "--mesh=table=2,row=2,col=2", "--plan=grid", "--num_steps=8",
           "--log_every=1"]          # the table axis spans the processes: all_to_all over gloo
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  t.run_train(one, [*flags, f"--predictions={tmp_path}/one.npz"], devices=8)
  proc = t.launch(two, ["--num_processes=2", "--devices_per_process=4"],
                  [*flags, f"--predictions={tmp_path}/two.npz"])
  assert t.finish(proc) == 0, open(os.path.join(two, "launch.log")).read()[-3000:]
  a, b = losses(one), losses(two)
  assert sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
  ea, eb = t.metrics(one)[-1], t.metrics(two)[-1]
  assert eb["eval_examples"] == ea["eval_examples"] == 1024
  np.testing.assert_allclose(eb["eval_auc"], ea["eval_auc"], rtol=1e-5)
  # --predictions: process 0 writes the global order (each process's rows gathered)
  with np.load(f"{tmp_path}/one.npz") as za, np.load(f"{tmp_path}/two.npz") as zb:
    np.testing.assert_array_equal(zb["label"], za["label"])
    np.testing.assert_allclose(zb["logit"], za["logit"], atol=1e-5)
    assert za["logit"].shape == (1024,)
  assert t.names(t.events(two)) == ["start", "plan", "launch", "initialized", "initialized",
                                    "restore", "worker_exit", "worker_exit", "finished"]


def test_killed_worker_job_finishes_on_smaller_mesh(tmp_path, reference):
  w = str(tmp_path)
  proc = t.launch(w, [*FAST_FAIL, *SLOW], [*t.TINY, *ELASTIC])
  t.wait_for(lambda: t.last_step(w, 1) >= 12 and (latest_checkpoint(w) or 0) >= 10, 600,
             "step 12", proc)
  t.kill(t.worker_pids(w, 0)[1])
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-3000:]
  ev = t.events(w)
  names = t.names(ev)
  for name in ("worker_exit", "replan", "restore", "resume", "finished"):
    assert name in names, names
  # process 0 often aborts (SIGABRT) when its collective peer vanishes, and the supervisor
  # may see both exits in one poll and record process 0's first: find the killed one
  first_gen = next(e for e in ev if e["event"] == "worker_exit")["generation"]
  exits = [e for e in ev if e["event"] == "worker_exit" and e["generation"] == first_gen]
  exit_ev = next(e for e in exits if e["process"] == 1)
  assert exit_ev["signal"] == "SIGKILL" and exit_ev["lost"]
  assert not [e for e in exits if e["lost"] and e is not exit_ev], exits
  replan = next(e for e in ev if e["event"] == "replan")
  assert replan["processes"] == 1 and replan["mesh"] == {"data": 1, "table": 2, "row": 2,
                                                          "col": 1}
  restore = [e for e in ev if e["event"] == "restore"][-1]
  assert restore["step"] >= 10 and restore["step"] % 5 == 0 and not restore["fresh"]
  assert ev[-1]["event"] == "finished" and ev[-1]["checkpoint"] == STEPS
  # every example exactly once: the final checkpoint consumed STEPS batches, and the
  # losses after the restart are those of the uninterrupted run (same data, same order)
  assert t.checkpoint_data_state(w, STEPS)["position"] == STEPS * 256
  got = losses(w)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [reference[s] for s in range(1, STEPS + 1)], rtol=1e-5)


def test_hung_worker_is_replaced(tmp_path, reference):
  w = str(tmp_path)
  proc = t.launch(w, [*FAST_FAIL, *SLOW], [*t.TINY, *ELASTIC])
  t.wait_for(lambda: (latest_checkpoint(w) or 0) >= 5, 600, "checkpoint 5", proc)
  t.kill(t.worker_pids(w, 0)[1], signal.SIGSTOP)
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-3000:]
  ev = t.events(w)
  hang = next(e for e in ev if e["event"] == "hang")
  assert hang["process"] == 1 and hang["state"] in ("T", "t")
  assert next(e for e in ev if e["event"] == "replan")["processes"] == 1
  assert "resume" in t.names(ev) and ev[-1]["event"] == "finished"
  got = losses(w)
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [reference[s] for s in range(1, STEPS + 1)], rtol=1e-5)


def test_sigterm_to_the_launcher_saves_and_the_same_command_resumes(tmp_path, reference):
  """A preemption's SIGTERM to launch.py: the real workers save at their next check step
  (no periodic checkpoint before it), the job stops with 143, and the same command resumes
  from that step with the uninterrupted run's losses."""
  w = str(tmp_path)
  flags = [*t.TINY, *ELASTIC, "--checkpoint_every=1000"]
  launch = [*FAST_FAIL, *SLOW, "--check_every=5"]
  proc = t.launch(w, launch, flags)
  t.wait_step(w, 1, 0, 7, timeout=600, proc=proc)
  proc.send_signal(signal.SIGTERM)
  assert t.finish(proc) == 128 + signal.SIGTERM, open(os.path.join(w, "launch.log")).read()[-3000:]
  saved = latest_checkpoint(w)
  assert saved is not None and saved % 5 == 0 and 10 <= saved < STEPS, saved
  assert "terminate" in t.names(t.events(w))
  # metrics.jsonl says so as a bare train.py's SIGTERM does (it read as a re-plan's stop)
  assert {"step": saved, "event": "terminated", "signal": "SIGTERM", "by": "launcher"} in (
      t.metrics(w))
  n = len(t.events(w))
  assert t.finish(t.launch(w, launch, flags)) == 0
  ev = t.events(w)[n:]
  assert [e["step"] for e in ev if e["event"] == "restore"] == [saved]
  assert ev[-1]["event"] == "finished" and ev[-1]["checkpoint"] == STEPS
  got = losses(w)
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [reference[s] for s in range(1, STEPS + 1)], rtol=1e-5)


def test_sigterm_to_the_launcher_during_an_eval_saves_its_step(tmp_path):
  """The launcher's SIGTERM while the real worker evaluates step 6 (a 2,000-batch eval, no
  checkpoint at 6, no check step to come): the worker stops the eval, saves step 6 with its
  loss line and exits; the job stops with 143, and a rerun evaluates step 6 first. Before,
  the eval ran on and the worker with it, killed at --stop_timeout: step 6 lost."""
  w = str(tmp_path)
  flags = [*t.TINY, "--log_every=1", "--checkpoint_every=4", "--eval_every=6"]
  launch = ["--check_every=1000", "--stop_timeout=30", "--hang_timeout=60"]
  proc = t.launch(w, launch, [*flags, "--num_steps=1000",
                              "--gin_bindings=ExperimentConfig.num_eval_examples=1024000"])
  t.wait_for(lambda: any(r.get("phase") == "eval" for r in t.progress(w, 0)), 600,
             "the eval of step 6", proc)
  proc.send_signal(signal.SIGTERM)
  assert t.finish(proc, timeout=60) == 128 + signal.SIGTERM, (
      open(os.path.join(w, "launch.log")).read()[-3000:])
  assert latest_checkpoint(w) == 6 and 6 in losses(w)
  assert not any("eval_auc" in m for m in t.metrics(w))
  assert t.finish(t.launch(w, launch, [*flags, "--num_steps=8"])) == 0
  assert [m["step"] for m in t.metrics(w) if "eval_auc" in m] == [6, 8]


def test_below_minimum_stops(tmp_path):
  w = str(tmp_path)
  proc = t.launch(w, [*FAST_FAIL, *SLOW, "--min_processes=2"], [*t.TINY, *ELASTIC])
  t.wait_step(w, 0, 0, 3, timeout=600, proc=proc)
  t.kill(t.worker_pids(w, 0)[0])
  assert t.finish(proc) == 2
  ev = t.events(w)
  assert ev[-1]["event"] == "give_up" and ev[-1]["reason"] == "below_min"
  assert "below --min_processes=2" in open(os.path.join(w, "launch.log")).read()


def test_grows_back_when_capacity_returns(tmp_path, reference):
  w = str(tmp_path)
  os.makedirs(os.path.join(w, "elastic"))
  with open(os.path.join(w, "elastic", "capacity"), "w") as f:
    f.write("1 4\n")
  proc = t.launch(w, [*FAST_FAIL, *SLOW, "--check_every=5"], [*t.TINY, *ELASTIC])
  t.wait_step(w, 0, 0, 7, timeout=600, proc=proc)
  with open(os.path.join(w, "elastic", "capacity"), "w") as f:
    f.write(json.dumps({"num_processes": 2, "devices_per_process": 4}))
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-3000:]
  ev = t.events(w)
  names = t.names(ev)
  assert "scale_up" in names and "stop" not in names        # the worker stopped itself
  plans = [e for e in ev if e["event"] in ("plan", "replan")]
  assert [(p["processes"], p["mesh"]["data"]) for p in plans] == [(1, 1), (2, 2)]
  restore = [e for e in ev if e["event"] == "restore"][-1]
  assert restore["step"] >= 10 and restore["step"] % 5 == 0   # the stop step, saved on request
  got = losses(w)
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [reference[s] for s in range(1, STEPS + 1)], rtol=1e-5)


def test_a_resume_through_launch_py_keeps_the_recorded_plan_and_mesh(tmp_path):
  """launch.py re-planned a `--mesh=auto --plan=auto` resume (data=8, a fresh plan) where
  train.py resumes the plan and mesh the checkpoint records."""
  w = str(tmp_path)
  t.run_train(w, [*t.TINY, "--mesh=table=2,row=2,col=2", "--plan=grid", "--num_steps=2"], 8)
  proc = t.launch(w, ["--num_processes=2", "--devices_per_process=4"],
                  [*t.TINY, "--num_steps=4"])
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-3000:]
  plan = next(e for e in t.events(w) if e["event"] == "plan")
  assert plan["mesh"] == {"data": 1, "table": 2, "row": 2, "col": 2}, plan
  assert set(plan["plan_kinds"]) == {"grid"} and "checkpoints/2" in plan["resumed"]
  launch = next(e for e in t.events(w) if e["event"] == "launch")
  assert launch["command"][-2:] == ["--mesh=auto", "--plan=auto"]
  with open(os.path.join(w, "workers", "0.log")) as f:
    assert "--mesh=auto --plan=auto resumes them" in f.read()


def test_grain_data_workers_run_under_the_launcher(tmp_path):
  """`make_train_iterator.num_workers > 0` hung every launched job: grain spawns its data
  workers, which re-imported scripts/train.py as `__mp_main__`, took themselves for
  elastic workers whose supervisor was gone (their parent is the trainer) and exited; the
  trainer waited for its first batch until --startup_timeout."""
  w = str(tmp_path / "w")
  proc = t.launch(w, ["--devices_per_process=2", "--startup_timeout=120", "--max_restarts=0"],
                  [*t.TINY, "--num_steps=3", "--log_every=1",
                   "--gin_bindings=make_train_iterator.num_workers=1"])
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-3000:]
  assert sorted(losses(w)) == [1, 2, 3]


def test_two_tower_retrieval_metrics_of_two_processes_equal_one_process(tmp_path):
  """A two-tower's eval ranks the global batch's items by ids each process holds for its
  rows only (gathered with the labels): 2 x 4 ranks as 1 x 8."""
  flags = ["--gin_file=configs/two_tower_synthetic.gin",
           "--gin_bindings=ExperimentConfig.batch_size=256",
           "--gin_bindings=ExperimentConfig.eval_batch_size=512",
           "--gin_bindings=ExperimentConfig.num_eval_examples=1024", "--noprogress",
           "--mesh=data=8", "--plan=dp", "--num_steps=4"]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  t.run_train(one, [*flags, f"--predictions={tmp_path}/one.npz"], devices=8)
  proc = t.launch(two, ["--num_processes=2", "--devices_per_process=4"],
                  [*flags, f"--predictions={tmp_path}/two.npz"])
  assert t.finish(proc) == 0, open(os.path.join(two, "launch.log")).read()[-3000:]
  ea, eb = t.metrics(one)[-1], t.metrics(two)[-1]
  assert ea["eval_queries"] > 100 and ea["eval_candidates"] > 400
  for k in ("eval_recall_at_1", "eval_recall_at_10", "eval_recall_at_100", "eval_mrr",
            "eval_queries", "eval_candidates", "eval_auc"):
    np.testing.assert_allclose(eb[k], ea[k], rtol=1e-6, err_msg=k)


def test_early_stopping_through_launch_py_stops_every_worker_at_one_step(tmp_path):
  """--early_stop_metric under scripts/launch.py: process 0 decides from its metrics.jsonl
  and both workers stop after the same eval (min_delta 1: no eval after the first improves,
  so patience 2 stops at step 6), the job finishes, the best step's checkpoint outlives
  --keep_checkpoints=1, and the same command again trains nothing."""
  w = str(tmp_path / "w")
  flags = [*t.TINY, "--mesh=data=8", "--plan=dp", "--num_steps=40", "--log_every=2",
           "--eval_every=2", "--keep_checkpoints=1", "--early_stop_metric=eval_auc",
           "--early_stop_patience=2", "--early_stop_min_delta=1"]
  launch = ["--num_processes=2", "--devices_per_process=4"]
  assert t.finish(t.launch(w, launch, flags)) == 0, \
      open(os.path.join(w, "launch.log")).read()[-3000:]
  lines = t.metrics(w)
  assert lines[-1]["event"] == "early_stop" and lines[-1]["step"] == 6, lines[-1]
  assert lines[-1]["best_step"] == 2
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "6"]
  assert t.names(t.events(w))[-1] == "finished"
  for process in (0, 1):   # both workers took the same decision (a worker that trained on
    log = open(os.path.join(w, "workers", f"{process}.log")).read()   # alone hung)
    assert "early stop after step 6: eval_auc has not improved for 2 evals" in log, log[-2000:]
  assert t.finish(t.launch(w, launch, flags)) == 0
  again = t.metrics(w)
  assert [l for l in again if "loss" in l] == [l for l in lines if "loss" in l]
  assert again[-1]["event"] == "resume" and again[-1]["step"] == 6


def test_early_stopping_baseline_of_a_restart_data_copy_under_launch_py(tmp_path):
  """A --restart_data copy trained by a 2-process job: process 0 decides that the copied
  step is owed its baseline eval and both workers evaluate it, count it and stop at one
  step naming it the best; the start line of the data read is in W2/workers/0.log, the
  warning that nothing improved on the copy on the launcher's stderr too."""
  w, w2 = str(tmp_path / "w"), str(tmp_path / "w2")
  flags = [*t.TINY, "--mesh=data=8", "--plan=dp", "--log_every=2", "--eval_every=2",
           "--keep_checkpoints=1", "--early_stop_metric=eval_auc", "--early_stop_min_delta=1"]
  t.run_train(w, [*flags, "--num_steps=4"], devices=8)
  out = subprocess.run([sys.executable, os.path.join(t.ROOT, "scripts", "convert_checkpoint.py"),
                        f"--checkpoint_dir={w}/checkpoints", f"--output={w2}/checkpoints",
                        "--format=checkpoint", "--restart_data"], capture_output=True,
                       text=True, env=t.env(), cwd=t.ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  launch = ["--num_processes=2", "--devices_per_process=4"]
  assert t.finish(t.launch(w2, launch, [*flags, "--num_steps=40", "--early_stop_patience=2"])
                  ) == 0, open(os.path.join(w2, "launch.log")).read()[-3000:]
  lines = t.metrics(w2)
  assert [l["step"] for l in lines if "eval_auc" in l] == [4, 6, 8]
  assert (lines[-1]["event"], lines[-1]["step"], lines[-1]["best_step"],
          lines[-1]["best_is_start"]) == ("early_stop", 8, 4, True)
  assert sorted(os.listdir(os.path.join(w2, "checkpoints"))) == ["4", "8"]
  for process in (0, 1):
    log = open(os.path.join(w2, "workers", f"{process}.log")).read()
    assert "early stop after step 8: eval_auc has not improved for 2 evals" in log, log[-2000:]
  assert "training data: synthetic, endless; this run trains steps 5-40" in open(
      os.path.join(w2, "workers", "0.log")).read()
  assert "no step trained on this data improved on checkpoint 4" in open(
      os.path.join(w2, "launch.log")).read()
