#!/usr/bin/env python3
"""Checkpoint cost of many tables: one save, its wait and one restore, on one CPU device.

`--tables` tables of `--rows` x `--dim` float32 with a row-wise Adagrad accumulator each
(two stored arrays a table), a few dense params; no training. Measures:

  blocked_s   how long `CheckpointManager.save` keeps the caller (copy to host)
  save_s      save start to commit (the files written in the background, waited for)
  restore_s   restore of the latest step onto the same collection
  files       files in one step directory; `layout`: `database` (one OCDBT database
              for the tables, a one-process save of 64 arrays or more) or `files`

  .venv/bin/python benchmarks/checkpoint_tables.py [--tables=3000] [--rows=1000] [--saves=2]

Prints one JSON line per save: {"benchmark": "checkpoint_tables", "tables": ..., ...}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import HelpFormatter, check_at_least, interruptible, scratch_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--tables", type=int, default=3000, help="tables in the collection")
  p.add_argument("--rows", type=int, default=1000, help="rows of each table")
  p.add_argument("--dim", type=int, default=16, help="dim of each table")
  p.add_argument("--saves", type=int, default=2, help="saves timed (each a new step)")
  p.add_argument("--workdir", default=None,
                 help="where to write (must not exist; default: a temp dir, removed)")
  args = p.parse_args()
  check_at_least(p.error, vars(args), ("tables", "rows", "dim", "saves"))
  if args.workdir is not None and os.path.exists(args.workdir):
    p.error(f"--workdir={args.workdir} exists: give a new path")
  return args


def _files(path: str) -> int:
  return sum(len(fs) for _, _, fs in os.walk(path))


@interruptible
def main():
  args = _args()
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  from absl import logging as absl_logging
  from common import emit
  from jaxrec.checkpoint import CheckpointManager
  from jaxrec.checkpoint import tables as tables_lib
  from jaxrec.embedding import optimizers
  from jaxrec.embedding.collection import EmbeddingCollection
  from jaxrec.embedding.specs import FeatureSpec, TableSpec
  from jaxrec.sharding.mesh import make_mesh
  from jaxrec.sharding.plan import uniform_plan

  absl_logging.set_verbosity(absl_logging.ERROR)
  tables = tuple(TableSpec(f"t{i:05d}", args.rows, args.dim) for i in range(args.tables))
  features = tuple(FeatureSpec(f"f{i:05d}", t.name, 1) for i, t in enumerate(tables))
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  coll = EmbeddingCollection.create(tables, features, uniform_plan("dp", tables, 1), mesh,
                                    optimizers.RowWiseAdagrad())
  dense = {"step": jnp.int32(0), "params": {"w": jnp.ones((64, 64))}, "opt_state": {},
           "rng": jax.random.key(0)}
  state = dict(dense, emb=jax.block_until_ready(coll.init(jax.random.key(1))))
  with scratch_dir(args.workdir, "jaxrec_ckpt_tables_") as workdir:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    with CheckpointManager(ckpt_dir, max_to_keep=2) as mgr:
      for step in range(1, args.saves + 1):
        state["step"] = jnp.int32(step)
        t0 = time.perf_counter()
        mgr.save(step, state, coll, force=True)
        blocked = time.perf_counter() - t0
        mgr.wait()
        saved = time.perf_counter() - t0
        t0 = time.perf_counter()
        restored = mgr.restore(dense, coll)
        jax.block_until_ready(restored.state)
        tables_dir = os.path.join(ckpt_dir, str(step), "embeddings")
        emit("checkpoint_tables", tables=args.tables, rows=args.rows, dim=args.dim,
             arrays=2 * args.tables, step=step,
             layout="database" if tables_lib.uses_database(tables_dir) else "files",
             blocked_s=round(blocked, 3), save_s=round(saved, 3),
             restore_s=round(time.perf_counter() - t0, 3),
             files=_files(os.path.join(ckpt_dir, str(step))))


if __name__ == "__main__":
  main()
