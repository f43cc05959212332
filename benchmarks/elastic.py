"""Elastic recovery time: 2 processes x 4 CPU devices, one worker killed mid-run.

  .venv/bin/python benchmarks/elastic.py [--num_steps=60] [--kill_at=15] [--workdir=DIR] [--keep]

Runs `scripts/launch.py --num_processes=2 --devices_per_process=4` on a small DLRM, waits
for a committed checkpoint and step `--kill_at`, kills worker 1 with SIGKILL and measures
the seconds from the kill to the first completed step on the new mesh (1 process x 4
devices). One JSON line (`"benchmark": "elastic_recovery"`) with `"ratio"` = seconds / 30
and `"goal": 1.0`, the breakdown (detect, stop, re-plan, restart, restore, compile: see
`jaxrec.elastic.supervisor`) and the machine's load average (timings on a shared machine
vary with it). A job that does not complete after the recovery (launch.py fails, or stops
short of --num_steps) adds `"error"` to the line, says it on stderr and exits 1.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import (  # noqa: E402
    check_at_least, check_dir_flag, emit, interruptible, own_dir)
from jaxrec import cli_flags  # noqa: E402
from jaxrec.elastic.events import read_events  # noqa: E402
from jaxrec.elastic.procs import latest_checkpoint  # noqa: E402

flags.DEFINE_integer("num_steps", 60, "Total steps of the job.")
flags.DEFINE_integer("kill_at", 15, "Kill worker 1 once it reported this step ...")
flags.DEFINE_integer("checkpoint_every", 10, "... and a checkpoint is committed.")
flags.DEFINE_integer("batch_size", 512, "Global batch.")
flags.DEFINE_string("mesh", "data=2,table=2,row=2,col=1", "Mesh of the 8-device start.")
flags.DEFINE_string("plan", "auto", "--plan of the job.")
flags.DEFINE_string("workdir", None, "Run directory, new or empty or of an earlier run "
                    "(emptied first; default: a temp dir, removed).")
flags.DEFINE_bool("keep", False, "Keep the run directory (its path: the JSON line's "
                  "\"workdir\" and stderr).")
flags.DEFINE_float("timeout", 900, "Seconds before giving up.")
flags.DEFINE_string("train_script", None, "Worker program (default scripts/train.py; tests "
                    "pass a fake one).")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL_S = 30.0
MARKER = ".elastic_benchmark"   # in --workdir: the run's own directory (may be emptied)


def _steps(workdir, process):
  path = os.path.join(workdir, "workers", f"{process}.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return max([json.loads(l).get("step", 0) for l in f if l.endswith("\n")] or [0])


def _wait(cond, proc, what, log_path=None):
  t0 = time.time()
  while not cond():
    if proc.poll() is not None:   # with the launcher's own error line: its log is in a
      why = _last_error(log_path)  # temporary workdir that is then removed
      raise SystemExit(f"error: the launcher exited ({proc.returncode}) before {what}"
                       + (f": {why}" if why else ""))
    if time.time() - t0 > FLAGS.timeout:
      raise SystemExit(f"error: timed out waiting for {what}")
    time.sleep(0.02)


def _last_error(log_path) -> str:
  """The last `error: ...` line of the launcher's log, without its prefix ('' if none)."""
  try:
    with open(log_path) as f:
      lines = [l.strip() for l in f if l.startswith("error: ")]
  except (OSError, TypeError):
    return ""
  return lines[-1].removeprefix("error: ") if lines else ""


def _failure(code, final, events):
  """Why the measured job did not complete after its recovery (one line), or None."""
  if code == 0 and final == FLAGS.num_steps:
    return None
  why = (f"scripts/launch.py exited {code}" if code != 0 else
         f"its last checkpoint is step {final}, not --num_steps={FLAGS.num_steps}")
  give_up = [e for e in events if e.get("event") == "give_up"]
  if give_up:
    why += ": " + " ".join(str(give_up[-1].get("message", "")).split())
  return f"the job failed after its recovery: {why}"


def _check_flags() -> None:
  """One-line error naming the flag before the job starts (else a bad value showed only
  as 'the launcher exited ... before step N', some after running the whole job)."""
  check_at_least(lambda m: sys.exit(f"error: {m}"), FLAGS.flag_values_dict(),
                 ("num_steps", "checkpoint_every", "batch_size", "kill_at"))
  if FLAGS.kill_at >= FLAGS.num_steps or FLAGS.checkpoint_every >= FLAGS.num_steps:
    sys.exit(f"error: --kill_at={FLAGS.kill_at} and --checkpoint_every="
             f"{FLAGS.checkpoint_every} must be below --num_steps={FLAGS.num_steps}")
  if FLAGS.timeout <= 0:
    sys.exit(f"error: --timeout must be positive, got {FLAGS.timeout}")
  check_dir_flag(lambda m: sys.exit(f"error: {m}"), "workdir", FLAGS.workdir)
  if FLAGS.train_script and not os.path.isfile(FLAGS.train_script):
    sys.exit(f"error: --train_script: no file {FLAGS.train_script!r}")
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.sharding import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from jaxrec.sharding.plan import check_plan_flag  # pylint: disable=import-outside-toplevel
  try:   # else only 'the launcher exited (1) before step N'
    if FLAGS.mesh != "auto":
      mesh_lib.parse_mesh_spec(FLAGS.mesh, 8)   # the job starts on 2 processes x 4
    check_plan_flag(FLAGS.plan)
  except ConfigError as e:
    sys.exit(f"error: {e}" if str(e).startswith("--") else f"error: --mesh/--plan: {e}")


def main(argv):
  del argv
  _check_flags()
  workdir = os.path.abspath(FLAGS.workdir) if FLAGS.workdir else tempfile.mkdtemp(
      prefix="jaxrec_elastic_")   # absolute: the launcher runs in the repository root
  own_dir(lambda m: sys.exit(f"error: {m}"), "workdir", workdir, MARKER)
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "launch.py"), "--quiet",
         "--num_processes=2", "--devices_per_process=4", "--hang_timeout=120",
         *([f"--train_script={os.path.abspath(FLAGS.train_script)}"] if FLAGS.train_script
           else []), "--",
         f"--workdir={workdir}", "--gin_file=configs/dlrm_synthetic.gin",
         f"--gin_bindings=ExperimentConfig.batch_size={FLAGS.batch_size}",
         "--gin_bindings=ExperimentConfig.eval_batch_size=1024",
         "--gin_bindings=ExperimentConfig.num_eval_examples=2048",
         f"--num_steps={FLAGS.num_steps}", f"--checkpoint_every={FLAGS.checkpoint_every}",
         f"--log_every={FLAGS.checkpoint_every}", f"--mesh={FLAGS.mesh}",
         f"--plan={FLAGS.plan}", "--noprogress"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with open(os.path.join(workdir, "launch.log"), "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  try:
    _wait(lambda: (_steps(workdir, 1) >= FLAGS.kill_at and
                   (latest_checkpoint(workdir) or 0) >= FLAGS.checkpoint_every),
          proc, f"step {FLAGS.kill_at} and a checkpoint", os.path.join(workdir, "launch.log"))
    pid = next(e["pids"][1] for e in read_events(workdir) if e["event"] == "launch")
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: any(e["event"] == "resume" for e in read_events(workdir)), proc,
          "the first step on the new mesh", os.path.join(workdir, "launch.log"))
    events = read_events(workdir)
    resume = next(e for e in events if e["event"] == "resume")
    exit_ev = next(e for e in events if e["event"] == "worker_exit")
    replan = next(e for e in events if e["event"] == "replan")
    seconds = resume["first_step_at"] - killed_at
    breakdown = {"detect_s": round(resume["detected_at"] - killed_at, 3),
                 **resume["breakdown"]}
    code = proc.wait(FLAGS.timeout)
    final = latest_checkpoint(workdir)
    failure = _failure(code, final, read_events(workdir))
    emit("elastic_recovery", seconds=round(seconds, 3), ratio=round(seconds / GOAL_S, 4),
         goal=1.0, goal_op="<=", breakdown=breakdown,
         killed_at_step=exit_ev.get("last_step"),
         restored_step=resume["step"] - 1, new_mesh=replan["mesh"],
         processes="2x4 -> 1x4", job_exit_code=code, final_checkpoint=final,
         completed=failure is None, **({"error": failure} if failure else {}),
         load_average=[round(x, 2) for x in os.getloadavg()], cpus=os.cpu_count(),
         **({"workdir": workdir} if FLAGS.keep or FLAGS.workdir else {}))
    if failure:
      print(f"error: {failure}", file=sys.stderr)
      sys.exit(1)
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGINT)
      try:
        proc.wait(30)
      except subprocess.TimeoutExpired:
        proc.kill()
    if not FLAGS.keep and not FLAGS.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
    elif not FLAGS.workdir:   # --keep: a temp dir nobody was told of
      print(f"kept the run directory: {workdir}", file=sys.stderr)


if __name__ == "__main__":
  # --help exits 0, a flag error is one line, Ctrl-C one line (exit 130)
  app.run(interruptible(main), flags_parser=cli_flags.parse)
