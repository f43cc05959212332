"""A TorchRec `EmbeddingBagCollection` state_dict saved as npz, read for an import
(`convert.import_torchrec`, `scripts/convert_checkpoint.py --torchrec_npz`).

Keys `...embedding_bags.<table>.weight` (or `embeddings.<table>.weight`) are tables; each is
checked (a `[rows, dim]` float table of a dtype a table can have, finite values) and read
again when its checkpoint array is written (`NpzTable.load`), one table in memory at a time.

npz has no bfloat16: a bfloat16 table is stored as its 2-byte raw bits (uint16, or numpy's
`|V2` for an ml_dtypes one), named in the JSON object of key `jaxrec_dtypes`
(`{"embedding_bags.t0.weight": "bfloat16"}`), as `third_party/torchrec_export` writes it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile

import numpy as np
from absl import logging
from jax import numpy as jnp

from jaxrec import signals
from jaxrec.checkpoint.steps import first_line
from jaxrec.embedding.specs import unstorable
from jaxrec.errors import DataError, counted, some
from jaxrec.kernels import quant

IMPORT_DTYPES = quant.FLOAT_TABLE_DTYPES   # what a TorchRec table can be imported as
TORCHREC_KEY = re.compile(r"(?:^|\.)(?:embedding_bags|embeddings)\.([^.]+)\.weight$")
DTYPES_KEY = "jaxrec_dtypes"   # {table key: "bfloat16"}: tables stored as their raw bits
_CHECK_ROWS = 1 << 16                      # a table's values are checked in row blocks


@dataclasses.dataclass(frozen=True)
class NpzTable:
  """A table of an npz, checked and read again when its checkpoint array is written
  (`tables.Piece`): an import holds one table at a time (it held every table, 2x the
  biggest while it checked it)."""
  shape: tuple[int, ...]
  dtype: np.dtype
  npz_path: str
  key: str
  raw_bfloat16: bool = False   # stored as 2-byte raw bits (`DTYPES_KEY`)

  def load(self) -> np.ndarray:
    """The table as checked; a `DataError` naming the file when it no longer reads so
    (replaced or damaged during the import)."""
    failure = None
    try:
      with np.load(self.npz_path) as z:
        w = z[self.key]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
      failure = first_line(e)   # raised outside: the save's error handling takes an
    if failure is not None:     # OSError in the context for a failure of its own output
      raise DataError(f"--torchrec_npz: {self.npz_path} became unreadable during the "
                      f"import ('{self.key}': {failure})")
    if self.raw_bfloat16 and w.dtype.itemsize == 2 and w.dtype.kind in "uV":
      w = w.view(jnp.bfloat16)
    if w.shape != self.shape or w.dtype != self.dtype:
      raise DataError(f"--torchrec_npz: {self.npz_path} changed during the import: "
                      f"'{self.key}' is now {w.dtype} {list(w.shape)}, was {self.dtype} "
                      f"{list(self.shape)}")
    _check_finite(w, self.npz_path, self.key)   # what is written (a file replaced alike)
    return w


def read_tables(npz_path) -> dict[str, NpzTable]:
  """`{table: NpzTable}` of a TorchRec npz (see `convert.import_torchrec`), each table
  checked (shape, dtype, finite values); `DataError` naming the file and key otherwise."""
  tables = {}
  with np.load(npz_path) as z:
    names, ignored = {}, []
    raw = _raw_bfloat16(z, npz_path)
    for key in z.files:
      if key == DTYPES_KEY:
        continue
      m = TORCHREC_KEY.search(key)
      if m:
        why = unstorable(m.group(1))   # e/q: int8 table e's codes; a file name's length
        if why:
          raise DataError(f"{npz_path}: '{key[:120]}' names table '{m.group(1)[:80]}': "
                          f"table {why}")
        if m.group(1) in names:
          raise DataError(f"{npz_path}: table '{m.group(1)}' appears twice ({names[m.group(1)]}"
                          f", {key}): jaxrec names tables alone, so give one key another "
                          "table name (e.g. when exporting) and the config that table too")
        names[m.group(1)] = key
      else:
        ignored.append(key)
    if not names:
      raise DataError(f"{npz_path}: no keys like 'embedding_bags.<table>.weight' (keys: "
                      f"{z.files[:10]})")
    if ignored:   # said at INFO, not shown: a misspelt table key went unimported unseen
      logging.warning("%s: ignoring %s not named like '[...]embedding_bags.<table>.weight' "
                      "or '[...]embeddings.<table>.weight' (a model's dense weights, or a "
                      "table under another name, which is not imported): %s", npz_path,
                      counted(len(ignored), "key"), some(sorted(ignored)))
    for name, key in sorted(names.items()):
      signals.check()   # Ctrl-C between tables
      w = z[key]
      if key in raw:
        if w.dtype.itemsize != 2 or w.dtype.kind not in "uV":
          raise DataError(f"{npz_path}: '{key}' has dtype {w.dtype}; its '{DTYPES_KEY}' "
                          "entry says bfloat16, stored as 2-byte raw bits (uint16)")
        w = w.view(jnp.bfloat16)
      tables[name] = NpzTable(w.shape, w.dtype, str(npz_path), key, key in raw)
      if w.ndim != 2 or not all(w.shape):
        raise DataError(f"{npz_path}: '{key}' has shape {w.shape}, expected [rows, dim] "
                        "(both positive)")
      if w.dtype.kind == "V" and w.dtype.itemsize == 2 and key not in raw:   # how numpy
        # loads an ml_dtypes bfloat16 array: 2-byte raw data
        raise DataError(f"{npz_path}: '{key}' has dtype {w.dtype} (2-byte raw data, e.g. "
                        f"bfloat16, which npz cannot hold): name it in a '{DTYPES_KEY}' entry "
                        f"as third_party/torchrec_export writes it ({{\"{key}\": "
                        "\"bfloat16\"}), or export the table as float32")
      if not np.issubdtype(w.dtype, np.floating) and key not in raw:
        raise DataError(f"{npz_path}: '{key}' has dtype {w.dtype}, expected a float dtype")
      if w.dtype.name not in IMPORT_DTYPES:   # no run could restore it (no float64 tables)
        raise DataError(f"{npz_path}: '{key}' has dtype {w.dtype}, which no table can have "
                        f"(table dtypes: {', '.join(IMPORT_DTYPES)}); convert it before the "
                        "import, e.g. to float32 (which rounds)")
      _check_finite(w, npz_path, key)
      del w
  return tables


def _raw_bfloat16(z, npz_path) -> set[str]:
  """The table keys `DTYPES_KEY` names as bfloat16 raw bits (none without it)."""
  if DTYPES_KEY not in z.files:
    return set()
  try:
    dtypes = json.loads(str(z[DTYPES_KEY]))
  except (ValueError, TypeError) as e:
    raise DataError(f"{npz_path}: '{DTYPES_KEY}' is not a JSON object of table keys and "
                    f"dtypes ({first_line(e)})") from None
  if not isinstance(dtypes, dict):
    raise DataError(f"{npz_path}: '{DTYPES_KEY}' is not a JSON object of table keys and "
                    f"dtypes: {str(z[DTYPES_KEY])[:80]}")
  for key, dtype in dtypes.items():
    if key not in z.files or not TORCHREC_KEY.search(key):
      raise DataError(f"{npz_path}: '{DTYPES_KEY}' names '{key}', not a table key of the file")
    if dtype != "bfloat16":
      raise DataError(f"{npz_path}: '{DTYPES_KEY}' gives '{key}' dtype {dtype!r}; it records "
                      "only bfloat16 (other dtypes are the arrays' own)")
  return set(dtypes)


def _check_finite(w: np.ndarray, npz_path, key: str) -> None:
  """A `DataError` when table `w` holds NaN/inf (a run would train it into every row it
  pools with, and save it); checked in row blocks (a temporary per block, not per table)."""
  bad_values, bad_rows, first = 0, 0, None
  for start in range(0, len(w), _CHECK_ROWS):
    bad = ~np.isfinite(w[start:start + _CHECK_ROWS])
    rows = np.flatnonzero(bad.any(axis=1))
    bad_values, bad_rows = bad_values + int(bad.sum()), bad_rows + len(rows)
    first = start + int(rows[0]) if first is None and len(rows) else first
  if bad_values:
    raise DataError(f"{npz_path}: '{key}' holds {bad_values} NaN/inf values in "
                    f"{bad_rows} rows (first: row {first})")
