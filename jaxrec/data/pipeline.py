"""What the trainer calls: `make_train_iterator` and `make_eval_batches`.

`source` is one of
  "synthetic"               the planted-signal generator (`synthetic`);
  a preprocessed directory  holds `manifest.json` (`binary`, written by scripts/preprocess.py);
  a TSV path               a file, a directory of files or a glob, plain or gzip (`tsv`;
                            parsed into memory once, ~160 bytes per Criteo example; for
                            data larger than memory preprocess it).

Train order (see `indexing`): the job's state is one number, the global count of examples
consumed (`position`). The next global batch holds positions `[position, position + B)`,
process `p` of `P` yields its contiguous `B/P` slice, finite data wraps around in epochs,
each a fresh global permutation keyed by `(seed, epoch)`. So batches depend only on
`(seed, position)`: the same on any number of processes, and a job restored from
`get_state()` continues with the next unseen example, also with a different `P` (or `B`).

Eval reads its data once, in file order, in `ceil(N / B)` global batches of static shape;
the last one is padded (label 0, dense 0, empty bags) and `EvalBatch.mask` marks the real
examples. Every process gets the same number of batches.

Batches are produced by a grain pipeline (`MapDataset` over batch numbers, vectorised
gathers run by `num_threads` threads, `prefetch` batches ahead; `num_workers > 0` moves
them to worker processes).
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import threading
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

from absl import flags
from absl import logging
import gin
import grain
import jax
import numpy as np

from jaxrec import gin_usage
from jaxrec.data import binary, indexing, tsv, vocab as vocab_lib
from jaxrec.data.batch import Batch
from jaxrec.data.source import ENDLESS_LEN, NUM_DENSE, Source, check_read_as, make_layout
from jaxrec.data.synthetic import SyntheticConfig, SyntheticSource
from jaxrec.embedding.specs import FeatureSpec, TableSpec, flag, whole
from jaxrec.errors import ConfigError, DataError

SYNTHETIC = "synthetic"
TRAIN_SPLIT, EVAL_SPLIT = 0, 1
STATE_VERSION = 1


def restart_hint(checkpoints: str = "W/checkpoints") -> str:
  """How to go on from a checkpoint with another data order (a data mismatch's error says
  it; the trainer names its checkpoint directory in place of `W/checkpoints`)."""
  return ("; to continue training on other data, copy the checkpoint with "
          f"`scripts/convert_checkpoint.py --checkpoint_dir={checkpoints} "
          "--output=W2/checkpoints --format=checkpoint --restart_data` and train in W2 (a "
          "new workdir)")


RESTART_HINT = restart_hint()
PARENT_POLL_S = 0.5   # how often a worker process checks that its trainer is alive
FINGERPRINT_EXAMPLES = 256   # examples hashed to tell one dataset from another of its size


def data_fingerprint(source: Source) -> str | None:
  """A hash of `FINGERPRINT_EXAMPLES` examples spread evenly over `source` (labels, dense
  values, ids and weights as the trainer reads them); None for an endless source.

  The data position of a checkpoint means something only on the data it was trained on:
  other data of the same size (the next day's file, same row count) was resumed silently
  mid-way, its first `position` examples never seen.
  """
  n = source.num_examples
  if n is None:
    return None
  idx = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_EXAMPLES)).astype(np.int64))
  batch = source.gather(idx)
  h = hashlib.sha256()
  for a in (batch.labels, batch.dense, *(batch.ids[k] for k in sorted(batch.ids)),
            *(batch.weights[k] for k in sorted(batch.weights))):
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def _rows(rows: Mapping[str, int] | Sequence[TableSpec]) -> dict[str, int]:
  if isinstance(rows, Mapping):
    return {k: int(v) for k, v in rows.items()}
  return {t.name: int(t.rows) for t in rows}


# What the trainer passes itself (from flags and `ExperimentConfig`): gin may not bind
# these, or the binding would be ignored without a word.
_PASSED = ["source", "features", "rows", "seed", "bad_rows", "num_dense"]
_PASSED_ITER = _PASSED + ["batch_size", "process_index", "process_count"]


def _knobs(fn: str, **knobs) -> list:
  """The gin knobs of `fn`, checked: bool ones (`shuffle`, `verify_checksums`) True or False
  (gin's `'False'` is truthy), the others integers >= 0 (`1e3` too) -> ints.
  A string used to fail later with a traceback, or (`'False'`) to read as True."""
  out = []
  for name, value in knobs.items():
    if name in ("shuffle", "verify_checksums"):
      out.append(flag(value, f"{fn}.{name}"))
    else:
      out.append(whole(value, f"{fn}.{name}", minimum=0))
  return out


@gin.configurable(denylist=_PASSED + ["split", "labeled"])
def open_source(source: str, features: Sequence[FeatureSpec],
                rows: Mapping[str, int] | Sequence[TableSpec], *, seed: int = 0,
                split: int = TRAIN_SPLIT, bad_rows: str = "error", num_dense: int = NUM_DENSE,
                num_categorical: int = 26, verify_checksums: bool = True,
                synthetic: SyntheticConfig | None = None, labeled: bool = True,
                dense_transform: str = "log", id_format: str = "hex",
                vocab: str | None = None) -> Source:
  """Opens `source` (see module docstring) for `features`.

  Args:
    source: "synthetic", a preprocessed directory, or a TSV file/directory/glob.
    features: the sparse features, in the order of the data's categorical columns.
    rows: table name -> row count (or the `TableSpec`s); ids are reduced `% rows`.
    seed, split: synthetic data only (train split 0, eval split 1).
    bad_rows: "error" (default) raises on the first malformed row; "skip" drops and counts.
    num_dense, num_categorical: TSV columns (Criteo: 13 and 26); `num_categorical` must
      equal `len(features)`.
    verify_checksums: check each binary shard's sha256 on open (once per unchanged file,
      see `binary`).
    synthetic: generator knobs (default: `SyntheticConfig()`, gin-configurable).
    labeled: False for TSV files without the label column, to be scored only (the
      trainer's `--noeval_labels`); synthetic and preprocessed data hold labels.
    dense_transform: how a TSV's dense values are read: "log" (raw integer counts ->
      `log(1 + max(x, 0))`) or "none" (floats, as written); a preprocessed directory must
      have been written with the same one. The synthetic generator ignores it.
    id_format: how a TSV's categorical ids are written: "hex" (Criteo's, `int(id, 16) %
      rows`) or "decimal" (ids already made contiguous, `int(id) % rows`); a preprocessed
      directory must have been written with the same one. The synthetic generator
      ignores it.
    vocab: a directory scripts/build_vocab.py wrote: a TSV's ids are read through it (a
      kept id -> its row 1..V of its table, any other -> row 0) in place of `% rows`;
      each table needs its vocabulary size + 1 rows. A preprocessed directory must have
      been written with the same vocabulary (or none, without). The synthetic generator
      ignores it.
  """
  if bad_rows not in tsv.BAD_ROWS:
    raise ConfigError(f"bad_rows must be one of {tsv.BAD_ROWS}, got '{bad_rows}'")
  num_categorical, verify_checksums = _knobs(
      "open_source", num_categorical=num_categorical, verify_checksums=verify_checksums)
  check_read_as("dense_transform", dense_transform, "open_source.dense_transform")
  check_read_as("id_format", id_format, "open_source.id_format")
  layout = make_layout(features, _rows(rows), num_dense, dense_transform, id_format,
                       vocab_lib.load_binding(vocab))
  if not labeled and (source == SYNTHETIC or binary.is_preprocessed(source)):
    raise ConfigError(f"{source}: {'synthetic' if source == SYNTHETIC else 'preprocessed'} "
                      "data holds labels; reading it without them (--noeval_labels) is for "
                      "TSV files that have no label column")
  if source == SYNTHETIC:
    return SyntheticSource(layout, seed=seed, split=split, config=synthetic)
  if not source:
    raise ConfigError("no data source given (expected 'synthetic', a TSV path or a "
                      "preprocessed directory)")
  if binary.is_preprocessed(source):
    return binary.BinarySource(source, layout, verify_checksums=verify_checksums)
  files = tsv.list_files(source)   # a missing path is the first thing to report
  binary.check_not_part(files)
  if len(features) != num_categorical:   # the file is not read: say where the count is from
    raise ConfigError(f"{source}: TSV data is read as {num_categorical} categorical columns "
                      f"(open_source.num_categorical, {_origin('open_source.num_categorical')})"
                      f" but {len(features)} sparse features are configured (TSV data with "
                      f"{len(features)}: bind open_source.num_categorical={len(features)})")
  return tsv.read_tsv(files, layout, bad_rows, labeled=labeled)


def _origin(selector: str) -> str:
  """'bound at FILE:LINE' (or 'bound by --gin_bindings', 'bound') when gin binds
  `selector`, else 'its default: not bound'."""
  try:
    gin.query_parameter(selector)
  except ValueError:
    return "its default: not bound"
  return gin_usage.bound_where(selector) or "bound"


def _train_batch(source: Source, batch_size: int, seed: int, process_index: int,
                 process_count: int, shuffle: bool, start: int, k: int) -> Batch:
  """This process's slice of global batch `k` after position `start` (pure, picklable)."""
  pos = indexing.local_positions(start + int(k) * batch_size, batch_size, process_index,
                                 process_count)
  return source.gather(indexing.example_indices(pos, source.num_examples, seed, shuffle))


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
  """grain `worker_init_fn`: the worker process exits once `parent` (the trainer) is gone.

  grain's workers stop only when their parent tells them to; after a `kill -9` of the
  trainer each one stayed, idle, for good, holding its copy of the source (for TSV, all the
  parsed data), and restarts piled them up. A thread polls, since PR_SET_PDEATHSIG would
  fire when the *thread* that started the worker ends (grain starts them from its own).
  A SIGTERM sent to the whole job (a scheduler's preemption) is ignored here: the trainer
  handles it (a checkpoint after the step in progress, which needs these workers' next
  batch), then stops them or exits, which this thread sees. So is SIGINT (Ctrl-C reaches
  the whole process group: each worker printed a KeyboardInterrupt traceback and leaked
  its shared memory, where the trainer stops with one line). So is SIGHUP, which the
  trainer takes as SIGTERM (a closed terminal hangs up the whole job: the workers died,
  the resource tracker printed a KeyError traceback per leaked shared memory block, and the
  trainer's save after the step in progress relied on batches already fetched).
  """
  del worker_index, worker_count
  try:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
      signal.signal(sig, signal.SIG_IGN)
  except ValueError:   # not called on the worker's main thread: leave them as they are
    pass

  def watch():
    while os.getppid() == parent:
      time.sleep(PARENT_POLL_S)
    os._exit(1)   # pylint: disable=protected-access
  threading.Thread(target=watch, name="jaxrec-exit-with-parent", daemon=True).start()


def _detach(batch: Batch) -> Batch:
  """Unlinks the shared memory names of a batch from worker processes (`num_workers > 0`);
  its arrays stay valid, and the kernel frees the memory when they are freed.

  grain unlinks a block when its array is garbage collected, on a background thread that
  stops at exit: the last batches' blocks were left to Python's resource tracker ("leaked
  shared_memory objects" at every exit), and to /dev/shm if it was killed too.
  """
  for a in (batch.dense, batch.labels, *batch.ids.values(), *batch.weights.values()):
    shm = getattr(a, "shm", None)
    if isinstance(shm, shared_memory.SharedMemory) and getattr(a, "_unlink_on_del", False):
      a._unlink_on_del = False   # pylint: disable=protected-access
      shm.unlink()
  return batch


def _finish_shm_deletes() -> None:
  """Waits for grain's pending shared memory unlinks (of batches dropped by a close)."""
  from grain._src.python.ipc import shared_memory_array   # pylint: disable=g-import-not-at-top
  pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
  try:   # one thread, in order: once this runs, the earlier ones have
    if pool is not None:
      pool.apply(int)
  except ValueError:   # the pool was stopped (at exit): the resource tracker unlinks them
    pass


def _start_resource_tracker() -> None:
  """Starts multiprocessing's resource tracker (if not running) with SIGHUP blocked, which
  it inherits: it ignores SIGINT and SIGTERM itself, but a SIGHUP to the whole job (a
  closed terminal), which the trainer takes as SIGTERM, killed it; its relaunch then
  printed a `KeyError` traceback for each shared memory block the workers' batches
  unregistered (45 of them at a stop of `--log_every=10` with one worker)."""
  if not hasattr(signal, "pthread_sigmask"):
    resource_tracker.ensure_running()
    return
  before = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP])
  try:
    resource_tracker.ensure_running()
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _pipeline(fn: Callable[[int], object], count: int, num_threads: int, prefetch: int,
              num_workers: int) -> Iterator:
  if prefetch <= 0 and num_workers <= 0:
    return (fn(k) for k in range(count))
  ds = grain.MapDataset.range(0, count).map(fn).to_iter_dataset(
      grain.ReadOptions(num_threads=max(num_threads, 1), prefetch_buffer_size=max(prefetch, 1)))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():   # grain's workers read absl flags of its own: outside
      flags.FLAGS.mark_as_parsed()    # an absl app (a notebook) UnparsedFlagAccessError
    _start_resource_tracker()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
  return iter(ds)


def _check_procs(batch_size: int, process_index: int, process_count: int) -> None:
  if batch_size <= 0:
    raise ConfigError(f"batch size must be positive, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size % process_count:
    raise ConfigError(f"global batch size {batch_size} is not divisible by the number of "
                      f"processes {process_count}")


class TrainIterator:
  """Endless local batches `[batch_size / process_count]` of a source (see module docstring).

  `get_state()` -> `{"version", "position", "seed", "shuffle", "num_examples"}` plus
  `"fingerprint"` (`data_fingerprint`) for finite data (JSON-able); `position` is the global
  number of examples yielded so far. `set_state(state)` continues after it.
  """

  def __init__(self, source: Source, batch_size: int, seed: int = 0, process_index: int = 0,
               process_count: int = 1, shuffle: bool = True, num_threads: int = 2,
               prefetch: int = 4, num_workers: int = 0):
    _check_procs(batch_size, process_index, process_count)
    self.source = source
    self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self._threads, self._prefetch, self._workers = num_threads, prefetch, num_workers
    self._position = 0
    self._it = None
    self._fingerprint: str | None | bool = False   # not computed yet

  @property
  def fingerprint(self) -> str | None:
    """`data_fingerprint` of the source (computed once)."""
    if self._fingerprint is False:
      self._fingerprint = data_fingerprint(self.source)
    return self._fingerprint

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def _batches(self, start: int) -> Callable[[int], Batch]:
    return functools.partial(_train_batch, self.source, self.batch_size, self.seed,
                             self.process_index, self.process_count, self.shuffle, start)

  def batch_at(self, position: int) -> Batch:
    """This process's slice of the global batch starting at `position` (pure)."""
    return self._batches(position)(0)

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> Batch:
    if self._it is None:
      self._it = _pipeline(self._batches(self._position), ENDLESS_LEN,
                           self._threads, self._prefetch, self._workers)
    batch = next(self._it)
    self._position += self.batch_size
    return _detach(batch) if self._workers else batch

  def get_state(self) -> dict:
    state = {"version": STATE_VERSION, "position": self._position, "seed": self.seed,
             "shuffle": self.shuffle, "num_examples": self.source.num_examples}
    if self.fingerprint is not None:
      state["fingerprint"] = self.fingerprint
    return state

  def set_state(self, state: Mapping) -> None:
    try:
      position, seed = int(state["position"]), int(state["seed"])
      version = int(state.get("version", STATE_VERSION))
    except (KeyError, TypeError, ValueError):
      raise DataError(f"data iterator state {dict(state)!r} is not a jaxrec iterator state") \
          from None
    if version != STATE_VERSION or position < 0:
      raise DataError(f"data iterator state {dict(state)!r} is not a valid version "
                      f"{STATE_VERSION} state")
    endless = self.source.num_examples is None and state.get("num_examples") is None
    # (shuffling does nothing to an endless synthetic stream: a change there was refused)
    shuffle_changed = bool(state.get("shuffle", self.shuffle)) != self.shuffle and not endless
    if seed != self.seed or shuffle_changed:
      raise ConfigError(f"the checkpoint's data order used seed={seed}, "
                        f"shuffle={state.get('shuffle')}; this run has seed={self.seed}, "
                        f"shuffle={self.shuffle}{RESTART_HINT}")
    if state.get("num_examples", self.source.num_examples) != self.source.num_examples:
      def size(n):   # synthetic data is an endless stream
        return "an endless synthetic stream" if n is None else f"{n} examples per epoch"
      raise DataError(f"the checkpoint was trained on {size(state['num_examples'])}, this "
                      f"training data is {size(self.source.num_examples)}; resuming would "
                      f"repeat and skip examples{RESTART_HINT}")
    saved = state.get("fingerprint")   # absent in states of older versions
    if saved is not None and self.fingerprint is not None and saved != self.fingerprint:
      raise DataError(f"the checkpoint was trained on other data of the same size "
                      f"({self.source.num_examples} examples; the examples differ, or the "
                      f"features read from them); resuming at its position "
                      f"{position} would skip this data's first examples{RESTART_HINT}")
    self.close()
    self._position = position

  def bad_row_counts(self) -> dict[str, int]:
    """Malformed rows dropped (`bad_rows="skip"`), per input file."""
    return self.source.bad_row_counts()

  def close(self) -> None:
    """Stops the pipeline (its threads and worker processes) and frees its batches."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
      if self._workers:
        _finish_shm_deletes()
    self._it = None


class EvalBatch(NamedTuple):
  """One eval batch: `batch` of local size `[B/P]`; `mask` float32 `[B/P]`, 0 = padding.

  The real examples are a prefix of the batch: `batch[:num_valid]`.
  """
  batch: Batch
  mask: np.ndarray

  @property
  def num_valid(self) -> int:
    return int(self.mask.sum())


EVAL_CACHE_BYTES = 256 << 20


def _frozen(batch: EvalBatch) -> EvalBatch:
  """`batch` with its arrays read-only: a cached eval batch is handed out on every pass,
  so a consumer writing into one would change the next evaluation's data."""
  for leaf in jax.tree.leaves(tuple(batch)):
    if isinstance(leaf, np.ndarray):
      leaf.setflags(write=False)
  return batch


class EvalData:
  """Re-iterable eval data: each pass yields `num_batches` `EvalBatch`es, every example once.

  Global batch `b` holds examples `[b*B, (b+1)*B)` in file order; process `p` takes its
  contiguous slice, so the real examples of all processes together are exactly the data.
  A set of at most `cache_bytes` (this process's batches) is kept on the host after its
  first complete pass, and later passes hand out those batches (read-only): building them
  again (the synthetic generator, file reads and grain's threads) took as long as the
  eval's forward passes on `dlrm_synthetic` (24-180 ms against 30-55, 32,768 examples).
  """

  def __init__(self, source: Source, batch_size: int, process_index: int = 0,
               process_count: int = 1, num_examples: int | None = None, num_threads: int = 2,
               prefetch: int = 4, cache_bytes: int = EVAL_CACHE_BYTES):
    _check_procs(batch_size, process_index, process_count)
    if source.num_examples is None and num_examples is None:
      raise ConfigError("eval on an endless source needs num_examples")
    n = source.num_examples if num_examples is None else int(num_examples)
    if source.num_examples is not None:
      n = min(n, source.num_examples)
    if n <= 0:
      raise ConfigError(f"eval num_examples must be positive, got {n}")
    self.source, self.num_examples = source, n
    self.labeled = getattr(source, "labeled", True)   # False: scores only, no metrics
    self.batch_size, self.process_index, self.process_count = batch_size, process_index, \
        process_count
    self.num_batches = -(-n // batch_size)
    self._threads, self._prefetch = num_threads, prefetch
    self._cache_bytes, self._cached = cache_bytes, None

  def batch(self, b: int) -> EvalBatch:
    """Eval batch number `b` of this process (pure)."""
    pos = indexing.local_positions(b * self.batch_size, self.batch_size, self.process_index,
                                   self.process_count)
    valid = pos < self.num_examples
    batch = self.source.gather(np.where(valid, pos, 0))
    if not valid.all():
      pad = ~valid
      batch.dense[pad] = 0.0
      batch.labels[pad] = 0.0
      for v in batch.ids.values():
        v[pad] = -1
      for v in batch.weights.values():
        v[pad] = 0.0
    return EvalBatch(batch, valid.astype(np.float32))

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[EvalBatch]:
    if self._cached is not None:
      return iter(self._cached)
    batches = _pipeline(self.batch, self.num_batches, self._threads, self._prefetch, 0)
    return self._keeping(batches) if self._cache_bytes > 0 else batches

  def _keeping(self, batches: Iterator[EvalBatch]) -> Iterator[EvalBatch]:
    """`batches`, kept as the cache when the pass completes and they fit `cache_bytes`
    (judged by the first batch: every batch has its shapes)."""
    kept = []
    for batch in batches:
      if kept is not None and not kept:
        size = sum(x.nbytes for x in jax.tree.leaves(tuple(batch)))
        kept = [] if size * self.num_batches <= self._cache_bytes else None
      if kept is not None:
        kept.append(_frozen(batch))
      yield batch
    if kept is not None and len(kept) == self.num_batches:
      self._cached = kept

  def bad_row_counts(self) -> dict[str, int]:
    return self.source.bad_row_counts()


@gin.configurable(denylist=_PASSED_ITER)
def make_train_iterator(source: str, features: Sequence[FeatureSpec],
                        rows: Mapping[str, int] | Sequence[TableSpec], batch_size: int,
                        seed: int = 0, process_index: int = 0, process_count: int = 1, *,
                        bad_rows: str = "error", shuffle: bool = True, num_threads: int = 2,
                        prefetch: int = 4, num_workers: int = 0,
                        num_dense: int = NUM_DENSE) -> TrainIterator:
  """The endless, resumable training stream of this process.

  Args:
    source: "synthetic", a TSV path/dir/glob, or a preprocessed directory.
    features: configured sparse features (the k-th takes the data's k-th categorical column).
    rows: table name -> rows (or the `TableSpec`s).
    batch_size: GLOBAL batch size `B`; this process yields `[B / process_count]`.
    seed: data order (and synthetic data) seed.
    process_index, process_count: this process and the number of processes.
    bad_rows: "error" | "skip" (see `tsv`).
    shuffle: global shuffle per epoch (finite sources).
    num_threads, prefetch, num_workers: grain parallelism (see module docstring).
    num_dense: dense columns (13 for Criteo).

  Returns:
    A `TrainIterator` of host `Batch`es, with `get_state`/`set_state`/`bad_row_counts`.
  """
  shuffle, num_threads, prefetch, num_workers = _knobs(
      "make_train_iterator", shuffle=shuffle, num_threads=num_threads, prefetch=prefetch,
      num_workers=num_workers)
  src = open_source(source, features, rows, seed=seed, split=TRAIN_SPLIT, bad_rows=bad_rows,
                    num_dense=num_dense)
  return TrainIterator(src, batch_size, seed, process_index, process_count, shuffle=shuffle,
                       num_threads=num_threads, prefetch=prefetch, num_workers=num_workers)


SYNTHETIC_EVAL_EXAMPLES = 65536   # a synthetic eval set's size when nothing gives one


@gin.configurable(denylist=_PASSED_ITER + ["synthetic_examples", "labeled"])
def make_eval_batches(source: str, features: Sequence[FeatureSpec],
                      rows: Mapping[str, int] | Sequence[TableSpec], batch_size: int,
                      process_index: int = 0, process_count: int = 1, *,
                      bad_rows: str = "error", num_examples: int | None = None,
                      synthetic_examples: int | None = None, seed: int = 0,
                      num_threads: int = 2,
                      prefetch: int = 4, num_dense: int = NUM_DENSE,
                      cache_bytes: int = EVAL_CACHE_BYTES, labeled: bool = True) -> EvalData:
  """Eval data of this process: iterate it once per evaluation.

  Args:
    source, features, rows, bad_rows, num_dense: as for `make_train_iterator`.
    labeled: False: TSV files without the label column (`open_source`; `EvalData.labeled`).
    batch_size: GLOBAL eval batch size `B`; batches are `[B / process_count]`.
    num_examples: evaluate only the first `num_examples` examples (default: all).
    synthetic_examples: size of the synthetic eval set (held out: split 1, data seed
      `seed`, the same hidden model as training): the trainer's
      `ExperimentConfig.num_eval_examples`; `num_examples` sizes it when given, else
      `SYNTHETIC_EVAL_EXAMPLES`.
    cache_bytes: an eval set of at most this many bytes (this process's batches) is kept
      on the host after the first evaluation and not built again; 0: never kept.

  Returns:
    `EvalData`: `for batch, mask in eval_data: ...`; `mask` is float32 `[B/P]`, 1 for real
    examples and 0 for the padding of the last batch (the real ones are a prefix; also
    `EvalBatch.num_valid`). `len(eval_data)` batches per pass, the same on every process.
  """
  num_threads, prefetch, cache_bytes = _knobs(
      "make_eval_batches", num_threads=num_threads, prefetch=prefetch, cache_bytes=cache_bytes)
  if num_examples is not None:
    num_examples = whole(num_examples, "make_eval_batches.num_examples")
  src = open_source(source, features, rows, seed=seed, split=EVAL_SPLIT, bad_rows=bad_rows,
                    num_dense=num_dense, labeled=labeled)
  if src.num_examples is None and num_examples is None:
    num_examples = SYNTHETIC_EVAL_EXAMPLES if synthetic_examples is None else synthetic_examples
  elif src.num_examples is None and synthetic_examples not in (None, num_examples):
    # both bound: the narrower binding won without a word (4096 asked, 1000 evaluated)
    logging.warning("warning: make_eval_batches.num_examples = %d sets the synthetic eval "
                    "set's size; ExperimentConfig.num_eval_examples = %d is not used",
                    num_examples, synthetic_examples)
  if src.num_examples is not None and num_examples is not None and (
      num_examples > src.num_examples):   # evaluated the file's 237 without a word
    logging.warning("warning: make_eval_batches.num_examples = %d, but the eval data %s holds "
                    "%d examples: all %d are evaluated", num_examples, source,
                    src.num_examples, src.num_examples)
  return EvalData(src, batch_size, process_index, process_count, num_examples=num_examples,
                  num_threads=num_threads, prefetch=prefetch, cache_bytes=cache_bytes)
