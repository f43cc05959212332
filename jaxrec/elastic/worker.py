"""The worker side of elastic training: joining the job, reporting progress, stopping.

The supervisor (`jaxrec.elastic.supervisor`) starts each worker with these variables;
without them every function here is a no-op (a plain single-process run):

  JAXREC_COORDINATOR_ADDRESS  host:port of the coordination service (process 0 hosts it)
  JAXREC_NUM_PROCESSES        processes in this generation
  JAXREC_PROCESS_ID           this process's index
  JAXREC_ELASTIC_SLOT         the capacity slot it runs on (on GPUs its devices); the
                              process index when unset
  JAXREC_ELASTIC_WORKDIR      the run's workdir (progress files, stop requests)
  JAXREC_ELASTIC_GENERATION   restart counter of the job (0, 1, ...)
  JAXREC_ELASTIC_PLATFORM     cpu (collectives over gloo) or gpu (NCCL)
  JAXREC_ELASTIC_CHECK_EVERY  steps between stop-request checks (default 50)
  JAXREC_ELASTIC_PROBE_EVERY  steps between per-device timing probes (0: never)
  JAXREC_ELASTIC_INJECT_DELAY fault injection for tests and benchmarks, `SLOT:SECONDS`:
                              the process on that slot (as a slow machine would) spends
                              SECONDS more host time per step
  JAXREC_ELASTIC_SUPERVISOR_PID  the supervisor's pid: the worker dies with it
                              (`die_with_supervisor`)

Progress goes to `W/workers/<process>.jsonl` (past `JAXREC_ELASTIC_PROGRESS_BYTES`, 64 MiB
by default, the file moves to `<process>.jsonl.1`, replacing the one before, and a new one
starts: a long job keeps at most twice that per process), one line per step:

  {"time": ..., "generation": 1, "process": 0, "step": 41, "step_time_s": 0.021,
   "host_time_s": 0.004, "shard_times_s": {"device:0": 0.0011, ...}}

plus a `{"phase": "joining"}` line as a worker of several starts joining the runtime (a
worker that never writes it is the one the others wait for there), one
`{"phase": "initialized", ...}` line when the worker joined the runtime, a
`{"phase": "eval"|"save", ...}` line now and then while it evaluates or saves
(`report_alive`) and a `{"warning": "warning: ..."}` line per `report_warning`. The
supervisor reads them for hang and straggler detection, the restart breakdown and the
warnings it prints.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time
from typing import Mapping

from jaxrec import jsonl

ENV_COORDINATOR = "JAXREC_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXREC_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXREC_PROCESS_ID"
ENV_WORKDIR = "JAXREC_ELASTIC_WORKDIR"
ENV_GENERATION = "JAXREC_ELASTIC_GENERATION"
ENV_PLATFORM = "JAXREC_ELASTIC_PLATFORM"
ENV_CHECK_EVERY = "JAXREC_ELASTIC_CHECK_EVERY"
ENV_PROBE_EVERY = "JAXREC_ELASTIC_PROBE_EVERY"
ENV_INJECT_DELAY = "JAXREC_ELASTIC_INJECT_DELAY"
ENV_SLOT = "JAXREC_ELASTIC_SLOT"
ENV_SUPERVISOR_PID = "JAXREC_ELASTIC_SUPERVISOR_PID"
ENV_PROGRESS_BYTES = "JAXREC_ELASTIC_PROGRESS_BYTES"
# A progress file is rotated past this size: at ~120 bytes a step, 500 steps a second wrote
# ~5 GB a day per process, kept for the whole job.
PROGRESS_BYTES = 64 << 20
PR_SET_PDEATHSIG = 1
# Process 0 could not host the coordination service: its port was taken after the
# supervisor picked it (`procs.free_port`); the supervisor starts the workers again on
# another port. XLA's words for it (jax 0.10) when gRPC finds the address in use:
EXIT_PORT_IN_USE = 75
_RPC_SERVER_FAILED = "Failed to start RPC server"

# In a stop file (`stop_path`): the stop is a preemption's (the launcher's SIGTERM), for
# which an eval in progress stops too (`stop_eval`).
PREEMPTION = "preemption"
WORKERS_DIR = "workers"
CONTROL_DIR = "elastic"
LAUNCH_LOCK = os.path.join(CONTROL_DIR, "launch.lock")   # one supervisor per workdir


def check_not_launched(workdir: str) -> None:
  """A run outside scripts/launch.py (`is_supervised` false) is refused on a workdir a
  launcher runs a job in: between the job's generations no worker holds the workdir's lock
  (a bare train.py took it, resumed the job's checkpoint with its own config and trained
  on in its workdir, and the launcher stopped on the lock as a user error)."""
  from jaxrec import files   # pylint: disable=import-outside-toplevel
  files.check_unlocked(workdir, LAUNCH_LOCK, "a job of scripts/launch.py")


def progress_path(workdir: str, process: int) -> str:
  return os.path.join(workdir, WORKERS_DIR, f"{int(process)}.jsonl")


def rotated_path(path: str) -> str:
  """Where a full progress file moves (`_Worker.write`)."""
  return path + ".1"


def stop_path(workdir: str, generation: int) -> str:
  """File whose existence asks generation `generation` to checkpoint and stop."""
  return os.path.join(workdir, CONTROL_DIR, f"stop.{int(generation)}")


class _Worker:
  """Per-process state, read once from the environment."""

  def __init__(self, env: Mapping[str, str]):
    self.supervised = ENV_GENERATION in env
    self.generation = int(env.get(ENV_GENERATION, 0))
    self.process = int(env.get(ENV_PROCESS_ID, 0))
    self.slot = int(env.get(ENV_SLOT, self.process))
    self.num_processes = int(env.get(ENV_NUM_PROCESSES, 1))
    self.workdir = env.get(ENV_WORKDIR)
    self.check_every = max(int(env.get(ENV_CHECK_EVERY, 50)), 1)
    self.probe_every = int(env.get(ENV_PROBE_EVERY, 0))
    self.delay = 0.0
    spec = env.get(ENV_INJECT_DELAY, "")
    if spec:
      slot, _, seconds = spec.partition(":")
      if int(slot) == self.slot:
        self.delay = float(seconds)
    self._file = None
    self._file_lock = threading.Lock()   # a warning may come from another thread
    self.progress_bytes = max(int(env.get(ENV_PROGRESS_BYTES, PROGRESS_BYTES)), 1)
    self._carry = 0.0      # injected host time, charged to the next step
    self.alive_at = float("-inf")   # when `report_alive` last wrote
    self.sigterm_at: float | None = None   # a SIGTERM from outside (`_on_sigterm`)
    self.sigterm_reported = False
    self.report_at_exit = False            # `_report_at_exit` registered

  def write(self, workdir: str, record: dict) -> None:
    """Appends `record` to this process's progress file; rotates the file once it holds
    `progress_bytes` (`rotated_path`: the supervisor reads the rest of it there)."""
    record = {"time": round(time.time(), 4), "generation": self.generation,
              "process": self.process, **record}
    path = progress_path(workdir, self.process)
    with self._file_lock:
      if self._file is None:
        self._file = _open_progress(path)
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
      if self._file.tell() >= self.progress_bytes:
        self._file.close()
        self._file = None
        os.replace(path, rotated_path(path))


def _open_progress(path: str):
  """Opens a progress file to append; a last line a killed writer left without its newline
  is ended first, or this process's first record would be glued onto it (and both skipped
  by every line reader). Not truncated: the supervisor's read offsets count its bytes."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  jsonl.repair_tail(path, drop_torn=False)
  return open(path, "a")


_WORKER: _Worker | None = None


def _worker() -> _Worker:
  global _WORKER
  if _WORKER is None:
    die_with_supervisor(os.environ)     # the first use of this module in a worker
    _WORKER = _Worker(os.environ)
  return _WORKER


def die_with_supervisor(env: Mapping[str, str]) -> None:
  """Has Linux SIGKILL this process when the supervisor dies (PR_SET_PDEATHSIG), and exits
  at once if it already died: the parent is no longer `env[ENV_SUPERVISOR_PID]`.

  The worker does it itself, early (the supervisor has threads: no preexec_fn). A no-op
  without the variable (a plain run), off Linux or without prctl.
  """
  pid = env.get(ENV_SUPERVISOR_PID)
  if not pid or not sys.platform.startswith("linux"):
    return
  import multiprocessing  # pylint: disable=import-outside-toplevel
  if multiprocessing.parent_process() is not None:   # a process the worker started (grain's
    return   # data workers): its parent is the worker, and it ends with it
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
      return
  except (OSError, AttributeError):
    return
  if os.getppid() != int(pid):   # it died before the prctl: the signal will not come
    sys.exit(f"error: the elastic supervisor (pid {pid}) is gone (this worker's parent "
             f"is now pid {os.getppid()}); exiting")


def is_supervised() -> bool:
  """True when this process was started by the elastic supervisor."""
  return _worker().supervised


def got_sigterm() -> bool:
  """True once this worker has recorded a SIGTERM from outside (`_on_sigterm`)."""
  return _worker().sigterm_at is not None


def preempted() -> str:
  """The launcher's signal (`SIGTERM`, `SIGHUP`) when the supervisor asks this generation
  to stop because the launcher got it (the job is being preempted, not re-planned): the
  trainer says so in its log and `metrics.jsonl`. "" otherwise and outside the
  supervisor."""
  w = _worker()
  return _preempting(w.workdir, w.generation) if w.supervised and w.workdir else ""


def initialize_from_env() -> bool:
  """Joins the multi-process job the supervisor described in the environment.

  Call first, before any use of jax (scripts/train.py does): the worker first arranges
  to die with the supervisor (`die_with_supervisor`), then sets gloo CPU collectives on
  CPU and calls `jax.distributed.initialize`. Process 0 exits with `EXIT_PORT_IN_USE` when
  the coordinator's port is taken (the supervisor retries on another). Returns True when
  it initialised a job of more than one process; False (and does nothing) without the
  variables.
  """
  w = _worker()
  if not w.supervised:
    return False
  t0 = time.time()
  import jax  # pylint: disable=import-outside-toplevel
  multi = bool(os.environ.get(ENV_COORDINATOR)) and w.num_processes > 1
  if multi:
    if os.environ.get(ENV_PLATFORM, "cpu") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = os.environ[ENV_COORDINATOR]
    from jaxrec.elastic import procs  # pylint: disable=import-outside-toplevel
    # checked first: XLA's failure to bind sometimes ends in a segfault, not an error
    if w.process == 0 and _port_taken(procs, address):
      _port_in_use(address, "taken before the coordination service started")
    if w.workdir:   # the others wait in initialize for a worker that never gets here
      w.write(w.workdir, {"phase": "joining", "pid": os.getpid()})
    try:
      jax.distributed.initialize(coordinator_address=address,
                                 num_processes=w.num_processes, process_id=w.process)
    except Exception as e:  # jax raises JaxRuntimeError with XLA's status text
      if w.process != 0 or _RPC_SERVER_FAILED not in str(e):
        raise
      _port_in_use(address, str(e).splitlines()[0])
  if os.environ.get(ENV_PLATFORM) == "gpu" and jax.default_backend() != "gpu":
    from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
    # (the supervisor leaves JAX_PLATFORMS unset for GPU workers: jax fell back to the CPU
    # and trained there without a word, or failed on a --mesh the user had not given)
    raise ConfigError(f"--platform=gpu: worker {w.process} finds no GPU (jax's backend is "
                      f"'{jax.default_backend()}'): install jax with its CUDA extra "
                      "(jax[cuda12]) on a machine with GPUs, or launch with --platform=cpu")
  # after jax.distributed.initialize, whose preemption notifier took SIGTERM and swallowed
  # it (with one process the default action killed the worker, with no checkpoint)
  report_sigterm()
  if w.workdir:
    w.write(w.workdir, {"phase": "initialized", "pid": os.getpid(),
                        "init_s": round(time.time() - t0, 4)})
  return multi


def report_sigterm() -> None:
  """From now on a SIGTERM is recorded and reported (`_on_sigterm`), not the end of this
  worker; `initialize_from_env` calls it. A no-op off the main thread."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not _worker().report_at_exit:
      _worker().report_at_exit = True
      atexit.register(_report_at_exit)


def _on_sigterm(signum, frame) -> None:
  """A SIGTERM from outside (a preempted machine): recorded; `report_progress` tells the
  supervisor, which counts this slot as lost, and the generation saves a checkpoint at
  its next check step and stops, as for a capacity change. A second one acts at once."""
  del frame
  w = _worker()
  if w.sigterm_at is not None:
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
  w.sigterm_at = time.time()


def _port_taken(procs, address: str) -> bool:
  """`procs.port_in_use` of the coordinator's port; a port that cannot be bound for another
  reason (EACCES) is the user's to fix: one `error:` line (the supervisor gives up with it)
  and exit 1, where XLA's bind would fail or crash later."""
  try:
    return procs.port_in_use(int(address.rpartition(":")[2]))
  except procs.PortUnusable as e:
    print(f"error: coordinator address {address}: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def _port_in_use(address: str, detail: str) -> None:
  """Process 0's exit when it cannot host the coordination service on `address`."""
  print(f"coordinator address {address} is in use ({detail}); the supervisor retries on "
        "another port", file=sys.stderr, flush=True)
  sys.exit(EXIT_PORT_IN_USE)


def report_warning(message: str) -> bool:
  """Hands a one-line warning for the user (e.g. `gin_usage.warning`) to the supervisor,
  which prints it on its stderr once per job (the worker's own log is a file); False, and
  nothing written, in a plain run."""
  w = _worker()
  if not (w.supervised and w.workdir):
    return False
  w.write(w.workdir, {"warning": message})
  return True


ALIVE_EVERY_S = 2.0   # `report_alive`: at most one record per this many seconds


def report_alive(phase: str, **fields) -> bool:
  """Tells the supervisor this process is working between steps (`phase`: `eval`, `save`,
  ...): it counts as progress for hang detection, which otherwise sees only steps and
  would kill a worker whose evaluation outlasts `--hang_timeout`. Call it per unit of work
  (an eval batch), never from a timer thread: a worker stuck inside the work must stop
  reporting. At most one record per `ALIVE_EVERY_S` seconds; False, and nothing written,
  when none was due or in a plain run."""
  if "step" in fields:   # the supervisor would read the record as a finished step
    raise ValueError("report_alive: a `step` field is report_progress's")
  w = _worker()
  now = time.monotonic()
  if not (w.supervised and w.workdir) or now - w.alive_at < ALIVE_EVERY_S:
    return False
  w.alive_at = now
  w.write(w.workdir, {"phase": str(phase), **fields})
  return True


def report_progress(workdir: str, step: int, step_time_s: float,
                    host_time_s: float | None = None,
                    shard_times_s: Mapping[str, float] | None = None) -> bool:
  """Records that this process finished `step`; returns True when the job must stop.

  Call on every process after every train step (same `step` everywhere). A True return
  (the same on every process) means: the supervisor asked this generation to stop for a
  re-plan; save a checkpoint of `step` and leave the loop. A no-op returning False
  outside the supervisor.

  Args:
    workdir: the run's workdir.
    step: the global step just completed (1-based, as the checkpoint would name it).
    step_time_s: wall seconds of the step (the same on every process of a synchronous job).
    host_time_s: seconds this process spent on its own host work for the step (input,
      checks, transfer; not dispatch, where a fast process waits for the slow ones).
      Straggler detection compares it between processes; default `step_time_s`.
    shard_times_s: optional per-shard seconds (e.g. per device); default: the probe's
      per-device timings every `JAXREC_ELASTIC_PROBE_EVERY` steps.
  """
  w = _worker()
  if not w.supervised:
    return False
  host = float(step_time_s if host_time_s is None else host_time_s) + w._carry
  record = {"step": int(step), "step_time_s": round(float(step_time_s) + w._carry, 6),
            "host_time_s": round(host, 6)}
  if shard_times_s is None and w.probe_every > 0 and step % w.probe_every == 0:
    shard_times_s = probe_local_devices()
  if shard_times_s:
    record["shard_times_s"] = {str(k): round(float(v), 6) for k, v in shard_times_s.items()}
  w.write(workdir, record)
  term = w.sigterm_at is not None   # read once: the record is written before the vote below
  if term:
    _write_sigterm(w, workdir, int(step))
  w._carry = 0.0
  if w.delay > 0:            # fault injection: this process is slow on the host
    time.sleep(w.delay)
    w._carry = w.delay
  if step % w.check_every:
    return False
  return _agree(os.path.exists(stop_path(workdir, w.generation)) or term)


def stop_eval(step: int, batch: int) -> bool:
  """Before eval batch `batch` (1, 2, ...) of step `step`, the same on every process:
  True, on every process, when the job is being preempted: this worker got a SIGTERM, or
  the supervisor asks this generation to stop because it got one (`PREEMPTION` in the stop
  file). The trainer then stops the eval and saves the step (the next generation or run
  evaluates it first): the eval would otherwise run to its end and the workers on to their
  next check step, past `--stop_timeout`, and be killed unsaved. Checked before every batch
  in a job of one process, every `check_every` batches from the first (one all-gather) in
  several. A no-op returning False outside the supervisor."""
  w = _worker()
  if not (w.supervised and w.workdir):
    return False
  if w.num_processes > 1 and (batch - 1) % w.check_every:
    return False
  term = w.sigterm_at is not None
  if term:
    _write_sigterm(w, w.workdir, int(step))
  return _agree(term or bool(_preempting(w.workdir, w.generation)))


def _preempting(workdir: str, generation: int) -> str:
  """The launcher's signal when generation `generation`'s stop file asks for the stop of
  a preemption, "" for a re-plan's (which lets an eval end). A file being written reads
  as not (yet)."""
  try:
    with open(stop_path(workdir, generation)) as f:
      signal_name = json.loads(f.read()).get(PREEMPTION)
  except (OSError, ValueError, AttributeError):
    return ""
  return signal_name if isinstance(signal_name, str) else "SIGTERM" if signal_name else ""


def _write_sigterm(w: _Worker, workdir: str, step: int | None) -> None:
  """The `{"sigterm": ...}` record of a recorded SIGTERM, once."""
  if w.sigterm_at is not None and not w.sigterm_reported:
    w.sigterm_reported = True
    w.write(workdir, {"sigterm": round(w.sigterm_at, 4), "at_step": step})


def _report_at_exit() -> None:
  """A SIGTERM that came after the last step's report (during the stop's save, the final
  eval) is still told before the worker exits: its slot must not be used again."""
  w = _worker()
  if w.supervised and w.workdir:
    _write_sigterm(w, w.workdir, None)


def _agree(flag: bool) -> bool:
  """True on every process when any process saw `flag` (one tiny all-gather)."""
  if _worker().num_processes <= 1:
    return flag
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


_PROBE = {}


def probe_local_devices(size: int = 256, repeats: int = 5) -> dict[str, float]:
  """Seconds of a small matmul on each local device: `{"device:<id>": seconds}`.

  First waits for every local device's queue (so it measures the devices, not the work
  queued on them), then takes each device's best of `repeats` runs, round-robin.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if "fn" not in _PROBE:
    _PROBE["fn"] = jax.jit(lambda x: (x @ x).sum())
  fn, devices = _PROBE["fn"], jax.local_devices()
  xs = []
  for d in devices:
    if (d.id, size) not in _PROBE:
      _PROBE[d.id, size] = jax.device_put(jnp.ones((size, size), jnp.float32), d)
    xs.append(_PROBE[d.id, size])
  jax.block_until_ready([fn(x) for x in xs])     # drain every queue, compile once
  best = [float("inf")] * len(xs)
  for _ in range(repeats):
    for i, x in enumerate(xs):
      t0 = time.perf_counter()
      fn(x).block_until_ready()
      best[i] = min(best[i], time.perf_counter() - t0)
  return {f"device:{d.id}": t for d, t in zip(devices, best)}
