#!/usr/bin/env python3
"""Wall time of the planner's search against the number of tables.

The search (`--plan=auto`, `scripts/plan.py`) runs before anything trains, and a model of
thousands of small tables (feature crosses, per-site ids) must not sit silent at start-up for
minutes.

Tables `t<i>` of 10 + i % 50 rows and dims `--dims` in turn (default 1, 4, 8, 16; one one-hot
feature each), on `--mesh` (default table=4,row=2), SGD, batch 512, the default budget.
Prints one line per size:
`{"benchmark": "planner_search", "tables": N, "seconds": S, "evaluations": E,
"estimated_step_us": T, "peak_rss_mib": M}` (E: plans priced, by parts or from scratch; M:
the process's peak so far).
`--record FILE` also writes each proposed plan and its estimate (JSON lines, the file made
afresh), to compare two versions of the search. No goal: the numbers are in docs/benchmarks.md.
"""

import argparse
import json
import resource
import time

import common  # noqa: E402  (also puts the repository on sys.path)
from common import HelpFormatter, interruptible  # noqa: E402

from jaxrec.embedding.specs import FeatureSpec, TableSpec  # noqa: E402
from jaxrec.errors import ConfigError  # noqa: E402
from jaxrec.planner import search  # noqa: E402
from jaxrec.sharding import mesh as mesh_lib  # noqa: E402

BATCH = 512


def _tables(n: int, dims=(1, 4, 8, 16)):
  tables = [TableSpec(f"t{i}", 10 + i % 50, dims[i % len(dims)]) for i in range(n)]
  return tables, [FeatureSpec(f"f{i}", f"t{i}") for i in range(n)]


def _counts(parser, flag: str, text: str) -> list[int]:
  """`'1,4,8'` -> `[1, 4, 8]`; a parser error unless every entry is a positive integer."""
  try:   # 'abc' or '10,,20': a ValueError traceback
    values = [int(x) for x in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    parser.error(f"--{flag} must be positive integers, got '{text}'")
  return values


def _mesh(parser, text: str) -> dict[str, int]:
  """`'table=4,row=2'` -> all four axes' sizes; a parser error naming `--mesh` for an
  unknown or repeated axis, a size that is not a positive integer, or a data axis that does
  not divide the batch (each was a traceback, or the last of a repeated axis taken)."""
  try:
    shape = mesh_lib.parse_mesh_spec(text, None, "--mesh", auto=False)
  except ConfigError as e:
    parser.error(str(e))
  if BATCH % shape["data"]:
    parser.error(f"--mesh: data={shape['data']} does not divide the batch of {BATCH}")
  return shape


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=HelpFormatter)
  parser.add_argument("--tables", default="26,200,800,2000",
                      help="comma-separated table counts")
  parser.add_argument("--dims", default="1,4,8,16", help="table dims, in turn")
  parser.add_argument("--mesh", default="table=4,row=2", help="mesh axis sizes")
  parser.add_argument("--record", default=None,
                      help="file to write each proposed plan and estimate to (JSON lines; default: "
                           "none)")
  args = parser.parse_args()
  sizes = _counts(parser, "tables", args.tables)
  dims = tuple(_counts(parser, "dims", args.dims))
  mesh = _mesh(parser, args.mesh)
  if args.record:   # a missing directory was a traceback after the first search (minutes)
    try:
      open(args.record, "w", encoding="utf-8").close()
    except OSError as e:
      parser.error(f"--record: cannot write {args.record}: {e.strerror}")
  priced = [0]
  for method in ("price", "evaluate_plan"):   # by parts during the search; from scratch
    original = getattr(search._Space, method)   # pylint: disable=protected-access

    def counting(self, *a, _original=original, **kw):
      priced[0] += 1
      return _original(self, *a, **kw)

    setattr(search._Space, method, counting)   # pylint: disable=protected-access
  for n in sizes:
    tables, features = _tables(n, dims)
    priced[0] = 0
    t0 = time.perf_counter()
    result = search.propose_plan(tables, features, mesh, None, "sgd", BATCH)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    common.emit("planner_search", tables=n, seconds=round(time.perf_counter() - t0, 2),
                evaluations=priced[0], estimated_step_us=round(result.step_time_s * 1e6, 1),
                peak_rss_mib=round(peak))
    if args.record:
      with open(args.record, "a", encoding="utf-8") as f:   # the whole result, reasons too
        f.write(json.dumps({"tables": n, "dims": dims, "mesh": mesh,
                            "result": result.to_json()}, sort_keys=True) + "\n")


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
