"""Where the trainer meets the input pipeline (`jaxrec.data.pipeline`) and checkpoints."""


from __future__ import annotations

import contextlib
import difflib
import logging
import os
from typing import Any

import jax

from jaxrec import gin_usage
from jaxrec.checkpoint.manager import CheckpointManager
from jaxrec.checkpoint.steps import step_dirs

from jaxrec.data import pipeline
from jaxrec.errors import ConfigError, DataError, DataPathError, counted
from jaxrec.train import early_stop
from jaxrec.train.writers import METRICS_FILE
from jaxrec.workdir_layout import checkpoint_dir

log = logging.getLogger("jaxrec")


def train_iterator(config, options) -> pipeline.TrainIterator:
  """This process's endless, resumable train stream (global batch `config.batch_size`)."""
  source = options.train_data or config.train_data
  with _naming_source(options, "train_data", source):
    return pipeline.make_train_iterator(
        source, config.features, config.tables,
        config.batch_size, options.seed, jax.process_index(), jax.process_count(),
        bad_rows=options.bad_rows, num_dense=config.num_dense)


def eval_data(config, options) -> pipeline.EvalData:
  """The fixed eval set: a file source is read whole; synthetic draws
  `config.num_eval_examples` held-out examples."""
  source = options.eval_data or config.eval_data
  with _naming_source(options, "eval_data", source):
    return pipeline.make_eval_batches(
        source, config.features, config.tables,
        config.eval_batch_size, jax.process_index(), jax.process_count(),
        bad_rows=options.bad_rows, synthetic_examples=config.num_eval_examples,
        seed=options.seed, num_dense=config.num_dense, labeled=options.eval_labels)


@contextlib.contextmanager
def _naming_source(options, name: str, source: str):
  """A path that names no file says where it came from, `--train_data` or the config's
  `ExperimentConfig.train_data` (it named only the path, and not which of the two), and
  a misspelled `synthetic` (`synthetc`: read as a file name) is suggested."""
  try:
    yield
  except DataPathError as e:
    where = _given_by(options, name)
    hint = ""
    name_only = not any(c in str(source) for c in "./" + os.sep)
    if name_only and difflib.get_close_matches(str(source).lower(), [pipeline.SYNTHETIC],
                                               cutoff=0.7):
      hint = f" (did you mean '{pipeline.SYNTHETIC}'?)"
    raise DataPathError(f"{where}: {str(e).splitlines()[0]}{hint}") from None


def bad_row_metrics(*sources) -> dict[str, Any]:
  """`{"bad_rows": {path: count}}` when rows were dropped as malformed (`--bad_rows=skip`,
  or when the shards were preprocessed with it), else `{}`. A path both sources name is
  one file (train and eval on one dataset): its larger count, not their sum, which counted
  each row twice; and not the last one's, a count the eval had not reached yet. (Two
  datasets preprocessed from pipes share a name, `/dev/fd/63`: their counts are not added.)"""
  counts: dict[str, int] = {}
  for s in sources:
    for k, v in s.bad_row_counts().items():
      if v:
        counts[k] = max(counts.get(k, 0), v)
  return {"bad_rows": counts} if counts else {}


def bad_row_scalars(**splits) -> dict[str, int]:
  """TensorBoard's `{"bad_rows/<split>": rows dropped}` for sources by split name (`train=`,
  `eval=`): the per-file `bad_rows` mapping is no number, TB showed nothing. {} when none
  dropped any (as `bad_row_metrics`)."""
  counts = {f"bad_rows/{name}": sum(s.bad_row_counts().values()) for name, s in splits.items()}
  return counts if any(counts.values()) else {}


def warn_preprocessed_skips(bad_rows: str, *sources) -> None:
  """Under `--bad_rows=error`, warns once that binary data lost malformed rows when it was
  preprocessed with `--bad_rows=skip`: this run cannot see them, let alone stop on them."""
  counts = bad_row_metrics(*sources).get("bad_rows")
  if bad_rows == "error" and counts:
    log.warning(
        "--bad_rows=error, but the data were preprocessed with --bad_rows=skip: %s dropped "
        "then (%s); they are also in metrics.jsonl ('bad_rows')",
        counted(sum(counts.values()), "malformed row"),
        ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


def passes_lines(num_examples: int | None, source: str, batch_size: int, start: int,
                 num_steps: int, early_stop: bool = False, shuffle: bool = True
                 ) -> tuple[str, str | None]:
  """The start-of-training info line saying how much of the training data (`num_examples`
  of `source`; None: endless, synthetic) this run reads: steps `start`..`num_steps` x the
  global `batch_size`, and over finite data how many passes (epochs) that is (a 100-row
  file trained 5 x 256, 12.8 passes, without a word); and the warning for data smaller than
  one batch (each batch holds examples more than once), else None. Several passes are often
  meant (epochs): said in the info line, with the number."""
  steps = max(num_steps - start, 0)
  read = steps * batch_size
  span = (f"steps {start + 1}-{num_steps}" if start else f"{steps} steps") + (
      ", fewer if early stopping stops it" if early_stop else "")
  if num_examples is None:
    return (f"training data: {source}, endless; this run trains {span}: up to {steps:,} "
            f"x {batch_size:,} = {read:,} examples"), None
  passes = read / num_examples if num_examples else float("inf")
  line = (f"training data: {num_examples:,} examples ({source}); this run trains {span}: "
          f"up to {steps:,} x {batch_size:,} = {read:,} examples, {passes:.3g} "
          f"pass(es) (epochs) over the data")
  if passes > 1:
    line += (" (examples repeat: each pass in a new shuffled order)" if shuffle else
             " (examples repeat, in the same order: shuffle is off)")
  warning = None
  if num_examples < batch_size:
    warning = (f"warning: the training data ({num_examples:,} examples, {source}) is smaller "
               f"than one batch (ExperimentConfig.batch_size = {batch_size:,}): every batch "
               f"holds examples more than once; this run reads it {passes:.3g} times")
  return line, warning


def log_passes(train_it, config, options, start: int) -> None:
  """Logs `passes_lines` of a run that trains, on process 0 (the warning under launch.py
  on the supervisor's stderr too)."""
  if jax.process_index() != 0 or train_it is None or start >= options.num_steps:
    return
  line, warning = passes_lines(train_it.source.num_examples,
                               options.train_data or config.train_data, config.batch_size,
                               start, options.num_steps, bool(options.early_stop_metric),
                               train_it.shuffle)
  log.info("%s", line)
  if warning:
    from jaxrec import elastic  # pylint: disable=import-outside-toplevel
    log.warning("%s", warning)
    elastic.report_warning(warning)


def warn_synthetic_eval(config, options) -> None:
  """Logs `synthetic_eval_warning` or `eval_in_train_warning`, if any, on process 0 (and
  under launch.py on the supervisor's stderr too). Call when the run opens its training
  data: a run that only evaluates said it 'trains on' data it never opened; one whose
  restore falls back below --num_steps opens it late."""
  text = synthetic_eval_warning(config, options) or eval_in_train_warning(config, options)
  if text and jax.process_index() == 0:
    from jaxrec import elastic  # pylint: disable=import-outside-toplevel
    log.warning("%s", text)
    elastic.report_warning(text)


def eval_count_warning(config, options) -> str | None:
  """The warning for a bound `ExperimentConfig.num_eval_examples` that does nothing: it
  sizes a synthetic eval set, and a file eval set is read whole (`= 1000` to shorten the
  eval of a 4,000-example file evaluated all 4,000, without a word); None otherwise."""
  name = "ExperimentConfig.num_eval_examples"
  where = gin_usage.bound_at(name)
  source = options.eval_data or config.eval_data
  if where is None or source == pipeline.SYNTHETIC:
    return None
  return (f"warning: {name} = {config.num_eval_examples} ({where}) has no effect: it sizes "
          f"a synthetic eval set, and the eval data {source} "
          f"({_given_by(options, 'eval_data')}) is read whole")


def warn_eval_count(config, options) -> None:
  """Logs `eval_count_warning`, if any, on process 0."""
  text = eval_count_warning(config, options)
  if text and jax.process_index() == 0:
    log.warning("%s", text)


def synthetic_eval_warning(config, options) -> str | None:
  """The warning for a run that trains on files but evaluates on synthetic examples (every
  shipped config sets `eval_data = 'synthetic'`: `--train_data=day_0.gz` alone scored the
  model on random examples, without a word); None otherwise."""
  train = options.train_data or config.train_data
  if train == pipeline.SYNTHETIC or (options.eval_data or config.eval_data) != pipeline.SYNTHETIC:
    return None
  return (f"warning: this run trains on {train} ({_given_by(options, 'train_data')}) but "
          f"evaluates on synthetic examples ({_given_by(options, 'eval_data')} = "
          f"'{pipeline.SYNTHETIC}'): its eval metrics say nothing about that data; pass "
          "--eval_data (e.g. a held-out day)")


def eval_seed_warning(config, options, meta) -> str | None:
  """The warning for a run that only evaluates a checkpoint on the synthetic eval set with
  another `--seed` than the one that trained it (`meta["seed"]`): that set is drawn from
  the seed (re-evaluated without the training run's `--seed=3`, a checkpoint scored
  other examples: AUC 0.6174 against its eval line's 0.6461, without a word); None
  otherwise."""
  trained = (meta or {}).get("seed")
  if (trained is None or int(trained) == options.seed
      or (options.eval_data or config.eval_data) != pipeline.SYNTHETIC):
    return None
  return (f"warning: --seed={options.seed} draws another synthetic eval set than the "
          f"--seed={trained} that trained this checkpoint and made its eval lines: pass "
          f"--seed={trained} to evaluate the same examples")


def warn_eval_seed(config, options, meta) -> None:
  """Logs `eval_seed_warning`, if any, on process 0 (and under launch.py on the
  supervisor's stderr too)."""
  text = eval_seed_warning(config, options, meta)
  if text and jax.process_index() == 0:
    from jaxrec import elastic  # pylint: disable=import-outside-toplevel
    log.warning("%s", text)
    elastic.report_warning(text)


def eval_in_train_warning(config, options) -> str | None:
  """The warning for an eval set that shares files with the training data (`--eval_data`
  equal to `--train_data`, or a file among its directory's or glob's): its metrics measure
  the fit on examples the model trained on (accepted without a word); None otherwise."""
  train, ev = (options.train_data or config.train_data), (options.eval_data or config.eval_data)
  shared = _data_files(ev) & _data_files(train)
  if not shared:
    return None
  return (f"warning: the eval data {ev} ({_given_by(options, 'eval_data')}) shares "
          f"{len(shared)} file(s) with the training data {train} "
          f"({_given_by(options, 'train_data')}), e.g. {sorted(shared)[0]}: its eval metrics "
          "measure the fit on examples the model trains on, not on held-out ones")


def check_predictions_path(config, options) -> None:
  """Raises `ConfigError` for a `--predictions` file that is one of the eval or training
  data's files or inside the eval data's directory of TSV files: the scores replaced the
  data they scored, or a later run read them as eval data (malformed rows)."""
  if not options.predictions:
    return
  path = os.path.realpath(options.predictions)
  train = options.train_data or config.train_data
  if path in _data_files(train):
    raise ConfigError(f"--predictions={options.predictions} is a file of the training data "
                      f"({_given_by(options, 'train_data')} = {train}): writing the scores "
                      "would replace it; give another file")
  source = options.eval_data or config.eval_data
  files = _data_files(source)
  directory = (os.path.realpath(source) if source != pipeline.SYNTHETIC
               and os.path.isdir(source) else None)
  if directory in files:   # a preprocessed dataset reads its manifest's shards only
    directory = None
  if path in files:
    raise ConfigError(f"--predictions={options.predictions} is a file of the eval data "
                      f"({_given_by(options, 'eval_data')} = {source}): writing the scores "
                      "would replace it; give another file")
  if directory is not None and path.startswith(directory + os.sep):
    raise ConfigError(f"--predictions={options.predictions} is inside the eval data's "
                      f"directory ({_given_by(options, 'eval_data')} = {source}): a later run "
                      "would read the scores as eval data; give a file elsewhere")


def _data_files(path: str) -> set[str]:
  """The real paths of the files (or the preprocessed dataset directory) a data path
  names; empty for `synthetic` and for a path that names nothing (its run reports it)."""
  if path == pipeline.SYNTHETIC:
    return set()
  from jaxrec.data import binary, listing  # pylint: disable=import-outside-toplevel
  if os.path.isdir(path) and binary.is_preprocessed(path):
    return {os.path.realpath(path)}
  try:
    return {os.path.realpath(p) for p in listing.list_files(path, quiet=True)}
  except (DataPathError, DataError, OSError):
    return set()


def _given_by(options, name: str) -> str:
  """Where data source `name` (`train_data`, `eval_data`) came from: its flag, or the
  config's binding."""
  return f"--{name}" if getattr(options, name) else f"ExperimentConfig.{name}"


def newest_saved_step(workdir) -> int | None:
  """The newest committed step directory in `W/checkpoints` (a listing; orbax renames a
  save to its step when it commits), before anything is opened: whether the run only
  evaluates. The restore may still fall back to an older step."""
  return max(step_dirs(checkpoint_dir(workdir)), default=None)


def evaluates_only(workdir, options) -> bool:
  """Whether the run only evaluates: its newest saved step is at or past --num_steps, or
  early stopping stopped there (no training data is opened, no training batch built,
  unless the restore falls back)."""
  saved = newest_saved_step(workdir)
  return saved is not None and (saved >= options.num_steps or early_stop.stopped_by(
      os.path.join(workdir, METRICS_FILE), options, saved))


def checkpointer(workdir, options) -> CheckpointManager:
  """`W/checkpoints`: saves every `--checkpoint_every` steps (and forced at the end)."""
  return CheckpointManager(checkpoint_dir(workdir), max_to_keep=options.keep_checkpoints,
                           save_every=options.checkpoint_every)
