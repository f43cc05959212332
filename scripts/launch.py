#!/usr/bin/env python3
r"""Elastic multi-process training: runs scripts/train.py as N workers and keeps the job
going when workers die or hang, capacity changes, or a worker straggles.

  .venv/bin/python scripts/launch.py --num_processes=2 --devices_per_process=4 [--min_processes=1] \
      [--max_restarts=10] [--hang_timeout=300] -- --workdir=W --gin_file=configs/... \
      [--mesh=data=2,table=2,row=2,col=1] [--plan=auto] [--checkpoint_every=100] ...

Decisions go to W/events.jsonl, worker output to W/workers/<p>.log. Capacity can be changed
while it runs by writing W/elastic/capacity (`N`, `N K` or JSON, see
jaxrec/elastic/supervisor.py). Exit codes: 0 done, 1 user error, 2 below --min_processes,
3 more than --max_restarts failures, 130 on SIGINT (workers killed), 143 on SIGTERM (the
workers first save at their next --check_every step, within --stop_timeout; a second
signal kills them at once); SIGHUP (a closed terminal) is taken as SIGTERM, exit 129,
unless it is ignored (`nohup`).
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# First, before absl and jax: SIGINT / SIGTERM (and SIGHUP, taken as SIGTERM unless ignored)
# are recorded and acted on at the launcher's and the supervisor's `signals.check()`s, never
# inside jax's import or gc callback. (The workers run in sessions of their own: a closed
# terminal's SIGHUP reaches the launcher only.)
from jaxrec import signals  # noqa: E402
signals.defer(signals.STOP_SIGNALS + signals.hangup())

from absl import app, flags  # noqa: E402

# No jax: a Ctrl-C while the supervisor's modules load is reported with these.
from jaxrec import cli_flags, launch  # noqa: E402
from jaxrec.elastic import procs  # noqa: E402

FLAGS = flags.FLAGS
# An unknown launcher flag is most often a train.py flag such as --workdir put before `--`.
UNKNOWN_FLAG_HINT = ("; flags for scripts/train.py go after `--`: launch.py [launcher flags] "
                     "-- --workdir=W --gin_file=...")
flags.DEFINE_integer("num_processes", 1, "Worker processes to start.")
flags.DEFINE_integer("devices_per_process", 1, "Devices per worker (CPU: forced host devices).")
flags.DEFINE_integer("min_processes", 1, "Stop when fewer processes than this are available.")
flags.DEFINE_integer("max_restarts", 10, "Stop after this many restarts caused by failures.")
flags.DEFINE_float("hang_timeout", 300.0, "Seconds without a finished step, eval batch or "
                   "checkpoint save before a worker counts as hung (keep above the longest "
                   "of these).")
flags.DEFINE_float("startup_timeout", 900.0, "Seconds from launch to a generation's first step.")
flags.DEFINE_string("capacity_file", None, "File stating the capacity (`N`, `N K` or JSON); "
                    "default W/elastic/capacity.")
flags.DEFINE_float("rejoin_after", 0.0, "Seconds after which a lost worker slot is offered "
                   "again (0: only when the capacity file says so).")
flags.DEFINE_float("straggler_threshold", 1.5, "Slow: median step time above this many times "
                   "the others' median ...")
flags.DEFINE_integer("straggler_windows", 3, "... in this many consecutive windows ...")
flags.DEFINE_integer("straggler_window_steps", 20, "... of this many steps.")
flags.DEFINE_bool("replan_on_straggler", False, "Re-plan without a straggling process.")
flags.DEFINE_float("straggler_cooldown", 600.0, "Seconds a straggler's slot sits out.")
flags.DEFINE_integer("probe_every", 0, "Steps between per-device timing probes (0: off).")
flags.DEFINE_integer("check_every", 50, "Steps between the workers' stop-request checks "
                     "(one tiny all-gather each).")
flags.DEFINE_float("stop_grace", 10.0, "Seconds between SIGTERM and SIGKILL when stopping; "
                   "after a requested stop's checkpoint appears, the workers get twice this "
                   "to exit by themselves.")
flags.DEFINE_float("stop_timeout", 300.0, "Seconds a requested stop may take: a re-plan's, "
                   "and the save the workers make when the launcher gets SIGTERM (keep it "
                   "under the scheduler's grace before SIGKILL).")
flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "Worker devices: forced host CPU devices "
                  "(gloo collectives) or GPUs (CUDA_VISIBLE_DEVICES slices, NCCL).")
flags.DEFINE_string("inject_delay", None, "Fault injection PROCESS:SECONDS (tests/benchmarks): "
                    "the process on slot PROCESS (process PROCESS of the first generation, "
                    "below --num_processes) spends SECONDS more host time per step, whenever "
                    "a generation uses that slot.")
flags.DEFINE_string("train_script", None, "Worker program (default scripts/train.py); it gets "
                    "the flags after `--` plus --mesh and --plan.")
flags.DEFINE_bool("quiet", False, "Do not echo events to stderr.")


def main(argv):
  # SIGINT / SIGTERM outside the supervisor's loop (which reports its own): importing,
  # loading the config, stopping the workers. It names the checkpoint to resume from, too.
  # A second one exits at once; the workers die with the supervisor (PR_SET_PDEATHSIG).
  signals.on_second_signal(lambda name: "error: " + procs.interrupted_text(
      argv[1:], name, again=True))
  with launch.user_errors(interrupted=lambda name: procs.interrupted_text(argv[1:], name)):
    from jaxrec.elastic import supervisor  # pylint: disable=import-outside-toplevel
    signals.check()
    options = supervisor.Options(
        num_processes=FLAGS.num_processes, devices_per_process=FLAGS.devices_per_process,
        min_processes=FLAGS.min_processes, max_restarts=FLAGS.max_restarts,
        hang_timeout=FLAGS.hang_timeout, startup_timeout=FLAGS.startup_timeout,
        capacity_file=FLAGS.capacity_file, rejoin_after=FLAGS.rejoin_after,
        straggler_threshold=FLAGS.straggler_threshold,
        straggler_windows=FLAGS.straggler_windows,
        straggler_window_steps=FLAGS.straggler_window_steps,
        replan_on_straggler=FLAGS.replan_on_straggler,
        straggler_cooldown=FLAGS.straggler_cooldown, probe_every=FLAGS.probe_every,
        check_every=FLAGS.check_every, stop_grace=FLAGS.stop_grace,
        stop_timeout=FLAGS.stop_timeout, platform=FLAGS.platform,
        inject_delay=FLAGS.inject_delay)
    if FLAGS.train_script:
      options.train_script = FLAGS.train_script
    echo = None if FLAGS.quiet else (
        lambda r: print("event: " + json.dumps(r), file=sys.stderr, flush=True))
    sup = supervisor.Supervisor(options, list(argv[1:]), echo=echo)
    code = sup.run()
  sys.exit(code)


if __name__ == "__main__":
  app.run(main, flags_parser=cli_flags.parser(unknown_hint=UNKNOWN_FLAG_HINT, positional=True))
