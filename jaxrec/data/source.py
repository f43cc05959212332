"""Random-access example sources: `gather(indices) -> Batch`.

Every source (synthetic, parsed TSV held in memory, preprocessed binary shards) answers the
same two questions, which is all the iterators in `pipeline` need:

  num_examples          int, or None for an endless source
  gather(indices)       int64 `[n]` example indices -> host `Batch` of `n` examples

and reports rows it dropped as malformed (`bad_row_counts()`, path -> count). A source also
implements grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__` returning one
example as a dict of numpy arrays), so it can be used in any grain pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, Sequence

import numpy as np

from jaxrec.data.batch import Batch
from jaxrec.data.vocab import Vocab, check_layout
from jaxrec.embedding.specs import FeatureSpec
from jaxrec.errors import ConfigError, in_order, some

NUM_DENSE = 13
# What becomes of a TSV file's dense values (`open_source.dense_transform`): "log", raw
# integer counts as `log(1 + max(x, 0))` (Criteo's); "none", floats used as written
# (already normalised data: NVTabular's, HugeCTR's).
DENSE_TRANSFORMS = {"log": "raw integer counts, read as log(1 + max(x, 0))",
                    "none": "floats, read as written"}
# How a TSV file's categorical ids are written (`open_source.id_format`): "hex", Criteo's
# hashed ids, `int(id, 16) % rows`; "decimal", ids already made contiguous (NVTabular's
# Categorify, HugeCTR's slot-size data), `int(id) % rows`.
ID_FORMATS = {"hex": "Criteo's hashed ids, read as int(id, 16) % rows",
              "decimal": "ids written in decimal, read as int(id) % rows"}
# The `Layout` fields saying how a TSV file's values are read (`open_source.<field>`,
# preprocess.py's `--<field>`, a dataset manifest's `<field>`): field -> (its choices, the
# default, which is also what a manifest from before the field was read with, what it reads)
READ_AS = {"dense_transform": (DENSE_TRANSFORMS, "log", "dense values"),
           "id_format": (ID_FORMATS, "hex", "ids")}
# `len()` of an endless source, as grain wants an int (positions beyond it never occur).
ENDLESS_LEN = 2**62


@dataclasses.dataclass(frozen=True)
class Layout:
  """The sparse columns a source produces, in order (one per configured feature).

  Attributes:
    names: feature names, the keys of `Batch.ids`.
    max_lens: bag size per feature (1 = one-hot).
    weighted: whether the feature carries `Batch.weights`.
    rows: rows of the feature's table; raw ids are reduced `% rows` (without `vocab`).
    tables: the table each feature reads.
    num_dense: dense columns (13 for Criteo).
    dense_transform: how TSV dense values are read, one of `DENSE_TRANSFORMS`.
    id_format: how TSV categorical ids are written, one of `ID_FORMATS`.
    vocab: the id vocabulary TSV ids are read through (`vocab.Vocab.lookup`: a kept id ->
      its row 1..V of its table, any other -> row 0), or None: `% rows`.
  """

  names: tuple[str, ...]
  max_lens: tuple[int, ...]
  weighted: tuple[bool, ...]
  rows: tuple[int, ...]
  tables: tuple[str, ...] = ()
  num_dense: int = NUM_DENSE
  dense_transform: str = "log"
  id_format: str = "hex"
  vocab: Vocab | None = None

  @property
  def num_sparse(self) -> int:
    return len(self.names)


def check_read_as(field: str, value, where: str | None = None) -> str:
  """`value` if it is one of `READ_AS[field]`'s choices, else a `ConfigError` naming
  `where` (the binding or flag that gave it; default `field`) and what each choice means."""
  choices = READ_AS[field][0]
  if not isinstance(value, str) or value not in choices:
    meanings = "; ".join(f"{k!r}: {v}" for k, v in choices.items())
    raise ConfigError(f"{where or field} must be one of {', '.join(map(repr, choices))} "
                      f"({meanings}), got {value!r}")
  return value


def make_layout(features: Sequence[FeatureSpec], rows: Mapping[str, int],
                num_dense: int = NUM_DENSE, dense_transform: str = "log",
                id_format: str = "hex", vocab: Vocab | None = None) -> Layout:
  """Layout of `features`; `rows` maps table name -> row count; `vocab` is checked
  against the tables (`vocab.check_layout`)."""
  check_read_as("dense_transform", dense_transform)
  check_read_as("id_format", id_format)
  if not features:
    raise ConfigError("no sparse features configured")
  table_rows = []
  for f in features:
    if f.table not in rows:
      raise ConfigError(f"feature '{f.name}' reads table '{f.table}' but no row count was given "
                        f"for it (tables: {some(in_order(rows), quote=False)})")
    r = int(rows[f.table])
    if not 0 < r < 2**31:
      raise ConfigError(f"table '{f.table}': rows must be in [1, 2**31), got {r}")
    table_rows.append(r)
  if vocab is not None:
    check_layout(vocab, [f.table for f in features], table_rows, id_format)
  return Layout(names=tuple(f.name for f in features),
                max_lens=tuple(int(f.max_len) for f in features),
                weighted=tuple(bool(f.weighted) for f in features),
                rows=tuple(table_rows), tables=tuple(f.table for f in features),
                num_dense=int(num_dense), dense_transform=dense_transform,
                id_format=id_format, vocab=vocab)


class Source(Protocol):
  layout: Layout
  num_examples: int | None

  def gather(self, indices: np.ndarray) -> Batch:
    ...

  def bad_row_counts(self) -> dict[str, int]:
    ...


class GrainMixin:
  """grain `RandomAccessDataSource` protocol on top of `gather`."""

  def __len__(self) -> int:
    return ENDLESS_LEN if self.num_examples is None else self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    b = self.gather(np.array([int(index)], np.int64))
    out = {"dense": b.dense[0], "label": b.labels[0]}
    out.update({f"ids/{k}": v[0] for k, v in b.ids.items()})
    out.update({f"weights/{k}": v[0] for k, v in b.weights.items()})
    return out


def empty_batch(layout: Layout, n: int) -> Batch:
  """`n` padding examples: label 0, dense 0, empty bags (ids -1, weights 0)."""
  return Batch(
      dense=np.zeros((n, layout.num_dense), np.float32),
      labels=np.zeros((n,), np.float32),
      ids={k: np.full((n, m), -1, np.int32) for k, m in zip(layout.names, layout.max_lens)},
      weights={k: np.zeros((n, m), np.float32)
               for k, m, w in zip(layout.names, layout.max_lens, layout.weighted) if w})


def take(batch: Batch, indices: np.ndarray) -> Batch:
  """Rows `indices` of a host batch."""
  return Batch(dense=batch.dense[indices], labels=batch.labels[indices],
               ids={k: v[indices] for k, v in batch.ids.items()},
               weights={k: v[indices] for k, v in batch.weights.items()})


class ArraySource(GrainMixin):
  """A finite source held in memory as one columnar `Batch` (e.g. parsed TSV)."""

  def __init__(self, examples: Batch, layout: Layout, bad_rows: Mapping[str, int] | None = None,
               name: str = "memory", labeled: bool = True):
    self.examples = examples
    self.layout = layout
    self.labeled = labeled   # False: files read without labels (all 0), to be scored only
    self.num_examples = examples.size
    self.name = name
    self._bad_rows = dict(bad_rows or {})

  def gather(self, indices: np.ndarray) -> Batch:
    return take(self.examples, np.asarray(indices, np.int64))

  def bad_row_counts(self) -> dict[str, int]:
    return dict(self._bad_rows)
