"""An int8 table of a checkpoint read as float32, for a run that configures it float32.

An int8 table is stored as `tables/<t>/{q, scale, bias}` (`[rows, dim]` int8, `[rows]`
float32 x2); the lookup sees `q * scale + bias`. A run that configures the table as float32
(e.g. on more devices, where the full-precision table fits again) restores those values:
`DequantizedArray` reads the three arrays block by block and returns the float32 rows, with
the read interface of a tensorstore array (`shape`, `dtype`, `[index].read().result()`),
so the restore, and a copy into an offload store, read it like a stored float32 table.
The three stored arrays are checked against their saved fingerprints separately
(`stored_parts`), since the values read are not the values saved.
"""

from __future__ import annotations

import types
from typing import Mapping

import numpy as np

from jaxrec.futures import first_error, wait_all

PARTS = ("q", "scale", "bias")
TARGETS = ("float32", "float64")   # dtypes that hold q * scale + bias as computed


def stored_parts(name: str) -> list[str]:
  """The stored arrays an int8 table `tables/<t>` consists of."""
  return [f"{name}/{p}" for p in PARTS]


def is_quantized(stored: Mapping, name: str) -> bool:
  """Whether the stored arrays (`{name: ...}`, an index) hold `name` as an int8 table."""
  return name not in stored and all(p in stored for p in stored_parts(name))


class DequantizedArray:
  """`[rows, dim]` float32 `q * scale + bias` of stored int8 parts (tensorstore arrays)."""

  def __init__(self, q, scale, bias):
    self.q, self.scale, self.bias = q, scale, bias
    self.shape = tuple(q.shape)
    self.dtype = types.SimpleNamespace(numpy_dtype=np.dtype(np.float32))

  def __getitem__(self, index) -> "_Block":
    index = index if isinstance(index, tuple) else (index,)
    rows = index[0] if index else slice(None)
    return _Block(self.q[index].read(), self.scale[rows].read(), self.bias[rows].read())


class _Block:
  """Reads in flight; `read().result()` gives the float32 block."""

  def __init__(self, q, scale, bias):
    self._reads = (q, scale, bias)

  def read(self) -> "_Block":
    return self

  def exception(self) -> BaseException | None:
    """The first read's error once all three are done; None when all succeeded."""
    return first_error(self._reads)

  def result(self) -> np.ndarray:
    """The float32 block; a failed read raises once the other two are done."""
    q, scale, bias = (np.asarray(r) for r in wait_all(self._reads))
    return dequantize(q, scale, bias)


def dequantize(q: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
  """`q * scale + bias` in float32, rows `[n, dim]` (`kernels.quant.dequantize` on host)."""
  out = q.astype(np.float32)
  out *= scale.astype(np.float32)[:, None]
  out += bias.astype(np.float32)[:, None]
  return out
