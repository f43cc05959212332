"""The words of a malformed TSV field's error (`tsv.Parser`): each reason code's text, the
value quoted with invisible characters escaped, and a hint for what the value likely
means."""

import math

import numpy as np

_HEX_DIGITS = b"0123456789abcdefABCDEF"

REASONS = {
    1: "label must be 0 or 1, got",
    2: "dense value is not an integer:",
    3: "dense value has more than 18 digits:",
    4: "categorical value is not hex:",
    5: "categorical value has more than 16 hex digits:",
    6: "one-hot feature (max_len=1) holds a ','-separated list:",
    7: "bag has more ids than max_len={max_len}:",
    8: "empty id:",
    9: "bad weight (expected {id}:FLOAT):",   # HEXID, or ID for decimal ids
    10: "dense value is not a number:",   # `tsv_floats` codes (dense_transform 'none')
    11: "dense value is beyond float32's range (+-3.4e38):",
    12: "dense value is longer than 64 characters:",
    13: "categorical value is not a decimal id:",   # `tsv_ids` codes (id_format 'decimal')
    14: "categorical value has more than 20 decimal digits:",
    15: "categorical value is beyond 2**64-1 (18446744073709551615):",
}
# How to read float dense values, in the hint of one read as an integer count.
FLOAT_OPTION = ("open_source.dense_transform = 'none' reads them as written "
                "(scripts/preprocess.py: --dense_transform=none)")


def value_hint(reason: int, value: bytes, weighted: bool, id_format: str = "hex") -> str:
  """What a bad categorical `value` likely means, beyond `REASONS[reason]`: `1:0.5` in an
  unweighted feature said only 'not hex'; a weight past float32's range, `1:1e40`, said
  only 'expected HEXID:FLOAT'. Under decimal ids: a `-` says ids are not negative, a
  float (`5.0`, as pandas writes an integer column holding NaN) that ids are whole, a
  hex letter names the hex format."""
  word = "HEXID" if id_format == "hex" else "ID"
  if reason in (4, 13) and not weighted and b":" in value:
    return f" ({word}:WEIGHT values need a weighted feature: FeatureSpec.weighted = True)"
  ids = [item.split(b":")[0] for item in value.split(b",")]
  if reason == 13 and any(i.startswith(b"-") for i in ids):
    return " (ids are not negative: 0 to 2**64-1)"
  if reason == 13 and any(b"." in i and _is_float(i) for i in ids):   # pandas' `5.0`
    return " (a float: ids are whole numbers, written without '.' or an exponent)"
  if reason == 13 and all(i and not i.strip(_HEX_DIGITS) for i in ids):   # letters
    return (" (a hex id? ids are read as decimal here: open_source.id_format = 'decimal';"
            " 'hex' reads hex ones)")
  if reason == 9:
    weights = [w for item in value.split(b",") for w in item.split(b":")[1:2]]
    for w in weights:
      try:
        big = math.isfinite(float(w)) and abs(float(w)) > float(np.finfo(np.float32).max)
      except ValueError:
        continue
      if big:
        return f" (weight {w.decode()} is beyond float32's range, +-3.4e38)"
  return ""


def _is_float(value: bytes) -> bool:
  try:
    return math.isfinite(float(value))
  except ValueError:
    return False


def dense_hint(reason: int, value: bytes) -> str:
  """What a bad dense `value` likely means: a finite float such as `0.25` is an already
  normalised feature (NVTabular's, HugeCTR's Parquet data), which said only 'not an
  integer', and now also names the option that reads it; `inf` or `nan` under
  dense_transform 'none' is not read (an empty field is 0)."""
  if reason == 10 and value.lstrip(b"+-").lower() in (b"inf", b"infinity", b"nan"):
    return " (infinite and NaN values are not read; an empty field is read as 0)"
  if reason != 2 or not any(c in value for c in b".eE"):
    return ""
  try:
    if not math.isfinite(float(value)):
      return ""
  except ValueError:
    return ""
  return (" (dense columns hold raw integer counts, which jaxrec turns into "
          "log(1 + max(x, 0)); already normalised float features are not read: "
          f"{FLOAT_OPTION})")


def shown(value: bytes) -> str:
  """A field's bytes as an error message quotes them: control characters and bytes that are
  not UTF-8 escaped (`'19\\r'`, `'\\xe9'`), at most 40 characters.

  Printed raw, a stray `\\r` (a line ending in `\\r\\r\\n`) made `not hex: '19'` of a
  hex-looking value and sent the terminal's cursor back over the message.
  """
  text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1]
                 for ch in value.decode("utf-8", "backslashreplace"))
  return text if len(text) <= 40 else text[:37] + "..."
