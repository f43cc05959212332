"""Process plumbing of the supervisor: ports, signals, process states, worker logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from jaxrec.elastic import worker as worker_lib


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def latest_checkpoint(workdir: str) -> int | None:
  """Newest committed checkpoint step in `W/checkpoints` (orbax renames finished saves to
  `<step>`), or None."""
  d = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def die_with_parent() -> None:
  """In the child before exec: SIGKILL it when the supervisor dies (Linux)."""
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


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


def describe_exit(code: int) -> str:
  return signal.Signals(-code).name if code < 0 else f"exit code {code}"


def user_error(workdir: str, indices: list[int]) -> str:
  """The `error: ...` line a failed worker printed last in this generation, if any."""
  for i in indices:
    path = os.path.join(workdir, worker_lib.WORKERS_DIR, f"{i}.log")
    try:
      text = open(path, errors="replace").read().rsplit("=== generation", 1)[-1]
    except OSError:
      continue
    lines = [l for l in text.splitlines() if l.startswith("error: ")]
    if lines:
      return f"worker {i}: {lines[-1]}"
  return ""


def last_line(workdir: str, index: int) -> str:
  """Last non-empty line of a worker's log (its error, usually)."""
  path = os.path.join(workdir, worker_lib.WORKERS_DIR, f"{index}.log")
  try:
    with open(path, "rb") as f:
      f.seek(max(os.path.getsize(path) - 4096, 0))
      lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
  except OSError:
    return ""
  return lines[-1][:300] if lines else ""
