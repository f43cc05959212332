#!/usr/bin/env python3
"""File work of an offloaded table's store at checkpoints, by table size.

One `TableStore` of `--rows` x `--dim` float32 (SGD: no optimizer state) in `--store_dir`
(default: a temporary directory), driven as a training run
drives it at its checkpoints: its initial rows written (`init_s`), a snapshot
(`snapshot_s`: hard links and the file list's CRC32s), one row rewritten in every file as a
write-back spread over the table does (`write_s`), a second snapshot, a restore of the first
into the store (`restore_s`, as a resume after `kill -9` does), and the removal of both
snapshots (`prune_s`, as rotation does). Prints one JSON line with the seconds, the store's
files and directories, and its size. The directories count: zarr3's default chunk keys
(`c/<i>/0`) made one per file, and on a disk mounted with `discard` each one created or
removed cost ~2 ms (docs/benchmarks.md).
"""

import argparse
import os
import time

from common import HelpFormatter, check_at_least, emit, interruptible, own_dir, scratch_dir

import jax
import numpy as np

from jaxrec import offload
from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import TableSpec
from jaxrec.offload import snapshots
from jaxrec.offload.store import TableStore


def _count(root: str) -> tuple[int, int]:
  """(files, directories) under `root`."""
  files = dirs = 0
  for _, ds, fs in os.walk(root):
    files, dirs = files + len(fs), dirs + len(ds)
  return files, dirs


def measure(rows: int, dim: int, directory: str) -> dict:
  spec = TableSpec("big", rows, dim)
  store = TableStore(spec, offload.OffloadTable("big", cache_rows=1), optimizers.SGD(lr=0.1),
                     os.path.join(directory, "store"))
  snaps = os.path.join(directory, "snapshots")
  out, t = {}, time.perf_counter()

  def lap(name):
    nonlocal t
    now = time.perf_counter()
    out[name] = round(now - t, 3)
    t = now

  store.create(jax.random.key(0))
  lap("init_s")
  snapshots.save(snaps, 1, {"big": store}, None)
  lap("snapshot_s")
  file_rows = store.off.file_rows(rows)[1] or store.off.file_rows(rows)[0]
  touched = np.arange(0, rows, file_rows)
  store.write(touched, {"table": np.ones((len(touched), dim), np.float32)})
  lap("write_s")
  snapshots.save(snaps, 2, {"big": store}, None)
  lap("second_snapshot_s")
  store.restore_snapshot(os.path.join(snaps, "1", "big"))
  lap("restore_s")
  snapshots.prune_older(snaps, 3)
  lap("prune_s")
  files, dirs = _count(store.path)
  return dict(out, rows=rows, dim=dim, store_files=files, store_dirs=dirs,
              store_mib=round(rows * dim * 4 / 2**20, 1))


@interruptible
def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--rows", type=int, default=3_000_000, help="rows of the table")
  p.add_argument("--dim", type=int, default=16, help="its dim")
  p.add_argument("--store_dir", default=None,
                 help="directory for the store and its snapshots: new, empty or an earlier "
                      "run's (default: a temporary one, removed at the end)")
  args = p.parse_args()
  check_at_least(p.error, vars(args), ("rows", "dim"))
  if args.store_dir is not None:   # a directory of its own: its store and snapshots go
    own_dir(p.error, "store_dir", args.store_dir, ".offload_files")
  with scratch_dir(args.store_dir, "jaxrec_offload_files_") as d:
    emit("offload_files", **measure(args.rows, args.dim, d))


if __name__ == "__main__":
  main()
