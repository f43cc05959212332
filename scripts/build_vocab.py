r"""Builds an id vocabulary from training TSV: ids seen at least --min_count times get rows of
their own, every other id one shared out-of-vocabulary row (NVTabular's freq_threshold).

  .venv/bin/python scripts/build_vocab.py --input='/data/tsv/day_*' --output=/data/vocab \
      --min_count=3 --gin_file=configs/dlrm_criteo.gin
  .venv/bin/python scripts/train.py --gin_file=configs/dlrm_criteo.gin \
      --gin_file=/data/vocab/vocab.gin --train_data='/data/tsv/day_*' ...

The vocabulary is per table (features sharing a table share it). Columns and bag sizes
come from --gin_file (its `ExperimentConfig.embedding` or `uniform_tables`, its
`open_source.num_categorical`, `.dense_transform`, `.id_format` and
`ExperimentConfig.num_dense`), or without one from --num_categorical, --num_dense and
--max_len (tables t0..tN-1); a flag given wins. --max_size keeps each table's most
frequent ids (ties to the smaller id). It writes --output whole or not at all: per-table
sorted ids and counts, vocab.json (inputs, sizes, a fingerprint) and vocab.gin, the
bindings a run adds (`open_source.vocab` and, for `uniform_tables`, the tables' rows:
vocabulary size + 1; a config listing its own tables gets them as comments).
Errors print one line and exit 1; Ctrl-C or SIGTERM stops it (exit 130 or 143) and leaves
no --output.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# First, before absl and jax: SIGINT / SIGTERM are recorded and raised between chunks
# (`signals.check()` in `vocab_build.count`), never inside the clean-up.
from jaxrec import signals  # noqa: E402
signals.defer()

from absl import app, flags  # noqa: E402

flags.DEFINE_string("input", None, "TSV file, directory of files, or glob (plain or gzip).")
flags.DEFINE_string("output", None, "Vocabulary directory to write (must not exist, or be "
                    "empty).")
flags.DEFINE_integer("min_count", 1, "Keep ids seen at least this many times (>= 1).")
flags.DEFINE_integer("max_size", None, "Keep at most this many ids per table (the most "
                     "frequent; ties to the smaller id).")
flags.DEFINE_string("max_len", "1", "Bag size per feature without --gin_file: one int or a "
                    "comma list.")
flags.DEFINE_integer("num_categorical", 26, "Categorical columns per line (with --gin_file: "
                     "its open_source.num_categorical, else its feature count, unless given).")
flags.DEFINE_integer("num_dense", 13, "Dense columns per line (with --gin_file: its "
                     "ExperimentConfig.num_dense unless given).")
flags.DEFINE_string("dense_transform", "log", "Dense values: 'log' (integer counts) or "
                    "'none' (floats): which rows are well-formed; with --gin_file: its "
                    "open_source.dense_transform unless given.")
flags.DEFINE_string("id_format", "hex", "Categorical ids: 'hex' or 'decimal'; with "
                    "--gin_file: its open_source.id_format unless given.")
flags.DEFINE_multi_string("gin_file", [], "Gin config(s) of the training run.")
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings.")
flags.DEFINE_enum("bad_rows", "error", ["error", "skip"], "Malformed rows: stop or skip.")
FLAGS = flags.FLAGS


def _gin() -> bool:
  return bool(FLAGS.gin_file or FLAGS.gin_bindings)


def _setting(flag: str, selector: str, default):
  """`--flag` when given (or without gin), else gin's `selector`, else `default`."""
  from jaxrec import launch
  if FLAGS[flag].present or not _gin():
    return FLAGS[flag].value, f"--{flag}"
  value = launch.bound_value(selector)
  return (default, "default") if value is None else (value, selector)


_configured_rows = {}   # table -> rows of a configuration listing its own tables


def _features():
  """(features, the `uniform_tables` prefix of their tables or None: another embedding)."""
  import gin
  from jaxrec import launch
  from jaxrec.embedding import specs
  from jaxrec.errors import ConfigError
  from jaxrec.train.config import check_embedding
  if _gin():
    if FLAGS["max_len"].present:
      raise ConfigError("--max_len: the features come from --gin_file here; give one or the "
                        "other")
    launch.parse_gin(FLAGS.gin_file, FLAGS.gin_bindings)
    emb = launch.bound_value("ExperimentConfig.embedding")
    prefix = launch.bound_value("uniform_tables.prefix", "t")
    if emb is None:   # a file binding only uniform_tables
      return launch.build(specs.uniform_tables)[1], prefix
    check_embedding(emb)
    specs.validate(*emb)
    ref = gin.query_parameter("ExperimentConfig.embedding")   # `@uniform_tables()`: its
    uniform = getattr(ref, "scoped_selector", None) == "uniform_tables"   # rows are bound
    _configured_rows.update({t.name: t.rows for t in emb[0]})
    return emb[1], prefix if uniform else None
  n = specs.whole(FLAGS.num_categorical, "--num_categorical")
  try:
    lens = [int(v) for v in FLAGS.max_len.split(",")]
  except ValueError:
    raise ConfigError(f"--max_len: expected an int or a comma list of ints, got "
                      f"'{FLAGS.max_len}'") from None
  if len(lens) not in (1, n) or min(lens) <= 0:
    raise ConfigError(f"--max_len: one positive int or {n} of them, got '{FLAGS.max_len}'")
  return specs.uniform_tables(n, 1, dim=1, max_len=lens if len(lens) > 1 else lens[0])[1], "t"


def build() -> dict:
  from jaxrec.data import source, tsv, vocab_build
  from jaxrec.embedding.specs import whole
  from jaxrec.errors import ConfigError, DataPathError
  if not FLAGS.input or not FLAGS.output:
    raise ConfigError("--input and --output are required")
  vocab_build.check_min_count(FLAGS.min_count, FLAGS.max_size)
  vocab_build.check_output(FLAGS.output)   # before reading the input (and at the write)
  features, prefix = _features()
  n, where = _setting("num_categorical", "open_source.num_categorical", len(features))
  if whole(n, where) != len(features):
    raise ConfigError(f"{where}={n}: the TSV data has {n} categorical columns but "
                      f"{len(features)} sparse features are configured; make them agree")
  num_dense, where = _setting("num_dense", "ExperimentConfig.num_dense", source.NUM_DENSE)
  num_dense = whole(num_dense, where, minimum=0)
  read_as = {}
  for field in source.READ_AS:
    value, where = _setting(field, f"open_source.{field}", FLAGS[field].default)
    read_as[field] = source.check_read_as(field, value, where)
  layout = source.make_layout(features, {f.table: 1 for f in features},
                              num_dense, **read_as)
  try:   # a missing path names its flag
    files = tsv.list_files(FLAGS.input)
  except DataPathError as e:
    raise DataPathError(f"--input: {e}") from None
  counts, skipped = vocab_build.count(files, layout, FLAGS.bad_rows)
  info = {**read_as, "bad_rows": {os.path.abspath(k): v for k, v in skipped.items() if v},
          "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)}
                     for p in files]}
  signals.check()
  m = vocab_build.write(FLAGS.output, counts, FLAGS.min_count, FLAGS.max_size, info, prefix)
  if prefix is None:   # vocab.gin binds no rows: the configured ones, to warn of
    m = {**m, "binds_rows": False, "tables": [
        {**t, "configured_rows": _configured_rows.get(t["name"], t["rows"])}
        for t in m["tables"]]}
  return m


def main(argv):
  del argv
  from jaxrec import script_errors
  from jaxrec.errors import counted, some
  signals.on_second_signal(lambda name: (
      f"interrupted again ({script_errors.signal_word(name)}, exited at once): no vocabulary "
      f"written to {FLAGS.output}"))
  m = script_errors.run(build, f"no vocabulary written to {FLAGS.output}")
  for t in m["tables"]:
    print(f"table '{t['name']}': {counted(t['size'], 'id')} kept of {t['distinct']:,} "
          f"distinct ({t['kept_occurrences']:,} of {t['occurrences']:,} occurrences): rows "
          f"{t['rows']:,}")
  empty = [t["name"] for t in m["tables"] if not t["size"]]
  if empty:   # every id of such a table reads row 0, one row trained by every example
    print(f"warning: table {some(empty, 4)} keeps no id (none seen --min_count="
          f"{m['min_count']} times or more): every id of it reads the out-of-vocabulary "
          "row 0", file=sys.stderr)
  gin_path = os.path.join(os.path.abspath(FLAGS.output), "vocab.gin")
  if m.get("binds_rows", True):
    print(f"wrote {FLAGS.output} (min_count {m['min_count']}); train with "
          f"--gin_file={gin_path} (binds open_source.vocab and the rows)")
    return
  small = [f"'{t['name']}' ({t['configured_rows']:,} rows, needs {t['rows']:,})"
           for t in m["tables"] if t.get("configured_rows", t["rows"]) < t["rows"]]
  print(f"wrote {FLAGS.output} (min_count {m['min_count']}); train with "
        f"--gin_file={gin_path} (binds open_source.vocab only: this configuration lists its "
        "own tables; give each table at least the rows above)")
  if small:
    print(f"warning: configured with too few rows: table {some(small, 4, quote=False)}",
          file=sys.stderr)


if __name__ == "__main__":
  from jaxrec import cli_flags
  app.run(main, flags_parser=cli_flags.parse)
