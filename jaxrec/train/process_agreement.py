"""The processes of one job run one run: the same flags and gin config on every process.

scripts/launch.py starts every worker with the same command line; processes started by hand
(the `JAXREC_*` variables of `jaxrec/elastic/worker.py`, or a cluster's per-rank command)
may differ. Different `--num_steps` or `--checkpoint_every` left each process waiting
forever in a collective the others never reach (no checkpoint, SIGTERM recorded and never
acted on), a different batch size aborted both with a C stack dump after 100 s, a
different `--seed` was jax's multi-line `AssertionError`. `check` compares them once, before
anything is planned or read, in one small all-gather.
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxrec.errors import ConfigError, DataError

# RunOptions fields every process must share (`progress` is each terminal's own;
# `predictions`, the path process 0 writes the scores to, is process 0's)
SHARED = ("num_steps", "mesh", "plan", "train_data", "eval_data", "log_every", "eval_every",
          "checkpoint_every", "keep_checkpoints", "seed", "on_nan", "bad_rows",
          "memory_per_device", "eval_labels", "early_stop_metric", "early_stop_patience",
          "early_stop_min_delta")
GIN = "gin bindings (--gin_file, --gin_bindings)"
LINE_BUCKETS = 4096   # gin config lines hashed into buckets, to name the ones that differ


def check(options, gin_config: Callable[[], str]) -> None:
  """Raises a `ConfigError` on every process naming what differs between the job's
  processes (`SHARED` options, and `gin_config()`'s lines: the bindings gin parsed) with
  this process's values; nothing in a job of one process. Every process must call it.
  `gin_config` (`gin.config_str`) is called only in a job of several processes: formatting
  the config took 3.5 s of every start at 3,000 tables."""
  if jax.process_count() == 1:
    return
  values, lines, mine = local_fingerprint(options, gin_config())
  every = np.asarray(multihost_utils.process_allgather(mine))   # [processes, len(mine)]
  message = disagreement(values, lines, every, jax.process_index())
  if message:
    raise ConfigError(message)


def local_fingerprint(options, gin_config: str) -> tuple[dict, list[str], np.ndarray]:
  """`(values, gin lines, int32 array)`: the `SHARED` options by flag, the binding lines of
  `gin_config`, and what this process gathers: a hash per option, then `LINE_BUCKETS`
  XORs of the lines' hashes (a line only some processes have changes its bucket)."""
  values = {f"--{name}": getattr(options, name) for name in SHARED}
  lines = [l for l in gin_config.splitlines() if l.strip() and not l.startswith("#")]
  mine = np.zeros(len(values) + LINE_BUCKETS, np.int32)
  mine[:len(values)] = [_hash(repr(v)) for v in values.values()]
  for line in lines:
    mine[len(values) + _hash(line) % LINE_BUCKETS] ^= _hash(line)
  return values, lines, mine


def disagreement(values: dict, lines: list[str], every: np.ndarray, me: int) -> str | None:
  """The error for process `me` (its `values` and `lines`) when the gathered fingerprints
  `every` `[processes, ...]` differ; None when they agree."""
  differs = (every != every[:1]).any(axis=0)
  if not differs.any():
    return None
  named = [name for i, name in enumerate(values) if differs[i]]
  shown = [f"{name}={values[name]!r}" for name in named]
  if differs[len(values):].any():
    named.append(GIN)
    own = [l.strip()[:120] for l in lines if differs[len(values) + _hash(l) % LINE_BUCKETS]]
    shown.append(f"the binding(s) {'; '.join(own[:4])}{'; ...' if len(own) > 4 else ''}"
                 if own else "none of the bindings the others have")
  others = [p for p in range(every.shape[0]) if (every[p] != every[me]).any()]
  return (f"the job's processes were started with different {', '.join(named)}: process "
          f"{me} has {', '.join(shown)}; processes {others} have other values. Start every "
          "process with the same flags and gin files (scripts/launch.py does)")


def opened_data(open_data: Callable[[], tuple], names: Sequence[str]) -> tuple:
  """`open_data()`'s data sources (each with `.source` or itself a source, or None), the
  same on every process of the job: each process hashes what it opened (the number of
  examples, `pipeline.data_fingerprint`) and one all-gather compares them. Processes that
  read a path each from its own host's copy, one of them short of a file, trained without a
  word on data whose global batches repeated some examples and never held others; one
  process that fails to open its data (a missing file) stopped with its error while the
  others waited for it forever. Now every process stops: a `DataError` names the source
  (`names`, e.g. `--train_data`) and this process's size, or the process that failed."""
  if jax.process_count() == 1:
    return open_data()
  failed, out = None, (None,) * len(names)
  try:
    out = open_data()
  except Exception as e:  # pylint: disable=broad-except
    failed = e
  mine = local_data_row(out, failed is not None)
  every = np.asarray(multihost_utils.process_allgather(mine))   # [processes, 1 + sources]
  if failed is not None:
    raise failed
  me = jax.process_index()
  broken = [int(p) for p in np.flatnonzero(every[:, 0])]
  if broken:
    raise DataError(f"process(es) {broken} of the job could not open their data (their "
                    "logs say why): every process reads the same data and stops with them")
  for i, name in enumerate(names):
    others = [p for p in range(every.shape[0]) if every[p, 1 + i] != every[me, 1 + i]]
    if others:
      n, fingerprint = _identity(out[i])
      raise DataError(f"the job's processes read different data for {name}: process {me} "
                      f"has {n if n is not None else 'an endless stream of'} examples "
                      f"(fingerprint {fingerprint}), processes {others} other data. Every "
                      "process must read the same files (a copy on each host identical)")
  return out


def local_data_row(sources: Sequence, failed: bool = False) -> np.ndarray:
  """What `opened_data` gathers from this process: int32 `[failed, hash of each source's
  identity...]`."""
  return np.asarray([failed] + [_hash(repr(_identity(s))) for s in sources], np.int32)


def _identity(data) -> tuple[int | None, str | None]:
  """`(examples, fingerprint)` of a training iterator (its cached `fingerprint`, which its
  data state records too) or eval batches (their `.source`), `(None, None)` for no data."""
  if data is None:
    return None, None
  from jaxrec.data import pipeline  # pylint: disable=import-outside-toplevel
  source = getattr(data, "source", data)
  if isinstance(data, pipeline.TrainIterator):
    return source.num_examples, data.fingerprint
  return source.num_examples, pipeline.data_fingerprint(source)


def _hash(text: str) -> int:
  return zlib.crc32(text.encode()) & 0x7FFFFFFF
