"""Id vocabularies: each table's ids seen at least `min_count` times in the training TSV get
rows `1 .. V` of their own, every other id (rare or unseen) the one shared row 0 (NVTabular's
`Categorify(freq_threshold=...)`, DLRM's Criteo preprocessing). `scripts/build_vocab.py`
counts the ids and writes (`vocab_build`)

  DIR/table-NNNNN.npz   per table: ids uint64 [V] (kept raw ids, sorted), counts int64 [V]
  DIR/vocab.json        {"format": "jaxrec.vocab", "version": 1, "min_count", "max_size",
                        "id_format", "dense_transform", "bad_rows", "inputs": [{path,
                        bytes}], "fingerprint", "tables": [{name, file, size, rows
                        (size + 1), distinct, occurrences, kept_occurrences, ids_sha256}]}
  DIR/vocab.gin         the bindings a run needs: `open_source.vocab` and the rows
                        (`uniform_tables.rows`; comments for a config listing its tables)

A run binding `open_source.vocab = 'DIR'` reads TSV ids through it (`Vocab.lookup_features`, in
place of `% rows`): training, eval and scripts/preprocess.py, which records the vocabulary
(`record`) in its manifest. The `fingerprint` hashes the tables' names and kept ids only:
two directories with the same vocabulary read the data alike.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import weakref
import zipfile
from typing import Mapping, Sequence

import numpy as np

from jaxrec.errors import ConfigError, DataError, in_order, some

FORMAT, VERSION = "jaxrec.vocab", 1
MANIFEST, GIN = "vocab.json", "vocab.gin"
OOV_ROW = 0   # the row of every id not kept (and of an empty one-hot field, as before)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)   # Fibonacci hashing's multiplier (2**64 / phi)


def ids_sha256(ids: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(ids, "<u8").tobytes()).hexdigest()


def fingerprint(tables: Mapping[str, np.ndarray]) -> str:
  """A hash of the tables' names and kept ids (uint64, sorted), in name order."""
  return _fingerprint_of({name: ids_sha256(ids) for name, ids in tables.items()})


def _fingerprint_of(digests: Mapping[str, str]) -> str:
  """`fingerprint` from each table's `ids_sha256` (name -> hex digest)."""
  h = hashlib.sha256()
  for name in sorted(digests):
    h.update(f"{name}\0{digests[name]}\0".encode())
  return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class Vocab:
  """A loaded vocabulary: `tables` maps table name -> kept ids (uint64 `[V]`, sorted);
  `id_format` is how the ids were parsed (`source.ID_FORMATS`). Equal by `fingerprint`."""

  directory: str
  fingerprint: str
  id_format: str
  tables: Mapping[str, np.ndarray]

  def size(self, table: str) -> int:
    return len(self.tables[table])

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocab) and other.fingerprint == self.fingerprint

  def __hash__(self) -> int:
    return hash(self.fingerprint)

  def __reduce__(self):
    """Pickled without its ids (a source sent to grain's worker processes holds its
    layout: a copy of every table's ids each); read from `directory` again if used."""
    return (_unpickled, (os.path.abspath(self.directory), self.fingerprint, self.id_format))

  def lookup(self, table: str, raw: np.ndarray) -> np.ndarray:
    """Raw ids (uint64 `[n]`) of `table` -> rows (int32 `[n]`): a kept id's index + 1,
    any other `OOV_ROW`."""
    ids = self.tables[table]
    if not len(ids):
      return np.full(len(raw), OOV_ROW, np.int32)
    i = np.searchsorted(ids, raw)
    hit = ids[np.minimum(i, len(ids) - 1)] == raw
    return np.where(hit, i + 1, OOV_ROW).astype(np.int32)

  def lookup_features(self, feature_tables: Sequence[str], tfeat: np.ndarray,
                      raw: np.ndarray) -> np.ndarray:
    """Rows (int32 `[n]`) of tokens `raw` (uint64 `[n]`) of features `tfeat` (`[n]`
    indices into `feature_tables`, each feature's table).

    When the ids and table numbers fit 64 bits together (Criteo's 32-bit ids) the tokens'
    keys `table << shift | id` are looked up in one hash table (`_hashed`: ~1-2 random
    reads a token, where a `searchsorted` over 326k keys made 19 and read 1M Criteo lines
    1.75x slower than `% rows`); else each table's ids are searched for its tokens."""
    names, shift, hashed = self._hashed
    table_of = np.array([names.index(t) for t in feature_tables], np.uint64)
    ttab = table_of[tfeat] if len(tfeat) else np.zeros(0, np.uint64)
    if hashed is None:
      return self._lookup_per_table(names, ttab, raw)
    keys, rows, directory, hshift = hashed
    out = np.full(len(raw), OOV_ROW, np.int32)
    q = (ttab << np.uint64(shift)) | raw
    h = ((q * _GOLDEN) >> hshift).astype(np.int64)
    lo, n = directory[h], directory[h + 1] - directory[h]
    act = np.flatnonzero((n > 0) & ((raw >> np.uint64(shift)) == 0))
    j = 0
    while len(act):   # bucket sizes: 1-2 on average, a few at most
      at = lo[act] + j
      eq = keys[at] == q[act]
      out[act[eq]] = rows[at[eq]]
      j += 1
      act = act[~eq & (n[act] > j)]
    return out

  def _lookup_per_table(self, names, ttab, raw):
    out = np.empty(len(raw), np.int32)
    order = np.argsort(ttab.astype(np.uint16 if len(names) < 2**16 else np.int64),
                       kind="stable")   # (a radix sort for 16-bit keys)
    bounds = np.searchsorted(ttab[order], np.arange(len(names) + 1, dtype=np.uint64))
    for k, name in enumerate(names):
      sel = order[bounds[k]:bounds[k + 1]]
      if len(sel):
        out[sel] = self.lookup(name, raw[sel])
    return out

  @functools.cached_property
  def _hashed(self):
    """(table names in order, shift, and unless `table << shift | id` keys overflow 64
    bits: (the keys in bucket order, uint64 `[K]`; each one's row, int32 `[K]`; bucket
    starts, int32 `[2**b + 1]`; the hash's shift `64 - b`), ~20 bytes a kept id)."""
    names = sorted(self.tables)
    arrays = [self.tables[t] for t in names]
    top = max((int(a[-1]) for a in arrays if len(a)), default=0)
    shift = max(top.bit_length(), 1)
    if shift + max(len(names) - 1, 1).bit_length() > 64:
      return names, shift, None
    keys = np.concatenate([(np.uint64(k) << np.uint64(shift)) | a
                           for k, a in enumerate(arrays)] or [np.zeros(0, np.uint64)])
    rows = np.concatenate([np.arange(1, len(a) + 1, dtype=np.int32) for a in arrays]
                          or [np.zeros(0, np.int32)])
    bits = max(int(len(keys)).bit_length(), 1)   # 2**bits > len(keys): load under 1
    hshift = np.uint64(64 - bits)
    bucket = (keys * _GOLDEN) >> hshift
    order = np.argsort(bucket, kind="stable")
    directory = np.searchsorted(bucket[order], np.arange(2**bits + 1, dtype=np.uint64))
    return names, shift, (keys[order], rows[order], directory.astype(
        np.int32 if len(keys) < 2**31 else np.int64), hshift)


class _Reloaded(Mapping):
  """A pickled `Vocab`'s tables: loaded from its directory at the first use, which must
  hold the same vocabulary (`fingerprint`)."""

  def __init__(self, directory: str, fp: str):
    self._directory, self._fingerprint, self._tables = directory, fp, None

  def _get(self) -> Mapping[str, np.ndarray]:
    if self._tables is None:
      v = load(self._directory)
      if v.fingerprint != self._fingerprint:
        raise DataError(f"{self._directory}: the vocabulary changed while in use (fingerprint "
                        f"{v.fingerprint}, was {self._fingerprint})")
      self._tables = v.tables
    return self._tables

  def __getitem__(self, key):
    return self._get()[key]

  def __iter__(self):
    return iter(self._get())

  def __len__(self) -> int:
    return len(self._get())


def _unpickled(directory: str, fp: str, id_format: str) -> Vocab:
  return Vocab(directory, fp, id_format, _Reloaded(directory, fp))


def check_layout(vocab: Vocab, tables: Sequence[str], rows: Sequence[int], id_format: str,
                 binding: str = "open_source.vocab") -> None:
  """`ConfigError` unless `vocab` holds exactly the configured `tables` (each feature's),
  each with rows >= its size + 1, its ids parsed as `id_format`."""
  where = f"{binding} = '{vocab.directory}'"
  configured = list(dict.fromkeys(tables))
  missing = [t for t in configured if t not in vocab.tables]
  extra = [t for t in vocab.tables if t not in configured]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"has no table {some(missing, quote=True)} that the configuration reads")
    if extra:
      parts.append(f"has table {some(extra, quote=True)} that no configured feature reads")
    raise ConfigError(f"{where}: the vocabulary {' and '.join(parts)} (its tables: "
                      f"{some(in_order(vocab.tables), quote=True)}); build one for this "
                      "configuration (scripts/build_vocab.py --gin_file=...)")
  if vocab.id_format != id_format:
    raise ConfigError(f"{where}: the vocabulary's ids were parsed with id_format "
                      f"'{vocab.id_format}' but this run reads ids with id_format '{id_format}'")
  small = {}
  for t, r in zip(tables, rows):
    if r < vocab.size(t) + 1 and t not in small:
      small[t] = r
  if small:
    lines = some([f"'{t}' has {r} rows, needs {vocab.size(t) + 1} ({vocab.size(t)} ids "
                  "+ 1 out-of-vocabulary row)" for t, r in small.items()], 4, quote=False)
    raise ConfigError(f"{where}: table {lines}; {rows_hint(vocab.directory)}")


def rows_hint(directory: str) -> str:
  """How to give the tables their rows: `vocab.gin` binds them for `uniform_tables`; for a
  config listing its own tables it only lists them (comments), and the hint to give it
  sent a user who had given it round in a circle."""
  gin_path = os.path.join(directory, GIN)
  try:
    with open(gin_path) as f:
      binds = any(line.startswith("uniform_tables.rows") for line in f)
  except OSError:
    binds = True
  if binds:
    return f"give the tables the rows its {GIN} binds (--gin_file={gin_path})"
  return (f"set these tables' rows in the configuration (their TableSpec / embedding_tables "
          f"entries: {gin_path} lists each table's rows in comments, and binds none for a "
          "configuration that lists its own tables)")


def record(vocab: Vocab | None) -> dict | None:
  """What a preprocessed manifest (and a checkpoint's meta, `vocab`) records of the
  vocabulary its ids were read with: absolute path and fingerprint; None without one."""
  if vocab is None:
    return None
  return {"path": os.path.abspath(vocab.directory), "fingerprint": vocab.fingerprint}


def check_stored(where: str, stored, vocab: Vocab | None) -> None:
  """`DataError` unless a preprocessed manifest's `vocab` entry (`record`'s; absent: None,
  data from before vocabularies) is the configured `vocab`'s."""
  same = (stored is None and vocab is None) or (
      stored is not None and vocab is not None and stored["fingerprint"] == vocab.fingerprint)
  if same:
    return
  def said(s, fp):
    return "no vocabulary (ids % rows)" if s is None else f"vocabulary {s} (fingerprint {fp})"
  data = said(stored and stored["path"], stored and stored["fingerprint"])
  run = said(vocab and vocab.directory, vocab and vocab.fingerprint)
  fix = ("unbind open_source.vocab" if stored is None
         else f"bind open_source.vocab = '{stored['path']}'")
  raise DataError(f"{where}: the data's ids were preprocessed with {data} but this run reads "
                  f"them with {run}; {fix} (gin) to train on this data, or re-run "
                  "scripts/preprocess.py with this run's vocabulary")


def load_binding(directory, binding: str = "open_source.vocab") -> Vocab | None:
  """`load(directory)` for a binding's value; None (or '') is no vocabulary."""
  if directory is None or directory == "":
    return None
  if not isinstance(directory, str):
    raise ConfigError(f"{binding} must be a vocabulary directory (a string) or None, got "
                      f"{directory!r}")
  if not os.path.isdir(directory):   # (moved, or a vocab.gin of another machine): named
    where = f"{binding}: {directory}" if binding.startswith("--") else (   # as bound, and
        f"{binding} = '{directory}'")                                   # where (`locate`)
    raise ConfigError(f"{where}: no such vocabulary directory (scripts/build_vocab.py writes "
                      "one; bind the path of one moved elsewhere)")
  return load(directory)


# Vocabularies loaded and still in use, by directory and its files' identities: a run's
# training and eval sources, its checkpoints' record and check read one directory up to four
# times (at 41.6M ids each load read and hashed 333 MB, ~1 s, and each source held its own
# ids and lookup table, ~1.2 GB); rewritten files (a rebuild renames a new directory in)
# have other identities and are read again.
_IN_USE: "weakref.WeakValueDictionary[tuple, Vocab]" = weakref.WeakValueDictionary()


def _identity(directory: str) -> tuple:
  """`directory` and each file's (name, inode, size, mtime, ctime) in it."""
  with os.scandir(directory) as entries:
    files = sorted((e.name, (st := e.stat()).st_ino, st.st_size, st.st_mtime_ns,
                    st.st_ctime_ns) for e in entries)
  return (os.path.realpath(directory), tuple(files))


def load(directory: str) -> Vocab:
  """The vocabulary `scripts/build_vocab.py` wrote to `directory`; `DataError` naming the
  file that is missing, malformed or corrupt (its ids not those recorded). A directory
  whose files are those of a vocabulary loaded before and still in use gives that one."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such vocabulary directory")
  key = _identity(directory)
  if key in _IN_USE:
    loaded = _IN_USE.get(key)
    if loaded is not None:
      return dataclasses.replace(loaded, directory=directory) if (
          loaded.directory != directory) else loaded
  vocab = _read(directory, path)
  _IN_USE[key] = vocab
  return vocab


def _read(directory: str, path: str) -> Vocab:
  try:
    with open(path) as f:
      m = json.load(f)
  except FileNotFoundError:
    raise DataError(f"{path}: missing (not a vocabulary directory: scripts/build_vocab.py "
                    "writes one)") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: not a valid vocabulary manifest ({e})") from None
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise DataError(f"{path}: not a {FORMAT} manifest")
  if m.get("version") != VERSION:
    raise DataError(f"{path}: format version {m.get('version')}, this reader reads {VERSION}")
  tables, digests = {}, {}
  try:
    for t in m["tables"]:
      name, file = str(t["name"]), str(t["file"])
      if os.path.basename(file) != file or file in ("", ".", ".."):
        raise DataError(f"{path}: table '{name}': file '{file}' must be a name in {directory}")
      tables[name] = _load_table(os.path.join(directory, file), t)
      digests[name] = t["ids_sha256"]   # (`_load_table` checked the ids against it)
    id_format, fp = str(m["id_format"]), str(m["fingerprint"])
  except DataError:
    raise
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
  if _fingerprint_of(digests) != fp:
    raise DataError(f"{path}: fingerprint {fp} does not match its tables' "
                    f"({_fingerprint_of(digests)})")
  return Vocab(directory=directory, fingerprint=fp, id_format=id_format, tables=tables)


def _load_table(file: str, entry: Mapping) -> np.ndarray:
  try:
    with np.load(file, allow_pickle=False) as z:
      ids = z["ids"]
  except FileNotFoundError:
    raise DataError(f"{file}: missing (table '{entry['name']}' of the vocabulary)") from None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f"{file}: not a vocabulary table ({type(e).__name__}: {e})") from None
  if ids.dtype != np.uint64 or ids.ndim != 1 or len(ids) != int(entry["size"]):
    raise DataError(f"{file}: ids are {ids.dtype} {list(ids.shape)}, expected uint64 "
                    f"[{entry['size']}]")
  if ids_sha256(ids) != entry["ids_sha256"]:
    raise DataError(f"{file}: its ids do not match the manifest's sha256 (corrupt table)")
  if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
    raise DataError(f"{file}: ids are not sorted and distinct")
  return ids
