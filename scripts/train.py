#!/usr/bin/env python3
r"""Train a jaxrec model: parses flags, reads gin configs, calls the trainer.

  .venv/bin/python scripts/train.py --workdir=runs/dlrm --gin_file=configs/dlrm_synthetic.gin \
      [--gin_bindings=ExperimentConfig.batch_size=1024] [--mesh=data=2,table=2,row=2,col=1] \
      [--plan=auto|dp|tw|rw|cw|twrw|twcw|grid] [--num_steps=N] ...

Running the same command again on the same workdir resumes from its latest checkpoint.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# First, before absl and jax: SIGINT / SIGTERM are recorded and acted on at `signals.check()`
# below, never inside jax's import or gc callback, until the process exits: the trainer's
# SIGTERM handling (`termination`) takes over from this deferral and hands back to it, so
# no SIGTERM meets the default action (a silent death). A worker of scripts/launch.py
# reports a SIGTERM to its supervisor instead, which has the generation save and stop
# (`jaxrec.elastic.worker.report_sigterm`; a second one ends it at once).
# Not in a process that imports this file as `__mp_main__` (a grain data worker, started
# with multiprocessing's spawn): there it exited at once as a worker whose supervisor was
# gone (its parent is the trainer), and the trainer waited for its first batch forever.
from jaxrec import elastic, signals  # noqa: E402
if __name__ == "__main__":
  signals.defer(signals.STOP_SIGNALS[:1] if elastic.is_supervised()
                else signals.STOP_SIGNALS + signals.hangup())   # SIGHUP: as SIGTERM
  if elastic.is_supervised():   # its SIGTERM while starting (imports, joining) is reported too
    from jaxrec.elastic import worker as _elastic_worker  # noqa: E402
    _elastic_worker.report_sigterm()   # (again after jax.distributed's own handler)
elif __name__ == "__mp_main__":   # the data worker holds Ctrl-C while it starts; the trainer
  signals.defer(signals.STOP_SIGNALS)   # stops it (then `pipeline._exit_with_parent`)

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from jaxrec.elastic import procs  # noqa: E402  (no jax; the signal lines use it)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints, config).")
flags.DEFINE_multi_string("gin_file", [], "Gin config file(s), applied in order.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after the files.")
flags.DEFINE_string("mesh", "auto", "Mesh axis sizes, e.g. data=2,table=2,row=2,col=1, or auto "
                    "(a --plan file's recorded mesh, or the closest to it that takes the plan "
                    "(recording none: the first mesh from data=N on that takes it); "
                    "resuming with --plan=auto, the checkpoint's mesh and plan when the device "
                    "count matches; else all on data or the forced kind's axis; for --plan=auto, "
                    "when the tables do not fit all on data, the fastest priced mesh that "
                    "splits them).")
flags.DEFINE_string("plan", "auto", "auto (planner), one kind for every table "
                    "(dp|tw|rw|cw|twrw|twcw|grid), or a plan JSON file (a run's plan.json, "
                    "scripts/plan.py --json output).")
flags.DEFINE_string("train_data", None, "synthetic, a Criteo TSV file/dir/glob (plain or gzip) "
                    "or a preprocessed dir; default ExperimentConfig.train_data.")
flags.DEFINE_string("eval_data", None, "As --train_data; default ExperimentConfig.eval_data.")
flags.DEFINE_integer("num_steps", 1000, "Total training steps (a resumed run counts from 0).")
flags.DEFINE_integer("log_every", 100, "Steps between metrics lines.")
flags.DEFINE_integer("eval_every", 0, "Steps between evaluations (0: only at the end).")
flags.DEFINE_integer("checkpoint_every", 0, "Steps between checkpoints (0: only at the end).")
flags.DEFINE_integer("keep_checkpoints", 3, "How many recent checkpoints to keep.")
flags.DEFINE_integer("seed", 0, "Seed for initialisation, data order and the synthetic eval "
                     "set, in [0, 2**32).")
flags.DEFINE_enum("on_nan", "stop", ["stop", "rollback"], "What to do on a non-finite loss.")
flags.DEFINE_enum("bad_rows", "error", ["error", "skip"], "Malformed input rows: stop or skip.")
flags.DEFINE_string("memory_per_device", None, "Device memory budget for the planner, e.g. "
                    "512MiB; default 16GiB (with --plan=auto on the CPU devices of one "
                    "process: the host's share, which a log line gives).")
flags.DEFINE_string("predictions", None, "Write the final eval's per-example scores here, in "
                    "the eval data's order: .npz (arrays label, score, logit), else "
                    "tab-separated text (.gz: compressed). With --num_steps at or below "
                    "the checkpoint's step: scores --eval_data with a trained model.")
flags.DEFINE_bool("eval_labels", True, "The eval data's lines start with a label. "
                  "--noeval_labels: TSV files without the label column (Criteo's test.txt), "
                  "scored only: the eval writes --predictions and no metrics.")
flags.DEFINE_string("early_stop_metric", "", "Stop when this eval metric (eval_auc, "
                    "eval_logloss, eval_ne, eval_recall_at_<k>, eval_mrr) has not improved for "
                    "--early_stop_patience evals, keeping the best step's checkpoint; needs "
                    "--eval_every > 0. Empty: off.")
flags.DEFINE_integer("early_stop_patience", 3, "Evals without improvement before an early stop.")
flags.DEFINE_float("early_stop_min_delta", 0.0, "Least change of --early_stop_metric that "
                   "counts as an improvement.")
flags.DEFINE_bool("progress", True, "Show a progress bar when stderr is a terminal.")
flags.DEFINE_string("compilation_cache", None, "Directory of jax's persistent compilation "
                    "cache (a restart skips compiling), or 'none'; default "
                    "$JAX_COMPILATION_CACHE_DIR, else $JAXREC_CACHE_DIR/xla, else "
                    "${XDG_CACHE_HOME:-~/.cache}/jaxrec/xla, at most 1 GiB (least recently used "
                    "dropped first).")


def _second_signal_text(name: str) -> str:
  """A second signal exits at once: a checkpoint save in flight is dropped (never
  committed), so the latest one on disk is where the same command resumes."""
  workdir = FLAGS.workdir if FLAGS.is_parsed() else None
  return "error: " + procs.checkpoint_text(workdir, f"interrupted again by {name} (exited at "
                                           "once)")


if __name__ == "__main__":
  signals.on_second_signal(_second_signal_text)


def main(argv):
  # Library chatter (orbax, jax) at WARNING; jaxrec's own progress lines at INFO.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxrec").setLevel(logging.INFO)
  del argv   # cli_flags.parse refuses arguments that are not flags
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  launch.quiet_orbax_tracebacks()   # a failed save is one `error:` line, not two tracebacks
  with launch.user_errors(interrupted=lambda name: procs.checkpoint_text(
      FLAGS.workdir, f"interrupted by {name}")):
    from jaxrec import compile_cache  # pylint: disable=import-outside-toplevel
    compile_cache.enable(FLAGS.compilation_cache)   # before anything compiles
    elastic.initialize_from_env()  # a worker of scripts/launch.py joins its job; else no-op
    signals.check()
    from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
    if not FLAGS.workdir:
      raise ConfigError("--workdir is required")
    if not FLAGS.gin_file:
      raise ConfigError("--gin_file is required (e.g. configs/dlrm_synthetic.gin)")
    from jaxrec.train import (config as config_lib, loop,  # pylint: disable=import-outside-toplevel
                              workdir_checks)
    options = config_lib.RunOptions(
        num_steps=FLAGS.num_steps, mesh=FLAGS.mesh, plan=FLAGS.plan,
        train_data=FLAGS.train_data, eval_data=FLAGS.eval_data, log_every=FLAGS.log_every,
        eval_every=FLAGS.eval_every, checkpoint_every=FLAGS.checkpoint_every,
        keep_checkpoints=FLAGS.keep_checkpoints, seed=FLAGS.seed, on_nan=FLAGS.on_nan,
        bad_rows=FLAGS.bad_rows,
        memory_per_device=config_lib.parse_bytes(FLAGS.memory_per_device, "--memory_per_device"),
        progress=FLAGS.progress, predictions=FLAGS.predictions,
        eval_labels=FLAGS.eval_labels,
        early_stop_metric=FLAGS.early_stop_metric or None,
        early_stop_patience=FLAGS.early_stop_patience,
        early_stop_min_delta=FLAGS.early_stop_min_delta)
    options.validate()
    given = [f"--{n}={FLAGS[n].value}" for n in ("early_stop_patience", "early_stop_min_delta")
             if FLAGS[n].present]
    if given and not options.early_stop_metric:   # the run trained to the end without a word
      raise ConfigError(f"{' '.join(given)} without --early_stop_metric, which turns early "
                        "stopping on: add --early_stop_metric=eval_auc (or eval_logloss, ...) "
                        "or leave out the flag")
    workdir_checks.check_workdir(FLAGS.workdir)
    # --train_data/--eval_data as bindings too: W/config.gin names the data the run used
    launch.parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, overrides={
        f"ExperimentConfig.{name}": getattr(FLAGS, name)
        for name in config_lib.DATA_FIELDS if getattr(FLAGS, name)})
    config_lib.absolute_data_paths()   # W/config.gin holds them absolute
    config = launch.build(config_lib.ExperimentConfig)
    signals.check()
    # The trainer: SIGTERM recorded until its first step, then after a checkpoint (its own
    # handler, `termination`); Ctrl-C stays recorded and is raised between steps (a
    # KeyboardInterrupt inside the first compile was lost in a gc callback, or segfaulted
    # at exit).
    result = loop.train_and_evaluate(config, options, FLAGS.workdir)
    signals.check()   # one after the last step's check: the run still says it stopped
    summary = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in result.items())
    print(f"done: {summary}\nresults in {os.path.abspath(FLAGS.workdir)} "
          f"({', '.join(workdir_checks.outputs(FLAGS.workdir))})")
    # Complete: a signal from here on exits 0 (a Ctrl-C in the ~0.7 s teardown exited 130
    # or by the signal, and a wrapper reran the finished run)
    late = signals.done()
    if late:
      print(f"note: {late} came after the run was complete; it is kept", file=sys.stderr)


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  from jaxrec import cli_flags  # noqa: E402  pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli_flags.parse)
