"""Writing a preprocessed dataset (`binary`'s format): TSV files parsed once into
`shard-NNNNN.bin` files of fixed-width records, then `manifest.json` (written last,
atomically: a directory without one is not a dataset). `scripts/preprocess.py` runs
`preprocess`; one writer at a time holds `--output`'s `LOCK`; a run that fails or is
stopped (SIGINT / SIGTERM at the next chunk) removes its shards, and the next run removes
those a killed run left.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np
from absl import logging

from jaxrec import signals
from jaxrec.data import tsv, vocab as vocab_lib
from jaxrec.data.binary import (FORMAT, MANIFEST, SHARD_NAME, VERSION, check_not_part,
                                is_preprocessed, record_dtype, to_records)
from jaxrec.data.source import Layout, make_layout
from jaxrec.errors import ConfigError, DataError, counted
from jaxrec.files import workdir_lock, write_text_atomic

SHARD_EXAMPLES = 1 << 22


class ShardWriter:
  """Writes records into `shard-NNNNN.bin` files of `shard_examples` each under `output`,
  hashing them as they go (`shards`: the manifest's entries of those closed)."""

  def __init__(self, output: str, shard_examples: int):
    self.output, self.shard_examples = output, shard_examples
    self.shards: list[dict] = []
    self._f = None

  def write(self, recs: np.ndarray) -> None:
    while len(recs):
      if self._f is None:
        name = self._next_name()
        self._f = open(os.path.join(self.output, name), "wb")
        self._hash, self._n, self._name = hashlib.sha256(), 0, name
      take = recs[:self.shard_examples - self._n]
      data = take.tobytes()
      self._f.write(data)
      self._hash.update(data)
      self._n += len(take)
      recs = recs[len(take):]
      if self._n == self.shard_examples:
        self.close()

  def _next_name(self) -> str:
    """The file name of the shard after those written (`binary.SHARD_NAME`)."""
    return f"shard-{len(self.shards):05d}.bin"

  def discard(self) -> None:
    """Removes the shards written so far (a failed run: they are not a dataset), the one
    being written included: by its name, which is known before it is opened (a signal
    right after `open` returns raises before `self._f` holds the file)."""
    names = [s["file"] for s in self.shards] + [self._next_name()]
    if self._f is not None:
      try:
        self._f.close()
      except OSError:   # its buffer cannot be written either
        pass
      self._f = None
    for name in names:
      try:
        os.remove(os.path.join(self.output, name))
      except OSError:
        pass

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self.shards.append({"file": self._name, "num_examples": self._n,
                          "bytes": os.path.getsize(os.path.join(self.output, self._name)),
                          "sha256": self._hash.hexdigest()})
      self._f = None


def write(inputs: Sequence[str], output: str, layout: Layout, bad_rows: str = "error",
          shard_examples: int = SHARD_EXAMPLES, chunk_bytes: int = tsv.CHUNK_BYTES,
          columns_from: str = tsv.FEATURES_FROM) -> dict:
  """Parses TSV files `inputs` (in order) into shards under `output`; returns the manifest.
  `columns_from`: where the column counts came from (`tsv.Parser`).

  Streams: memory stays at a few chunks whatever the input size.
  """
  if shard_examples <= 0:
    raise ConfigError(f"shard_examples must be positive, got {shard_examples}")
  _check_output(output)
  created = not os.path.exists(output)
  if not created and not os.path.isdir(output):   # said 'cannot create directory: File exists'
    raise DataError(f"--output {output} is a file, not a directory")
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise DataError(f"{output}: cannot create directory: {e.strerror}") from None
  # One writer at a time: a second run removed the first one's shards as an unfinished
  # run's and wrote its own under the same names; both said `wrote` over a broken dataset.
  lock = os.path.join(output, LOCK)
  try:
    with workdir_lock(output, LOCK, "another scripts/preprocess.py", "--output"):
      try:
        _check_output(output)   # (again: one may have finished while this one started)
        _remove_unfinished(output)
        writer = ShardWriter(output, shard_examples)
        try:
          return _write(inputs, output, layout, bad_rows, chunk_bytes, writer, columns_from)
        except BaseException:
          writer.discard()
          raise
      finally:
        os.remove(lock)   # (still held: a run starting now finds the lock taken)
  except OSError as e:   # input errors are `DataError`s: a write failed
    raise DataError(f"--output {output}: cannot write the dataset: {e.strerror or e}"
                    ) from None
  finally:
    if created and os.path.isdir(output) and not os.listdir(output):
      os.rmdir(output)


LOCK = ".preprocess.lock"   # in --output while a run writes there


def _check_output(output: str) -> None:
  """`DataError` when `output` holds a dataset already (or another program's manifest)."""
  if is_preprocessed(output):
    raise DataError(f"{output}: already holds a preprocessed dataset ({MANIFEST}); "
                    "remove it or choose another --output")
  if os.path.isfile(os.path.join(output, MANIFEST)):   # another program's: its shard-*.bin
    raise DataError(f"{output}: holds a {MANIFEST} that is not a jaxrec dataset's "  # are not
                    "(another program's?); choose another --output")   # ours to remove


def _remove_unfinished(output: str) -> None:
  """Removes the shards a killed run left in `output` (no manifest: not a dataset). A
  rerun wrote over as many as it wrote itself, and the rest stayed (kill -9 after 6
  shards, a rerun of 1: 5 stray shard files)."""
  stale = sorted(n for n in os.listdir(output) if SHARD_NAME.fullmatch(n))
  for name in stale:
    try:
      os.remove(os.path.join(output, name))
    except OSError as e:
      raise DataError(f"--output {output}: cannot remove {name}, a shard an unfinished "
                      f"run left: {e.strerror}") from None
  if stale:
    logging.warning("--output %s: removed %d shard file(s) an unfinished run left (%s)",
                    output, len(stale), ", ".join(stale[:3]) + (", ..." if len(stale) > 3
                                                                else ""))


def _write(inputs, output, layout, bad_rows, chunk_bytes, writer, columns_from) -> dict:
  parser, policy = tsv.Parser(layout, columns_from), tsv.BadRowPolicy(bad_rows)
  total = 0
  for path in inputs:
    for batch in tsv.iter_file(path, parser, policy, chunk_bytes):
      signals.check()   # SIGINT / SIGTERM deferred by scripts/preprocess.py: discard, stop
      writer.write(to_records(batch, layout))
      total += batch.size
  writer.close()
  signals.check()
  if total == 0:
    raise DataError(f"{', '.join(inputs)}: no valid rows "
                    f"({counted(sum(policy.counts.values()), 'malformed row')} skipped)")
  dtype = record_dtype(layout.num_dense, layout.max_lens, layout.weighted)
  manifest = {
      "format": FORMAT, "version": VERSION, "num_examples": total,
      "num_dense": layout.num_dense, "dense_transform": layout.dense_transform,
      "id_format": layout.id_format, "vocab": vocab_lib.record(layout.vocab),
      "record_bytes": dtype.itemsize,
      "features": [{"name": n, "table": t, "rows": r, "max_len": m, "weighted": w}
                   for n, t, r, m, w in zip(layout.names, layout.tables or layout.names,
                                            layout.rows, layout.max_lens, layout.weighted)],
      "shards": writer.shards,
      "bad_rows": {os.path.abspath(k): v for k, v in policy.counts.items()},   # relative
  }                                         # to where preprocess ran: meaningless elsewhere
  write_text_atomic(os.path.join(output, MANIFEST), json.dumps(manifest, indent=1))
  return manifest




def preprocess(input_path: str, output: str, features, rows, bad_rows: str = "error",
               num_dense: int = 13, num_categorical: int = 26,
               shard_examples: int = SHARD_EXAMPLES,
               columns_from: str = tsv.FEATURES_FROM, dense_transform: str = "log",
               id_format: str = "hex", vocab: str | None = None) -> dict:
  """`scripts/preprocess.py`: TSV file/dir/glob `input_path` -> shards in `output`.

  `features` are the configured `FeatureSpec`s (k-th = k-th categorical column), `rows` maps
  table name -> rows (or the `TableSpec`s); `columns_from` says where the column counts
  came from, for a wrong count's error (`tsv.Parser`); `dense_transform` how dense values
  are read (`source.READ_AS`) and `id_format` how ids are written
  (the same), both recorded in the manifest, as is `vocab` (a directory
  scripts/build_vocab.py wrote: ids are read through it, `vocab.record`). Returns the
  manifest.
  """
  if bad_rows not in tsv.BAD_ROWS:
    raise ConfigError(f"--bad_rows must be one of {tsv.BAD_ROWS}, got '{bad_rows}'")
  if len(features) != num_categorical:
    raise ConfigError(f"{input_path}: the TSV data has {num_categorical} categorical columns "
                      f"but {len(features)} sparse features are configured")
  rows = rows if isinstance(rows, dict) else {t.name: t.rows for t in rows}
  layout = make_layout(features, rows, num_dense, dense_transform, id_format,
                       vocab_lib.load_binding(vocab, "--vocab"))
  files = tsv.list_files(input_path)
  check_not_part(files)
  return write(files, output, layout, bad_rows, shard_examples, columns_from=columns_from)
