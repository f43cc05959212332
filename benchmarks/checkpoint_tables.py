#!/usr/bin/env python3
"""Checkpoint cost of many tables: one save, its wait and one restore, on one CPU device
(or `--processes` jax.distributed processes of `--devices_per_process` CPU devices each,
the tables split by rows over all their devices: each process writes its rows).

`--tables` tables of `--rows` x `--dim` float32 with a row-wise Adagrad accumulator each
(two stored arrays a table), a few dense params; no training. Measures:

  blocked_s   how long `CheckpointManager.save` keeps the caller (copy to host)
  save_s      save start to commit (the files written in the background, waited for)
  restore_s   restore of the latest step onto the same collection
  files       files in one step directory; `layout`: `database` (one OCDBT database
              for the tables: a save of 64 arrays or more) or `files`

`--layout=files` keeps the directory of files per array however many arrays (the layout
before databases: `DATABASE_ARRAYS` raised), to compare.

  .venv/bin/python benchmarks/checkpoint_tables.py [--tables=3000] [--rows=1000] [--saves=2]
      [--processes=2 --devices_per_process=4] [--layout=files]

Prints one JSON line per save: {"benchmark": "checkpoint_tables", "tables": ..., ...}.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
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
  p.add_argument("--processes", type=int, default=1,
                 help="jax.distributed processes on this host (started by this script)")
  p.add_argument("--devices_per_process", type=int, default=1, help="CPU devices of each")
  p.add_argument("--layout", choices=("auto", "files"), default="auto",
                 help="files: a directory per array however many arrays")
  p.add_argument("--workdir", default=None,
                 help="where to write (must not exist; default: a temp dir, removed)")
  args = p.parse_args()
  check_at_least(p.error, vars(args), ("tables", "rows", "dim", "saves", "processes",
                                       "devices_per_process"))
  if args.workdir is not None and os.path.exists(args.workdir) and not _WORKER:
    p.error(f"--workdir={args.workdir} exists: give a new path")
  return args


_WORKER = "JAXREC_BENCH_PROCESS" in os.environ   # one of the processes this script started


def _start_processes(args, workdir: str) -> None:
  """This script again as `--processes` processes of one jax.distributed job (their lines
  on stdout: process 0's); raises when one fails."""
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  flags = os.environ.get("XLA_FLAGS", "")
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--workdir={workdir}"],
      env=dict(os.environ, JAXREC_BENCH_PROCESS=str(p), JAXREC_BENCH_PORT=str(port),
               JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} --xla_force_host_platform_device_"
               f"count={args.devices_per_process}".strip()))
      for p in range(args.processes)]
  codes = [proc.wait() for proc in procs]
  if any(codes):
    raise SystemExit(f"checkpoint_tables: processes exited with {codes}")


def _files(path: str) -> int:
  return sum(len(fs) for _, _, fs in os.walk(path))


@interruptible
def main():
  args = _args()
  if args.processes > 1 and not _WORKER:
    with scratch_dir(args.workdir, "jaxrec_ckpt_tables_") as workdir:
      _start_processes(args, workdir)
    return
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
  from jax.sharding import NamedSharding, PartitionSpec

  absl_logging.set_verbosity(absl_logging.ERROR)
  if _WORKER:
    jax.distributed.initialize(f"127.0.0.1:{os.environ['JAXREC_BENCH_PORT']}",
                               args.processes, int(os.environ["JAXREC_BENCH_PROCESS"]))
  if args.layout == "files":
    tables_lib.DATABASE_ARRAYS = float("inf")
  tables = tuple(TableSpec(f"t{i:05d}", args.rows, args.dim) for i in range(args.tables))
  features = tuple(FeatureSpec(f"f{i:05d}", t.name, 1) for i, t in enumerate(tables))
  if _WORKER:   # every stack split by rows over every process's devices
    mesh = make_mesh({"row": jax.device_count()}, devices=jax.devices())
    plan = uniform_plan("rw", tables, 1)
  else:
    mesh, plan = make_mesh({"data": 1}, devices=jax.devices()[:1]), uniform_plan("dp", tables, 1)
  coll = EmbeddingCollection.create(tables, features, plan, mesh, optimizers.RowWiseAdagrad())
  replicated = NamedSharding(mesh, PartitionSpec())
  dense = jax.jit(lambda: {"step": jnp.int32(0), "params": {"w": jnp.ones((64, 64))},
                           "opt_state": {}, "rng": jax.random.key(0)},
                  out_shardings=replicated)()
  state = dict(dense, emb=jax.block_until_ready(coll.init(jax.random.key(1))))
  with scratch_dir(args.workdir, "jaxrec_ckpt_tables_") as workdir:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    with CheckpointManager(ckpt_dir, max_to_keep=2) as mgr:
      for step in range(1, args.saves + 1):
        state["step"] = jax.jit(lambda s=step: jnp.int32(s), out_shardings=replicated)()
        t0 = time.perf_counter()
        mgr.save(step, state, coll, force=True)
        blocked = time.perf_counter() - t0
        mgr.wait()
        saved = time.perf_counter() - t0
        t0 = time.perf_counter()
        restored = mgr.restore(dense, coll)
        jax.block_until_ready(restored.state)
        tables_dir = os.path.join(ckpt_dir, str(step), "embeddings")
        if jax.process_index() > 0:
          continue
        emit("checkpoint_tables", tables=args.tables, rows=args.rows, dim=args.dim,
             arrays=2 * args.tables, step=step, processes=jax.process_count(),
             devices=jax.device_count(),
             layout="database" if tables_lib.uses_database(tables_dir) else "files",
             blocked_s=round(blocked, 3), save_s=round(saved, 3),
             restore_s=round(time.perf_counter() - t0, 3),
             files=_files(os.path.join(ckpt_dir, str(step))))


if __name__ == "__main__":
  main()
