"""Randomized cross-check of the offload tier: one seed draws a whole configuration
(`offload_fuzz_cases`: a mesh of 8, 4, 2 or 1 devices, tables of mixed rows, dims and
dtypes each with its own placement, one or more of them offloaded with caches from one
batch's distinct rows to most of the table, look-ahead depth, a sparse optimizer, batches
with heavy duplicates and empty bags) and trains it with the offloaded tables and with every
table on the device, through the real train step; losses, tables and optimizer state (the
stores' after a flush) must agree, bit for bit where docs/offload.md promises it (with
`max_staleness` > 0, unless a stale row was installed: then they may differ). Variants:
an eval pass mid-way (logits, then training goes on), a checkpoint (orbax + offload
snapshot) mid-way, a few steps lost, restored on the same or another mesh and continued,
and a NaN rollback (`offload_fuzz_loop`: one or two batches with a NaN input, rolled back
to the last checkpoint or the start on the live tier and skipped; the device run trains
without them). Int8 tables may sit on the device beside the offloaded ones, a slow
eviction fetcher makes the planner wait for fetches (`fetch_waits`), and some tables,
offloaded or not, train with a sparse optimizer of their own (`table_optimizers`).

By hand, more seeds:

  python -m tests.offload.test_offload_fuzz --seeds 0:200

prints one line per failing seed: the seed, its configuration and the first mismatch.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import tempfile

if __name__ == "__main__":   # run by hand: 8 host devices, as tests/conftest.py sets them
  from tests import xla_env
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_env.xla_flags(8)}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxrec.checkpoint import CheckpointManager  # noqa: E402
from jaxrec.embedding.specs import EmbeddingOptions  # noqa: E402
from jaxrec.kernels import quant  # noqa: E402
from jaxrec.sharding.mesh import make_mesh  # noqa: E402
from jaxrec.train import state as state_lib  # noqa: E402
from jaxrec.train import step as step_lib  # noqa: E402
from tests.embedding.test_collection_fuzz import (assert_close_stored,  # noqa: E402
                                                  assert_f32_close, run_seeds)
from tests.offload.offload_fuzz_cases import Case, Stream, sample  # noqa: E402
from tests.offload.offload_fuzz_loop import save, slow_fetches, train_rolling_back  # noqa
from tests.offload.offload_helpers import Run  # noqa: E402


def _mesh(shape):
  return make_mesh(shape, jax.devices()[:math.prod(shape.values())])


def _run(case: Case, off=True, mesh=None, plan=None) -> Run:
  options = EmbeddingOptions(stochastic_rounding=case.stochastic_rounding)
  batches = case.batches[:case.steps] if off else case.train_batches
  run = Run(case.config(), _mesh(mesh or case.mesh), case.off if off else None,
            plan=plan or case.plan, iterator=Stream(batches), options=options)
  if off and case.fetch_delay:
    slow_fetches(run.tier, case.fetch_delay, case.fetch_stall)
  return run


def _eval(run: Run, case: Case, batch) -> np.ndarray:
  eval_fn = step_lib.make_eval_step(case.config(), run.collection,
                                    state_lib.shardings(run.state, run.collection))
  if run.tier is None:
    return np.asarray(eval_fn(run.state, run.put(batch))["logits"])
  run.state, got = run.tier.eval_logits(
      run.state, batch, lambda st, b: np.asarray(eval_fn(st, run.put(b))["logits"]))
  return got


def _resume(case: Case, ckpt: CheckpointManager, workdir: str, losses) -> Run:
  """A new run restored as the trainer's `resume_from` restores one."""
  mesh, plan = (case.mesh2, case.plan2) if case.mesh2 is not None else (case.mesh, case.plan)
  run = _run(case, mesh=mesh, plan=plan)
  try:
    restored = ckpt.restore(run.state, run.collection,
                            offloaded={n: t.spec for n, t in run.tier.tables.items()})
    step = int(restored.state["step"])
    assert step == case.at, step
    run.tier.restore(step, os.path.join(workdir, "offload_snapshots"), restored.host_tables)
    run.it.set_state(restored.data_state)
    run.state, run.losses = restored.state, list(losses[:step])
  except BaseException:
    run.close()
    raise
  return run


def train_offloaded(case: Case, workdir: str):
  """`(losses, tables, opt, stats, eval logits)` of the offloaded run of `case`; `stats`:
  the tier's, and the rollbacks made (`offload_fuzz_loop.train_rolling_back`)."""
  run, got_eval, stale, seen = _run(case), None, 0, {}
  try:
    if case.variant == "rollback":
      seen = train_rolling_back(run, case, workdir)
    elif case.variant == "eval":
      run.train(case.at)
      got_eval = _eval(run, case, case.batches[case.steps])
    elif case.variant.startswith("ckpt"):
      run.train(case.at)
      with CheckpointManager(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        save(run, ckpt, case.at, workdir)
        run.train(min(case.after_save, case.steps - case.at))   # then the run dies
        losses, stale = run.losses, run.tier.stats().get("stale_rows", 0)
        run.close()
        run = _resume(case, ckpt, workdir, losses)
    run.train(len(case.train_batches) - len(run.losses))
    tables, opt = run.full_tables()
    stats = run.tier.stats()
    stats["stale_rows"] = stats.get("stale_rows", 0) + stale
    stats.update(seen)
    return run.losses, tables, opt, stats, got_eval
  finally:
    run.close()


def train_on_device(case: Case):
  run = _run(case, off=False)
  want_eval = None
  if case.variant == "eval":
    run.train(case.at)
    want_eval = _eval(run, case, case.batches[case.steps])
  run.train(len(case.train_batches) - len(run.losses))
  tables, opt = run.full_tables()
  return run.losses, tables, opt, want_eval


def compare(case: Case, got, want) -> None:
  """AssertionError naming the first thing that differs."""
  g_losses, g_tables, g_opt, stats, g_eval = got
  w_losses, w_tables, w_opt, w_eval = want
  assert np.isfinite(g_losses).all(), g_losses
  if stats["stale_rows"]:   # updates lost by design (docs/offload.md)
    return
  exact = case.exact()

  def close(a, b, what, loose=1.0):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if exact:
      np.testing.assert_array_equal(a, b, err_msg=f"{what} (bitwise)")
    else:
      assert_f32_close(a, b, what, 1e-5 * loose)
  close(g_losses, w_losses, "losses", loose=10)
  if case.variant == "eval":
    close(g_eval, w_eval, "eval logits", loose=10)
  for t in case.tables:
    got_t, want_t = g_tables[t.name], w_tables[t.name]
    scale = None
    if isinstance(want_t, quant.QuantizedTable):   # int8 (on the device: not offloadable)
      if exact:
        for k in ("q", "scale", "bias"):
          close(getattr(got_t, k), getattr(want_t, k), f"table {t.name} ({k})")
      scale = np.asarray(want_t.scale)
      got_t, want_t = (np.asarray(x.q * x.scale[:, None] + x.bias[:, None], np.float32)
                       for x in (got_t, want_t))
    got_t, want_t = got_t.astype(np.float32), want_t.astype(np.float32)
    if t.dtype == "float32" or exact:
      close(got_t, want_t, f"table {t.name}")
    else:
      assert_close_stored(t.name, t, got_t, want_t, scale)
    for k, v in w_opt.get(t.name, {}).items():
      loose = 1e3 if t.dtype != "float32" and k == "z" else 1.0
      close(g_opt[t.name][k], v, f"optimizer state {k} of table {t.name}", loose)


# counters of `OffloadTier.stats()` (and `train_rolling_back`) that mark a path taken
PATHS = ("store_reads", "buffer_reads", "device_bounces", "fetch_waits", "stale_rows",
         "written_rows", "flushed_rows", "rollbacks to a checkpoint", "rollbacks to the start")


def check(seed: int, stats: collections.Counter | None = None) -> str:
  """Runs seed `seed` offloaded and on the device; an AssertionError with the configuration
  in its first line for a mismatch or any error raised. Returns the tier's nonzero path
  counters (`--seeds` prints them)."""
  with tempfile.TemporaryDirectory(prefix="offload_fuzz_") as tmp:
    case = sample(seed, os.path.join(tmp, "stores"))
    try:
      want = train_on_device(case)
      got = train_offloaded(case, os.path.join(tmp, "w"))
      compare(case, got, want)
    except Exception as e:   # a refusal too: every sampled configuration is documented valid
      raise AssertionError(f"{case.describe()}\n{type(e).__name__}: {e}") from e
  if stats is not None:
    _count(stats, case, got[3])
  return " ".join(f"{k.replace(' ', '_')}={int(got[3][k])}" for k in PATHS if got[3].get(k))


def _count(stats, case: Case, tier_stats) -> None:
  """What a passing case covered (the `--seeds` summary)."""
  stats[f"devices={math.prod(case.mesh.values())}"] += 1
  stats[f"variant={case.variant}"] += 1
  stats[f"optimizer={type(case.optimizer).__name__}"] += 1
  for name, opt in case.table_optimizers:
    where = "offloaded" if case.off.table(name) is not None else "on the device"
    stats[f"own {type(opt).__name__} {where}"] += 1
  stats[f"K={case.off.prefetch_depth}"] += 1
  if tier_stats["stale_rows"]:
    stats["stale installs (not compared)"] += 1
  else:
    stats["exact (bitwise)" if case.exact() else "to rounding"] += 1
  stats[f"S={case.off.max_staleness}"] += 1
  for m in case.cache_modes:
    stats[f"cache={m}"] += 1
  for t in case.tables:
    if case.off.table(t.name) is not None:
      stats[f"offloaded {t.dtype}"] += 1
      kind = dict((n, k) for n, k, _ in case.placements)[t.name]
      stats[f"offloaded on {kind}"] += 1
  for t in case.tables:
    if t.dtype == "int8":
      stats["int8 on the device"] += 1
  if case.fetch_delay:
    stats["slow fetcher"] += 1
  if case.variant == "eval" and case.batches[case.steps] is case.batches[case.at - 1]:
    stats["eval of the last batch (every row cached)"] += 1
  for key in PATHS:
    stats[f"with {key}"] += int(tier_stats.get(key, 0) > 0)


# Slow target only: a seed costs 10-100 s on 2 shared cores (mostly compiling the train
# step twice, install, eval and checkpoint programs); the default suite keeps the
# hand-written exactness cases (test_exact.py, test_checkpoint.py). Seeds 0 and 200-211
# (their `_extend` draws since) and new ones for the paths `_extend` added: 0, 501, 523: NaN
# rollback to the start, 209, 211, 625: to a checkpoint (625 then to the start; 211's
# stale installs leave it uncompared), 203, 205, 209: int8 tables, 210, 526: an eval of the
# last batch trained, 501, 509, 523, 526: the slow fetcher and `fetch_waits` (3-14 each).
# Each 25-82 s at load ~9 (the list with 515 for 625: 621 s). Tables with optimizers of
# their own (`_own_optimizers`' draws since): 0, 201, 209, and 24 (ckpt_mesh: offloaded t0
# Adam and t1 FTRL), 25 (ckpt: int8 t0 on the device and offloaded t1 with FTRL).
SLOW_SEEDS = (0, 24, 25, 201, 202, 203, 205, 209, 210, 211, 501, 509, 523, 526, 625)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_random_offload_configurations_match_the_device(seed):
  check(seed)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", default="0:50", help="START:STOP (or one seed)")
  stats = collections.Counter()
  code = run_seeds(parser.parse_args(argv).seeds, lambda seed: check(seed, stats))
  print("passed cases covered: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
  return code


if __name__ == "__main__":
  sys.exit(main())
