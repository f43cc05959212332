"""Categorical ids of TSV fields (`tsv.Parser`), vectorised over a chunk's tokens, in the
format `open_source.id_format` names (`source.ID_FORMATS`):

* "hex" (Criteo's): at most 16 hex digits, either case (leading zeros count). The
  digits of right-aligned 8- or 16-byte windows are packed into big-endian bytes.
* "decimal" (ids already made contiguous: NVTabular's `Categorify`, HugeCTR's slot-size
  data, any vocabulary): at most 20 decimal digits (leading zeros count), up to 2**64-1.
  Right-aligned 8-, 16- or 24-byte windows, their digits summed pairwise (tens in uint8,
  hundreds in uint16, 10**4 in uint32) into 8-digit uint32 groups, then joined in uint64;
  a 24-byte window's top group (4 digits) is compared against 2**64-1's before the join,
  whose uint64 product would wrap. As fast as the hex windows (2.0-2.5M tokens/s on a
  loaded 2-core host); summing uint64 digit products ran at 1.6-2.3M.

No `-`, `+`, spaces or `0x` in either; an id is reduced `% rows` of its feature's table
by the parser. Each token gets a reason code (`tsv_messages.REASONS`), 0 when good; its
cell's first code in `ORDER` is the one an error names.

Read as hex, decimal ids collide (`0 .. 999` fill 712 of 1,000 rows): under "hex" a
file's first chunk is checked for features whose ids look decimal (`decimal_features`),
and a warning (`warn_decimal`) names them and the option that reads them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from absl import logging

NOT_HEX, HEX_TOO_LONG, EMPTY = 4, 5, 8   # `tsv_messages.REASONS` codes
NOT_DECIMAL, DECIMAL_TOO_LONG, TOO_LARGE = 13, 14, 15
# Each format's codes, the first one of a cell's tokens named in its error (hex: as before
# "decimal" existed; decimal: a bad character before a length, `-1234...` is negative).
ORDER = {"hex": (EMPTY, HEX_TOO_LONG, NOT_HEX),
         "decimal": (EMPTY, NOT_DECIMAL, DECIMAL_TOO_LONG, TOO_LARGE)}
# How an id is written in the words of a weighted value's error (`ID:FLOAT`).
ID_WORD = {"hex": "HEXID", "decimal": "ID"}
# A feature whose first chunk of a file holds this many distinct ids, none with a hex
# letter, has decimal ids (random 8-digit hex ids are all digits 2% of the time: 64 such
# distinct ones by chance, ~1e-105): `decimal_features`, a warning naming them.
DECIMAL_DISTINCT = 64
DECIMAL_OPTION = ("open_source.id_format = 'decimal' (scripts/preprocess.py: "
                  "--id_format=decimal)")

_HEX = np.full(256, 255, np.uint8)
for _c in b"0123456789":
  _HEX[_c] = _c - 48
for _c in b"abcdef":
  _HEX[_c] = _c - 87
  _HEX[_c - 32] = _c - 87
_MAX = 2**64 - 1
_TOP, _LOW = divmod(_MAX, 10**16)   # 1844, 6744073709551615: 2**64-1's 4 + 16 digits


def parse(a: np.ndarray, s: np.ndarray, e: np.ndarray,
          id_format: str) -> tuple[np.ndarray, np.ndarray]:
  """The ids in byte ranges `[s, e)` of `a` (int32 token bounds; `a` has at least 16
  bytes before any token) -> (uint64 ids, uint8 reason codes: 0 = good). A bad token's
  id is meaningless."""
  if id_format == "decimal":
    return _decimal(a, s, e)
  return _hex(a, s, e)


def _hex(a, s, e):
  w = e - s
  k = 8 if w.max(initial=0) <= 8 else 16
  idx = e[:, None] + np.arange(-k, 0, dtype=np.int32)
  hv = _HEX[a[idx]]
  hv *= idx >= s[:, None]
  packed = (hv[:, 0::2] << 4) | hv[:, 1::2]
  raw = packed.view(">u4" if k == 8 else ">u8")[:, 0].astype(np.uint64)
  why = np.where((hv == 255).any(-1), NOT_HEX, 0).astype(np.uint8)
  why[w > 16] = HEX_TOO_LONG
  why[w == 0] = EMPTY
  return raw, why


def _decimal(a, s, e):
  w = e - s
  top = w.max(initial=0)
  k = 8 if top <= 8 else 16 if top <= 16 else 24
  idx = e[:, None] + np.arange(-k, 0, dtype=np.int32)
  d = a[np.maximum(idx, 0)] - np.uint8(48)   # (a 24-byte window may reach before `a`)
  d *= idx >= s[:, None]
  bad_char = d.max(-1, initial=0) > 9
  d[bad_char] = 0   # (their pairwise sums would wrap)
  tens = d[:, 0::2] * np.uint8(10) + d[:, 1::2]
  hundreds = tens[:, 0::2].astype(np.uint16) * np.uint16(100) + tens[:, 1::2]
  groups = (hundreds[:, 0::2].astype(np.uint32) * np.uint32(10_000)
            + hundreds[:, 1::2])   # 8 digits each, most significant first
  raw = groups[:, -1].astype(np.uint64)
  if k >= 16:
    raw += groups[:, -2].astype(np.uint64) * np.uint64(10**8)
  too_large = np.zeros(len(s), bool)
  if k == 24:   # 2**64-1 has 20 digits: its top group 1844, the 16 below 6744073709551615
    high = groups[:, 0].astype(np.uint64)
    too_large = (high > _TOP) | ((high == _TOP) & (raw > np.uint64(_LOW)))
    with np.errstate(over="ignore"):
      raw += high * np.uint64(10**16)
  why = np.where(too_large, TOO_LARGE, 0).astype(np.uint8)
  why[w > 20] = DECIMAL_TOO_LONG
  why[bad_char] = NOT_DECIMAL
  why[w == 0] = EMPTY
  return raw, why


def has_letter(a: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
  """Whether each token `[s, e)` of `a` holds a byte other than a decimal digit (a hex
  letter; any other makes its row malformed) within its last 16 bytes."""
  idx = e[:, None] + np.arange(-16, 0, dtype=np.int32)
  return ((_HEX[a[np.maximum(idx, 0)]] >= 10) & (idx >= s[:, None])).any(-1)


def decimal_features(layout, column_names: Sequence[str], tfeat: np.ndarray,
                     letters: np.ndarray, raw: np.ndarray) -> list[str]:
  """The features (`'name' (column C3)`) whose tokens (`tfeat`: each one's feature,
  `letters`: whether it holds a hex letter, `raw`: its id) are `DECIMAL_DISTINCT` or more
  distinct ids without a hex letter: decimal ids, which read as hex collide (`0 .. 999`
  fill 712 of 1,000 rows)."""
  lay = layout
  with_letter = np.bincount(tfeat, weights=letters, minlength=lay.num_sparse) > 0
  found = [f for f in np.flatnonzero(~with_letter)
           if len(np.unique(raw[tfeat == f])) >= DECIMAL_DISTINCT]
  columns = [column_names[1 + lay.num_dense + f] for f in found]
  return [f"'{lay.names[f]}'" + ("" if lay.names[f] == c else f" (column {c})")
          for f, c in zip(found, columns)]


def warn_decimal(path: str, features: Sequence[str]) -> None:
  """The warning for features of `path` whose ids look decimal, naming the option that
  reads them as such (it said only to write them in hex)."""
  names = ", ".join(features[:8]) + (
      f" and {len(features) - 8} more" if len(features) > 8 else "")
  one = len(features) == 1
  logging.warning("%s: %s %s %s decimal ids only (%d or more distinct at the start of the "
                  "file, none with a hex letter): ids are read as hex (int(id, 16) %% rows), "
                  "so decimal ids collide (0 .. 999 fill 712 of 1,000 rows); if they are "
                  "decimal (already made contiguous), read them as such with %s, or "
                  "write them in hex ('%%x')", path, "feature" if one else "features",
                  names, "holds" if one else "hold", DECIMAL_DISTINCT, DECIMAL_OPTION)
