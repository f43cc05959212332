"""Process plumbing of the supervisor: ports, signals, process states, worker logs."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
from typing import IO

from jaxrec import workdir_layout
from jaxrec.elastic import worker as worker_lib
from jaxrec.elastic.events import give_up_text
from jaxrec.elastic.train_args import TrainArgs
from jaxrec.errors import ConfigError, JaxrecError


class PortUnusable(JaxrecError):
  """A TCP port cannot be bound for a reason other than another socket holding it (EACCES:
  a privileged port or a sandbox's refusal); the message names the port and the errno."""


def _bind_like_coordinator(port: int, reuse: bool = False) -> socket.socket:
  """A TCP socket bound where the coordination service binds port `port` (0: any): `[::]`
  dual stack, every IPv6 and IPv4 address; `0.0.0.0` where the host has no IPv6. `reuse`:
  SO_REUSEADDR, as the service sets it (a TIME_WAIT port is free). Raises OSError
  (EADDRINUSE: another socket holds the port on some address)."""
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      s = socket.socket(family, socket.SOCK_STREAM)
    except OSError:   # no IPv6 in this kernel
      continue
    try:
      if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
      if reuse:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind((host, port))
      return s
    except OSError as e:
      s.close()
      if e.errno == errno.EADDRINUSE or family == socket.AF_INET:
        raise
  raise OSError(errno.EAFNOSUPPORT, "no TCP socket of IPv6 or IPv4")


def _unusable(port: int, e: OSError) -> PortUnusable:
  what = f"TCP port {port} cannot" if port else "no TCP port can"
  name = errno.errorcode.get(e.errno, f"errno {e.errno}")
  return PortUnusable(f"{what} be bound on [::] or 0.0.0.0 ({name}: {e.strerror})")


def free_port() -> int:
  """A TCP port free now on every address (where the coordinator binds); released again, so
  another process may take it before the coordinator binds it (`port_in_use`, and the
  supervisor's retries). Raises `PortUnusable` when no port can be bound."""
  try:
    with _bind_like_coordinator(0) as s:
      return s.getsockname()[1]
  except OSError as e:
    raise _unusable(0, e) from None


def port_in_use(port: int) -> bool:
  """Whether another socket holds TCP `port` on any address (IPv4 or IPv6: the coordination
  service binds `[::]`, and fails with EADDRINUSE). Raises `PortUnusable` when the port
  cannot be bound for another reason (EACCES...): it is neither free nor taken."""
  try:
    _bind_like_coordinator(port, reuse=True).close()
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      return True
    raise _unusable(port, e) from None
  return False


def latest_checkpoint(workdir: str) -> int | None:
  """Newest committed checkpoint step in `W/checkpoints` (orbax renames finished saves to
  `<step>`), or None."""
  d = os.path.join(workdir, workdir_layout.CHECKPOINTS_DIR)
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def interrupted_text(train_argv: list[str], signal_name: str = "SIGINT",
                     again: bool = False) -> str:
  """What the launcher prints for a signal outside the supervisor's loop (importing,
  loading the config, stopping the workers): the latest checkpoint of the train flags'
  `--workdir`, as the supervisor's `give_up` says it, or that none was saved. `again`: a
  second signal, on which the launcher exits at once (its workers die with it)."""
  try:
    workdir = TrainArgs.parse(train_argv).workdir
  except ConfigError:   # no --workdir: nothing can have been saved
    workdir = None
  if again:
    return checkpoint_text(workdir, f"interrupted again by {signal_name} (exited at once; "
                           "the workers are killed with the launcher)")
  return checkpoint_text(workdir, f"interrupted by {signal_name}")


def checkpoint_text(workdir: str | None, message: str, fix: str | None = None) -> str:
  """`message`, then the latest checkpoint in `workdir` to resume from, or that none was
  saved (just `message. Stopping.` without a workdir); `fix`: what the user must change
  first (`events.give_up_text`)."""
  if not workdir:
    return f"{message}. Stopping."
  return give_up_text(message, latest_checkpoint(workdir),
                      os.path.join(workdir, workdir_layout.CHECKPOINTS_DIR), fix)


def start_worker(argv: list[str], env: dict, log: IO) -> subprocess.Popen:
  """Starts a worker in a session of its own (`send_signal` reaches its process group).

  No preexec_fn: the supervisor has threads (jax), so code between fork and exec could
  deadlock on a lock another thread held. The worker itself asks to die with the
  supervisor (`worker.die_with_supervisor`, from `env[worker.ENV_SUPERVISOR_PID]`).
  """
  return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)


def send_signal(popen: subprocess.Popen, sig) -> None:
  try:
    os.killpg(popen.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def state(pid: int) -> str | None:
  """Linux process state letter (`R`, `S`, `T` stopped, `Z`), None if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except (OSError, IndexError):
    return None


def signal_name(code: int) -> str | None:
  """`SIGKILL` for return code -9 (None for an exit code)."""
  if code >= 0:
    return None
  try:
    return signal.Signals(-code).name
  except ValueError:
    return f"signal {-code}"


def describe_exit(code: int) -> str:
  return signal_name(code) if code < 0 else f"exit code {code}"


GENERATION_BANNER = "=== generation"   # the supervisor's first line of each worker log


def exit_error(code: int, last_log_line: str) -> str:
  """A failed worker's `error`: the signal that killed it (its last log line is whatever
  it printed last, e.g. metrics), else the last log line (its error, usually)."""
  if code < 0:
    return f"killed by {signal_name(code)}"
  return last_log_line or f"exited {code} without output"


# absl's own flag parser (a --train_script program that does not use jaxrec.cli_flags); for
# scripts/train.py a misspelled or ill-typed flag is an `error: ...` line (jaxrec.cli_flags).
_FLAGS_ERROR = "FATAL Flags parsing error: "


def user_error(workdir: str, indices: list[int]) -> str:
  """What the `error: ...` line a failed worker printed last in this generation says
  (train.py's flag errors included: `error: scripts/train.py has no flag --X ...`; absl's
  `FATAL Flags parsing error` of another --train_script as `train flags: ...`), as
  `worker I: ...`; '' if none. (The supervisor prints it after its own `error: `.)"""
  for i in indices:
    path = os.path.join(workdir, worker_lib.WORKERS_DIR, f"{i}.log")
    try:
      text = open(path, errors="replace").read().rsplit(GENERATION_BANNER, 1)[-1]
    except OSError:
      continue
    lines = [l[len("error: "):] if l.startswith("error: ") else
             "train flags: " + l[len(_FLAGS_ERROR):]
             for l in text.splitlines() if l.startswith(("error: ", _FLAGS_ERROR))]
    if lines:
      return f"worker {i}: {lines[-1]}"
  return ""


# What the runtime prints around a worker's end that says nothing of it: gloo's connection
# chatter (a SIGKILLed worker's last line was `[Gloo] Rank 6 is connected to 7 peer ranks`)
# and the module list and frames of Python's fault handler after `Fatal Python error: ...`.
_NOISE = ("[Gloo]", "Extension modules:", "  File ", "Current thread ", "Thread 0x",
          "Stack (most recent call first)", "  <no Python frame>")


def last_line(workdir: str, index: int) -> str:
  """Last non-empty line of a worker's log (its error, usually) in this generation, the
  runtime's chatter (`_NOISE`) passed over; '' if it printed none (the supervisor's
  `=== generation` banner was taken for its error)."""
  path = os.path.join(workdir, worker_lib.WORKERS_DIR, f"{index}.log")
  try:
    with open(path, "rb") as f:
      f.seek(max(os.path.getsize(path) - 16384, 0))
      lines = [l for l in f.read().decode(errors="replace").splitlines()
               if l.strip() and not l.startswith(_NOISE)]
  except OSError:
    return ""
  last = lines[-1] if lines else ""
  return "" if last.startswith(GENERATION_BANNER) else last[:300]
