"""Criteo TSV: files, gzip, a vectorised numpy parser, strict errors.

Format (the Criteo Kaggle / Terabyte layout): one example per line, tab-separated,

  label \\t I1 .. I13 \\t C1 .. C26

* label: `0` or `1`.
* I1..I13: decimal integers (optional leading `-`, at most 18 digits) or empty. Stored as
  `log(1 + max(x, 0))`; empty -> 0. With `Layout.dense_transform == "none"`
  (`open_source.dense_transform`) finite decimal floats instead, stored as written
  (`tsv_floats`); empty -> 0.
* C1..C26: hexadecimal ids (at most 16 hex digits, either case) or empty. The k-th
  categorical column feeds the k-th configured feature; stored as `int(hex, 16) % rows`
  of the feature's table. With `Layout.id_format == "decimal"` (`open_source.id_format`)
  decimal ids instead (at most 20 digits, up to 2**64-1), `int(id) % rows` (`tsv_ids`).
  With `Layout.vocab` (`open_source.vocab`) each id reads as its vocabulary row instead:
  1..V for a kept id, 0 for any other (`vocab`).
  - one-hot feature (`max_len == 1`): one id; empty -> id 0 (the DLRM/TorchRec convention).
  - multi-hot feature (`max_len > 1`): ids separated by `,` (e.g. `a3f,11,7c`), at most
    `max_len` of them; the bag's length is the number of ids; empty -> an empty bag (all
    slots -1). Empty list items (`a,,b`, `a,`) are malformed.
  - weighted feature: each id may carry `:weight` (e.g. `a3f:0.5,11:2`), a finite float
    (digits, sign, `.`, exponent: no spaces or `_`); an id without one has weight 1.
Files may be plain or gzip (detected by content), lines end in `\\n` or `\\r\\n` (not `\\r`
alone), and the last line may lack its newline. A UTF-8 byte order mark (BOM, written by
some Windows tools) at the very start of a file's (decompressed) content is skipped; one
anywhere else is malformed.

Anything else is malformed and raises `DataError("FILE:LINE: column C (NAME): ...")` (line
1-based), or with `bad_rows="skip"` the row is dropped and counted per file. An empty file, a
file that is not text, a truncated or corrupt gzip, a line longer than `MAX_LINE_BYTES`
(64 MiB: not Criteo TSV) and a missing path always raise.

Parsing works on byte chunks of whole lines with numpy only (delimiter positions, gathered
fixed-width digit windows): ~100k Criteo lines per second of one core on a loaded 2-core
host, 255k idle (docs/benchmarks.md; the 0.5-1M once written here was never measured).
"""

from __future__ import annotations

import ctypes
import gzip
import io
import os
import zlib
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from jaxrec import signals
from jaxrec.data import tsv_floats, tsv_ids
from jaxrec.data.batch import Batch, concatenate
from jaxrec.data.listing import list_files  # noqa: F401 (the readers' entry point)
from jaxrec.data.source import ArraySource, Layout, empty_batch
from jaxrec.data.tsv_messages import REASONS, dense_hint, shown, value_hint
from jaxrec.errors import ConfigError, DataError, counted

BAD_ROWS = ("error", "skip")
CHUNK_BYTES = 4 << 20
MAX_LINE_BYTES = 64 << 20   # a Criteo line is ~200 bytes: longer means another format
MAX_LOGGED_BAD_ROWS = 5

_CONTROL = np.zeros(256, bool)
_CONTROL[:32] = True
_CONTROL[[9, 10, 13]] = False
_CONTROL[127] = True
_FLOAT_CHARS = np.zeros(256, bool)
_FLOAT_CHARS[list(b"0123456789+-.eE")] = True
_POW10 = 10 ** np.arange(18, -1, -1, dtype=np.int64)  # 10^18 .. 10^0
_PAD = 19  # longest digit window; zero bytes before a chunk
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark: skipped at byte 0 of a file


def read_chunks(path: str, chunk_bytes: int = CHUNK_BYTES,
                max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
  """Decompressed content of `path` in chunks of whole lines (each ends with `\\n`), as
  `(number of the chunk's first line, chunk)` (1-based).

  Linear in the file size whatever its line lengths; a line still without a newline after
  `max_line_bytes` (default `MAX_LINE_BYTES`) raises `DataError` naming file and line.
  """
  limit = MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
  try:
    with signals.immediate():   # a pipe's open waits for its writer
      raw = open(path, "rb")
  except OSError as e:
    raise DataError(f"{path}: cannot open: {e.strerror}") from None
  with raw:
    head = raw.peek(2)[:2]   # one read at most: a pipe may bring gzip's first byte alone
    if len(head) < 2:
      head = raw.read(2)     # (`<(ssh host cat day.gz)`); then read as "not a text file")
      raw = io.BufferedReader(_Unread(head, raw))
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if head == b"\x1f\x8b" else raw
    pieces, held, line = [], 0, 1   # the unfinished line: its pieces, bytes, number
    for data in _blocks(path, stream, chunk_bytes):
      cut = data.rfind(b"\n") + 1
      if cut:
        chunk = b"".join(pieces + [data[:cut]])
        yield line, chunk
        line += chunk.count(b"\n")
        pieces, held = [data[cut:]], len(data) - cut
      else:
        pieces.append(data)
        held += len(data)
      if held > limit:
        raise DataError(f"{path}:{line}: a line longer than {limit} bytes (no newline in its "
                        f"first {limit} bytes): not Criteo TSV")
    if held:
      yield line, b"".join(pieces) + b"\n"


class _Unread(io.RawIOBase):
  """The stream `raw` with `head`, bytes already read from it, back in front."""

  def __init__(self, head: bytes, raw):
    super().__init__()
    self._head, self._raw = head, raw

  def readable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    if self._head:
      n = min(len(b), len(self._head))
      b[:n], self._head = self._head[:n], self._head[n:]
      return n
    return self._raw.readinto(b)


def _blocks(path: str, stream, chunk_bytes: int) -> Iterator[bytes]:
  """The decompressed blocks of `path`; the first one checked (not empty, text) and a BOM
  at its start removed."""
  data = _read(path, stream, chunk_bytes).removeprefix(_BOM)   # from Windows tools
  if not data:
    raise DataError(f"{path}: empty file")
  _check_not_compressed(path, data[:8])
  _check_text(path, data[:1 << 16])
  _check_line_ends(path, data[:1 << 16])
  while data:
    yield data
    data = _read(path, stream, chunk_bytes)


def _read(path: str, stream, size: int) -> bytes:
  try:
    with signals.immediate():   # a deferred SIGINT / SIGTERM stops a wait for input
      return stream.read(size)
  except EOFError:
    raise DataError(f"{path}: truncated gzip file (the compressed stream ends early)") from None
  except (gzip.BadGzipFile, zlib.error, OSError) as e:
    raise DataError(f"{path}: corrupt gzip file ({e})") from None


_MAGIC = {b"\xfd7zXZ\x00": ("xz", "xzcat"), b"BZh": ("bzip2", "bzcat"),
          b"\x28\xb5\x2f\xfd": ("zstd", "zstdcat"), b"PK\x03\x04": ("zip", "unzip -p"),
          b"\x04\x22\x4d\x18": ("lz4", "lz4cat")}


def _check_not_compressed(path: str, head: bytes) -> None:
  """`DataError` naming a compression other than gzip, or UTF-16 (each was 'not a text
  file (control byte 0x00)', or with `BZh` a line of binary read as TSV)."""
  for magic, (name, cat) in _MAGIC.items():
    if head.startswith(magic) and (name != "bzip2" or head[3:4] in b"123456789"):
      raise DataError(f"{path}: {name}-compressed; only plain text and gzip are read "
                      f"(decompress it, or give a pipe: <({cat} FILE))")
  # UTF-16 (Excel's 'Unicode Text', PowerShell's `>`): a byte-order mark, or ASCII text's
  # every other byte 0; it read as 'not a text file (control byte 0x00)'
  halves = (head[::2], head[1::2])   # big- and little-endian ASCII: one half all zero
  if head[:2] in (b"\xff\xfe", b"\xfe\xff") or len(head) >= 4 and any(
      zeros.count(0) == len(zeros) and 0 not in text for zeros, text in (halves, halves[::-1])):
    raise DataError(f"{path}: UTF-16 text; only UTF-8 (or ASCII) is read (convert it: "
                    f"iconv -f UTF-16 -t UTF-8 {path} > {path}.utf8, and read that)")


_READ = ("jaxrec reads Criteo TSV (plain or gzip) and directories scripts/preprocess.py "
         "wrote from it")


def _check_text(path: str, head: bytes) -> None:
  """`DataError` for a file that is not text: a control byte among its first 8 bytes
  (zip/npz, shards, length-prefixed records), or in over 1% of `head`. A few elsewhere
  are left to the row parser: one NUL in a field at line 5 stopped a `--bad_rows=skip`
  run as 'not a text file', where at line 900 it skipped the row. A Parquet file
  (NVTabular's output; HugeCTR's Parquet format) is named as one; it and any other binary
  file (HugeCTR's Norm / Raw files) say what is read instead (they said only 'not a text
  file (control byte 0x15)')."""
  if head.startswith(b"PAR1"):
    raise DataError(f"{path}: a Parquet file; {_READ}: write the data out as TSV (label, "
                    "integer and hex categorical columns) and preprocess that")
  a = np.frombuffer(head, np.uint8)
  bad = np.flatnonzero(_CONTROL[a])   # (one alone in a short file is a bad row's too)
  if len(bad) and (bad[0] < 8 or (len(bad) > 1 and len(bad) * 100 > len(a))):
    line = int(np.count_nonzero(a[:bad[0]] == 10)) + 1
    raise DataError(f"{path}:{line}: not a text file (control byte 0x{a[bad[0]]:02x}): "
                    f"{_READ} (not Parquet, TFRecord or HugeCTR's Norm / Raw binary files)")


def _check_line_ends(path: str, head: bytes) -> None:
  """`DataError` for lines that end in `\\r` alone (classic Mac): the file read as one line,
  'expected 40 columns, found 196', and `bad_rows=skip` dropped it whole as 1 row."""
  if b"\n" not in head and b"\r" in head.rstrip(b"\r"):   # a final `\r` reads as `\r\n`
    raise DataError(f"{path}:1: lines end in '\\r' alone (classic Mac line endings), not "
                    "'\\n' or '\\r\\n': convert the file, e.g. tr '\\r' '\\n'")


FEATURES_FROM = ("the configuration has {n} sparse features, one per categorical column (the "
                 "FeatureSpecs of ExperimentConfig.embedding, e.g. uniform_tables.num_tables)")


class Parser:
  """Parses chunks of Criteo TSV lines for one `Layout` (see module docstring).

  `columns_from`: where the expected column counts came from, in a wrong count's hint
  (`{n}`: the categorical count); default the training config's features
  (`FEATURES_FROM`). `scripts/preprocess.py` without a gin file names its flags: it
  blamed `uniform_tables.num_tables` for a `--num_categorical` the user gave."""

  def __init__(self, layout: Layout, columns_from: str = FEATURES_FROM, labeled: bool = True):
    self.layout = layout
    self.columns_from = columns_from
    # False: lines without the label column (Criteo's test.txt), to be scored: read as if
    # they started with a label of 0, which the eval does not score (`open_source`)
    self.labeled = labeled
    self.check_decimal = False   # `decimal_features` of the next chunk parsed (hex ids)
    self.decimal_features: list[str] = []
    self.keep_raw = False   # True: `raw_tokens` holds the last chunk's (features, raw ids)
    self.raw_tokens = (np.zeros(0, np.int64), np.zeros(0, np.uint64))
    nd, nf = layout.num_dense, layout.num_sparse
    self.num_columns = 1 + nd + nf
    self._shift = 0 if labeled else 1   # the file's columns: num_columns - _shift
    self.column_names = (["label"] + [f"I{i + 1}" for i in range(nd)] +
                         [f"C{i + 1}" for i in range(nf)])
    self._max_len = np.array(layout.max_lens, np.int64)
    self._rows = np.array(layout.rows, np.uint64)
    self._slot_off = np.concatenate([[0], np.cumsum(self._max_len)[:-1]])
    self._weighted = np.array(layout.weighted, bool)
    onehot = np.repeat(self._max_len == 1, self._max_len)
    self._fill_ids = np.where(onehot, 0, -1).astype(np.int32)
    self._fill_w = np.where(onehot, 1.0, 0.0).astype(np.float32)

  def parse(self, chunk: bytes) -> tuple[Batch, np.ndarray, list]:
    """Parses whole lines.

    Returns:
      (batch of the good lines in order, 0-based indices of the bad lines in the chunk,
       per bad line `(column or None, message)`).
    """
    a = np.frombuffer(chunk, np.uint8)
    if not len(a):
      raise ValueError("empty chunk")
    self.raw_tokens = (np.zeros(0, np.int64), np.zeros(0, np.uint64))
    if a[-1] != 10:
      a = np.concatenate([a, [10]]).astype(np.uint8)
    cr = np.flatnonzero(a == 13)
    if len(cr):
      cr = cr[a[np.minimum(cr + 1, len(a) - 1)] == 10]
      a = np.delete(a, cr)
    nl = np.flatnonzero(a == 10)
    delim = np.flatnonzero((a == 9) | (a == 10))
    counts = np.diff(np.concatenate([[0], np.searchsorted(delim, nl, "right")]))
    line_idx = np.arange(len(nl))
    bad_lines, bad_msgs = [], []
    columns = self.num_columns - self._shift
    wrong = counts != columns
    if wrong.any():
      line_len = np.diff(np.concatenate([[-1], nl]))
      kind = "integer" if self.layout.dense_transform == "log" else "dense"
      expected = (f"{columns} tab-separated columns ({'label, ' * self.labeled}"
                  f"{self.layout.num_dense} {kind}, {self.layout.num_sparse} categorical"
                  f"{'' if self.labeled else '; no label'})")
      layout = self._layout_hint(counts) if wrong.all() else ""
      for i in np.flatnonzero(wrong):   # (an empty line, e.g. a blank last one, "found 1")
        bad_lines.append(i)
        # a tab before the line's end (some exporters write one) makes one empty column more;
        # (a Criteo line whose last field is empty ends in a tab too: the layout hint first)
        tail = " (the line ends in a tab)" if (counts[i] == columns + 1
                                               and a[nl[i] - 1] == 9) else ""
        if counts[i] == 1 and line_len[i] > 1:   # a CSV file: "found 1", nothing more
          commas = int((a[nl[i] - line_len[i] + 1:nl[i]] == 44).sum())
          tail = (f" (no tab, {commas} commas: comma-separated? the columns must be "
                  "tab-separated)" if commas else "")
        bad_msgs.append((None, f"empty line, expected {expected}" if line_len[i] == 1 else
                         f"expected {expected}, found {counts[i]}{layout or tail}"))
      a = a[np.repeat(~wrong, line_len)]
      line_idx = line_idx[~wrong]
      delim = np.flatnonzero((a == 9) | (a == 10))
    if not self.labeled and len(line_idx):
      a, delim = _with_label_column(a)
    batch, bad_rows, cols, msgs = self._parse_fields(a, delim, len(line_idx))
    bad_lines.extend(line_idx[bad_rows])
    bad_msgs.extend(zip(cols, msgs))
    order = np.argsort(np.array(bad_lines, np.int64), kind="stable")
    return batch, np.array(bad_lines, np.int64)[order], [bad_msgs[i] for i in order]

  def _layout_hint(self, counts) -> str:
    """For a chunk of lines that all have the same wrong column count: the data's
    categorical column count, read as such (the configuration was written for other data,
    e.g. an 8-feature config on Criteo's 26 columns), or ''."""
    nd, nf = self.layout.num_dense, self.layout.num_sparse
    first = 1 - self._shift + nd   # columns before the categorical ones
    if len(counts) < 2 or (counts != counts[0]).any() or counts[0] <= first:
      return ""
    if self.labeled:
      label = ("no label column (as Criteo's unlabeled test.txt: training and preprocessed "
               "files need labels; eval files to be scored only are read as TSV by "
               "scripts/train.py --noeval_labels)? or "
               if counts[0] == self.num_columns - 1 else "")
    else:
      label = ("a label column first (read without --noeval_labels)? or "
               if counts[0] == self.num_columns else "")
    kind = "integer" if self.layout.dense_transform == "log" else "dense"
    return (f", as do all {len(counts)} lines read with it: {label}{counts[0] - first} "
            f"categorical columns after the {nd} {kind} ones? "
            + self.columns_from.format(n=nf, nd=nd))

  def _parse_fields(self, a, delim, m):
    lay = self.layout
    if m == 0:
      return empty_batch(lay, 0), np.zeros(0, np.int64), [], []
    nd, nc = lay.num_dense, self.num_columns
    # Zero bytes in front, so that right-aligned windows never index below 0.
    a = np.concatenate([np.zeros(_PAD, np.uint8), a])
    delim = delim.astype(np.int32) + _PAD
    ends = delim.reshape(m, nc)
    starts = np.empty_like(ends)
    starts.reshape(-1)[0] = _PAD
    starts.reshape(-1)[1:] = delim[:-1] + 1
    widths = ends - starts
    bad = np.zeros((m, nc), bool)
    reason = np.zeros((m, nc), np.uint8)

    def flag(mask, code, rows=None, cols=None):
      if rows is None:
        bad[mask] = True
        reason[mask & (reason == 0)] = code
      else:
        rows, cols = rows[mask], cols[mask]
        bad[rows, cols] = True
        r = reason[rows, cols]
        reason[rows, cols] = np.where(r == 0, code, r)

    # Label.
    c0 = a[starts[:, 0]]
    ok = (widths[:, 0] == 1) & ((c0 == 48) | (c0 == 49))
    flag(np.pad(~ok[:, None], ((0, 0), (0, nc - 1))), 1)
    labels = (c0 == 49).astype(np.float32)
    s, e, w = starts[:, 1:1 + nd], ends[:, 1:1 + nd], widths[:, 1:1 + nd]
    dense_bad = np.zeros((m, nc), bool)
    if lay.dense_transform == "none":   # floats, as written (`tsv_floats`)
      dense, why = tsv_floats.parse(a, s, e)
      for code in np.unique(why[why > 0]):
        dense_bad[:, 1:1 + nd] = why == code
        flag(dense_bad, code)
    else:   # "log": right-aligned windows of decimal digits
      neg = (w > 0) & (a[s] == 45)
      k = int(min(max(w.max(initial=0), 1), _PAD))
      idx = e[..., None] + np.arange(-k, 0, dtype=np.int32)
      d = a[idx] - np.uint8(48)
      d *= idx >= (s + neg)[..., None]
      chars_ok = (d <= 9).all(-1) & ~(neg & (w == 1))
      too_long = (w - neg) > 18
      dense_bad[:, 1:1 + nd] = ~chars_ok
      flag(dense_bad, 2)
      dense_bad[:, 1:1 + nd] = too_long & chars_ok
      flag(dense_bad, 3)
      if k <= 9:
        vals = (d.astype(np.int32) * _POW10[-k:].astype(np.int32)).sum(-1, dtype=np.int64)
      else:
        vals = (d.astype(np.int64) * _POW10[-k:]).sum(-1)
      dense = np.log1p(np.maximum(np.where(neg, -vals, vals), 0)).astype(np.float32)
    # Categorical tokens: non-empty fields, split at ',' in multi-hot features.
    cs, ce = starts[:, 1 + nd:], ends[:, 1 + nd:]
    nonempty = ce > cs
    tok_s, tok_e = cs[nonempty], ce[nonempty]  # row-major = buffer order
    commas = np.flatnonzero(a == 44).astype(np.int32)
    if len(commas):
      fidx = np.searchsorted(delim, commas)
      crow, ccol = fidx // nc, fidx % nc
      incat = ccol > nd
      onehot = np.zeros(len(commas), bool)
      onehot[incat] = self._max_len[ccol[incat] - 1 - nd] == 1
      flag(onehot, 6, crow, ccol)
      cc = commas[incat]
      tok_s = np.sort(np.concatenate([tok_s, cc + 1]))
      tok_e = np.sort(np.concatenate([tok_e, cc]))
      tf = np.searchsorted(delim, tok_s)
      trow, tcol = tf // nc, tf % nc
      run = np.concatenate([[True], tf[1:] != tf[:-1]])
      ar = np.arange(len(tf))
      slot = ar - np.maximum.accumulate(np.where(run, ar, 0))
    else:
      trow, tcol = np.nonzero(nonempty)
      tcol = tcol + 1 + nd
      slot = np.zeros(len(trow), np.int64)
    tfeat = tcol - 1 - nd
    over = slot >= self._max_len[tfeat]
    flag(over, 7, trow, tcol)
    # Weights (`id:weight`) of weighted features.
    id_end = tok_e.copy()
    tok_w = np.ones(len(trow), np.float32)
    if self._weighted.any():
      colons = np.flatnonzero(a == 58)
      ti = np.searchsorted(tok_s, colons, "right") - 1
      keep = (ti >= 0)
      keep[keep] &= colons[keep] < tok_e[ti[keep]]
      colons, ti = colons[keep], ti[keep]
      wt = self._weighted[tfeat[ti]]
      colons, ti = colons[wt], ti[wt]
      many = np.bincount(ti, minlength=len(trow)) > 1
      flag(many, 9, trow, tcol)
      id_end[ti] = colons
      tok_w[ti], wbad = _parse_floats(a, colons + 1, tok_e[ti])
      flag(np.isin(np.arange(len(trow)), ti[wbad]), 9, trow, tcol)
    # Ids, hex or decimal (`tsv_ids`).
    raw, why = tsv_ids.parse(a, tok_s, id_end, lay.id_format)
    for code in tsv_ids.ORDER[lay.id_format]:
      flag(why == code, code, trow, tcol)
    if lay.vocab is None:
      tid = (raw % self._rows[tfeat]).astype(np.int32)
    else:   # kept ids -> rows 1..V of their table, the others row 0 (`vocab`)
      tid = lay.vocab.lookup_features(lay.tables, tfeat, raw)
    if self.check_decimal:
      self.check_decimal = False
      self.decimal_features = [] if lay.id_format == "decimal" else tsv_ids.decimal_features(
          lay, self.column_names, tfeat, tsv_ids.has_letter(a, tok_s, id_end), raw)
    # Assemble.
    total = int(self._max_len.sum())
    ids = np.broadcast_to(self._fill_ids, (m, total)).copy()
    put = ~over
    col = self._slot_off[tfeat[put]] + slot[put]
    ids[trow[put], col] = tid[put]
    weights = None
    if self._weighted.any():
      weights = np.broadcast_to(self._fill_w, (m, total)).copy()
      weights[trow[put], col] = tok_w[put]
    bad_rows = bad.any(1)
    good = ~bad_rows
    if self.keep_raw:   # the good rows' tokens, for scripts/build_vocab.py's counts
      keep = put & good[trow]
      self.raw_tokens = (tfeat[keep], raw[keep])
    out_ids, out_w = {}, {}
    for f, name in enumerate(lay.names):
      o, ml = self._slot_off[f], self._max_len[f]
      out_ids[name] = ids[good, o:o + ml]
      if lay.weighted[f]:
        out_w[name] = weights[good, o:o + ml]
    batch = Batch(dense=dense[good], labels=labels[good], ids=out_ids, weights=out_w)
    rows = np.flatnonzero(bad_rows)
    cols, msgs = [], []
    for r in rows[:MAX_LOGGED_BAD_ROWS]:
      c = int(np.argmax(bad[r]))
      value = bytes(a[starts[r, c]:ends[r, c]])
      why = REASONS[int(reason[r, c])]
      hint = (" (a UTF-8 byte order mark: one is skipped only at the start of a file)"
              if value.startswith(_BOM) else "")
      if 0 < c <= nd:
        hint = hint or dense_hint(int(reason[r, c]), value)
      if c > nd:
        hint = hint or value_hint(int(reason[r, c]), value, lay.weighted[c - 1 - nd],
                                  lay.id_format)
        why = f"feature '{lay.names[c - 1 - nd]}': " + why.format(
            max_len=lay.max_lens[c - 1 - nd], id=tsv_ids.ID_WORD[lay.id_format])
      cols.append(c)
      msgs.append(f"column {c + 1 - self._shift} ({self.column_names[c]}): {why} "
                  f"'{shown(value)}'{hint}")
    cols += [None] * (len(rows) - len(cols))
    msgs += [None] * (len(rows) - len(msgs))
    return batch, rows, cols, msgs


def _with_label_column(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Whole lines `a` (uint8, each ending in a newline) with `0\t` in front of each, and
  the positions of their tabs and newlines: an unlabeled file's lines as labeled ones."""
  starts = np.concatenate([[0], np.flatnonzero(a == 10)[:-1] + 1])
  a = np.insert(a, np.repeat(starts, 2), np.tile(np.array([48, 9], np.uint8), len(starts)))
  return a, np.flatnonzero((a == 9) | (a == 10))


def _parse_floats(a: np.ndarray, s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Floats in byte ranges `[s, e)` -> (float32 values, bool `bad` mask)."""
  n = len(s)
  if not n:
    return np.zeros(0, np.float32), np.zeros(0, bool)
  k = int(min(max((e - s).max(), 1), 32))
  idx = s[:, None] + np.arange(k)
  inside = idx < e[:, None]
  win = np.where(inside, a[np.minimum(idx, len(a) - 1)], 0).astype(np.uint8)
  strs = np.frombuffer(win.tobytes(), f"S{k}")
  too_long = (e - s) > 32
  # what float() reads beyond the format: `1_0` (10), ` 1`; letters other than e (inf, nan)
  # are rejected below anyway
  odd = (inside & ~_FLOAT_CHARS[win]).any(-1)
  try:
    vals = strs.astype(np.float64)
    bad = np.zeros(n, bool)
  except ValueError:
    vals, bad = np.zeros(n), np.zeros(n, bool)
    for i, t in enumerate(strs):
      try:
        vals[i] = float(t)
      except ValueError:
        bad[i] = True
  with np.errstate(over="ignore"):
    vals = vals.astype(np.float32)  # checked as stored: `1e39` is inf in float32
  bad |= ~np.isfinite(vals) | too_long | odd | (e <= s)
  return np.where(bad, np.float32(0), vals), bad


class BadRowPolicy:
  """Applies `bad_rows` = `error` | `skip` and counts dropped rows per file (by absolute
  path, as preprocessed shards record them: `./a.tsv` for one split and `a.tsv` for the
  other were two files in `metrics.jsonl`'s `bad_rows`)."""

  def __init__(self, bad_rows: str):
    if bad_rows not in BAD_ROWS:
      raise ConfigError(f"bad_rows must be one of {BAD_ROWS}, got '{bad_rows}'")
    self.mode = bad_rows
    self.counts: dict[str, int] = {}
    self._logged: dict[str, int] = {}

  def report(self, path: str, first_line: int, bad: np.ndarray, msgs: list) -> None:
    """Raises (error mode) or counts and logs the bad lines of one chunk (0-based `bad`)."""
    key = os.path.abspath(path)
    self.counts.setdefault(key, 0)
    if not len(bad):
      return
    if self.mode == "error":
      raise DataError(f"{path}:{first_line + int(bad[0])}: {msgs[0][1]}")
    for i, (_, msg) in zip(bad, msgs):
      if msg is not None and self._logged.get(path, 0) < MAX_LOGGED_BAD_ROWS:
        self._logged[path] = self._logged.get(path, 0) + 1
        logging.warning("skipping malformed row %s:%d: %s", path, first_line + int(i), msg)
    self.counts[key] += len(bad)


def iter_file(path: str, parser: Parser, policy: BadRowPolicy,
              chunk_bytes: int = CHUNK_BYTES) -> Iterator[Batch]:
  """Parsed batches (one per chunk) of the good rows of one file, in order. Under hex ids, a
  warning names the features whose ids in the file's first chunk look decimal
  (`tsv_ids.decimal_features`)."""
  for line, chunk in read_chunks(path, chunk_bytes):
    parser.check_decimal = line == 1
    batch, bad, msgs = parser.parse(chunk)
    policy.report(path, line, bad, msgs)
    if line == 1 and parser.decimal_features:
      tsv_ids.warn_decimal(path, parser.decimal_features)
    yield batch


def _return_freed_memory() -> None:
  """Gives the heap the parsed chunks left (freed by `read_tsv`'s concatenation) back to
  the system where glibc keeps it: the process held ~430 bytes per example afterwards,
  ~160 (the arrays) after it."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):   # not glibc
    pass


def read_tsv(paths: Sequence[str], layout: Layout, bad_rows: str = "error",
             chunk_bytes: int = CHUNK_BYTES, labeled: bool = True) -> ArraySource:
  """Parses TSV files into an in-memory source (160 bytes per Criteo example); `labeled`
  False: lines without the label column (`Parser`), read with labels of 0."""
  parser, policy = Parser(layout, labeled=labeled), BadRowPolicy(bad_rows)
  parts = [b for p in paths for b in iter_file(p, parser, policy, chunk_bytes)]
  examples = concatenate(parts)
  del parts
  _return_freed_memory()
  if examples.size == 0:
    raise DataError(f"{', '.join(paths)}: no valid rows "
                    f"({counted(sum(policy.counts.values()), 'malformed row')} skipped)")
  return ArraySource(examples, layout, policy.counts, name=",".join(paths), labeled=labeled)
