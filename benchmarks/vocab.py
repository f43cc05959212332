"""Id vocabulary: scripts/build_vocab.py's speed and memory, and TSV reading with vs without
the vocabulary (`open_source.vocab`).

  .venv/bin/python benchmarks/vocab.py [--examples=1000000] [--zipf=1.1] [--min_count=3]

Generates `--examples` Criteo-like lines (label, 13 small counts, 26 columns of 8-digit hex
ids drawn Zipf(`--zipf`) over ranks hashed to 32 bits, a few empty) and prints one JSON
line per result (`"benchmark": "vocab"`): `build_vocab` (the script in a subprocess, as a
user runs it: wall seconds, MB/s, peak RSS and that of its imports alone, and the counting
alone in this process: `vocab_build.count`), then
`read` with `"vocab": false` / `true` (`tsv.read_tsv`, best of `--rounds` interleaved).
"""

import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from common import check_at_least, emit as emit_line, interruptible, scratch_dir
from jaxrec import cli_flags  # noqa: E402
from jaxrec.data import tsv, vocab, vocab_build
from jaxrec.data.source import make_layout
from jaxrec.embedding.specs import uniform_tables

flags.DEFINE_integer("examples", 1_000_000, "Lines of the generated TSV file.")
flags.DEFINE_float("zipf", 1.1, "Zipf exponent of each column's id ranks (> 1).")
flags.DEFINE_integer("min_count", 3, "build_vocab.py --min_count.")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds of the two reads (best is kept).")
flags.DEFINE_string("workdir", None, "Scratch directory (default: a temp dir, removed).")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 100_000


def emit(**kw):
  emit_line("vocab", **kw)


def write_tsv(path: str, n: int, a: float, seed: int = 0) -> None:
  """`n` Criteo-like lines; each column's ids Zipf(`a`) ranks hashed to 8 hex digits."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for start in range(0, n, BLOCK):
      m = min(BLOCK, n - start)
      cols = [rng.integers(0, 2, m).astype(str)]
      dense = rng.geometric(0.05, (13, m))
      cols += [np.where(rng.random(m) < 0.1, "", d.astype(str)) for d in dense]
      for k in range(26):
        ranks = rng.zipf(a, m).astype(np.uint64) + np.uint64(k << 40)
        hashed = (ranks * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
        u, inv = np.unique(hashed, return_inverse=True)
        text = np.array([f"{x:08x}" for x in u.tolist()])[inv]
        cols.append(np.where(rng.random(m) < 0.03, "", text))
      f.write("\n".join("\t".join(row) for row in zip(*cols)) + "\n")


# Runs argv[1:] and prints its peak RSS (KiB): a child of this large process would report
# this one's (Linux keeps the pre-exec memory's high-water mark), a grandchild through this
# small Python does not.
_RSS = ("import resource, subprocess, sys; "
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r)")


def run_rss(cmd) -> tuple[float, float, int]:
  """Runs `cmd`: (its peak RSS in MiB, wall seconds, exit code)."""
  t = time.perf_counter()
  done = subprocess.run([sys.executable, "-c", _RSS, *cmd], capture_output=True, text=True,
                        check=False)
  wall = time.perf_counter() - t
  rss = int(done.stdout.split()[-1]) / 1024 if done.stdout.strip() else float("nan")
  return rss, wall, done.returncode


def read_rate(path: str, layout) -> float:
  t = time.perf_counter()
  src = tsv.read_tsv([path], layout)
  dt = time.perf_counter() - t
  del src
  return dt


def main(argv):
  del argv
  check_at_least(lambda m: sys.exit(f"error: {m}"), FLAGS.flag_values_dict(),
                 ("examples", "min_count", "rounds"))
  if not FLAGS.zipf > 1:
    sys.exit(f"error: --zipf must be above 1, got {FLAGS.zipf}")
  with scratch_dir(FLAGS.workdir, "jaxrec_bench_vocab_") as work:
    path = os.path.join(work, "train.tsv")
    t = time.perf_counter()
    write_tsv(path, FLAGS.examples, FLAGS.zipf)
    mb = os.path.getsize(path) / 1e6
    emit(step="generate", examples=FLAGS.examples, mb=round(mb, 1),
         seconds=round(time.perf_counter() - t, 1))
    out = os.path.join(work, "vocab")
    baseline, _, _ = run_rss([sys.executable, "-c", "import sys; sys.path.insert(0, "
                              "sys.argv[1]); import jaxrec.launch, jaxrec.data.vocab_build",
                              ROOT])   # the script's imports alone
    peak, wall, done = run_rss([sys.executable, os.path.join(ROOT, "scripts", "build_vocab.py"),
                                f"--input={path}", f"--output={out}",
                                f"--min_count={FLAGS.min_count}"])
    if done:
      sys.exit(f"error: build_vocab.py failed (exit {done})")
    _, features = uniform_tables(26, 1)
    layout = make_layout(features, {f.table: 1 for f in features})
    t = time.perf_counter()
    counts, _ = vocab_build.count([path], layout)
    count_s = time.perf_counter() - t
    distinct = sum(len(v) for v in counts.ids.values())
    del counts
    voc = vocab.load(out)
    kept = sum(len(v) for v in voc.tables.values())
    emit(step="build_vocab", examples=FLAGS.examples, mb=round(mb, 1), min_count=FLAGS.min_count,
         distinct_ids=distinct, kept_ids=kept, script_seconds=round(wall, 1),
         script_mb_per_sec=round(mb / wall, 1), peak_rss_mib=round(peak),
         imports_rss_mib=round(baseline),
         count_seconds=round(count_s, 1), count_mb_per_sec=round(mb / count_s, 1))
    rows = {t: len(ids) + 1 for t, ids in voc.tables.items()}
    layouts = {False: make_layout(features, {f.table: 100_000 for f in features}),
               True: make_layout(features, rows, vocab=voc)}
    best = {False: float("inf"), True: float("inf")}
    for _ in range(FLAGS.rounds):
      for with_vocab, lay in layouts.items():
        best[with_vocab] = min(best[with_vocab], read_rate(path, lay))
    for with_vocab, dt in best.items():
      emit(step="read", vocab=with_vocab, examples_per_sec=round(FLAGS.examples / dt),
           mb_per_sec=round(mb / dt, 1), seconds=round(dt, 1))


if __name__ == "__main__":
  app.run(interruptible(main), flags_parser=cli_flags.parse)
