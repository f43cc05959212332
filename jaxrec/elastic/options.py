"""The elastic supervisor's settings: `scripts/launch.py`'s flags of the same names."""

from __future__ import annotations

import dataclasses
import os
import sys

from jaxrec.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Options:
  """Supervisor settings (`scripts/launch.py` flags of the same names)."""

  num_processes: int
  devices_per_process: int
  min_processes: int = 1
  max_restarts: int = 10
  hang_timeout: float = 300.0       # seconds without a step before a worker counts as hung
  startup_timeout: float = 900.0    # seconds from launch to a generation's first step
  capacity_file: str | None = None  # default W/elastic/capacity
  rejoin_after: float = 0.0         # a lost slot returns after this many seconds (0: never)
  straggler_threshold: float = 1.5
  straggler_windows: int = 3
  straggler_window_steps: int = 20
  replan_on_straggler: bool = False
  straggler_cooldown: float = 600.0
  probe_every: int = 0
  check_every: int = 50            # steps between the workers' stop-request checks
  stop_grace: float = 10.0
  stop_timeout: float = 300.0       # a requested stop: wait this long for the checkpoint
  platform: str = "cpu"
  poll_interval: float = 0.1
  inject_delay: str | None = None   # fault injection, PROCESS:SECONDS (tests, benchmarks);
                                    # PROCESS < num_processes
  python: str = sys.executable
  train_script: str = os.path.join(ROOT, "scripts", "train.py")

  def validate(self) -> None:
    for name in ("num_processes", "devices_per_process"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
    if not 1 <= self.min_processes <= self.num_processes:
      raise ConfigError(f"--min_processes must be in [1, --num_processes], got "
                        f"{self.min_processes}")
    for name, low, strict in (("max_restarts", 0, False), ("hang_timeout", 0, True),
                              ("straggler_threshold", 1, True),
                              ("startup_timeout", 0, True), ("stop_timeout", 0, True),
                              ("straggler_windows", 1, False),
                              ("straggler_window_steps", 1, False), ("check_every", 1, False),
                              ("probe_every", 0, False), ("stop_grace", 0, False),
                              ("rejoin_after", 0, False), ("straggler_cooldown", 0, False)):
      v = getattr(self, name)
      if not (v > low if strict else v >= low):   # also NaN
        raise ConfigError(f"--{name} must be {'>' if strict else '>='} {low}, got {v}")
    if self.platform not in ("cpu", "gpu"):
      raise ConfigError(f"--platform must be cpu or gpu, got '{self.platform}'")
    if not os.path.isfile(self.train_script):    # every worker failed: 'below --min_processes'
      raise ConfigError(f"--train_script: {self.train_script} is not a file")
    if self.capacity_file:      # never there, never read: changes written elsewhere are lost
      where = os.path.dirname(os.path.abspath(self.capacity_file))
      if not os.path.isdir(where):
        raise ConfigError(f"--capacity_file: {self.capacity_file}: directory {where} does "
                          "not exist")
    if self.inject_delay:
      proc, _, seconds = self.inject_delay.partition(":")
      try:
        ok = int(proc) >= 0 and 0 <= float(seconds) < 1e6   # inf: time.sleep overflowed
                                                             # in every worker
      except ValueError:
        ok = False
      if not ok:
        raise ConfigError(f"--inject_delay must be PROCESS:SECONDS (e.g. 1:0.5), got "
                          f"'{self.inject_delay}'")
      if int(proc) >= self.num_processes:    # no such worker: it delayed nothing, silently
        raise ConfigError(f"--inject_delay={self.inject_delay}: process {int(proc)} is not one "
                          f"of the job's processes 0 to {self.num_processes - 1} "
                          f"(--num_processes={self.num_processes})")


# scripts/launch.py's own flags: the fields above but two, and --quiet (train_args names one
# given after `--`, where train.py would not know it).
LAUNCH_FLAGS = frozenset({f.name for f in dataclasses.fields(Options)}
                         - {"poll_interval", "python"} | {"quiet"})
