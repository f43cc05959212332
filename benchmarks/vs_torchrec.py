#!/usr/bin/env python3
"""jaxrec vs TorchRec: training examples/sec on this CPU, same model, same data, same AUC.

The `configs/dlrm_criteo.gin` shape (26 tables x 100,000 rows x dim 16, bottom MLP
512-256-64-16, top MLP 512-256-1, batch 512, SGD lr 0.1 dense and sparse) is trained by
both frameworks, one after the other, on the same examples in the same order:

  1. This script (core venv) writes the data once with jaxrec's synthetic source to an
     .npz: `dense [N, 13] float32`, `sparse [N, 26] int64`, `labels [N] float32` (train,
     `N = steps * 512`) and `eval_dense` / `eval_sparse` / `eval_labels` (a disjoint
     split).
  2. jaxrec trains in a subprocess of this script (`--worker=jaxrec`) on two cores
     (`taskset -c 0,1`: XLA sizes its CPU thread pool from the affinity mask), one CPU
     device, plan `dp`.
  3. TorchRec trains with `third_party/torchrec_reference/run_torchrec.py` in its own venv
     (`make -C third_party/torchrec_reference venv`): `DistributedModelParallel` on a gloo
     group of world size 1, fused TBE with the SGD update in the backward pass,
     `torch.set_num_threads(2)`. Skipped with a `"skipped"` line when that venv is absent.
  4. A plain single-device JAX DLRM (`benchmarks/naive_dlrm.py`, no framework: a gather,
     the MLPs, `value_and_grad`, a scatter-add SGD) trains the same way in the core venv:
     the issue's bar is that the framework beats it. `--skip_naive` leaves it out.

All three time the steps after `--warmup` steps (compilation, first-touch allocations) to the
last one, host batch preparation included, and then score the same eval set (exact AUC,
log loss). On a machine shared with other work, `--repeats N` alternates them N times
(their order rotated every repeat, so none always follows the same one) and compares the
fastest run of each (every run's speed is in `runs_examples_per_sec`; the 1-minute load
average at the start of each run in `load_average_1m`), and `--nice -20` (as root) runs
them at a higher priority than the other work. TorchRec's OpenMP threads
suffer much more than XLA's thread pool when a core is taken by another process (a
parallel region waits for its descheduled thread), so measure on a quiet machine or with
both of these before trusting a ratio. Prints one JSON line per framework and a summary line

  {"benchmark": "vs_torchrec", "ratio": jaxrec_eps / torchrec_eps, "goal": 2.0,
   "ratio_vs_naive": jaxrec_eps / naive_eps, ...}

The goal is met when `ratio >= 2.0` and jaxrec's AUC is not worse than TorchRec's
(`"auc_ok"`, with a tolerance of `--auc_tolerance` for run-to-run noise, 0 by default), and,
with 3 or more repeats, the median run of each also gives 2.0 (`"ratio_runs_median"`), so
that one unusually fast run cannot meet it alone. `"cpu_bf16"` says whether this CPU has
bfloat16 instructions (`jaxrec.models.bf16_hardware`); a `--dense_dtype=bfloat16` comparison
without them never meets the goal (it compares the frameworks' emulation of bfloat16).
No verdict (`"met": null`, a `"note"`) comes from a compared run whose mean step is 1.5x
its median or more (other processes took the cores for part of it), nor from fewer than
50 timed steps. `--nice` below 0 needs root: elsewhere the runs keep their priority, the
summary's `"nice"` says so and the load warning stays on.
`--breakdown` adds, for jaxrec, the step time of the dense part alone and of the embedding
part alone (where the time goes), and of the dense step's matmuls alone (`dense_dots`); with
TorchRec the summary then has `ratio_bound_dots`, TorchRec's step ÷ those matmuls' time: the
ratio jaxrec would reach on this host if nothing but its dense matmuls took time (below the
goal, the host's matmul rate rules the goal out). `--trace_dir` writes a `jax.profiler`
trace of a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import HelpFormatter, check_at_least, emit, interruptible

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILE = os.path.join(ROOT, "configs", "dlrm_criteo.gin")
TORCHREC_DIR = os.path.join(ROOT, "third_party", "torchrec_reference")
TORCHREC_PYTHON = os.path.join(TORCHREC_DIR, ".venv", "bin", "python")
TORCHREC_RUNNER = os.path.join(TORCHREC_DIR, "run_torchrec.py")
NAIVE_RUNNER = os.path.join(ROOT, "benchmarks", "naive_dlrm.py")
NAME = "vs_torchrec"
GOAL = 2.0   # jaxrec ex/s ÷ TorchRec ex/s, at equal or better AUC
MIN_TIMED_STEPS = 50   # fewer timed steps (--steps - --warmup): no verdict (`met` null)
# A run whose mean step is this many times its median step was disturbed (other processes
# took the cores for part of it): no verdict from it. One TorchRec run at load ~2.9 on 2
# cores took 428 ms a step on average, 72 ms at the median, and read 32x ("met").
DISTURBED = 1.5


# ----------------------------------------------------------------------------- data
def load_config(dense_dtype: str = "float32"):
  """The `dlrm_criteo.gin` ExperimentConfig (gin parsed in this process), its dense network
  computing in `dense_dtype` (`DLRM.dtype`; parameters stay float32)."""
  from jaxrec.launch import parse_gin
  from jaxrec.train.config import ExperimentConfig
  parse_gin([GIN_FILE], [f"DLRM.dtype = '{dense_dtype}'"])
  return ExperimentConfig()


def write_data(path: str, num_train: int, num_eval: int, seed: int) -> dict:
  """Writes the train and eval examples to `path` (.npz); returns shape facts."""
  from jaxrec.data.source import make_layout
  from jaxrec.data.synthetic import SyntheticSource
  config = load_config()
  rows = {t.name: t.rows for t in config.tables}
  layout = make_layout(config.features, rows, config.num_dense)
  if any(m != 1 for m in layout.max_lens) or any(layout.weighted):
    raise SystemExit(f"{NAME}: expects one-hot unweighted features (the Criteo shape)")
  out = {}
  for prefix, split, n in (("", 0, num_train), ("eval_", 1, num_eval)):
    src = SyntheticSource(layout, seed=seed, split=split)
    dense, sparse, labels = [], [], []
    for lo in range(0, n, 65536):
      b = src.gather(np.arange(lo, min(lo + 65536, n), dtype=np.int64))
      dense.append(b.dense)
      labels.append(b.labels)
      sparse.append(np.concatenate([b.ids[f] for f in layout.names], axis=1).astype(np.int64))
    out[prefix + "dense"] = np.concatenate(dense).astype(np.float32)
    out[prefix + "sparse"] = np.concatenate(sparse)
    out[prefix + "labels"] = np.concatenate(labels).astype(np.float32)
  np.savez(path, **out)


def data_facts(path: str) -> dict:
  """What the `.npz` at `path` holds (written now, or reused via `--data`)."""
  with np.load(path) as z:
    labels = z["labels"]
    return {"positive_rate": round(float(labels.mean()), 4), "train_examples": len(labels),
            "eval_examples": len(z["eval_labels"])}


# ----------------------------------------------------------------------------- jaxrec side
def step_times(done, warmup: int, batch_size: int) -> dict:
  """Speed from the finish times of every step (seconds, `done[i]` = step i).

  `examples_per_sec`: wall clock from the end of step `warmup - 1` to the end of the last
  step; `examples_per_sec_median`: from the median per-step time, which load from other
  processes disturbs less. (`run_torchrec.py` computes the same.)
  """
  done = np.asarray(done, np.float64)
  timed = len(done) - warmup
  elapsed = done[-1] - done[warmup - 1]
  gaps = np.diff(done[warmup - 1:])
  return {"examples_per_sec": timed * batch_size / elapsed,
          "examples_per_sec_median": batch_size / float(np.median(gaps)),
          "step_ms": 1e3 * elapsed / timed, "step_ms_median": 1e3 * float(np.median(gaps)),
          "step_ms_min": 1e3 * float(gaps.min())}


def _batches(data, prefix: str, batch_size: int, names):
  """Yields host `Batch`es of consecutive `batch_size` slices (the last one may be short)."""
  from jaxrec.data.batch import Batch
  dense, sparse, labels = data[prefix + "dense"], data[prefix + "sparse"], data[prefix + "labels"]
  sparse32 = sparse.astype(np.int32)
  for lo in range(0, len(labels), batch_size):
    hi = min(lo + batch_size, len(labels))
    yield Batch(dense=dense[lo:hi], labels=labels[lo:hi],
                ids={f: sparse32[lo:hi, i:i + 1] for i, f in enumerate(names)})


def run_jaxrec(args) -> dict:
  """Trains jaxrec on the npz batches; returns the framework's JSON record."""
  import jax
  from jaxrec.sharding.mesh import batch_sharding
  from jaxrec.train import loop, metrics
  from jaxrec.train import state as state_lib
  from jaxrec.train import step as step_lib
  from jaxrec.train.config import RunOptions

  config = load_config(args.dense_dtype)
  options = RunOptions(num_steps=args.steps, plan="dp", mesh="auto", seed=args.seed,
                       progress=False)
  collection, _, _ = loop.setup(config, options, devices=jax.devices()[:1])
  state = state_lib.create(config, collection, args.seed)
  shardings = state_lib.shardings(state, collection)
  train_step = step_lib.make_train_step(config, collection, shardings)
  eval_step = step_lib.make_eval_step(config, collection, shardings)
  bsharding = batch_sharding(collection.mesh)
  names = [f.name for f in config.features]
  bs = config.batch_size

  data = dict(np.load(args.data))
  n_train = args.steps * bs
  if len(data["labels"]) < n_train:
    raise SystemExit(f"{NAME}: {args.data} holds {len(data['labels'])} train examples, "
                     f"{args.steps} steps need {n_train}")
  data = {k: (v[:n_train] if not k.startswith("eval_") else v) for k, v in data.items()}
  # The ids of every batch are checked as it is packed (`loop.device_batch`), as in the
  # trainer's loop: a bad id in the data fails there, not silently.

  load = round(os.getloadavg()[0], 2)   # other processes competing for the 2 cores
  # done[i]: when step i was seen finished. One step stays in flight (step i+1 is
  # dispatched before waiting on step i), so the host work overlaps the device as in the
  # trainer's loop, and the gaps between finishes are per-step times.
  losses, done = [], []
  for batch in _batches(data, "", bs, names):
    state, m = train_step(state, loop.device_batch(collection, batch, bsharding))
    if losses:
      losses[-1].block_until_ready()
      done.append(time.perf_counter())
    losses.append(m["loss"])
  jax.block_until_ready(state)
  done.append(time.perf_counter())
  losses = np.asarray(jax.device_get(losses), np.float64)

  acc = metrics.EvalAccumulator()
  eb = config.eval_batch_size
  for batch in _batches(data, "eval_", eb, names):
    n = batch.size
    if n < eb:   # pad the tail to the compiled eval batch size
      pad = eb - n
      batch = jax.tree.map(lambda x: np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]),
                           batch)
    logits = np.asarray(eval_step(state, loop.device_batch(collection, batch, bsharding))[
        "logits"])[:n]
    acc.add(logits, batch.labels[:n])
  ev = acc.result()
  record = {"framework": "jaxrec", **step_times(done, args.warmup, bs), "auc": ev["eval_auc"],
            "logloss": ev["eval_logloss"], "steps": args.steps, "warmup": args.warmup,
            "train_loss_last50": float(losses[-50:].mean()),
            "eval_examples": ev["eval_examples"], "jax": jax.__version__,
            "devices": len(collection.mesh.devices.flat), "load_average_1m": load,
            "dense_dtype": args.dense_dtype}
  if args.breakdown:
    parts = breakdown(config, collection, state, train_step,
                      list(_batches(data, "", bs, names))[:8], bsharding)
    state = parts.pop("state")
    record.update(parts)
  if args.trace_dir:
    batches = [loop.device_batch(collection, b, bsharding)
               for b in list(_batches(data, "", bs, names))[:10]]
    state, _ = train_step(state, batches[0])
    jax.block_until_ready(state)
    with jax.profiler.trace(args.trace_dir):
      for b in batches:
        state, _ = train_step(state, b)
      jax.block_until_ready(state)
    record["trace_dir"] = args.trace_dir
  return record


def breakdown(config, collection, state, train_step, host_batches, bsharding) -> dict:
  """Median step time (ms) of the full step and its parts, on the same batches.

  full:        the train step as benchmarked (jitted, state donated)
  dense:       model forward + backward + optax update, pooled embeddings given as input
  embedding:   lookup + pool + pool-backward + sparse row update, stand-in upstream grads
  host_put:    packing and placing one host batch (`loop.device_batch`)
  dots:        the dense step's matmuls alone, in one program of nothing else
               (`dense_dots`; with `dense_gflop`, `dots_gflops` and the dot count)
  """
  import dense_dots
  import jax
  import jax.numpy as jnp
  import optax
  from jaxrec.models import compute_loss
  from jaxrec.train import loop

  batches = [loop.device_batch(collection, b, bsharding) for b in host_batches]
  model, tx = config.model, config.dense_tx()

  def med(fn, iters=30):
    times = []
    for i in range(iters + 3):
      t = time.perf_counter()
      jax.block_until_ready(fn(i))
      if i >= 3:
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))

  # Copies first: the full step donates (deletes) the state it is given.
  p0, o0 = jax.tree.map(jnp.copy, (state["params"], state["opt_state"]))
  emb_state = {"s": jax.tree.map(jnp.copy, state["emb"])}
  holder = {"s": state}

  def full(i):
    holder["s"], m = train_step(holder["s"], batches[i % len(batches)])
    return holder["s"]

  ctxs = [jax.jit(collection.lookup)(emb_state["s"], b.ids) for b in batches]
  pooled = [jax.jit(collection.pool)(c.rows, c) for c in ctxs]

  @jax.jit
  def dense_step(params, opt_state, dense, emb, labels):
    def loss_fn(p):
      return compute_loss(model, p, dense, emb, labels)[0]
    g = jax.grad(loss_fn)(params)
    upd, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state

  def dense(i):
    b = batches[i % len(batches)]
    return dense_step(p0, o0, b.dense, pooled[i % len(batches)], b.labels)

  def emb_fn(es, ids):
    ctx = collection.lookup(es, ids)
    p, vjp = jax.vjp(lambda r: collection.pool(r, ctx), ctx.rows)
    (g,) = vjp(p * 1e-3)
    return collection.apply_gradients(es, ctx, g, jnp.int32(0))

  emb_step = jax.jit(emb_fn, donate_argnums=(0,))

  def emb(i):
    emb_state["s"] = emb_step(emb_state["s"], batches[i % len(batches)].ids)
    return emb_state["s"]

  def put(i):
    return loop.device_batch(collection, host_batches[i % len(host_batches)], bsharding)

  out = {"dense": med(dense), "embedding": med(emb), "host_put": med(put), "full": med(full)}
  b0 = batches[0]
  dots = dense_dots.summary(lambda p: jax.grad(lambda q: compute_loss(
      model, q, b0.dense, pooled[0], b0.labels)[0])(p), p0)
  out["dots"] = dots.pop("dots_ms")
  return {"breakdown_ms": {k: round(v, 3) for k, v in out.items()}, **dots,
          "state": holder["s"]}


# ----------------------------------------------------------------------------- driver
def goal_verdict(jaxrec_runs: list[dict], torchrec_runs: list[dict],
                 auc_tolerance: float = 0.0, emulated_bf16: bool = False,
                 timed_steps: int | None = None) -> dict:
  """`ratio` (fastest run of each), `ratio_runs_median` (median run of each), `auc_ok` and
  `met` from every run's record (failed runs, without `examples_per_sec`, left out).
  `emulated_bf16`: a bfloat16 comparison on a CPU without bfloat16 instructions, which
  measures the two frameworks' emulation of it (TorchRec's autocast ran 20x slower than
  its float32 on 2026-12-04): never met, with a `note` saying why. `timed_steps` below
  `MIN_TIMED_STEPS`: `met` is None (no verdict; 2 timed steps reported met), with a `note`;
  so too when a compared (fastest) run's mean step is `DISTURBED` times its median.

  Best against best lets one unusually fast run decide (2026-12-03: jaxrec's five bfloat16
  runs were 51.7k-54.6k ex/s and one 73.7k), so with 3 or more runs of each the medians
  must reach the goal too. The AUCs are those of the fastest runs (every run trains the
  same steps on the same data, so they agree to ~1e-4).
  """
  jx = [r for r in jaxrec_runs if "examples_per_sec" in r]
  tr = [r for r in torchrec_runs if "examples_per_sec" in r]
  if not jx or not tr:
    raise ValueError("goal_verdict needs at least one finished run of each framework")
  best_jx = max(jx, key=lambda r: r["examples_per_sec"])
  best_tr = max(tr, key=lambda r: r["examples_per_sec"])
  ratio = best_jx["examples_per_sec"] / best_tr["examples_per_sec"]
  runs_median = (float(np.median([r["examples_per_sec"] for r in jx]))
                 / float(np.median([r["examples_per_sec"] for r in tr])))
  auc_ok = best_jx["auc"] >= best_tr["auc"] - auc_tolerance
  enough = min(len(jx), len(tr)) >= 3
  met = ratio >= GOAL and auc_ok and (not enough or runs_median >= GOAL) and not emulated_bf16
  verdict = {"ratio": round(ratio, 3), "ratio_runs_median": round(runs_median, 3),
             "auc_ok": bool(auc_ok), "met": bool(met)}
  if emulated_bf16:
    verdict["note"] = ("this CPU has no bfloat16 instructions: both frameworks emulate "
                       "bfloat16, so the ratio compares emulations; compare in float32")
  elif timed_steps is not None and timed_steps < MIN_TIMED_STEPS:
    verdict["met"] = None
    verdict["note"] = (f"{timed_steps} timed steps (--steps - --warmup), fewer than "
                       f"{MIN_TIMED_STEPS}: too few to judge the goal")
  elif disturbed := _disturbed(best_jx, best_tr):
    verdict["met"] = None
    verdict["note"] = (f"{disturbed}: other processes took the cores for part of the run; "
                       "no verdict (rerun on a quiet machine, or with --repeats 3)")
  return verdict


def _disturbed(*runs: dict) -> str:
  """Says which of `runs` had a mean step `DISTURBED` times its median or more ('' none)."""
  said = []
  for r in runs:
    slowdown = r.get("examples_per_sec_median", 0.0) / r["examples_per_sec"]
    if slowdown >= DISTURBED:
      said.append(f"{r.get('framework', 'a')} run's mean step is {slowdown:.1f}x its median")
  return "; ".join(said)


def _two_thread_env() -> dict:
  """Environment of both subprocesses. The two cores come from `taskset` (see `_pin`);
  XLA ignores the bare `intra_op_parallelism_threads=2` token (kept for the record of
  intent), torch takes `--threads 2`."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true"
                      " intra_op_parallelism_threads=2").strip()
  env["OMP_NUM_THREADS"] = "2"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _pin(cmd: list[str], nice: int = 0) -> list[str]:
  """`cmd` on cores 0 and 1 (`taskset`, where the machine has 2+ cores), at priority `nice`.

  The kernel's autogroup scheduling shares the CPU between sessions before it looks at
  `nice`, so a nonzero `nice` also sets the new session's autogroup priority (the
  subprocess is started in its own session, see `_run_json`); lowering it needs root.
  """
  from shutil import which
  if which("taskset") and (os.cpu_count() or 1) >= 2:
    cmd = ["taskset", "-c", "0,1"] + cmd
  if nice:
    cmd = ["sh", "-c", f"echo {int(nice)} > /proc/self/autogroup 2>/dev/null; "
           f'exec nice -n {int(nice)} "$@"', "sh"] + cmd
  return cmd


def applied_nice(nice: int) -> int:
  """The change of priority a child started at `nice -n NICE` gets: `nice`, or less where
  it may not go so far (a user's `--nice -20`: `nice` says 'cannot set niceness' and runs
  the command unchanged; niceness stays within -20..19)."""
  code = (f"import os\nbase = os.nice(0)\ntry: os.nice({int(nice)})\nexcept OSError: pass\n"
          "print(os.nice(0) - base)")
  out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       check=True)
  return int(out.stdout)


def _run_json(cmd: list[str], env: dict, framework: str) -> dict:
  """Runs `cmd` in a new session, passing its stderr through; returns the last JSON line
  of its stdout."""
  proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True,
                        start_new_session=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    return {"framework": framework, "error": f"exit code {proc.returncode}",
            "stdout_tail": proc.stdout[-2000:]}
  return json.loads(lines[-1])


def check_data_flag(error, path) -> None:
  """`error(message)` for a `--data` that cannot be read or written: a directory, or a new
  file in no directory (tracebacks after the data was generated)."""
  if path is None:
    return
  if os.path.isdir(path):
    error(f"--data: {path} is a directory, not an .npz file")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.exists(path) and not os.path.isdir(parent):
    error(f"--data: no file {path} and no directory {parent} to write it in")


def _best(records: list[dict]) -> dict:
  """The fastest of repeated runs, with every run's examples/sec; the `_median` speed is
  the best over runs too."""
  ok = [r for r in records if "examples_per_sec" in r]
  if not ok:
    return records[-1]
  best = dict(max(ok, key=lambda r: r["examples_per_sec"]))
  if len(records) > 1:
    best["examples_per_sec_median"] = max(r["examples_per_sec_median"] for r in ok)
    best["runs_examples_per_sec"] = [   # None: a failed run (was NaN: not JSON)
        round(r["examples_per_sec"], 1) if "examples_per_sec" in r else None for r in records]
  return best


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--steps", type=int, default=300, help="train steps of batch 512 per framework")
  p.add_argument("--warmup", type=int, default=20, help="untimed first steps")
  p.add_argument("--eval_examples", type=int, default=65536,
                 help='eval set size')
  p.add_argument("--seed", type=int, default=0,
                 help='data and initialisation seed')
  p.add_argument("--data", default=None, help="npz path (default: a temp file, regenerated)")
  p.add_argument("--torchrec_python", default=TORCHREC_PYTHON,
                 help='python of the TorchRec venv (make bench-torchrec builds it)')
  p.add_argument("--skip_torchrec", action="store_true",
                 help='run jaxrec (and the naive baseline) only')
  p.add_argument("--skip_naive", action="store_true",
                 help="leave out the plain JAX DLRM baseline (benchmarks/naive_dlrm.py)")
  p.add_argument("--breakdown", action="store_true", help="add jaxrec step-time breakdown")
  p.add_argument("--trace_dir", default=None,
                 help="write a jax.profiler trace here (default: none)")
  p.add_argument("--repeats", type=int, default=1,
                 help="runs per framework, alternating; the fastest of each is compared")
  p.add_argument("--nice", type=int, default=0,
                 help="run both frameworks at priority N (nice and autogroup; e.g. -20 as "
                      "root on a shared machine, so other processes disturb the timing less)")
  p.add_argument("--auc_tolerance", type=float, default=0.0,
                 help="jaxrec's eval AUC may trail TorchRec's by this much (run-to-run noise)")
  p.add_argument("--dense_dtype", choices=["float32", "bfloat16"], default="float32",
                 help="matmul operand dtype of every framework's dense network: jaxrec's "
                      "DLRM.dtype, the naive DLRM's casts, TorchRec's CPU autocast; "
                      "parameters, embeddings and loss stay float32")
  p.add_argument("--worker", choices=["jaxrec"], default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if not 0 < args.warmup < args.steps:
    p.error("--warmup must be in [1, --steps)")
  if args.repeats < 1:
    p.error("--repeats must be at least 1")
  check_at_least(p.error, vars(args), ("eval_examples",))   # 0: an AUC of no examples
  check_data_flag(p.error, args.data)
  if args.torchrec_python != TORCHREC_PYTHON and not os.path.isfile(args.torchrec_python):
    p.error(f"--torchrec_python: no file {args.torchrec_python}")   # skipped, as if unbuilt
  nice = applied_nice(args.nice) if args.nice and args.worker is None else args.nice
  if nice != args.nice:
    print(f"{NAME}: --nice {args.nice} applies as {nice} here (raising priority needs "
          "root; niceness stays within -20..19)", file=sys.stderr)
    args.nice = nice   # as run: the summary's `nice`, and the load warning is given

  if args.worker == "jaxrec":
    print(json.dumps(run_jaxrec(args)), flush=True)
    return

  tmp = None
  if args.data is None:
    tmp = tempfile.TemporaryDirectory(prefix="vs_torchrec_")
    args.data = os.path.join(tmp.name, "data.npz")
  try:
    t = time.perf_counter()
    config = load_config()
    bs = config.batch_size
    what = "reusing"
    if tmp is not None or not os.path.exists(args.data):
      write_data(args.data, args.steps * bs, args.eval_examples, args.seed)
      what = "wrote"
    facts = data_facts(args.data)
    print(f"{NAME}: {what} data {args.data} ({facts['train_examples']} train + "
          f"{facts['eval_examples']} eval examples) in {time.perf_counter() - t:.1f}s",
          file=sys.stderr)

    common_flags = ["--data", args.data, "--steps", str(args.steps), "--warmup", str(args.warmup),
                    "--seed", str(args.seed), "--dense_dtype", args.dense_dtype]
    env = _two_thread_env()
    jx_cmd = [sys.executable, os.path.abspath(__file__), "--worker", "jaxrec"] + common_flags
    if args.breakdown:
      jx_cmd.append("--breakdown")
    if args.trace_dir:
      jx_cmd += ["--trace_dir", args.trace_dir]
    skip = None
    if args.skip_torchrec:
      skip = "--skip_torchrec"
    elif not os.path.exists(args.torchrec_python):
      skip = f"torchrec venv missing ({args.torchrec_python}); run make bench-torchrec"
    tr_cmd = [args.torchrec_python, TORCHREC_RUNNER, "--threads", "2", "--batch_size", str(bs),
              "--lr", "0.1", "--rows", str(config.tables[0].rows),
              "--dim", str(config.tables[0].dim)] + common_flags
    nv_cmd = [sys.executable, NAIVE_RUNNER, "--batch_size", str(bs), "--lr", "0.1",
              "--rows", str(config.tables[0].rows),
              "--dim", str(config.tables[0].dim)] + common_flags
    # Alternate the frameworks so that load from other processes hits all alike, and
    # rotate their order every repeat so that none always runs right after the same one.
    cmds = {"jaxrec": jx_cmd}
    if skip is None:
      cmds["torchrec"] = tr_cmd
    if not args.skip_naive:
      cmds["naive_jax"] = nv_cmd
    runs = {"jaxrec": [], "torchrec": [], "naive_jax": []}
    names = list(cmds)
    for r in range(args.repeats):
      for name in names[r % len(names):] + names[:r % len(names)]:
        runs[name].append(_run_json(_pin(cmds[name], args.nice), env, name))
    jx = _best(runs["jaxrec"])
    emit(NAME, **jx)
    nv = _best(runs["naive_jax"]) if runs["naive_jax"] else None
    if nv is not None:
      emit(NAME, **nv)
    tr = _best(runs["torchrec"]) if skip is None else None
    if tr is not None:
      emit(NAME, **tr)
    else:
      emit(NAME, framework="torchrec", skipped=skip)
    # Every framework that ran must have finished at least once, with or without TorchRec:
    # `make bench` (no TorchRec venv) relies on the exit status to notice a crash.
    failed = [r["framework"] for r in (jx, nv, tr)
              if r is not None and "examples_per_sec" not in r]
    if failed:
      emit(NAME, error=f"{', '.join(failed)} failed; see its line above", goal=GOAL,
           goal_op=">=")
      sys.exit(1)
    vs_naive = {}
    if nv is not None:
      vs_naive = {"ratio_vs_naive": round(jx["examples_per_sec"] / nv["examples_per_sec"], 3),
                  "naive_examples_per_sec": round(nv["examples_per_sec"], 1),
                  "naive_auc": round(nv["auc"], 5)}
    if skip is not None:
      emit(NAME, skipped=skip, goal=GOAL, goal_op=">=", jaxrec_auc=round(jx["auc"], 5),
           jaxrec_examples_per_sec=round(jx["examples_per_sec"], 1), **vs_naive)
      return
    from jaxrec.models.bf16_hardware import cpu_has_bf16
    extra = dict(facts, cpu_bf16=cpu_has_bf16())
    goal = goal_verdict(runs["jaxrec"], runs["torchrec"], args.auc_tolerance,
                        emulated_bf16=args.dense_dtype == "bfloat16" and
                        extra["cpu_bf16"] is False, timed_steps=args.steps - args.warmup)
    load = max(r.get("load_average_1m", 0.0) for r in runs["jaxrec"] + runs["torchrec"])
    if load > 1.5 * (os.cpu_count() or 1) and args.nice >= 0:
      extra["warning"] = (f"load average up to {load} on {os.cpu_count()} cores during the "
                          "runs: other processes distort the timings (TorchRec most); rerun "
                          "on a quiet machine or with --nice -20 --repeats 3")
    dots_ms = jx.get("breakdown_ms", {}).get("dots")
    if dots_ms:   # --breakdown: the ratio if jaxrec's step were its dense matmuls alone
      extra["ratio_bound_dots"] = round(1e3 * bs / tr["examples_per_sec"] / dots_ms, 3)
    emit(NAME, **goal, goal=GOAL, goal_op=">=",
         ratio_median_step=round(jx["examples_per_sec_median"] / tr["examples_per_sec_median"], 3),
         jaxrec_examples_per_sec=round(jx["examples_per_sec"], 1),
         torchrec_examples_per_sec=round(tr["examples_per_sec"], 1),
         jaxrec_auc=round(jx["auc"], 5), torchrec_auc=round(tr["auc"], 5),
         jaxrec_logloss=round(jx["logloss"], 5), torchrec_logloss=round(tr["logloss"], 5),
         examples=args.steps * bs, timed_examples=(args.steps - args.warmup) * bs,
         threads=2, repeats=args.repeats, nice=args.nice,
         dense_dtype=args.dense_dtype,
         load_average=[round(x, 2) for x in os.getloadavg()], **vs_naive, **extra)
  finally:
    if tmp is not None:
      tmp.cleanup()


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
