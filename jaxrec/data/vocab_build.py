"""Building an id vocabulary (`vocab`'s format) from TSV files: `count` streams over them
chunk by chunk (`tsv.Parser` with `keep_raw`), each chunk's ids per table counted with
`np.unique` and merged into running sorted arrays (`Counts`: memory ~ 16 bytes per distinct
id, no Python object per id); `select` keeps those seen `min_count` times or more (the
`max_size` most frequent, ties to the smaller id); `write` writes the directory whole or
not at all. `scripts/build_vocab.py` runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Mapping, Sequence

import numpy as np

from jaxrec import signals
from jaxrec.data import tsv
from jaxrec.data.source import Layout
from jaxrec.data.vocab import FORMAT, GIN, MANIFEST, VERSION, ids_sha256, fingerprint
from jaxrec.errors import ConfigError, DataError, counted


def count(paths: Sequence[str], layout: Layout, bad_rows: str = "error",
          chunk_bytes: int = tsv.CHUNK_BYTES, columns_from: str = tsv.FEATURES_FROM
          ) -> tuple["Counts", dict[str, int]]:
  """The ids of the good rows of TSV files `paths` (parsed as `layout` reads them, its
  `vocab` unused), counted per table; and the rows skipped per file (`bad_rows` "skip")."""
  parser, policy = tsv.Parser(layout, columns_from), tsv.BadRowPolicy(bad_rows)
  parser.keep_raw = True
  counts, rows = Counts(layout.tables), 0
  for path in paths:
    for batch in tsv.iter_file(path, parser, policy, chunk_bytes):
      signals.check()   # SIGINT / SIGTERM deferred by scripts/build_vocab.py: stop
      counts.add_features(layout.tables, *parser.raw_tokens)
      rows += batch.size
  if rows == 0:
    raise DataError(f"{', '.join(paths)}: no valid rows "
                    f"({counted(sum(policy.counts.values()), 'malformed row')} skipped)")
  return counts, policy.counts


class Counts:
  """Running counts of each table's raw ids: sorted distinct ids (uint64 `[D]`) and their
  occurrences (int64 `[D]`), merged chunk by chunk (memory ~ 16 bytes per distinct id)."""

  def __init__(self, tables: Sequence[str]):
    self.ids = {t: np.zeros(0, np.uint64) for t in dict.fromkeys(tables)}
    self.counts = {t: np.zeros(0, np.int64) for t in self.ids}

  def add(self, table: str, raw: np.ndarray) -> None:
    """Counts the ids `raw` (uint64 `[n]`) of `table`."""
    if not len(raw):
      return
    u, c = np.unique(raw, return_counts=True)
    ids, counts = self.ids[table], self.counts[table]
    i = np.searchsorted(ids, u)
    hit = np.zeros(len(u), bool)
    if len(ids):
      hit = ids[np.minimum(i, len(ids) - 1)] == u
    counts[i[hit]] += c[hit]
    new = ~hit
    self.ids[table] = np.insert(ids, i[new], u[new])
    self.counts[table] = np.insert(counts, i[new], c[new].astype(np.int64))

  def add_features(self, feature_tables: Sequence[str], tfeat: np.ndarray,
                   raw: np.ndarray) -> None:
    """Counts tokens `raw` of features `tfeat` (indices into `feature_tables`)."""
    names = list(self.ids)
    table_of = np.array([names.index(t) for t in feature_tables],
                        np.uint16 if len(names) < 2**16 else np.int64)
    ttab = table_of[tfeat]
    order = np.argsort(ttab, kind="stable")   # (a radix sort for 16-bit keys)
    bounds = np.searchsorted(ttab[order], np.arange(len(names) + 1))
    for k, name in enumerate(names):
      self.add(name, raw[order[bounds[k]:bounds[k + 1]]])


def select(ids: np.ndarray, counts: np.ndarray, min_count: int,
           max_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The kept ids (sorted) and their counts: those seen `min_count` times or more; with
  `max_size`, the `max_size` most frequent of them, ties to the smaller id."""
  keep = counts >= min_count
  ids, counts = ids[keep], counts[keep]
  if max_size is not None and len(ids) > max_size:
    top = np.sort(np.lexsort((ids, -counts))[:max_size])   # (ids sorted: indices keep order)
    ids, counts = ids[top], counts[top]
  return ids, counts


def check_min_count(min_count, max_size=None) -> None:
  if not isinstance(min_count, int) or min_count < 1:
    raise ConfigError(f"--min_count must be a whole number >= 1 (ids seen fewer times share "
                      f"the out-of-vocabulary row), got {min_count!r}")
  if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
    raise ConfigError(f"--max_size must be a whole number >= 1, got {max_size!r}")


def write(output: str, counts: Counts, min_count: int, max_size: int | None,
          info: Mapping, uniform_prefix: str | None = None) -> dict:
  """Writes the vocabulary of `counts` to `output` (which must not exist, or be an empty
  directory): built in a temporary sibling directory renamed to `output` at the end, so
  a failure or an interrupt leaves nothing. `info`: the manifest's other entries (inputs,
  id_format, ...). `uniform_prefix`: the tables are `uniform_tables`' (`<prefix>0..`),
  whose rows `vocab.gin` binds; else it lists them. Returns the manifest."""
  output = check_output(output)
  parent = os.path.dirname(output)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
  except OSError as e:
    raise DataError(f"--output {output}: cannot create it: {e.strerror or e}") from None
  try:
    tables, kept = [], {}
    for k, name in enumerate(counts.ids):
      ids, cnt = select(counts.ids[name], counts.counts[name], min_count, max_size)
      file = f"table-{k:05d}.npz"
      with open(os.path.join(tmp, file), "wb") as f:
        np.savez(f, ids=ids, counts=cnt)
      kept[name] = ids
      tables.append({"name": name, "file": file, "size": int(len(ids)),
                     "rows": int(len(ids)) + 1, "distinct": int(len(counts.ids[name])),
                     "occurrences": int(counts.counts[name].sum()),
                     "kept_occurrences": int(cnt.sum()), "ids_sha256": ids_sha256(ids)})
    manifest = {"format": FORMAT, "version": VERSION, "min_count": min_count,
                "max_size": max_size, **info, "fingerprint": fingerprint(kept),
                "tables": tables}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      f.write(json.dumps(manifest, indent=1))
    with open(os.path.join(tmp, GIN), "w") as f:
      f.write(gin_text(output, tables, uniform_prefix))
    if os.path.isdir(output):
      os.rmdir(output)
    os.rename(tmp, output)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise DataError(f"--output {output}: cannot write the vocabulary: {e.strerror or e}"
                    ) from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def check_output(output: str) -> str:
  """`output` made absolute; `DataError` if it exists and is not an empty directory (checked
  before counting too: an existing one was refused only after the whole input was read)."""
  output = os.path.abspath(output)
  if os.path.exists(output) and not (os.path.isdir(output) and not os.listdir(output)):
    raise DataError(f"--output {output}: exists and is not an empty directory; remove it or "
                    "choose another")
  return output


def gin_text(output: str, tables: Sequence[Mapping], uniform_prefix: str | None) -> str:
  """`vocab.gin`: `open_source.vocab` and the tables' rows (`uniform_tables.rows`, or one
  comment per table for a config that lists its `TableSpec`s)."""
  lines = [f"# scripts/build_vocab.py: ids read through the vocabulary in {output};",
           "# each table needs its vocabulary size + 1 rows (row 0: every other id).",
           f"open_source.vocab = {output!r}"]
  if uniform_prefix is not None:
    rows = ", ".join(str(t["rows"]) for t in tables)
    lines.append(f"uniform_tables.rows = ({rows}{',' if len(tables) == 1 else ''})")
  else:
    lines += [f"# table {t['name']!r}: rows = {t['rows']}" for t in tables]
  return "\n".join(lines) + "\n"
