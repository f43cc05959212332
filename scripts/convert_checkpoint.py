r"""Exports, re-targets or imports jaxrec checkpoints.

  .venv/bin/python scripts/convert_checkpoint.py --checkpoint_dir=W/checkpoints [--step=N] \
      --output=PATH --format=npz|zarr|checkpoint [--mesh=data=2,row=2 --plan=rw|PLAN.json \
      [--gin_file=CONFIG.gin]]
  .venv/bin/python scripts/convert_checkpoint.py --torchrec_npz=EBC.npz --output=W/checkpoints \
      --format=checkpoint [--step=0]

npz / zarr: one array per table (`tables/<name>`), per dense parameter (`dense/<path>`) and
per optimizer state leaf (`table_opt/<table>/<name>`, `dense_opt/<path>`), plus `step`,
`rng` and `metadata` (JSON). checkpoint: a verified copy into the checkpoint directory
PATH; with --mesh and --plan it first checks the plan fits that mesh, and that the mesh's
devices divide the batch size (--gin_file's, else the one the checkpoint's run records;
a plan file without --mesh: the mesh it records; any checkpoint restores on any mesh and
plan: tables are stored per table, by name) and prints the stacks a run resuming the
copy lays out, with the sparse optimizers of the config the checkpoint records (or of
--gin_file / --gin_bindings: the resuming run's; one that would not keep the stored
optimizer state is refused). Ctrl-C or SIGTERM stops it between row blocks (files for
checkpoint) and removes the partial output: one line, exit 130 or 143; once it has
printed `wrote ...` the exit status is 0.
"""

import logging as std_logging
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# First, before jax: SIGINT / SIGTERM are recorded and raised between row blocks or files
# (`signals.check()` in `convert`), never inside jax's gc callback or the clean-up.
from jaxrec import signals  # pylint: disable=g-import-not-at-top
signals.defer()

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top

from jaxrec import cli_flags, files, workdir_layout  # pylint: disable=g-import-not-at-top
from jaxrec.checkpoint import convert  # pylint: disable=g-import-not-at-top
from jaxrec.train import early_stop  # pylint: disable=g-import-not-at-top
from jaxrec.errors import ConfigError, JaxrecError  # pylint: disable=g-import-not-at-top

_DIR = flags.DEFINE_string("checkpoint_dir", None, "Checkpoint directory (W/checkpoints), or "
                           "one rejected checkpoint (W/checkpoints/rejected/<step>.<reason>.<ns>).")
_STEP = flags.DEFINE_integer("step", None, "Step to convert; default the latest valid one "
                             "(as a training restore picks it: corrupt ones are skipped with "
                             "a warning). "
                             "With --torchrec_npz: the step to write (default 0).")
_OUTPUT = flags.DEFINE_string("output", None, "Output file (npz), directory (zarr) or "
                              "checkpoint directory (checkpoint).", required=True)
_FORMAT = flags.DEFINE_enum("format", None, list(convert.FORMATS), "Output format.",
                            required=True)
_MESH = flags.DEFINE_string("mesh", None, "Target mesh for --format=checkpoint, e.g. "
                            "data=2,table=2,row=2,col=1.")
_PLAN = flags.DEFINE_string("plan", None, "Target plan for --format=checkpoint: a kind "
                            "(dp, tw, rw, cw, twrw, twcw, grid) or a plan JSON file.")
_RESTART_DATA = flags.DEFINE_bool("restart_data", False, "With --format=checkpoint: the copy "
                                  "keeps the model and its step but not the data position: "
                                  "a run on it reads its --train_data from the start (continue "
                                  "training on new data, e.g. the next day's).")
_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "With --format=checkpoint --plan: the "
                                      "gin files of the run that will resume the copy, for "
                                      "the sparse optimizers of the stacks printed "
                                      "(ExperimentConfig.sparse_optimizer, table_optimizers: "
                                      "tables of different optimizers stack apart); default: "
                                      "the config the checkpoint's run recorded.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after "
                                          "--gin_file (as --gin_file).")
_TORCHREC = flags.DEFINE_string("torchrec_npz", None, "Import this TorchRec "
                                "EmbeddingBagCollection state_dict (npz written by "
                                "third_party/torchrec_export) instead of --checkpoint_dir.")


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's routine messages (every manager opened read-only warns) and its relay
  of a failed save's exception (`future.py`: the error the script's `error:` line then
  gives again); keeps its other errors, and ours."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= std_logging.ERROR and not record.pathname.endswith("future.py")


# Lines before and after a large table's long phases (`jaxrec.phase_log`: a snapshot's CRC
# check, reading, writing and copying arrays of 256 MiB or more), also at the default
# verbosity: a 3e7 x 16 offloaded table's conversion ran 30-37 s without a word.
_PHASE_LOGGERS = ("jaxrec.phase_log", "jaxrec.offload.snapshots")


def run() -> str:
  for flag in ("checkpoint_dir", "output"):   # orbax and zarr go through tensorstore
    if flags.FLAGS[flag].value and (flag == "checkpoint_dir" or _FORMAT.value != "npz"):
      files.check_tensorstore_path(f"--{flag}", flags.FLAGS[flag].value)
  if _TORCHREC.value:
    if _FORMAT.value != "checkpoint":
      raise ConfigError("--torchrec_npz imports into a checkpoint: use --format=checkpoint")
    given = [f"--{f}" for f in ("checkpoint_dir", "mesh", "plan", "restart_data",
                                "gin_file", "gin_bindings") if flags.FLAGS[f].present]
    if given:
      raise ConfigError(f"{', '.join(given)}: not used with --torchrec_npz (it imports the "
                        "npz into --output)")
    step = 0 if _STEP.value is None else _STEP.value
    names = convert.import_torchrec(_TORCHREC.value, _OUTPUT.value, step)
    return (f"imported {len(names)} tables ({', '.join(names)}) as step {step} in "
            f"{_OUTPUT.value}{_resume_hint(_OUTPUT.value)}")
  if not _DIR.value:
    raise ConfigError("--checkpoint_dir is required (or --torchrec_npz to import)")
  if _FORMAT.value != "checkpoint" and (_MESH.value or _PLAN.value):
    raise ConfigError(f"--mesh and --plan apply to --format=checkpoint only, not "
                      f"--format={_FORMAT.value} (exports hold each table whole)")
  if _FORMAT.value != "checkpoint" and (_GIN_FILE.value or _GIN_BINDINGS.value):
    raise ConfigError(f"--gin_file and --gin_bindings apply to --format=checkpoint --plan "
                      f"only, not --format={_FORMAT.value}")
  if _FORMAT.value != "checkpoint" and _RESTART_DATA.value:
    raise ConfigError(f"--restart_data applies to --format=checkpoint only, not "
                      f"--format={_FORMAT.value}")
  if _FORMAT.value == "npz":
    step = convert.export_npz(_DIR.value, _OUTPUT.value, _STEP.value)
  elif _FORMAT.value == "zarr":
    step = convert.export_zarr(_DIR.value, _OUTPUT.value, _STEP.value)
  else:
    mesh = convert.parse_mesh(_MESH.value) if _MESH.value else None
    step, layouts = convert.export_checkpoint(_DIR.value, _OUTPUT.value, _STEP.value, mesh,
                                              _PLAN.value, _RESTART_DATA.value,
                                              _GIN_FILE.value, _GIN_BINDINGS.value)
    if layouts:
      print(layouts)
  note = early_stop.best_step_note(_DIR.value, step) if _STEP.value is None else None
  if note:   # the latest step of an early-stopped run: its best one is beside it
    print(note, file=sys.stderr)
  hint = _resume_hint(_OUTPUT.value, step) if _FORMAT.value == "checkpoint" else ""
  return f"wrote step {step} of {_DIR.value} to {_OUTPUT.value} ({_FORMAT.value}){hint}"


def _resume_hint(output: str, step: int | None = None) -> str:
  """How a run trains from checkpoint directory `output`: `train.py --workdir=W` reads
  `W/checkpoints` only. An import into `X/imported` was followed by `--workdir=X` (as the
  refusal of `--workdir=X/imported` advised), which trained from fresh tables. A copy of
  step `step` with offloaded tables also wrote their snapshots beside `output`: they move
  with it (the hint left them behind, and the run stopped for want of them)."""
  path = os.path.abspath(output)
  if os.path.basename(path) == workdir_layout.CHECKPOINTS_DIR:
    return f"; train.py --workdir={os.path.dirname(output.rstrip('/')) or '.'} resumes from it"
  snapshots = os.path.join(os.path.dirname(output.rstrip("/")), workdir_layout.SNAPSHOTS_DIR)
  also = (f" && mv {snapshots} W/" if step is not None
          and os.path.isdir(os.path.join(snapshots, str(step))) else "")
  return (f"; train.py resumes only from the checkpoints/ of its --workdir: to train from "
          f"this copy, move it there (e.g. mkdir W && mv {output} W/checkpoints{also}) and "
          f"pass --workdir=W")


def main(argv):
  del argv   # cli_flags.parse refuses arguments that are not flags
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_QuietOrbax())
    for name in _PHASE_LOGGERS:
      std_logging.getLogger(name).setLevel(std_logging.INFO)
  # a second signal exits at once, before any clean-up: `*tmp-*` names are never read
  signals.on_second_signal(lambda name: (
      f"error: interrupted again by {name} (exited at once): nothing was written to --output "
      f"{_OUTPUT.value}; temporary files named '*tmp-*' beside or inside it may be left "
      "(every conversion ignores them: remove them when you like)"))
  try:
    print(run())
    late = signals.done()   # written: a signal from here on changes nothing
    if late:
      print(f"note: {late} came after the output was complete; it is kept", file=sys.stderr)
  except JaxrecError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except (KeyboardInterrupt, signals.TerminateRequested) as e:   # partial output removed
    what = "import" if _TORCHREC.value else "conversion"
    print(f"error: interrupted by {signals.name(e)}: the {what} stopped; nothing was written "
          f"to --output {_OUTPUT.value} (its temporary files were removed)", file=sys.stderr)
    sys.exit(signals.exit_code(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli_flags.parse)
