"""The elastic supervisor: runs `scripts/train.py` as N worker processes and keeps the job
going while workers and devices come and go.

One *generation* is one set of workers on one mesh. The supervisor

  1. picks the processes, mesh and plan for the capacity it has (`replan`), starts the
     workers with the coordinator address (127.0.0.1, a free port) and the mesh/plan
     flags, each with its own log `W/workers/<p>.log`;
  2. watches them: exits, progress (`W/workers/<p>.jsonl`: hangs, stragglers) and the
     capacity file;
  3. on a failure (a worker exited, or made no progress for `hang_timeout` seconds) kills
     the rest (they wait in collectives for the lost peer), counts the failed slot as
     lost and goes to 1 with one process fewer; on more capacity (the capacity file, a lost slot
     returning after `rejoin_after`) or a straggler it asks the workers to checkpoint and
     stop (`report_progress` returns True), then goes to 1 with the new capacity;
  4. the new generation's workers restore the latest checkpoint onto their mesh (the
     trainer resumes from `W/checkpoints`) and continue with the next unseen example.

It stops when the workers finish (exit 0), below `min_processes` (or with no mesh of the
processes available), after `max_restarts`
restarts caused by failures, on a user error (a worker's `error: ...` line), or on
SIGINT (workers killed, exit 130) or SIGTERM (exit 143; SIGHUP, unless ignored, as SIGTERM
with exit 129): the first SIGTERM, once the workers
trained past the latest checkpoint, asks them to save at their next check step and exit
(`jaxrec.elastic.stopping`; at most `stop_timeout` seconds, then they are killed); before
that, or on a second signal, they are killed at once. `jaxrec.signals` records the signals,
the loop acts on them at its checks. Every
decision is an event in `W/events.jsonl` (`jaxrec.elastic.events`).

Capacity file (default `W/elastic/capacity`): `N`, `N K` or
`{"num_processes": N, "devices_per_process": K}`: the processes (and devices each) the
job may use now. Every rewrite is a fresh statement: it also returns the lost slots.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from jaxrec import files, signals
from jaxrec.elastic import capacity as capacity_lib
from jaxrec.elastic import procs as proc_lib, recovery, replan, scaling, stopping, stragglers
from jaxrec.elastic import watching
from jaxrec.elastic import worker as worker_lib
from jaxrec.elastic.events import EVENTS_FILE, EventLog, read_events, unfinished_run
from jaxrec.elastic.options import Options
from jaxrec.errors import JaxrecError, counted

_Outcome = scaling.Outcome

EXIT_OK, EXIT_USER_ERROR, EXIT_BELOW_MIN, EXIT_MAX_RESTARTS = 0, 1, 2, 3
PORT_TRIES = 5   # coordinator ports tried in a row for one set of workers
FIX_CONFIG = ("fix the config (--gin_file, --gin_bindings) or --num_processes, "
              "--devices_per_process, --mesh")


def _bookkeeping(name: str) -> bool:
  """Whether workdir file `name` is one the launcher or a refused worker writes before
  anything is trained: events, worker logs and progress, the lock files. A checkpoint, a
  metrics line, `config.gin` (a run past its checks) or a file of the user's is not."""
  return (name in (EVENTS_FILE, files.LOCK_NAME, worker_lib.LAUNCH_LOCK)
          or os.path.dirname(name) == worker_lib.WORKERS_DIR)


class Supervisor(scaling.Scaling):
  """Runs the job (module docstring); `run()` returns the exit code."""

  def __init__(self, options: Options, train_argv: list[str], echo=None):
    options.validate()
    self.o = options
    self.args = replan.TrainArgs.parse(train_argv)
    replan.check_mesh_flag(str(self.args.get("mesh", "auto")), options.num_processes,
                           options.devices_per_process)
    replan.check_plan_flags(self.args)
    self.workdir = self.args.workdir
    self._made = files.missing_top(self.workdir)   # what this launch creates (None: existed)
    files.make_dirs(os.path.join(self.workdir, worker_lib.CONTROL_DIR), shown=self.workdir)
    self.events = EventLog(self.workdir, echo=echo)
    self.capacity_file = options.capacity_file or os.path.join(
        self.workdir, worker_lib.CONTROL_DIR, "capacity")
    self.capacity_reader = capacity_lib.Reader(self.capacity_file, self.events.emit)
    self.capacity = (options.num_processes, options.devices_per_process)
    self.lost: dict[int, float] = {}          # slot -> when it was lost (not yet returned)
    self.quarantine: dict[int, float] = {}    # slot -> until when it sits out (a straggler)
    self.slots: list[int] = []                # the slot of each process of the generation
    self.generation = 0
    self._launched: int | None = None        # generation of the last workers started
    self.restarts = 0
    self.procs: list[watching.WorkerProc] = []
    self.choice: replan.Choice | None = None
    self._recovery: dict | None = None        # timings of the restart in progress
    self._port: int | None = None             # the coordinator's, of the last workers
    self._first_plan_failed = False           # no mesh of the processes asked for at start
    self._last_failure = ""                   # `Outcome.failure_text` of the last failure
    self._warnings: set[str] = set()          # workers' warnings already printed
    self._sigterms: list = []                 # (process, record): SIGTERMs not acted on
    self._terminated: dict | None = None      # the launcher's SIGTERM: checkpoint, signal

  # ---------------------------------------------------------------------------- main loop
  def run(self) -> int:
    """Runs the job holding `W/elastic/launch.lock`: a second supervisor on the workdir
    (which would delete this one's stop requests and mix its events and progress lines
    with this one's) is refused before it writes anything, naming this one's pid. A
    workdir this launch created is removed again when the job stops on a user error, a
    signal or no capacity before anything but the launcher's bookkeeping was written
    (`_bookkeeping`, `_nothing_to_keep`)."""
    with signals.deferred(), files.workdir_lock(
        self.workdir, worker_lib.LAUNCH_LOCK,
        "another scripts/launch.py"):
      try:
        code = self._run()
      except JaxrecError:   # e.g. a bad --gin_bindings, found loading the config
        files.remove_made(self._made, self.workdir, _bookkeeping)
        raise
      if self._nothing_to_keep(code):
        files.remove_made(self._made, self.workdir, _bookkeeping)
      return code

  def _nothing_to_keep(self, code: int) -> bool:
    """Whether the launcher's bookkeeping of a job that ended with `code` tells nothing the
    printed line does not: a user error, a SIGINT/SIGTERM (as train.py's `made_dir`), or
    no capacity for the first workers. Workers that failed keep their logs."""
    return (code == EXIT_USER_ERROR or code > 128
            or (code == EXIT_BELOW_MIN and self._launched is None))

  def _run(self) -> int:
    self.events.repair_tail()
    self._record_second_signal()
    self.config = replan.load_config(self.args)
    before = read_events(self.workdir)
    # A restarted supervisor continues the workdir's count: its first set of workers was
    # 'generation 0' again, two sets under one number in events.jsonl and progress files.
    launched = [e.get("generation") for e in before if e.get("event") == "launch"]
    self.generation = first = max((g for g in launched if type(g) is int), default=-1) + 1
    # `start` first (the flags), then what the capacity file says: a restarted supervisor
    # finds the file of the previous run, and its `capacity` came before `start`.
    self.events.emit("start", num_processes=self.o.num_processes,
                     devices_per_process=self.o.devices_per_process,
                     min_processes=self.o.min_processes, max_restarts=self.o.max_restarts,
                     hang_timeout=self.o.hang_timeout, capacity_file=self.capacity_file,
                     train_flags=list(self.args.argv), pid=os.getpid())
    self._previous_died(unfinished_run(before))
    self._read_capacity(initial=True)
    if self.capacity_reader.error is not None:   # bad input before anything started
      return self._give_up("user_error", EXIT_USER_ERROR, self.capacity_reader.message,
                           fix=f"fix or remove {self.capacity_file}")
    reason = "start"
    try:
      while True:
        signals.check()   # SIGINT / SIGTERM act only where the workers can be stopped
        t0 = time.time()
        choice, why, cause = self._plan(first=self.generation == first)
        signals.check()
        if choice is None:
          if self.generation == first and self._first_plan_failed:   # the user's to fix
            return self._give_up("user_error", EXIT_USER_ERROR, why, fix=FIX_CONFIG)
          if cause == "below_min" and self._wait_for_returns(why):
            continue
          return self._give_up(cause, EXIT_BELOW_MIN, why, fix=self._capacity_fix())
        self.events.emit("plan" if self.generation == first else "replan",
                         generation=self.generation, reason=reason,
                         seconds=round(time.time() - t0, 3), **choice.to_json())
        if self._recovery is not None:
          self._recovery["replan_s"] = time.time() - t0
        out = self._launch_and_watch(choice)
        if out.kind != "finished":
          self._recovery_failed(out.reason, out.detected)
        if out.kind != "finished" and self._terminated is not None:
          return self._stop_after_sigterm(out)
        if out.kind == "finished":
          self.events.emit("finished", generation=self.generation,
                           step=max(p.last_step for p in self.procs),
                           restarts=self.restarts,
                           checkpoint=proc_lib.latest_checkpoint(self.workdir))
          return EXIT_OK
        self._stop_all(out.reason, graceful=out.kind == "planned")
        if out.kind == "port_in_use":
          return self._give_up("port_in_use", EXIT_MAX_RESTARTS, out.message)
        if out.kind == "user_error":
          return self._give_up("user_error", EXIT_USER_ERROR, out.message,
                               fix="fix what it names")
        if out.kind == "failure":
          self.restarts += 1
          self.lost.update(dict.fromkeys(out.slots, out.detected))
          self._last_failure = out.failure_text()
          if self.restarts > self.o.max_restarts:
            return self._give_up("max_restarts", EXIT_MAX_RESTARTS,
                                 f"{counted(self.restarts, 'failure')} (the last: "
                                 f"{self._last_failure}): --max_restarts="
                                 f"{self.o.max_restarts} allows {self.o.max_restarts} "
                                 "restart(s) after failures")
        # from the detection: a requested stop's workers save and exit on their own first
        self._recovery = recovery.begin(out.detected, out.reason, time.time(), self._recovery)
        self.generation += 1
        reason = out.reason
    except (KeyboardInterrupt, signals.TerminateRequested) as e:
      sig = signal.Signals[signals.name(e)]
      self._recovery_failed(f"supervisor got {sig.name}", time.time())
      self._stop_all(f"supervisor got {sig.name}", graceful=False)
      return self._give_up("interrupted", 128 + sig, f"interrupted by {sig.name}")
    finally:
      self._stop_all("supervisor exit", graceful=False, quiet=True)

  def _record_second_signal(self) -> None:
    """A second signal exits at once (`signals.stop_now`); it records its `give_up` first
    (reason `interrupted_again`), or the next run took the job for one killed without a
    word: after a second SIGTERM while the workers saved, it blamed a scheduler's grace
    period."""
    line = signals.second_signal_line()

    def second(name: str) -> str:
      text = line(name) if line is not None else f"error: interrupted again by {name}"
      self.events.emit_now("give_up", reason="interrupted_again", generation=self._launched,
                           restarts=self.restarts, message=text.removeprefix("error: "))
      return text
    signals.on_second_signal(second)

  def _previous_died(self, previous: dict | None) -> None:
    """Says so (event and stderr) when the previous supervisor on this workdir ended without
    a word (`events.unfinished_run`): its events stop mid-job, and a user who finds the job
    running again should know that it went down and where it resumes."""
    if previous is None:
      return
    checkpoint = proc_lib.latest_checkpoint(self.workdir)
    self.events.emit("supervisor_died", **previous, checkpoint=checkpoint)
    pid = f" (pid {previous['pid']})" if previous["pid"] is not None else ""
    when = previous["last_event_time"]
    when = time.strftime(" at %Y-%m-%d %H:%M:%S", time.localtime(when)) if when else ""
    resume = (f"resuming from checkpoint step {checkpoint}" if checkpoint is not None
              else "no checkpoint was saved: starting fresh")
    hint = ""
    if previous["last_event"] == "terminate":   # preempted, then killed before the save
      hint = (" It was saving after a SIGTERM when it ended: a scheduler's grace period "
              "(Kubernetes' and Slurm's default 30 s) shorter than --check_every steps and "
              "a save loses those steps; raise the grace period or lower --check_every.")
    print(f"note: the previous scripts/launch.py on {self.workdir}{pid} ended without "
          "recording why (a second Ctrl-C or SIGTERM, kill -9, the OOM killer, or its "
          f"machine went down); its last event was '{previous['last_event']}'{when}. Its "
          f"workers ended with it; {resume}.{hint}", file=sys.stderr, flush=True)

  def _stop_after_sigterm(self, out: _Outcome) -> int:
    """Ends the job after the launcher's SIGTERM (`_check_signals`): the workers saved and
    exited, or did not within `stop_timeout`, or failed first (`out` says which)."""
    name = self._terminated["signal"]
    self._stop_all(stopping.terminate_reason(name), graceful=False)
    why_not = (out.reason if out.kind != "planned" else
               f"the workers saved no checkpoint within --stop_timeout={self.o.stop_timeout:g} "
               "s and were killed")
    text = stopping.sigterm_text(self._terminated["checkpoint"],
                                 proc_lib.latest_checkpoint(self.workdir), why_not, name)
    return self._give_up("interrupted", 128 + signal.Signals[name], text)

  def _recovery_failed(self, ended_by: str, now: float) -> None:
    """`recovery_failed` when the running generation ends before its `resume`."""
    if self._recovery is not None and self._launched == self.generation:
      details = recovery.failed(self._recovery, ended_by, now)
      if details is not None:
        self.events.emit("recovery_failed", generation=self.generation, **details)

  def _give_up(self, reason: str, code: int, message: str, fix: str | None = None) -> int:
    ckpt = proc_lib.latest_checkpoint(self.workdir)   # the workers are stopped: no new one
    text = proc_lib.checkpoint_text(self.workdir, message, fix)
    # the workers it gave up on: the next set (never started) is the next run's number
    self.events.emit("give_up", reason=reason, generation=self._launched,
                     restarts=self.restarts, checkpoint=ckpt, message=text)
    print(f"error: {text}", file=sys.stderr)
    return code

  # ---------------------------------------------------------------------------- workers
  def _launch_and_watch(self, choice: replan.Choice) -> _Outcome:
    """Starts the workers of `choice` and watches them. When process 0 found the
    coordinator's port taken (another process bound it after `free_port` released it) they
    start again on a new port, as the next generation (no restart counted, no slot lost);
    after `PORT_TRIES` taken ports in a row the outcome stays `port_in_use`."""
    for attempt in range(1, PORT_TRIES + 1):
      try:
        self._launch(choice)
      except proc_lib.PortUnusable as e:   # nothing started: the host refuses every bind
        return _Outcome("user_error", "no port", message=f"the coordinator's port: {e}",
                        detected=time.time())
      out = self._watch()
      if out.kind != "port_in_use" or self._terminated is not None:
        return out
      self.events.emit("port_in_use", generation=self.generation, port=self._port,
                       attempt=attempt, retry=attempt < PORT_TRIES)
      if attempt == PORT_TRIES:
        out.message = (f"the coordinator's port was taken {PORT_TRIES} times in a row "
                       f"(last 127.0.0.1:{self._port}: address in use); free some ports "
                       "or run again")
        return out
      self._stop_all(out.reason, graceful=False)
      self.generation += 1

  def _launch(self, choice: replan.Choice) -> None:
    port = self._port = proc_lib.free_port()   # first: PortUnusable leaves no generation
    self.choice = choice
    # what the plan saw: a slot returning since then (`--rejoin_after`) is a change that
    # the first capacity check acts on (seen here, the job ran one process short)
    self._capacity_seen = self._planned_on
    g = self._launched = self.generation
    stopping.clear_requests(self.workdir)
    os.makedirs(os.path.join(self.workdir, worker_lib.WORKERS_DIR), exist_ok=True)
    argv = [self.o.python, self.o.train_script,
            *self.args.with_mesh_plan(*choice.worker_mesh_plan)]
    self.procs, self._sigterms = [], []
    self.slots = self._free_slots()[:choice.processes]
    self._checkpoint_at_launch = proc_lib.latest_checkpoint(self.workdir)
    for p in range(choice.processes):
      signals.check()   # before each start: the workers started so far are in self.procs
      log = open(os.path.join(self.workdir, worker_lib.WORKERS_DIR, f"{p}.log"), "a")
      log.write(f"{proc_lib.GENERATION_BANNER} {g}, process {p} of {choice.processes}, "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
      log.flush()
      popen = proc_lib.start_worker(argv, self._env(p, choice, port), log)
      # Workers resume from that checkpoint (at num_steps they only evaluate and exit).
      offset, inode = watching.progress_end(self.workdir, p)
      self.procs.append(watching.WorkerProc(
          p, popen, log, time.time(), last_seen=time.time(),
          last_step=self._checkpoint_at_launch or 0, slot=self.slots[p],
          offset=offset, inode=inode))
    self.detectors = (
        stragglers.Detector("process", self.o.straggler_threshold, self.o.straggler_windows,
                            self.o.straggler_window_steps),
        stragglers.Detector("shard", self.o.straggler_threshold, self.o.straggler_windows,
                            max(self.o.straggler_window_steps, 3 * self.o.probe_every)))
    self.events.emit("launch", generation=g, processes=choice.processes,
                     coordinator=f"127.0.0.1:{port}", mesh=choice.mesh_flag, plan=choice.plan,
                     pids=[p.popen.pid for p in self.procs], slots=self.slots,
                     checkpoint=self._checkpoint_at_launch, command=argv[1:])

  def _env(self, p: int, choice: replan.Choice, port: int) -> dict:
    env = dict(os.environ)
    k, slot = choice.devices_per_process, self.slots[p]
    env.update({worker_lib.ENV_NUM_PROCESSES: str(choice.processes),
                worker_lib.ENV_PROCESS_ID: str(p),
                worker_lib.ENV_SLOT: str(slot),
                worker_lib.ENV_WORKDIR: self.workdir,
                worker_lib.ENV_GENERATION: str(self.generation),
                worker_lib.ENV_PLATFORM: self.o.platform,
                worker_lib.ENV_CHECK_EVERY: str(self.o.check_every),
                worker_lib.ENV_PROBE_EVERY: str(self.o.probe_every),
                worker_lib.ENV_SUPERVISOR_PID: str(os.getpid()),
                "PYTHONUNBUFFERED": "1"})
    if choice.processes > 1:
      env[worker_lib.ENV_COORDINATOR] = f"127.0.0.1:{port}"
    else:
      env.pop(worker_lib.ENV_COORDINATOR, None)
    if self.o.inject_delay:
      env[worker_lib.ENV_INJECT_DELAY] = self.o.inject_delay
    if self.o.platform == "cpu":
      flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
      env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={k}"])
      env["JAX_PLATFORMS"] = "cpu"
    else:
      env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * k + i) for i in range(k))
      env.pop("JAX_PLATFORMS", None)
    return env

  def _stop_all(self, reason: str, graceful: bool = True, quiet: bool = False) -> None:
    """Ends every running worker: SIGTERM, then SIGKILL after `stop_grace` seconds; at
    once with SIGKILL when not `graceful` (after a failure the survivors are stuck in
    collectives waiting for the lost peer, and jax.distributed turns SIGTERM into a
    preemption notice). Committed checkpoints are unaffected; a save in flight is
    discarded (orbax commits by renaming at the end)."""
    running = [p for p in self.procs if p.popen.poll() is None]
    t0 = time.time()
    for p in running:
      proc_lib.send_signal(p.popen, signal.SIGTERM if graceful else signal.SIGKILL)
    deadline = t0 + (self.o.stop_grace if graceful else 5.0)
    while any(p.popen.poll() is None for p in running) and time.time() < deadline:
      if graceful:   # a signal during a requested stop: `run` kills them at once
        signals.check()
      time.sleep(0.05)
    killed = [p.index for p in running if p.popen.poll() is None]
    for p in running:
      if p.popen.poll() is None:
        proc_lib.send_signal(p.popen, signal.SIGKILL)
        p.popen.wait()
    for p in self.procs:
      proc_lib.send_signal(p.popen, signal.SIGKILL)        # leftovers in the process group
      p.log.close()
    if running and not quiet:
      self.events.emit("stop", generation=self.generation, reason=reason,
                       stopped=[p.index for p in running], killed_after_grace=killed,
                       seconds=round(time.time() - t0, 3))

  # ---------------------------------------------------------------------------- watching
  def _watch(self) -> _Outcome:
    stop: stopping.StopRequest | None = None
    while True:
      time.sleep(self.o.poll_interval)
      now = time.time()
      self._read_progress(now)   # first: a SIGTERM weighs the steps trained by now
      stop = self._check_signals(now, stop)
      if self._sigterms:   # before the exits: the workers stop on their own then
        preempted = self._check_sigterms(now)
        stop = stop or self._request_stop(preempted, now)
      out = self._check_exits(now, stop and stop.outcome)
      if out is not None:
        return out
      out = self._check_hangs(now)
      if out is not None:
        return out
      if stop is None:
        planned = self._check_capacity(now) or self._check_stragglers(now)
        if planned is not None:
          stop = self._request_stop(planned, now)
      elif stop.overdue(now, proc_lib.latest_checkpoint(self.workdir), self.o.check_every,
                        self.o.stop_timeout, self.o.stop_grace,
                        max((p.last_step for p in self.procs), default=0)):
        return stop.outcome          # workers did not stop by themselves: stop them

  def _request_stop(self, planned: _Outcome, now: float) -> stopping.StopRequest:
    return stopping.request(self.workdir, self.generation, planned, now,
                            max((p.last_step for p in self.procs), default=0))

  def _check_signals(self, now: float,
                     stop: stopping.StopRequest | None) -> stopping.StopRequest | None:
    """SIGINT raises (`run` kills the workers), and so does a SIGTERM while the generation
    has trained nothing past the latest checkpoint (starting, or just saved). Otherwise the
    first SIGTERM (a preemption: Kubernetes and Slurm send it to the launcher, then SIGKILL
    a grace period later) asks the workers to save at their next check step and exit, as
    a re-plan does (a stop already asked for serves); `run` then ends the job (exit 143).
    A second signal exits at once (`signals.stop_now`; the workers die with the launcher).
    Returns the stop request in force."""
    try:
      signals.check()
    except signals.TerminateRequested as e:   # SIGTERM, or SIGHUP taken as it
      checkpoint = proc_lib.latest_checkpoint(self.workdir)
      step = max((p.last_step for p in self.procs), default=0)
      if step <= (checkpoint or 0):
        raise
      name = signals.name(e)
      self._terminated = {"checkpoint": checkpoint, "signal": name}
      self.events.emit("terminate", generation=self.generation, step=step,
                       checkpoint=checkpoint, stop_timeout=self.o.stop_timeout, signal=name,
                       action="checkpoint at the next check step, stop")
      print(f"{name}: the workers save at their next check step (--check_every="
            f"{self.o.check_every}; or the step of an eval in progress or coming before it, "
            f"which stops), then the job stops; at most --stop_timeout="
            f"{self.o.stop_timeout:g} s. Again (or Ctrl-C): stop at once.",
            file=sys.stderr, flush=True)
      if stop is not None:   # a re-plan's: an eval in progress now stops too
        stopping.preempt(self.workdir, self.generation, stop, name)
      return stop or self._request_stop(_Outcome("planned", stopping.terminate_reason(name),
                                                 detected=now), now)
    return stop

  def _check_sigterms(self, now: float) -> _Outcome:
    """Workers that got a SIGTERM from outside (a preempted machine): their slots count as
    lost (until `--rejoin_after` or a capacity rewrite), and the generation saves and stops
    at its next check step (the workers agree on that themselves too), then re-plans."""
    action = (f"checkpoint, stop; the job ends (the launcher got {self._terminated['signal']})"
              if self._terminated else "checkpoint, stop, replan without it")
    for p, r in self._sigterms:
      self.events.emit("sigterm", generation=self.generation, process=p.index, slot=p.slot,
                       step=r.get("at_step"), action=action)
      if not self._terminated:   # the job ends: no slot to plan around
        self.lost[p.slot] = now
    first, self._sigterms = self._sigterms[0][0], []
    return _Outcome("planned", f"worker {first.index} got SIGTERM", detected=now)

  def _read_progress(self, now: float) -> None:
    for p in self.procs:
      records = watching.new_records(self.workdir, p, self.generation)
      for r in records:
        p.last_seen = now
        if "warning" in r:
          self._warn(p.index, str(r["warning"]))
        elif "sigterm" in r:
          self._sigterms.append((p, r))
        elif r.get("phase") not in (None, "initialized", "joining"):   # `report_alive`
          p.working = True
        elif r.get("phase") == "initialized":
          p.initialized = r
          self.events.emit("initialized", generation=self.generation, process=p.index,
                           pid=r.get("pid"), seconds_since_launch=round(r["time"] - p.launched, 3),
                           init_s=r.get("init_s"))
        elif "step" in r:
          if p.first is None:
            p.first = r
            self._on_first_step(p)
          p.last_step = max(p.last_step, int(r["step"]))
      stragglers.feed_records(*self.detectors, (
          dict(r, shard_times_s={f"{p.index}/{k}": v
                                 for k, v in (r.get("shard_times_s") or {}).items()})
          for r in records))

  def _warn(self, process: int, message: str) -> None:
    """A worker's `report_warning`: a `warning` event and the line on stderr, once per job
    (each generation's workers warn again)."""
    if message in self._warnings:
      return
    self._warnings.add(message)
    self.events.emit("warning", generation=self.generation, process=process, message=message)
    print(message, file=sys.stderr, flush=True)

  def _on_first_step(self, p: watching.WorkerProc) -> None:
    if sum(q.first is not None for q in self.procs) == 1:
      step = int(p.first["step"]) - 1
      self.events.emit("restore", generation=self.generation, step=step,
                       checkpoint_at_launch=self._checkpoint_at_launch,
                       fresh=step == 0)
    if all(q.first is not None for q in self.procs) and self._recovery is not None:
      rec, self._recovery = self._recovery, None
      self.events.emit("resume", generation=self.generation,
                       **recovery.resumed(rec, self.procs))

  def _check_exits(self, now: float, planned: _Outcome | None) -> _Outcome | None:
    new = []
    for p in self.procs:
      if p.exited is None and p.popen.poll() is not None:
        p.exited = p.popen.returncode
        new.append(p)
    if not new:
      return None
    self._read_progress(now)   # a SIGTERM told just before these exits (or at them): the
    if self._sigterms:         # workers that voted to stop on it exit 0 below --num_steps
      preempted = self._check_sigterms(now)
      planned = planned or preempted
    failed = [p for p in new if p.exited != 0]
    first_failure = failed and all(q.exited in (0, None) for q in self.procs if q not in new)
    signaled = [p for p in failed if p.exited < 0]
    # Lost: the workers a signal from outside ended (SIGKILL, an OOM kill: several may go
    # at once), else one. Peers of a crashed or killed worker often fail right after it,
    # often within the same poll: jax aborts a process whose collective or coordination
    # peer vanished (SIGABRT). An abort alone is that worker's own crash (one lost).
    killed = [p for p in signaled if p.exited != -signal.SIGABRT]
    lost = killed or sorted(failed, key=lambda p: p.exited == -signal.SIGABRT)[:1]
    message = first_failure and proc_lib.user_error(self.workdir, [p.index for p in failed])
    port_taken = first_failure and any(p.index == 0 and self._port_taken(p) for p in failed)
    if port_taken or (message and not signaled):   # the user's to fix, or a port: no slot lost
      lost = []
    lasts = {}   # process -> its log's last line, of those that failed
    for p in new:
      extra = {}
      if p.exited:
        last = lasts[p.index] = proc_lib.last_line(self.workdir, p.index)
        extra = {"error": proc_lib.exit_error(p.exited, last), "last_log_line": last}
      self.events.emit("worker_exit", generation=self.generation, process=p.index,
                       slot=p.slot, pid=p.popen.pid, returncode=p.exited,
                       signal=proc_lib.signal_name(p.exited),
                       last_step=p.last_step,
                       lost=bool(first_failure and p in lost)
                       or (p.slot in self.lost and not self._terminated), **extra)
    if first_failure:
      if port_taken:
        return _Outcome("port_in_use", f"coordinator port {self._port} in use", detected=now)
      if not lost:
        return _Outcome("user_error", "user error", message=message, detected=now)
      why = proc_lib.describe_exit(lost[0].exited)
      last = lasts[lost[0].index]   # (lost workers are among the new exits)
      reason = f"worker {lost[0].index} exited ({why})"
      return _Outcome("failure", reason, lost=len(lost), detected=now,
                      slots=tuple(p.slot for p in lost),
                      message=f"{reason}: {last}" if last and lost[0].exited > 0
                      else f"worker {lost[0].index} {proc_lib.exit_error(lost[0].exited, '')}")
    if all(p.exited == 0 for p in self.procs):
      if planned is not None and max(p.last_step for p in self.procs) < self.args.num_steps:
        return planned
      return _Outcome("finished", "done", detected=now)
    return None

  def _port_taken(self, p: watching.WorkerProc) -> bool:
    """Whether failed process 0 could not host the coordinator: it says so (exit code
    `EXIT_PORT_IN_USE`), or it died before joining the job (XLA sometimes crashes on a
    taken port) while another process holds the port."""
    return p.exited == worker_lib.EXIT_PORT_IN_USE or (
        p.initialized is None and self.choice is not None and self.choice.processes > 1
        and self._port_held())

  def _port_held(self) -> bool:
    """Whether another socket holds the coordinator's port (one that cannot be bound for
    another reason is not taken: process 0 printed that as its error)."""
    try:
      return proc_lib.port_in_use(self._port)
    except proc_lib.PortUnusable:
      return False

  def _check_hangs(self, now: float) -> _Outcome | None:
    culprits = watching.hung(self.procs, now, self.o.hang_timeout, self.o.startup_timeout)
    if not culprits:
      return None
    for p in culprits:
      self.events.emit("hang", generation=self.generation, process=p.index,
                       slot=p.slot, pid=p.popen.pid,
                       seconds_without_progress=round(now - p.last_seen, 3),
                       last_step=p.last_step, state=proc_lib.state(p.popen.pid))
      proc_lib.send_signal(p.popen, signal.SIGKILL)
    return _Outcome("failure", f"worker {culprits[0].index} hung", lost=len(culprits),
                    detected=now, slots=tuple(p.slot for p in culprits))
