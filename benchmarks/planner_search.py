#!/usr/bin/env python3
"""Wall time of the planner's search against the number of tables.

The search (`--plan=auto`, `scripts/plan.py`) runs before anything trains, and a model of
thousands of small tables (feature crosses, per-site ids) must not sit silent at start-up for
minutes.

Tables `t<i>` of 10 + i % 50 rows and dims 1, 4, 8, 16 in turn (one one-hot feature each), on
mesh table=4,row=2, SGD, batch 512, the default budget. Prints one line per size:
`{"benchmark": "planner_search", "tables": N, "seconds": S, "evaluations": E,
"estimated_step_us": T}` (E: plans priced). No goal: the numbers are in docs/benchmarks.md.
"""

import argparse
import time

from common import interruptible  # noqa: E402  (also puts the repository on sys.path)

from jaxrec.embedding.specs import FeatureSpec, TableSpec  # noqa: E402
from jaxrec.planner import search  # noqa: E402


def _tables(n: int):
  tables = [TableSpec(f"t{i}", 10 + i % 50, (1, 4, 8, 16)[i % 4]) for i in range(n)]
  return tables, [FeatureSpec(f"f{i}", f"t{i}") for i in range(n)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--tables", default="26,200,800,2000",
                      help="comma-separated table counts")
  args = parser.parse_args()
  try:   # 'abc' or '10,,20': a ValueError traceback
    sizes = [int(x) for x in args.tables.split(",")]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    parser.error(f"--tables must be positive counts, got '{args.tables}'")
  priced = [0]
  evaluate_plan = search._Space.evaluate_plan   # pylint: disable=protected-access

  def counting(self, *a, **kw):
    priced[0] += 1
    return evaluate_plan(self, *a, **kw)

  search._Space.evaluate_plan = counting   # pylint: disable=protected-access
  for n in sizes:
    tables, features = _tables(n)
    priced[0] = 0
    t0 = time.perf_counter()
    result = search.propose_plan(tables, features, {"table": 4, "row": 2}, None, "sgd", 512)
    common.emit("planner_search", tables=n, seconds=round(time.perf_counter() - t0, 2),
                evaluations=priced[0], estimated_step_us=round(result.step_time_s * 1e6, 1))


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
