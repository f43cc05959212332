"""Preprocessed binary shards: fixed-width records plus a JSON manifest.

`scripts/preprocess.py --input=TSV --output=DIR` parses Criteo TSV once (see `tsv`) and
writes

  DIR/shard-00000.bin ...   packed little-endian records, one per example:
                            label u1, dense f4[num_dense], then per feature k
                            ids i4[max_len] (-1 = absent slot) and, if weighted,
                            weights f4[max_len]; ids are already reduced `% rows`.
  DIR/manifest.json         {"format": "jaxrec.binary", "version": 1, "num_examples",
                            "num_dense", "dense_transform" ("log" | "none": how the TSV's
                            dense values were read; absent, from before it was recorded:
                            "log"), "id_format" ("hex" | "decimal": how the TSV's ids
                            were written; absent: "hex"), "vocab" (null, or {path,
                            fingerprint} of the id vocabulary the ids were read through,
                            `vocab.record`; absent: null), "record_bytes", "features":
                            [{name, table, rows, max_len, weighted}], "shards": [{file,
                            num_examples, bytes, sha256}], "bad_rows": {input path: rows
                            skipped}}

The manifest is written last (atomically), so a directory without one is not a dataset
(`binary_write` writes it; this module defines the format and reads it).
Readers memory-map the shards: example `i` is one fixed-size read, so any permutation is
cheap and each process touches only the examples it takes. On open the reader checks the
manifest against the configured features (count, bag sizes, weights, row counts; a feature
stored one-hot cannot be read multi-hot: their empty fields differ), that the configured
dense transform and id format are the ones the data was preprocessed with, that each shard
`file` is a name inside DIR (not a path), and each shard's size and sha256; any mismatch
raises `DataError`. A shard whose sha256 matched is recorded in `DIR/.verified.json` with
its size, mtime and inode, and later opens skip hashing it while those are unchanged
(hashing a Criteo-1TB-sized dataset takes minutes, on every open by every process); a
read-only directory is hashed on every open.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from typing import Sequence

import numpy as np

from jaxrec.data import file_limit, vocab
from jaxrec.data.batch import Batch
from jaxrec.data.source import READ_AS, GrainMixin, Layout
from jaxrec.errors import DataError
from jaxrec.files import write_text_atomic

FORMAT = "jaxrec.binary"
VERSION = 1
MANIFEST = "manifest.json"
VERIFIED = ".verified.json"   # shards whose sha256 matched, by size, mtime and inode
SHARD_NAME = re.compile(r"shard-\d{5,}\.bin")   # the writer's file names


def record_dtype(num_dense: int, max_lens: Sequence[int], weighted: Sequence[bool]) -> np.dtype:
  """The packed record of one example (see module docstring)."""
  fields = [("label", "u1"), ("dense", "<f4", (num_dense,))]
  for k, (m, w) in enumerate(zip(max_lens, weighted)):
    fields.append((f"i{k}", "<i4", (m,)))
    if w:
      fields.append((f"w{k}", "<f4", (m,)))
  return np.dtype(fields)


def to_records(batch: Batch, layout: Layout) -> np.ndarray:
  """Host batch -> structured records `[n]`."""
  recs = np.zeros(batch.size, record_dtype(layout.num_dense, layout.max_lens, layout.weighted))
  recs["label"] = batch.labels
  recs["dense"] = batch.dense
  for k, name in enumerate(layout.names):
    recs[f"i{k}"] = batch.ids[name]
    if layout.weighted[k]:
      recs[f"w{k}"] = batch.weights[name]
  return recs


def is_preprocessed(path: str) -> bool:
  """Whether directory `path` holds a preprocessed dataset's manifest. A `manifest.json`
  whose JSON is another program's (no `"format": "jaxrec.binary"`, nor our `shards`) is
  not one: a TSV directory holding such a file was refused three contradictory ways. One
  that does not parse is taken as ours, damaged (reading it names the fault)."""
  manifest = os.path.join(path, MANIFEST)
  if not (os.path.isdir(path) and os.path.isfile(manifest)):
    return False
  try:
    with open(manifest, "rb") as f:
      data = json.loads(f.read())
  except (OSError, ValueError):
    return True
  return isinstance(data, dict) and (data.get("format") == FORMAT
                                     or ("format" not in data and "shards" in data))


def check_not_part(files: Sequence[str]) -> None:
  """`DataError` when TSV `files` hold a preprocessed dataset's manifest or shards, or
  shards without a manifest (a killed preprocess): read as TSV, they said 'expected 40
  tab-separated columns' or 'not a text file' and nothing more."""
  for path in files:
    parent, name = os.path.dirname(path) or ".", os.path.basename(path)
    if name == MANIFEST or SHARD_NAME.fullmatch(name):
      if is_preprocessed(parent):
        raise DataError(f"{path}: part of the preprocessed dataset {parent}; give the "
                        "directory")
      if name == MANIFEST:   # another program's: read as TSV, it was a bad row (or error)
        raise DataError(f"{path}: a {MANIFEST} among the TSV files, not a jaxrec dataset's; "
                        f"give the TSV files alone (e.g. {os.path.join(parent, '*.tsv')})")
      if SHARD_NAME.fullmatch(name) and _first_byte(path) in (b"\0", b"\1"):   # a record's label
        raise DataError(f"{path}: a shard without {MANIFEST} beside it: a scripts/preprocess.py "
                        "run that did not finish (run it again)")


def _first_byte(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read(1)
  except OSError:   # reported when it is read
    return b""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _file_identity(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns, st.st_ino]


def _verify_shards(directory: str, shards: Sequence[dict]) -> None:
  """Checks each shard's sha256 against the manifest, skipping those `VERIFIED` records
  as already matched with the file's current size, mtime and inode."""
  record_path = os.path.join(directory, VERIFIED)
  try:
    with open(record_path) as f:
      seen = json.load(f)
  except (OSError, ValueError):
    seen = {}
  seen = seen if isinstance(seen, dict) else {}
  fresh = {}
  for s in shards:
    path = os.path.join(directory, s["file"])
    ident = _file_identity(path)
    if seen.get(s["file"]) != {"identity": ident, "sha256": s["sha256"]}:
      if _sha256(path) != s["sha256"]:
        raise DataError(f"{path}: sha256 checksum does not match {MANIFEST} (corrupt shard)")
    fresh[s["file"]] = {"identity": ident, "sha256": s["sha256"]}
  if fresh != seen:
    try:   # best effort: other processes may race (same content), the dir may be read-only
      write_text_atomic(record_path, json.dumps(fresh))
    except OSError:
      pass


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such directory")
  try:
    with open(path) as f:
      m = json.load(f)
  except FileNotFoundError:
    raise DataError(f"{path}: missing (not a preprocessed directory)") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: not a valid manifest ({e})") from None
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise DataError(f"{path}: not a {FORMAT} manifest")
  if m.get("version") != VERSION:
    raise DataError(f"{path}: format version {m.get('version')}, this reader reads {VERSION}")
  try:
    _check_kinds(m)
    for field, (choices, _, _) in READ_AS.items():
      if stored_read_as(m, field) not in choices:
        raise DataError(f"{path}: {field} is {json.dumps(m[field])}, not one of "
                        f"{', '.join(map(json.dumps, choices))}")
    for f in m["features"]:   # before the record layout: -1 failed in numpy, unnamed
      if int(f["max_len"]) <= 0:
        raise DataError(f"{path}: feature {f['name']}: max_len is {f['max_len']}, must be "
                        "positive")
    dtype = record_dtype(int(m["num_dense"]), [int(f["max_len"]) for f in m["features"]],
                         [bool(f["weighted"]) for f in m["features"]])
    if int(m["record_bytes"]) != dtype.itemsize:
      raise DataError(f"{path}: record_bytes {m['record_bytes']} does not match its features "
                      f"({dtype.itemsize} bytes)")
    if int(m["num_examples"]) <= 0:   # gathers failed later with an IndexError
      raise DataError(f"{path}: num_examples is {m['num_examples']}: the dataset holds no "
                      "examples")
    if sum(int(s["num_examples"]) for s in m["shards"]) != int(m["num_examples"]):
      raise DataError(f"{path}: shard sizes do not add up to num_examples {m['num_examples']}")
    for f in m["features"]:
      str(f["name"])
      if int(f["rows"]) <= 0:   # `0 % rows == 0` passed the table check
        raise DataError(f"{path}: feature {f['name']}: rows is {f['rows']}, must be positive")
    seen: dict[str, int] = {}
    for k, s in enumerate(m["shards"]):
      _check_shard_file(path, k, s["file"])
      if s["file"] in seen:   # read twice, and the file it replaced never
        raise DataError(f"{path}: shards {seen[s['file']]} and {k} are both '{s['file']}'")
      seen[s["file"]] = k
      int(s["bytes"]), str(s["sha256"])
    bad = m.get("bad_rows", {})   # read at every log step
    if not isinstance(bad, dict):
      raise TypeError(f"bad_rows is a {type(bad).__name__}, not an object")
    [int(n) for n in bad.values()]
    v = m.get("vocab")   # absent (from before vocabularies) or null: none
    if v is not None and not (isinstance(v, dict) and isinstance(v.get("path"), str)
                              and isinstance(v.get("fingerprint"), str)):
      raise TypeError(f"vocab is {json.dumps(v)}, not null or {{path, fingerprint}}")
  except DataError:   # a ValueError too: already says what is wrong
    raise
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
  return m


def stored_read_as(m: dict, field: str):
  """How manifest `m`'s data was read (`field`: `dense_transform`, `id_format`); the
  default (`source.READ_AS`: "log", "hex") for one from before the field was recorded
  (only that was read then)."""
  return m.get(field, READ_AS[field][1])


def _check_kinds(m: dict) -> None:
  """`TypeError` for a count that is not a JSON integer (`int()` took 100000.5 as 100000)
  or a `weighted` that is not a JSON bool (`bool("false")` is True)."""
  def whole(value, what):
    if not isinstance(value, int) or isinstance(value, bool):
      raise TypeError(f"{what} is {json.dumps(value)}, not a whole number")
  for key in ("num_dense", "num_examples", "record_bytes"):
    whole(m[key], key)
  for f in m["features"]:
    for key in ("rows", "max_len"):
      whole(f[key], f"feature {f['name']}: {key}")
    if not isinstance(f["weighted"], bool):
      raise TypeError(f"feature {f['name']}: weighted is {json.dumps(f['weighted'])}, not "
                      "true or false")
  for k, s in enumerate(m["shards"]):
    for key in ("num_examples", "bytes"):
      whole(s[key], f"shard {k}: {key}")


def _check_shard_file(manifest: str, k: int, name) -> None:
  """`DataError` unless shard `k`'s `file` is a plain name: an absolute path or one with
  `../` read a file outside the dataset directory (only the size check caught it)."""
  seps = [c for c in (os.sep, os.altsep, "/") if c]
  if (not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in seps)
      or os.path.isabs(name)):
    raise DataError(f"{manifest}: shard {k}: file '{name}' must be a name inside the dataset "
                    "directory")


def _check_feature_order(where: str, stored: Sequence[str], names: Sequence[str]) -> None:
  """`DataError` unless the configured features `names` can map in order onto the `stored`
  ones: as many, and none named like a stored feature at another position (that read
  another feature's ids, silently when the tables had one size)."""
  hint = "re-run scripts/preprocess.py with this configuration"
  if len(stored) != len(names):
    n = min(len(stored), len(names))
    many = abs(len(stored) - len(names)) > 1
    left = (f"data feature{'s' * many} {', '.join(stored[n:])}" if len(stored) > n else
            f"configured feature{'s' * many} {', '.join(repr(x) for x in names[n:])}")
    left += (" have no " if many else " has no ") + (
        "configured feature" if len(stored) > n else "data feature")
    raise DataError(f"{where}: the data has {len(stored)} sparse features but {len(names)} "
                    f"are configured: {left} (stored features map to the configured ones in "
                    f"order; {hint})")
  position = {s: k for k, s in enumerate(stored)}
  for k, name in enumerate(names):
    if position.get(name, k) != k:
      order = ", ".join(stored[:3]) + (", ..." if len(stored) > 3 else "")
      raise DataError(f"{where}: configured feature {k} '{name}' is data feature "
                      f"{position[name]}; stored features map to the configured ones in "
                      f"order: list the features in the data's order ({order}) or {hint}")


class BinarySource(GrainMixin):
  """Random access to a preprocessed directory, for the configured `layout`.

  Stored features map to the configured ones in order (a configured name that is another
  position's stored name is refused). A configured bag may be larger than the stored one
  (padded with -1); a configured table may be smaller than the stored row count if it
  divides it (ids are reduced again, which equals reducing the raw id).
  """

  def __init__(self, directory: str, layout: Layout, verify_checksums: bool = True):
    self.directory, self.layout = directory, layout
    m = self.manifest = read_manifest(directory)
    where = os.path.join(directory, MANIFEST)
    feats = m["features"]
    _check_feature_order(where, [str(f["name"]) for f in feats], layout.names)
    if int(m["num_dense"]) != layout.num_dense:
      raise DataError(f"{where}: the data has {m['num_dense']} dense features but "
                      f"{layout.num_dense} are configured")
    for field, (_, _, what) in READ_AS.items():   # a model trained on other inputs
      stored, configured = stored_read_as(m, field), getattr(layout, field)
      if stored != configured:
        raise DataError(
            f"{where}: the data's {what} were preprocessed with {field} '{stored}' but this "
            f"run is configured with open_source.{field} = '{configured}'; bind "
            f"open_source.{field} = '{stored}' (gin) to train on this data, or re-run "
            f"scripts/preprocess.py with --{field}={configured}")
    vocab.check_stored(where, m.get("vocab"), layout.vocab)
    self._reduce = []
    for f, name, ml, w, rows, table in zip(feats, layout.names, layout.max_lens,
                                           layout.weighted, layout.rows, layout.tables):
      what = f"{where}: feature {f['name']} (configured as '{name}')"
      if int(f["max_len"]) > ml:
        raise DataError(f"{what} holds bags of up to {f['max_len']} ids, max_len is {ml}")
      if int(f["max_len"]) == 1 < ml:   # one-hot stores an empty field as id 0, not a bag
        raise DataError(f"{what} was preprocessed one-hot (max_len 1: an empty field is id 0) "
                        f"but is configured multi-hot (max_len {ml}: an empty field is an "
                        "empty bag); re-run scripts/preprocess.py with this configuration")
      if bool(f["weighted"]) != w:
        raise DataError(f"{what} is {'' if f['weighted'] else 'not '}weighted in the data but "
                        f"{'' if w else 'not '}weighted in the config")
      if layout.vocab is not None:   # ids < vocabulary size + 1 <= rows (`make_layout`)
        self._reduce.append(False)
        continue
      if int(f["rows"]) % rows:
        raise DataError(f"{what}: ids were reduced to {f['rows']} rows, its table '{table}' has "
                        f"{rows} (re-run scripts/preprocess.py with matching rows)")
      self._reduce.append(int(f["rows"]) != rows)
    self._dtype = record_dtype(layout.num_dense, [int(f["max_len"]) for f in feats],
                               layout.weighted)
    for s in m["shards"]:
      path = os.path.join(directory, s["file"])
      if not os.path.isfile(path):
        raise DataError(f"{path}: shard listed in {MANIFEST} is missing")
      size = os.path.getsize(path)
      if size != int(s["bytes"]) or size != int(s["num_examples"]) * self._dtype.itemsize:
        raise DataError(f"{path}: {size} bytes, the manifest says {s['num_examples']} records "
                        f"of {self._dtype.itemsize} bytes ({s['bytes']} bytes)")
    if verify_checksums:
      _verify_shards(directory, m["shards"])
    self.num_examples = int(m["num_examples"])
    self._offsets = np.cumsum([0] + [int(s["num_examples"]) for s in m["shards"]])
    # each id column's table rows (`_check_values`; ids are int32)
    self._id_limit = np.repeat(np.asarray(layout.rows, np.int32 if max(layout.rows) < 2**31
                                          else np.int64), layout.max_lens)
    self._open()

  def _open(self):
    # Raw bytes per record (np.void): fancy indexing them is ~20x faster than indexing a
    # structured array; the gathered copy is then viewed with the record dtype.
    void = np.dtype((np.void, self._dtype.itemsize))
    shards = self.manifest["shards"]
    file_limit.make_room(sum(int(s["num_examples"]) > 0 for s in shards), self.directory)
    try:
      maps = [np.memmap(os.path.join(self.directory, s["file"]), void, "r",
                        shape=(int(s["num_examples"]),))
              if int(s["num_examples"]) else None for s in shards]
    except OSError as e:
      if e.errno != errno.EMFILE:
        raise
      raise DataError(file_limit.too_many(len(shards), self.directory)) from None
    self._maps = [None if m is None else np.asarray(m) for m in maps]
    # each map's file, to check its size before a read (`_check_size`)
    self._mmaps = [None if m is None else m._mmap for m in maps]   # pylint: disable=protected-access

  def _check_size(self, k: int) -> None:
    """`DataError` when shard `k`'s file is now shorter than the records mapped: reading
    past its end killed the process with SIGBUS ('Fatal Python error: Bus error', exit 135,
    or a data worker's 'exit code -7'), naming no file and saving nothing. One `fstat` (the
    map's, ~1 us); a file truncated between it and the read still crashes."""
    mm = self._mmaps[k]
    if mm is not None and mm.size() < self._maps[k].nbytes:
      path = os.path.join(self.directory, self.manifest["shards"][k]["file"])
      raise DataError(f"{path}: {mm.size()} bytes now, {self._maps[k].nbytes} when the run "
                      "opened it: the shard was truncated or rewritten during the run; re-run "
                      "scripts/preprocess.py, or put the dataset back as it was")

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_maps"] = state["_mmaps"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def records(self, indices: np.ndarray) -> np.ndarray:
    """Raw records of examples `indices` (int64 `[n]`)."""
    indices = np.asarray(indices, np.int64)
    if len(self._maps) == 1:
      self._check_size(0)
      return self._maps[0][indices].view(self._dtype)
    shard = np.searchsorted(self._offsets, indices, "right") - 1
    local = indices - self._offsets[shard]
    out = np.empty(len(indices), np.dtype((np.void, self._dtype.itemsize)))   # shard 0
                                                      # may hold no examples (no map)
    # one slice of the indices sorted by shard per shard read: a mask over the whole batch
    # per shard was O(batch x shards) (1,000 shards at batch 512: 8.6x the time of 3)
    order = np.argsort(shard, kind="stable")
    bounds = np.flatnonzero(np.diff(shard[order])) + 1
    for run in np.split(order, bounds) if len(order) else ():
      k = int(shard[run[0]])
      self._check_size(k)
      out[run] = self._maps[k][local[run]]
    return out.view(self._dtype)

  def gather(self, indices: np.ndarray) -> Batch:
    recs = self.records(indices)
    lay = self.layout
    ids, weights = {}, {}
    for k, (name, ml) in enumerate(zip(lay.names, lay.max_lens)):
      v = recs[f"i{k}"]
      if self._reduce[k]:
        v = np.where(v >= 0, v % lay.rows[k], v)
      if v.shape[1] < ml:
        v = np.pad(v, ((0, 0), (0, ml - v.shape[1])), constant_values=-1)
      ids[name] = np.ascontiguousarray(v, np.int32)
      if lay.weighted[k]:
        w = recs[f"w{k}"]
        if w.shape[1] < ml:
          w = np.pad(w, ((0, 0), (0, ml - w.shape[1])))
        weights[name] = np.ascontiguousarray(w, np.float32)
    self._check_values(indices, recs, ids, weights)
    return Batch(dense=np.ascontiguousarray(recs["dense"], np.float32),
                 labels=recs["label"].astype(np.float32), ids=ids, weights=weights)

  def _check_values(self, indices, recs, ids, weights) -> None:
    """`DataError` naming the shard and record of a value preprocessing never writes: a
    label other than 0/1, a non-finite dense value or weight, an id outside `[-1, rows)`.
    The checksums only say the shards are as the manifest says, and another tool may have
    written them: a label 2 trained silently, a NaN ended in 'non-finite loss', and an id
    out of range was refused naming no file."""
    # (whole-batch reductions first, the per-example masks only when one fails: 26
    # features checked one by one doubled the gather's time)
    lay = self.layout
    label = recs["label"]
    if label.max(initial=0) > 1:
      self._refuse(indices, label > 1, lambda r: f"label must be 0 or 1, got {label[r]}")
    dense = recs["dense"]
    if not np.isfinite(dense.sum()):   # (or finite values summing past float32)
      bad = ~np.isfinite(dense)
      self._refuse(indices, bad.any(axis=1), lambda r: (
          f"dense value {int(np.argmax(bad[r]))} is {dense[r][bad[r]][0]}"))
    every = np.concatenate([ids[name] for name in lay.names], axis=1)   # [n, sum(max_len)]
    if every.size and (every.min() < -1 or (every >= self._id_limit).any()):
      for name, rows, table in zip(lay.names, lay.rows, lay.tables):
        v = ids[name]
        out = (v < -1) | (v >= rows)
        self._refuse(indices, out.any(axis=1), lambda r: (
            f"feature '{name}' (table '{table}', {rows} rows): id {v[r][out[r]][0]} is "
            f"out of range [0, {rows}) (-1 marks an empty slot)"))
    for name in weights:
      w = weights[name]
      if not np.isfinite(w.sum()):
        self._refuse(indices, ~np.isfinite(w).all(axis=1), lambda r: (
            f"feature '{name}': weight {w[r][~np.isfinite(w[r])][0]} is not finite"))

  def _refuse(self, indices, bad: np.ndarray, what) -> None:
    """Raises for the first example `bad` marks (`what(row in the batch)` says why)."""
    if bad.any():
      r = int(np.flatnonzero(bad)[0])
      i = int(indices[r])
      s = int(np.searchsorted(self._offsets, i, "right") - 1)
      path = os.path.join(self.directory, self.manifest["shards"][s]["file"])
      raise DataError(f"{path}: record {i - int(self._offsets[s])}: {what(r)} (the shard "
                      "was not written by scripts/preprocess.py, or changed with its "
                      "checksum)")

  def bad_row_counts(self) -> dict[str, int]:
    """Rows skipped as malformed when the data was preprocessed, per input file."""
    return {k: int(v) for k, v in self.manifest.get("bad_rows", {}).items()}
