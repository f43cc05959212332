"""Input pipeline throughput: synthetic, TSV parsing, preprocessed binary shards.

  .venv/bin/python benchmarks/input_pipeline.py [--trainer_examples_per_sec=X |
                                                 --trainer_metrics=W/metrics.jsonl]

Prints one JSON line per result (`"benchmark": "input_pipeline"`). TSV parsing is timed
three times on the same examples: integer counts and hex ids (`"dense_transform": "log"`,
`"id_format": "hex"`), dense values written as floats (`%.9g`, `"none"`), ids written in
decimal (`%d`, `"id_format": "decimal"`); `--dense_transform` picks the file preprocessed
and read from binary shards. The `binary` line holds
`"ratio"` = binary examples/sec / trainer examples/sec with `"goal": 5` (the input
pipeline must outrun the trainer 5x); the trainer rate comes from the flag, from the
median `examples_per_sec` of a trainer's metrics.jsonl, or else is measured here by running
scripts/train.py on configs/dlrm_criteo.gin for `--trainer_steps` steps.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from common import check_at_least, emit as emit_line, interruptible, own_dir, scratch_dir
from jaxrec import cli_flags  # noqa: E402
from jaxrec.data import binary_write, pipeline, synthetic, tsv
from jaxrec.data.source import make_layout
from jaxrec.embedding.specs import uniform_tables

flags.DEFINE_float("trainer_examples_per_sec", None, "Trainer throughput to compare with.")
flags.DEFINE_string("trainer_metrics", None, "metrics.jsonl to read the trainer rate from.")
flags.DEFINE_integer("trainer_steps", 120, "Steps of the dlrm_criteo trainer run that measures "
                     "the trainer rate when neither flag above gives it (0: no ratio).")
flags.DEFINE_integer("examples", 200_000, "Examples in the TSV / binary data.")
flags.DEFINE_integer("batch_size", 512, "Global batch size.")
flags.DEFINE_integer("rows", 100_000, "Rows of each of the 26 tables.")
flags.DEFINE_integer("batches", 400, "Batches per iterator measurement.")
flags.DEFINE_integer("num_threads", 2, "grain threads.")
flags.DEFINE_integer("prefetch", 4, "Batches prefetched.")
flags.DEFINE_enum("dense_transform", "log", ["log", "none"], "The TSV file preprocessed for "
                  "the preprocess and binary lines: integer counts (log) or floats (none).")
flags.DEFINE_string("workdir", None, "Scratch directory: new, empty or of an earlier run of "
                    "this benchmark (emptied first) (default: a temp dir, removed).")
FLAGS = flags.FLAGS


MARKER = ".input_pipeline_benchmark"   # in --workdir: this benchmark's (may be emptied)


def emit(**kw):
  emit_line("input_pipeline", **kw)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure_trainer(work: str) -> str:
  """Runs scripts/train.py on configs/dlrm_criteo.gin (synthetic data); its metrics.jsonl."""
  w = os.path.abspath(os.path.join(work, "trainer"))   # the trainer runs in the repository
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--workdir={w}",
         "--gin_file=configs/dlrm_criteo.gin", "--plan=dp", "--noprogress",
         f"--num_steps={FLAGS.trainer_steps}", f"--log_every={max(FLAGS.trainer_steps // 4, 1)}",
         "--gin_bindings=ExperimentConfig.num_eval_examples=4096"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    last = proc.stderr.strip().splitlines()[-1:]   # was printed as a Python list
    sys.exit(f"error: the trainer run failed: {last[0] if last else f'exit {proc.returncode}'}")
  return os.path.join(w, "metrics.jsonl")


def trainer_rate(work: str) -> tuple[float | None, str]:
  """(trainer examples/sec, where it came from)."""
  if FLAGS.trainer_examples_per_sec is not None:
    return FLAGS.trainer_examples_per_sec, "flag"
  if FLAGS.trainer_metrics:
    return metrics_rate(FLAGS.trainer_metrics, "--trainer_metrics: "), "metrics"
  if FLAGS.trainer_steps <= 0:
    return None, "none"
  return (metrics_rate(measure_trainer(work)),
          f"dlrm_criteo.gin, {FLAGS.trainer_steps} steps, measured here")


def metrics_rate(path: str, flag: str = "") -> float:
  """The median `examples_per_sec` of a trainer's `metrics.jsonl` at `path`; exits with an
  error (after `flag`, when the file was a flag's) when it holds none."""
  rates = []
  with open(path) as f:
    for line in f:
      try:
        v = json.loads(line).get("examples_per_sec")
      except (json.JSONDecodeError, AttributeError):   # not JSON, or not an object
        continue
      if isinstance(v, (int, float)) and v > 0:
        rates.append(float(v))
  if not rates:
    sys.exit(f"error: {flag}{path}: no examples_per_sec values (a trainer's metrics.jsonl?)")
  return float(np.median(rates))


def write_examples(path: str, block: bytes, n_block: int, n: int) -> None:
  """`n` lines into `path`: `block` (`n_block` lines) repeated, then the lines it needs."""
  whole, rest = divmod(n, n_block)   # --examples exactly (was rounded up to a multiple of
  with open(path, "wb") as f:        # the 20,000-line block)
    for _ in range(whole):
      f.write(block)
    if rest:
      f.write(b"".join(block.splitlines(keepends=True)[:rest]))


def iterator_rate(it) -> float:
  for _ in range(5):  # warm up threads and page cache
    next(it)
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(it)
  rate = FLAGS.batches * it.local_batch_size / (time.perf_counter() - start)
  it.close()
  return rate


def _check_flags() -> None:
  """One-line error naming the flag, before any work (a missing --trainer_metrics was a
  FileNotFoundError after all the measurements; --batch_size=0 a gin traceback)."""
  values, error = FLAGS.flag_values_dict(), lambda m: sys.exit(f"error: {m}")
  check_at_least(error, values, ("examples", "batch_size", "rows", "batches"))
  check_at_least(error, values, ("num_threads", "prefetch", "trainer_steps"), low=0)  # 0: no
  rate = FLAGS.trainer_examples_per_sec                                     # ratio (--help)
  if rate is not None and not rate > 0:   # -5 gave a negative ratio, 0 measured anyway
    sys.exit(f"error: --trainer_examples_per_sec must be positive, got {rate}")
  if FLAGS.trainer_metrics and not os.path.isfile(FLAGS.trainer_metrics):
    sys.exit(f"error: --trainer_metrics: no file {FLAGS.trainer_metrics!r}")
  if FLAGS.trainer_metrics:   # one without rates failed after every other measurement
    metrics_rate(FLAGS.trainer_metrics, "--trainer_metrics: ")
  if FLAGS.workdir is not None:   # a file, no parent or its own output: a traceback later
    # an earlier run's outputs go, not its trainer/ when --trainer_metrics (often its
    # trainer/metrics.jsonl) stands in for the trainer run
    own_dir(error, "workdir", FLAGS.workdir, MARKER, ("train.tsv", "block.tsv", "bin",
                                                      "floats.tsv", "floats_block.tsv") + (
        () if FLAGS.trainer_metrics or FLAGS.trainer_examples_per_sec else ("trainer",)))


def main(argv):
  del argv
  _check_flags()
  tables, features = uniform_tables(26, FLAGS.rows)
  kw = dict(num_threads=FLAGS.num_threads, prefetch=FLAGS.prefetch)
  common = dict(batch_size=FLAGS.batch_size, threads=FLAGS.num_threads,
                prefetch=FLAGS.prefetch, cpus=os.cpu_count())

  it = pipeline.make_train_iterator("synthetic", features, tables, FLAGS.batch_size, **kw)
  emit(source="synthetic", examples_per_sec=round(iterator_rate(it)), **common)

  with scratch_dir(FLAGS.workdir, "jaxrec_bench_") as work:   # a temp dir: gone on any exit
    rows = {t.name: t.rows for t in tables}
    layouts = {d: make_layout(features, rows, dense_transform=d) for d in ("log", "none")}
    layouts["decimal"] = make_layout(features, rows, id_format="decimal")   # (log)
    n_block = min(20_000, FLAGS.examples)
    blocks = {}
    for key, name in (("log", "block.tsv"), ("none", "floats_block.tsv"),
                      ("decimal", "decimal_block.tsv")):
      block = os.path.join(work, name)   # the same examples: counts, floats (`%.9g`), or
      synthetic.write_tsv(block, synthetic.SyntheticSource(layouts[key], seed=0),  # counts
                          n_block)                                  # with ids written `%d`
      blocks[key] = open(block, "rb").read()
    n = FLAGS.examples
    paths = {"log": os.path.join(work, "train.tsv"), "none": os.path.join(work, "floats.tsv"),
             "decimal": os.path.join(work, "decimal.tsv")}
    for key, path in paths.items():
      write_examples(path, blocks[key], n_block, n)
      size = os.path.getsize(path)
      start = time.perf_counter()
      src = tsv.read_tsv([path], layouts[key])
      dt = time.perf_counter() - start
      assert src.num_examples == n
      del src
      emit(source="tsv_parse", dense_transform=layouts[key].dense_transform,
           id_format=layouts[key].id_format, examples_per_sec=round(n / dt),
           mb_per_sec=round(size / dt / 1e6, 1), examples=n)

    out = os.path.join(work, "bin")
    start = time.perf_counter()
    binary_write.write([paths[FLAGS.dense_transform]], out, layouts[FLAGS.dense_transform])
    emit(source="preprocess", dense_transform=FLAGS.dense_transform,
         examples_per_sec=round(n / (time.perf_counter() - start)), examples=n)

    it = pipeline.TrainIterator(pipeline.open_source(
        out, features, tables, dense_transform=FLAGS.dense_transform), FLAGS.batch_size, **kw)
    rate = iterator_rate(it)
    trainer, origin = trainer_rate(work)
    line = dict(source="binary", examples_per_sec=round(rate), shuffle=True, **common)
    if trainer:
      line.update(trainer_examples_per_sec=round(trainer), trainer_rate_from=origin,
                  ratio=round(rate / trainer, 2))
    else:
      line.update(ratio=None, note="--trainer_steps=0 and no trainer rate given")
    emit(**line, goal=5, goal_op=">=")


if __name__ == "__main__":
  # --help exits 0, a flag error is one line, Ctrl-C one line (exit 130)
  app.run(interruptible(main), flags_parser=cli_flags.parse)
