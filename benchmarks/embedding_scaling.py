#!/usr/bin/env python3
"""Embedding lookup + sparse update step time vs rows per table (same batch).

The sparse path touches only the rows a batch uses, so step time should not grow with the
table: goal time(1e7 rows) / time(1e5 rows) <= 1.2.

All sizes are built first and timed interleaved (a few steps of each size per round, for
`--rounds` rounds), so load drift on a shared machine hits every size alike; times are
medians over all rounds, `cpu_ms` the process's CPU time per step.
Prints `{"benchmark": "embedding_scaling", "rows": R, "step_ms": T, "cpu_ms": C}` per size
and a final line with `"ratio"`, `"cpu_ratio"` and `"goal"` (given two sizes or more).
"""

import argparse

from common import HelpFormatter, check_at_least, emit, interleaved_times, interruptible, median

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.sharding.mesh import make_mesh
from jaxrec.sharding.plan import uniform_plan


class ScalingStep:
  """One size's jitted lookup + pool backward + sparse update; `run()` does a step and
  blocks (the interface `interleaved_times` takes)."""

  def __init__(self, rows: int, num_tables: int, batch: int, dim: int, optimizer, seed=0):
    self.step, self.state, self.ids = _build(rows, num_tables, batch, dim, optimizer, seed)

  def run(self):
    self.state = self.step(self.state, self.ids)
    jax.block_until_ready(self.state)


def _build(rows, num_tables, batch, dim, optimizer, seed):
  tables = [TableSpec(f"t{i}", rows, dim, init_scale=0.01) for i in range(num_tables)]
  features = [FeatureSpec(f"f{i}", f"t{i}") for i in range(num_tables)]
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  coll = EmbeddingCollection.create(tables, features, uniform_plan("dp", tables, 1), mesh,
                                    optimizer)
  state = coll.init(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  ids = {f"f{i}": (rng.zipf(1.2, (batch, 1)) % rows).astype(np.int32) for i in range(num_tables)}
  ids = jax.device_put(ids)

  def step(state, ids):
    ctx = coll.lookup(state, ids)
    pooled, vjp = jax.vjp(lambda r: coll.pool(r, ctx), ctx.rows)
    (grads,) = vjp(pooled)          # a stand-in upstream gradient
    return coll.apply_gradients(state, ctx, grads, jnp.int32(0))

  return jax.jit(step, donate_argnums=(0,)), state, ids


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--rows", default="100000,1000000,10000000",
                 help='comma list of table sizes (rows) to time')
  p.add_argument("--tables", type=int, default=2,
                 help='tables of each size')
  p.add_argument("--batch", type=int, default=4096,
                 help='examples per step')
  p.add_argument("--dim", type=int, default=16,
                 help='embedding dimension')
  p.add_argument("--optimizer", default="rowwise_adagrad",
                 help='sparse optimizer (jaxrec.embedding.optimizers.OPTIMIZERS)')
  p.add_argument("--rounds", type=int, default=10,
                 help='interleaved rounds over all sizes')
  p.add_argument("--steps", type=int, default=5, help="timed steps per size per round")
  args = p.parse_args()
  if args.optimizer not in optimizers.OPTIMIZERS:
    p.error(f"--optimizer: unknown {args.optimizer!r} (known: {', '.join(optimizers.OPTIMIZERS)})")
  check_at_least(p.error, vars(args), ("tables", "batch", "dim", "rounds", "steps"))
  opt = optimizers.sparse_optimizer(args.optimizer)
  try:   # smallest first: the goal is the largest size's time over the smallest's
    sizes = sorted({int(float(r)) for r in args.rows.split(",")})
  except (ValueError, OverflowError):   # inf: an OverflowError traceback
    p.error(f"--rows: comma-separated row counts (e.g. 1e5,1e7), got {args.rows!r}")
  if sizes[0] < 1:
    p.error(f"--rows: row counts must be positive, got {args.rows!r}")
  if sizes[-1] > 2**31 - 1:   # the collection's ConfigError, as a traceback
    p.error(f"--rows: {sizes[-1]:,} rows is over the {2**31 - 1:,} that int32 ids reach")
  runners = {rows: ScalingStep(rows, args.tables, args.batch, args.dim, opt) for rows in sizes}
  wall, cpu = interleaved_times(runners, args.rounds, args.steps, warmup=3)
  times = {rows: median(wall[rows]) for rows in sizes}
  cpus = {rows: median(cpu[rows]) for rows in sizes}
  for rows in sizes:
    emit("embedding_scaling", rows=rows, tables=args.tables, batch=args.batch, dim=args.dim,
         optimizer=args.optimizer, step_ms=round(times[rows] * 1e3, 3),
         cpu_ms=round(cpus[rows] * 1e3, 3))
  if len(sizes) > 1:   # (one size compared with itself was a ratio of 1.0 "meeting" it)
    emit("embedding_scaling", rows=f"{sizes[-1]}/{sizes[0]}",
         ratio=round(times[sizes[-1]] / times[sizes[0]], 3),
         cpu_ratio=round(cpus[sizes[-1]] / cpus[sizes[0]], 3), goal=1.2, goal_op="<=")


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
