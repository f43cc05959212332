"""Input pipeline throughput: synthetic, TSV parsing, preprocessed binary shards.

  python benchmarks/input_pipeline.py [--trainer_examples_per_sec=X |
                                       --trainer_metrics=W/metrics.jsonl]

Prints one JSON line per result (`"benchmark": "input_pipeline"`). The `binary` line holds
`"ratio"` = binary examples/sec / trainer examples/sec with `"goal": 5` (the input
pipeline must outrun the trainer 5x); the trainer rate comes from the flag or from the
median `examples_per_sec` of a trainer's metrics.jsonl.
"""

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from jaxrec.data import binary, pipeline, synthetic, tsv
from jaxrec.data.source import make_layout
from jaxrec.embedding.specs import uniform_tables

flags.DEFINE_float("trainer_examples_per_sec", None, "Trainer throughput to compare with.")
flags.DEFINE_string("trainer_metrics", None, "metrics.jsonl to read the trainer rate from.")
flags.DEFINE_integer("examples", 200_000, "Examples in the TSV / binary data.")
flags.DEFINE_integer("batch_size", 512, "Global batch size.")
flags.DEFINE_integer("rows", 100_000, "Rows of each of the 26 tables.")
flags.DEFINE_integer("batches", 400, "Batches per iterator measurement.")
flags.DEFINE_integer("num_threads", 2, "grain threads.")
flags.DEFINE_integer("prefetch", 4, "Batches prefetched.")
flags.DEFINE_string("workdir", None, "Scratch directory (default: a temp dir, removed).")
FLAGS = flags.FLAGS


def emit(**kw):
  print(json.dumps({"benchmark": "input_pipeline", **kw}), flush=True)


def trainer_rate() -> float | None:
  if FLAGS.trainer_examples_per_sec:
    return FLAGS.trainer_examples_per_sec
  if not FLAGS.trainer_metrics:
    return None
  rates = []
  with open(FLAGS.trainer_metrics) as f:
    for line in f:
      try:
        v = json.loads(line).get("examples_per_sec")
      except json.JSONDecodeError:
        continue
      if isinstance(v, (int, float)) and v > 0:
        rates.append(float(v))
  if not rates:
    sys.exit(f"error: {FLAGS.trainer_metrics}: no examples_per_sec values")
  return float(np.median(rates))


def iterator_rate(it) -> float:
  for _ in range(5):  # warm up threads and page cache
    next(it)
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(it)
  rate = FLAGS.batches * it.local_batch_size / (time.perf_counter() - start)
  it.close()
  return rate


def main(argv):
  del argv
  tables, features = uniform_tables(26, FLAGS.rows)
  kw = dict(num_threads=FLAGS.num_threads, prefetch=FLAGS.prefetch)
  common = dict(batch_size=FLAGS.batch_size, threads=FLAGS.num_threads,
                prefetch=FLAGS.prefetch, cpus=os.cpu_count())

  it = pipeline.make_train_iterator("synthetic", features, tables, FLAGS.batch_size, **kw)
  emit(source="synthetic", examples_per_sec=round(iterator_rate(it)), **common)

  work = FLAGS.workdir or tempfile.mkdtemp(prefix="jaxrec_bench_")
  try:
    layout = make_layout(features, {t.name: t.rows for t in tables})
    path = os.path.join(work, "train.tsv")
    block = os.path.join(work, "block.tsv")
    n_block = min(20_000, FLAGS.examples)
    synthetic.write_tsv(block, synthetic.SyntheticSource(layout, seed=0), n_block)
    data = open(block, "rb").read()
    reps = -(-FLAGS.examples // n_block)
    with open(path, "wb") as f:
      for _ in range(reps):
        f.write(data)
    n = reps * n_block
    size = os.path.getsize(path)

    start = time.perf_counter()
    src = tsv.read_tsv([path], layout)
    dt = time.perf_counter() - start
    assert src.num_examples == n
    emit(source="tsv_parse", examples_per_sec=round(n / dt), mb_per_sec=round(size / dt / 1e6, 1),
         examples=n)

    out = os.path.join(work, "bin")
    start = time.perf_counter()
    binary.write([path], out, layout)
    emit(source="preprocess", examples_per_sec=round(n / (time.perf_counter() - start)),
         examples=n)

    it = pipeline.make_train_iterator(out, features, tables, FLAGS.batch_size, **kw)
    rate = iterator_rate(it)
    trainer = trainer_rate()
    line = dict(source="binary", examples_per_sec=round(rate), shuffle=True, **common)
    if trainer:
      line.update(trainer_examples_per_sec=trainer, ratio=round(rate / trainer, 2))
    else:
      line.update(ratio=None, note="pass --trainer_examples_per_sec or --trainer_metrics")
    emit(**line, goal=5)
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
