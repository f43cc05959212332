#!/usr/bin/env python3
"""Cost of per-table sparse optimizers (`ExperimentConfig.table_optimizers`).

Tables of different optimizer families (class and hyperparameters but `lr`) are stacked
apart, so a config that mixes optimizers runs more, smaller stacks; tables that differ only
in `lr` share stacks, each row updated at its table's rate. Times the embedding step
(lookup + pool backward + sparse update, as `embedding_scaling.py`, one device) on the
`dlrm_criteo` shape (26 tables x 1e5 x 16, batch 512) for: every table SGD; every table
row-wise Adagrad; half of each (2 stacks); every table its own row-wise Adagrad rate
(`each_lr`: one family, one stack); every table its own row-wise Adagrad `eps` (`each_eps`:
26 families, 26 stacks, the worst case); every table its own SGD rate (`sgd_each_lr`); and,
as the parts of "half", 13 tables SGD alone and 13 row-wise Adagrad alone. Variants are
timed interleaved (`common.interleaved_times`). Prints one line per variant
`{"benchmark": "table_optimizers", "variant": V, "stacks": S, "step_ms": T, "cpu_ms": C}`
and a last line with `"half_vs_parts"` (the half/half step over its two halves' steps
added: the cost of running both in one program, ~1 if splitting costs nothing),
`"half_vs_rowwise"`, `"each_lr_vs_rowwise"`, `"each_eps_vs_rowwise"` and
`"sgd_each_lr_vs_sgd"`.
"""

import argparse

from common import HelpFormatter, check_at_least, emit, interleaved_times, interruptible, median
from embedding_scaling import ScalingStep

from jaxrec.embedding import optimizers


def variants(num_tables: int) -> dict:
  """`{name: (tables, sparse optimizer: one, or per table)}`."""
  sgd, rowwise = optimizers.SGD(0.1), optimizers.RowWiseAdagrad(0.1)
  names = [f"t{i}" for i in range(num_tables)]
  half = num_tables // 2
  return {
      "sgd": (num_tables, sgd),
      "rowwise": (num_tables, rowwise),
      "half": (num_tables, optimizers.per_table(sgd, {n: rowwise for n in names[:half]})),
      "each_lr": (num_tables, optimizers.per_table(
          rowwise, {n: optimizers.RowWiseAdagrad(0.1 + 0.01 * i)
                    for i, n in enumerate(names[1:], 1)})),
      "each_eps": (num_tables, optimizers.per_table(
          rowwise, {n: optimizers.RowWiseAdagrad(0.1, eps=1e-8 * (1 + i))
                    for i, n in enumerate(names[1:], 1)})),
      "sgd_each_lr": (num_tables, optimizers.per_table(
          sgd, {n: optimizers.SGD(0.1 + 0.01 * i) for i, n in enumerate(names[1:], 1)})),
      "sgd_part": (num_tables - half, sgd),   # "half"'s two stacks, each alone
      "rowwise_part": (half, rowwise),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--rows", type=int, default=100_000, help="rows per table")
  p.add_argument("--tables", type=int, default=26, help="tables")
  p.add_argument("--batch", type=int, default=512, help="examples per step")
  p.add_argument("--dim", type=int, default=16, help="embedding dimension")
  p.add_argument("--rounds", type=int, default=10, help="interleaved rounds over the variants")
  p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
  args = p.parse_args()
  check_at_least(p.error, vars(args), ("rows", "tables", "batch", "dim", "rounds", "steps"))
  if args.tables < 2:
    p.error(f"--tables: at least 2 (half of them change optimizer), got {args.tables}")
  runners = {name: ScalingStep(args.rows, tables, args.batch, args.dim, opt)
             for name, (tables, opt) in variants(args.tables).items()}
  wall, cpu = interleaved_times(runners, args.rounds, args.steps, warmup=3)
  times = {name: median(wall[name]) for name in runners}
  for name, runner in runners.items():
    emit("table_optimizers", variant=name, stacks=len(runner.state["tables"]),
         tables=variants(args.tables)[name][0], rows=args.rows, batch=args.batch, dim=args.dim,
         step_ms=round(times[name] * 1e3, 3), cpu_ms=round(median(cpu[name]) * 1e3, 3))
  emit("table_optimizers", variant="summary",
       half_vs_parts=round(times["half"] / (times["sgd_part"] + times["rowwise_part"]), 3),
       half_vs_rowwise=round(times["half"] / times["rowwise"], 3),
       each_lr_vs_rowwise=round(times["each_lr"] / times["rowwise"], 3),
       each_eps_vs_rowwise=round(times["each_eps"] / times["rowwise"], 3),
       sgd_each_lr_vs_sgd=round(times["sgd_each_lr"] / times["sgd"], 3))


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
