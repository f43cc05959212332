"""A stand-in for scripts/train.py in supervisor tests: no jax, a step is a short sleep.

Reads --workdir, --num_steps, --checkpoint_every, --mesh, --step_s (seconds per step) and
--error (print a user error and exit 1), --linger_s (seconds between a requested stop's
checkpoint and the exit, like a real trainer closing its files), --crash_at=G:S (process 0
of generation G exits 1 after its S-th step, no `error:` line: a crash), --warn=TEXT
(process 0 reports `warning: TEXT` at each start, as the trainer its unused gin bindings),
--port_taken_gens=N (process 0 of generations below N exits as on a taken coordinator port),
--eval_s=SECONDS (after the last step, an "eval" of that long, reporting each 0.1 s batch
through `worker.report_alive` unless --eval_silent), --eval_every=N (also after every N-th
step, an eval of --eval_s that `worker.stop_eval` cuts short, as the trainer's: then that
step is saved and the process exits), --stuck_slot=K (the worker on slot K never joins:
it sleeps before its `joining` record, and the others wait for it as in
`jax.distributed.initialize`);
$FAKE_TRAIN_ARGS adds flags (for callers that do not pass train flags through). Reports progress through
`jaxrec.elastic.worker` like the real trainer, "checkpoints" by creating
W/checkpoints/<step>/ (process 0), resumes from the newest one, stops when the supervisor
asks and appends what it ran to W/fake_runs.jsonl. Prints `step N` per step (like the
trainer's metrics lines). Processes talk only through files (no jax.distributed): the
progress files (lockstep) and a stop vote at each check step (`stop_vote`).
"""

import hashlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jaxrec.elastic import worker  # noqa: E402


def main(argv):
  argv = [*argv, *os.environ.get("FAKE_TRAIN_ARGS", "").split()]
  args = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
  w, n = args["workdir"], int(args.get("num_steps", 100))
  every, step_s = int(args.get("checkpoint_every", 5) or 5), float(args.get("step_s", 0.02))
  if "error" in args:
    print("error: --error: the fake trainer fails as asked", file=sys.stderr)
    return 1
  me = worker._worker()                      # pylint: disable=protected-access
  at = {"step": 0}                           # the check step `report_progress` votes at
  worker._agree = stop_vote(w, me, at)       # pylint: disable=protected-access
  if me.process == 0 and me.generation < int(args.get("port_taken_gens", 0)):
    print("coordinator address is in use (fake)")
    return worker.EXIT_PORT_IN_USE
  if args.get("stuck_slot") == os.environ.get(worker.ENV_SLOT, str(me.process)):
    time.sleep(3600)                         # a broken machine: never gets to join
  if me.num_processes > 1:                   # as worker.initialize_from_env
    me.write(w, {"phase": "joining", "pid": os.getpid()})
    wait_joined(w, me)
  worker.report_sigterm()                    # as worker.initialize_from_env
  me.write(w, {"phase": "initialized", "pid": os.getpid(), "init_s": 0.0})
  if "warn" in args and me.process == 0:
    worker.report_warning(f"warning: {args['warn']}")
  ckpts = os.path.join(w, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
  start = max(steps, default=0)
  with open(os.path.join(w, "fake_runs.jsonl"), "a") as f:
    f.write(json.dumps({"generation": me.generation, "process": me.process,
                        "processes": me.num_processes, "mesh": args.get("mesh"),
                        "plan": args.get("plan"), "start": start}) + "\n")
  crash_gen, _, crash_step = args.get("crash_at", "-1:0").partition(":")
  crash = start + int(crash_step) if me.process == 0 and int(crash_gen) == me.generation else None
  for step in range(start + 1, n + 1):
    if not wait_for_peers(w, me, step - 1, start):     # a peer stopped: stop after step - 1
      if me.process == 0 and step - 1 > start:
        os.makedirs(os.path.join(ckpts, str(step - 1)), exist_ok=True)
      break
    t0 = time.perf_counter()
    time.sleep(step_s)
    dt = time.perf_counter() - t0
    print(f"step {step}")
    at["step"] = step
    stop = worker.report_progress(w, step, dt, host_time_s=dt)
    if step == crash:
      print(f"crashing after step {step} as asked")
      return 1
    if me.process == 0 and (step % every == 0 or step == n or stop):
      os.makedirs(os.path.join(ckpts, str(step)), exist_ok=True)
    eval_every = int(args.get("eval_every", 0))
    if not stop and eval_every and step % eval_every == 0 and step < n:
      stop = not evaluate(float(args.get("eval_s", 0)), False, step, at)
      if stop and me.process == 0:
        os.makedirs(os.path.join(ckpts, str(step)), exist_ok=True)
    if stop:
      me.write(w, {"stopped_at": step})
      time.sleep(float(args.get("linger_s", 0)))
      break
  else:
    evaluate(float(args.get("eval_s", 0)), "eval_silent" in args)
  print("done")
  return 0


def stop_vote(w, me, at):
  """`worker._agree` between fake processes, as the trainer's all-gather: each writes its
  vote for the check step `at["step"]` and waits for every other's; any True stops all at
  that step. (It returned the process's own vote: under load, the process whose peer got
  SIGTERM ran a step past the peer's stop and saved off the check step.)"""
  if me.num_processes <= 1:
    return lambda flag: flag
  key = hashlib.sha1(os.path.realpath(w).encode()).hexdigest()[:16]
  root = os.path.join(tempfile.gettempdir(), "jaxrec_fake_votes", key, str(me.generation))

  def agree(flag):
    d = os.path.join(root, str(at["step"]))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{me.process}")
    with open(tmp, "w") as f:
      f.write("1" if flag else "0")
    os.replace(tmp, os.path.join(d, str(me.process)))
    while True:   # a peer that died never votes: the supervisor ends this process, as a hang
      votes = [v for v in os.listdir(d) if not v.startswith(".")]
      if len(votes) >= me.num_processes:
        return any(open(os.path.join(d, v)).read() == "1" for v in votes)
      time.sleep(0.005)
  return agree


def evaluate(seconds, silent, step=None, at=None):
  """The trainer's eval: `seconds` of 0.1 s batches with no step between them; the final
  one (`step` None) runs to its end, another stops when `worker.stop_eval` says so (False
  returned; `at` keys the processes' vote by step and batch)."""
  worker.ALIVE_EVERY_S = 0.2       # the tests' --hang_timeout is seconds, not minutes
  for batches in range(1, int(seconds / 0.1) + 1):
    if step is not None:
      at["step"] = f"{step}.eval.{batches}"
      if worker.stop_eval(step, batches):
        return False
    time.sleep(0.1)
    if not silent:
      worker.report_alive("eval", batches=batches)
  return True


def wait_joined(w, me):
  """As `jax.distributed.initialize`: waits until every process of the generation wrote
  its `joining` record."""
  while True:
    joined = 0
    for q in range(me.num_processes):
      path = worker.progress_path(w, q)
      if os.path.exists(path):
        with open(path) as f:
          joined += any(r.get("phase") == "joining" and r.get("generation") == me.generation
                        for r in map(_record, f))
    if joined == me.num_processes:
      return
    time.sleep(0.01)


def _record(line: str) -> dict:
  try:
    return json.loads(line)
  except json.JSONDecodeError:   # a line being written
    return {}


def wait_for_peers(w, me, step, start):
  """Lockstep like collectives: waits until every peer finished `step`; False if one
  stopped instead."""
  while True:
    behind = False
    for q in range(me.num_processes):
      if q == me.process:
        continue
      last, stopped = start, False
      path = worker.progress_path(w, q)
      if os.path.exists(path):
        with open(path) as f:
          for line in f:
            try:
              r = json.loads(line)
            except json.JSONDecodeError:
              continue
            if r.get("generation") == me.generation:
              last = max(last, r.get("step", 0))
              stopped = stopped or "stopped_at" in r
      if stopped:
        return False
      behind = behind or last < step
    if not behind:
      return True
    time.sleep(0.002)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
