"""Dense TSV values read as floats (`open_source.dense_transform = 'none'`): exactly Python's
`float(value)` cast to float32, over a chunk's values at once.

Accepted: an optional sign, digits with at most one `.` (at least one digit), then an
optional exponent (`e` or `E`, an optional sign, at least one digit): `0.25`, `-3`, `.5`,
`1.`, `1e-3`, `+2.5E+04`. Not: `inf`, `nan`, spaces, `_` or `0x` (which `float()` reads
too), a value beyond float32's range (`1e39`), more than `MAX_CHARS` characters. An empty
field is 0; values below float32's smallest become subnormal or 0, as a float32 cast makes
them.

The values are gathered into fixed-width byte windows, checked for characters outside the
format, and converted by numpy's string cast (C, no per-value Python). A cast that fails
(a malformed value such as `1e` or `1.2.3` in the chunk) checks the format of every value
(`_well_formed`, vectorised) and casts the good ones. An exact vectorised parser (digits as
int64, Clinger's fast path, a float32-midpoint check) ran at half the cast's speed
(0.8M against 1.5-2.3M values/s on a loaded 2-core host) and was dropped.
"""

from __future__ import annotations

import numpy as np

MAX_CHARS = 64   # longer is malformed: `repr` of a float64 is at most 24 characters
NOT_A_NUMBER, OUT_OF_RANGE, TOO_LONG = 10, 11, 12   # `tsv_messages.REASONS` codes
_FORMAT_CHARS = np.zeros(256, bool)
_FORMAT_CHARS[list(b"0123456789+-.eE")] = True


def parse(a: np.ndarray, s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The floats in byte ranges `[s, e)` of `a` (arrays of one shape) -> (float32 values,
  uint8 reason codes: 0 = good, else `NOT_A_NUMBER` / `OUT_OF_RANGE` / `TOO_LONG`).
  An empty range is 0; a bad value is 0 with its code."""
  shape = s.shape
  s, e = s.reshape(-1).astype(np.int64), e.reshape(-1).astype(np.int64)
  values, why = np.zeros(len(s), np.float32), np.zeros(len(s), np.uint8)
  w = e - s
  why[w > MAX_CHARS] = TOO_LONG
  todo = np.flatnonzero((w > 0) & (w <= MAX_CHARS))
  if len(todo):
    values[todo], why[todo] = _parse_nonempty(a, s[todo], w[todo])
  return values.reshape(shape), why.reshape(shape)


def _parse_nonempty(a, s, w):
  k = int(w.max())
  j = np.arange(k, dtype=np.int64)
  inside = j < w[:, None]
  c = a[np.minimum(s[:, None] + j, len(a) - 1)]
  c[~inside] = 0   # trailing NULs: padding of numpy's `S` strings
  good = ~(inside & ~_FORMAT_CHARS[c]).any(1)
  strs = np.frombuffer(c.tobytes(), f"S{k}")
  try:
    f = _cast(strs if good.all() else strs[good])
  except ValueError:   # a malformed value in the chunk
    good &= _well_formed(c, inside, w)
    f = _cast(strs[good])
  out = np.zeros(len(s), np.float32)
  out[good] = f
  why = np.where(good, np.where(np.isfinite(out), 0, OUT_OF_RANGE), NOT_A_NUMBER)
  out[why > 0] = 0
  return out, why.astype(np.uint8)


def _cast(strs: np.ndarray) -> np.ndarray:
  with np.errstate(over="ignore"):   # checked as stored: `1e39` is inf in float32
    return strs.astype(np.float64).astype(np.float32)


def _well_formed(c: np.ndarray, inside: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Whether each row of byte windows `c` (`inside`: the value's bytes, `w` of them) is
  in the module docstring's format, given that its characters are."""
  j = np.arange(c.shape[1])
  digit = (c >= 48) & (c <= 57)
  dot, expo, sign = c == 46, (c | 32) == 101, (c == 43) | (c == 45)
  n_e = expo.sum(1)
  epos = np.where(n_e > 0, np.argmax(expo, 1), w)   # the exponent's `e`, else the end
  mant = j < epos[:, None]
  bad_sign = (sign & (j != 0) & (j != (epos + 1)[:, None])).any(1)
  return ~((n_e > 1) | (dot.sum(1) > 1) | bad_sign | (dot & ~mant).any(1)
           | ~(digit & mant).any(1) | ((n_e == 1) & ~(digit & inside & ~mant).any(1)))
