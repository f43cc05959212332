"""Preprocesses Criteo TSV into binary shards that training reads with random access.

  .venv/bin/python scripts/preprocess.py --input=day_0.gz --output=/data/criteo_bin --rows=100000
  .venv/bin/python scripts/preprocess.py --input='/data/tsv/*' --output=DIR --gin_file=configs/x.gin

`--rows` gives the table sizes (one value for all 26 tables, or 26 comma-separated values)
and `--max_len` the bag sizes of multi-hot features (same forms; default 1); features are
named f0..f25 reading tables t0..t25. With `--gin_file` the features come from the
config's `ExperimentConfig.embedding` instead (or its `uniform_tables` bindings if that is
unbound), `--num_categorical` defaults to its `open_source.num_categorical` (else the
feature count; another count than that is an error), `--num_dense` to its
`ExperimentConfig.num_dense`, `--dense_transform` to its `open_source.dense_transform`
(else `log`), `--id_format` to its `open_source.id_format` (else `hex`), `--vocab` to its
`open_source.vocab` (else none: ids `% rows`); `--rows`/`--max_len` are then refused. The
dense transform, id format and vocabulary are recorded in the manifest: training must be
configured with the same ones. Errors print one line
and exit 1. Ctrl-C or SIGTERM stops it (exit 130 or 143) between chunks (at once while it
waits for input), removing the shards written so far.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# First, before absl and jax: SIGINT / SIGTERM are recorded and raised between chunks
# (`signals.check()` in `binary_write.write`), never inside jax's gc callback or the clean-up.
from jaxrec import signals  # noqa: E402
signals.defer()

from absl import app, flags  # noqa: E402

from jaxrec import script_errors  # noqa: E402
from jaxrec.errors import JaxrecError, counted  # noqa: E402

flags.DEFINE_string("input", None, "TSV file, directory of files, or glob (plain or gzip).")
flags.DEFINE_string("output", None, "Output directory (must not hold a dataset yet).")
flags.DEFINE_string("rows", None, "Table rows: one int for all tables or a comma list.")
flags.DEFINE_string("max_len", "1", "Bag size per feature: one int or a comma list.")
flags.DEFINE_integer("num_categorical", 26, "Categorical columns per line (with --gin_file: "
                     "its open_source.num_categorical, else its feature count, unless given).")
flags.DEFINE_integer("num_dense", 13, "Dense columns per line (with --gin_file: the config's "
                     "ExperimentConfig.num_dense unless given).")
flags.DEFINE_string("dense_transform", "log", "Dense values: 'log' (raw integer counts, "
                    "stored as log(1 + max(x, 0))) or 'none' (floats, stored as written); "
                    "with --gin_file: its open_source.dense_transform unless given.")
flags.DEFINE_string("id_format", "hex", "Categorical ids: 'hex' (Criteo's, int(id, 16) % rows) "
                    "or 'decimal' (ids written in decimal, int(id) % rows); with --gin_file: "
                    "its open_source.id_format unless given.")
flags.DEFINE_string("vocab", None, "Id vocabulary (a directory scripts/build_vocab.py wrote): "
                    "ids are stored as their vocabulary rows (kept id -> 1..V, others 0); "
                    "with --gin_file: its open_source.vocab unless given.")
flags.DEFINE_multi_string("gin_file", [], "Gin config(s) binding `uniform_tables`.")
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings.")
flags.DEFINE_enum("bad_rows", "error", ["error", "skip"], "Malformed rows: stop or skip.")
flags.DEFINE_integer("shard_examples", 1 << 22, "Examples per shard file.")
FLAGS = flags.FLAGS


def _int_list(flag: str, value: str, n: int) -> list[int]:
  from jaxrec.errors import ConfigError
  try:
    vals = [int(v) for v in value.split(",")]
  except ValueError:
    raise ConfigError(f"--{flag}: expected an int or a comma list of ints, got '{value}'") \
        from None
  if any(v <= 0 for v in vals):
    raise ConfigError(f"--{flag}: values must be positive integers, got '{value}'")
  if any(v >= 2**31 for v in vals):   # named only "table 't0'", not the flag
    raise ConfigError(f"--{flag}: values must be below 2**31, got '{value}'")
  if len(vals) == 1:
    vals = vals * n
  if len(vals) != n:
    raise ConfigError(f"--{flag}: {len(vals)} values given, {n} categorical columns")
  return vals


def _specs():
  from jaxrec import launch
  from jaxrec.embedding import specs
  from jaxrec.errors import ConfigError
  from jaxrec.train.config import check_embedding
  n = FLAGS.num_categorical
  if FLAGS.gin_file or FLAGS.gin_bindings:
    given = [f"--{f}" for f in ("rows", "max_len") if FLAGS[f].present]
    if given:
      source = "--gin_file" if FLAGS.gin_file else "--gin_bindings"   # not --gin_file, when
      raise ConfigError(f"{' and '.join(given)}: the tables come from {source} here; give "
                        "one or the other")                  # only bindings were given
    launch.parse_gin(FLAGS.gin_file, FLAGS.gin_bindings)   # a misspelled binding is an error
    emb = launch.bound_value("ExperimentConfig.embedding")   # what the training run reads
    if emb is None:   # a file binding only uniform_tables
      return launch.build(specs.uniform_tables)
    check_embedding(emb)
    specs.validate(*emb)
    return emb
  if n <= 0:
    raise ConfigError(f"--num_categorical must be positive, got {n}")
  if not FLAGS.rows:
    raise ConfigError("give the table sizes: --rows=N (or N1,...,N26) or --gin_file")
  return specs.uniform_tables(n, _int_list("rows", FLAGS.rows, n), dim=1,
                              max_len=_int_list("max_len", FLAGS.max_len, n))


def _column_count(flag: str, selector: str, default: int) -> tuple[int, str]:
  """A TSV column count and where it came from: `--flag` when given (or without gin), else
  gin's `selector` binding, what training reads from that TSV (it was ignored: data of that
  config failed on every row's column count), else `default`."""
  from jaxrec import launch
  from jaxrec.embedding.specs import whole
  if FLAGS[flag].present or not (FLAGS.gin_file or FLAGS.gin_bindings):
    return whole(FLAGS[flag].value, f"--{flag}", minimum=0), f"--{flag}"
  value = launch.bound_value(selector)
  if value is None:   # not bound
    return default, "default"
  return whole(value, selector, minimum=0), selector


def _columns_from(dense_from: str) -> str:
  """Where the expected column counts came from, for a wrong count's error (`tsv.Parser`):
  without a gin file the flags (it named `uniform_tables.num_tables` for a
  `--num_categorical` given on the command line)."""
  from jaxrec.data import tsv
  if FLAGS.gin_file or FLAGS.gin_bindings:
    return tsv.FEATURES_FROM
  given = "given" if FLAGS["num_categorical"].present else "default"
  dense = "given" if dense_from == "--num_dense" and FLAGS["num_dense"].present else "default"
  return (f"--num_categorical={{n}} ({given}) sets the categorical columns and "
          f"--num_dense={{nd}} ({dense}) the integer ones")


def _num_categorical(features) -> int:
  """`--num_categorical` > `open_source.num_categorical` > the config's feature count; one
  that is not the feature count is an error naming it (training refuses that TSV too)."""
  from jaxrec.errors import ConfigError
  n, where = _column_count("num_categorical", "open_source.num_categorical", len(features))
  if n != len(features):
    raise ConfigError(f"{where}={n}: the TSV data has {n} categorical columns but "
                      f"{len(features)} sparse features are configured; make them agree")
  return n


def _read_as(flag: str) -> str:
  """`--flag` (`dense_transform`, `id_format`) > gin's `open_source.<flag>` (what
  training reads that TSV with, and is checked against the manifest's) > the flag's
  default; an unknown name is an error naming where it came from."""
  from jaxrec import launch
  from jaxrec.data import source
  if FLAGS[flag].present or not (FLAGS.gin_file or FLAGS.gin_bindings):
    return source.check_read_as(flag, FLAGS[flag].value, f"--{flag}")
  value = launch.bound_value(f"open_source.{flag}")
  if value is None:   # not bound
    return FLAGS[flag].default
  return source.check_read_as(flag, value, f"open_source.{flag}")


def _vocab() -> str | None:
  """`--vocab` > gin's `open_source.vocab` (what training reads that TSV through) > none."""
  from jaxrec import launch
  if FLAGS["vocab"].present or not (FLAGS.gin_file or FLAGS.gin_bindings):
    return FLAGS.vocab or None
  return launch.bound_value("open_source.vocab") or None


def _check_paths() -> None:
  """The output directory must not be the one holding input files (it would become a
  dataset directory, its TSV files unread)."""
  from jaxrec.data import binary, tsv
  from jaxrec.errors import ConfigError, DataPathError
  try:   # a missing path says which flag gave it
    inputs = tsv.list_files(FLAGS.input, quiet=True)   # preprocess() warns of skipped ones
  except DataPathError as e:
    datasets = sorted(n for n in (os.listdir(FLAGS.input) if os.path.isdir(FLAGS.input) else [])
                      if binary.is_preprocessed(os.path.join(FLAGS.input, n)))
    if datasets:   # list_files' advice, 'give one of them', is for training
      raise ConfigError(f"--input {FLAGS.input} holds preprocessed datasets, not TSV files "
                        f"({', '.join(datasets[:3])}): train on one directly "
                        f"(--train_data={os.path.join(FLAGS.input, datasets[0])})") from None
    raise DataPathError(f"--input: {e}") from None
  if binary.is_preprocessed(FLAGS.input):   # its manifest.json was parsed as TSV
    raise ConfigError(f"--input {FLAGS.input} is a preprocessed dataset ({binary.MANIFEST}), "
                      "not TSV: train on it directly (--train_data)")
  output = os.path.realpath(FLAGS.output)
  for path in inputs:   # the directory of the file or of the link naming it (links to TSV
    if output in (os.path.dirname(os.path.realpath(path)),   # files elsewhere: the shards
                  os.path.realpath(os.path.dirname(path))):  # went among the links)
      raise ConfigError(f"--output {FLAGS.output} holds the --input file {path}; write the "
                        "shards to another directory")


def _preprocess() -> dict:
  """Checks the flags and writes the dataset; returns its manifest."""
  from jaxrec.data import binary_write  # pylint: disable=import-outside-toplevel
  if not FLAGS.input or not FLAGS.output:
    raise JaxrecError("--input and --output are required")
  if FLAGS.shard_examples <= 0:
    raise JaxrecError(f"--shard_examples must be positive, got {FLAGS.shard_examples}")
  _check_paths()
  tables, features = _specs()
  num_dense, dense_from = _column_count("num_dense", "ExperimentConfig.num_dense",
                                        FLAGS["num_dense"].default)
  return binary_write.preprocess(
      FLAGS.input, FLAGS.output, features, tables, FLAGS.bad_rows, num_dense=num_dense,
      num_categorical=_num_categorical(features), shard_examples=FLAGS.shard_examples,
      columns_from=_columns_from(dense_from), dense_transform=_read_as("dense_transform"),
      id_format=_read_as("id_format"), vocab=_vocab())


def main(argv):
  del argv   # cli_flags.parse refuses arguments that are not flags
  # a second signal exits at once, before `discard`: the next run into --output (no
  # manifest there) removes those shards, then writes its own and a manifest
  signals.on_second_signal(lambda name: (
      f"interrupted again ({script_errors.signal_word(name)}, exited at once): no "
      f"dataset written to {FLAGS.output} (the shards written so far are left, without a "
      "manifest; the next run into it removes them)"))
  m = script_errors.run(_preprocess, f"no dataset written to {FLAGS.output} (the shards "
                        "written so far were removed)")   # Ctrl-C was a traceback, SIGTERM
  # left shards without a manifest in --output
  skipped = sum(m["bad_rows"].values())
  print(f"wrote {counted(m['num_examples'], 'example')} in {counted(len(m['shards']), 'shard')} "
        f"to {FLAGS.output}" + (f" ({counted(skipped, 'malformed row')} skipped)"
                                if skipped else ""))


if __name__ == "__main__":
  from jaxrec import cli_flags
  app.run(main, flags_parser=cli_flags.parse)
