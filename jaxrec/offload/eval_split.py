"""Splitting an eval batch whose distinct rows do not fit an offloaded table's cache.

An eval step looks a batch up through the device cache (`OffloadTier.eval_view`), so each
offloaded table's distinct rows of the batch must fit its cache. A batch that reads more is
evaluated in pieces: consecutive runs of examples that fit (greedy, in example order), each
looked up as the whole batch with the other examples' ids set to -1 (padding). Every pass
has the batch's shape (no new compilation) and each example's logits are the ones the
all-on-device eval gives; a batch that fits takes one pass, as before.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from jaxrec.data.batch import Batch
from jaxrec.errors import ConfigError
from jaxrec.offload.device import global_rows, pad_rows, padded
from jaxrec.offload.store import TABLE


def _example_rows(batch: Batch, features: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """`(rows [n], example [n])`: every non-padding id `features` read, with its example."""
  rows, examples = [], []
  for f in features:
    x = np.asarray(batch.ids[f]).reshape(batch.size, -1)
    ex = np.broadcast_to(np.arange(batch.size)[:, None], x.shape)
    valid = x >= 0
    rows.append(x[valid].astype(np.int64))
    examples.append(ex[valid])
  if not rows:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  return np.concatenate(rows), np.concatenate(examples)


def _fits_until(rows: np.ndarray, examples: np.ndarray, start: int, cache_rows: int,
                size: int) -> int:
  """The end of the longest run of examples `[start, end)` reading <= `cache_rows` rows."""
  keep = examples >= start
  r, e = rows[keep], examples[keep]
  order = np.lexsort((e, r))                       # by row, then example
  r, e = r[order], e[order]
  first = e[np.r_[True, r[1:] != r[:-1]]] if len(r) else e   # first example of each row
  if len(first) <= cache_rows:
    return size
  return int(np.sort(first)[cache_rows])           # the example with row cache_rows + 1


def pieces(batch: Batch, tables: Mapping[str, tuple[Sequence[str], int]]) -> list[np.ndarray]:
  """Example masks `[B] bool` of the passes `batch` needs (one when it fits).

  Args:
    tables: `{table: (features, cache_rows)}` of the offloaded tables.

  Raises:
    ConfigError: one example alone reads more distinct rows of a table than its cache.
  """
  found = {n: _example_rows(batch, f) for n, (f, _) in tables.items()}
  out, start = [], 0
  while start < batch.size:
    end = batch.size
    for name, (_, cache_rows) in tables.items():
      stop = _fits_until(*found[name], start, cache_rows, batch.size)
      if stop == start:
        rows, examples = found[name]
        n = len(np.unique(rows[examples == start]))
        raise ConfigError(f"offloaded table '{name}': example {start} of an eval batch alone "
                          f"reads {n} distinct rows, more than its cache of {cache_rows}; "
                          "raise its cache_rows/cache_bytes (OffloadConfig.tables)")
      end = min(end, stop)
    mask = np.zeros(batch.size, bool)
    mask[start:end] = True
    out.append(mask)
    start = end
  return out


def only(batch: Batch, keep: np.ndarray, features: Sequence[str]) -> Batch:
  """`batch` with the ids of `features` set to -1 (padding) outside the examples `keep`."""
  ids = dict(batch.ids)
  for f in features:
    x = np.asarray(ids[f])
    ids[f] = np.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, -1).astype(x.dtype)
  return batch.replace(ids=ids)


def view_payload(t, uniq: np.ndarray, read_latest) -> tuple:
  """`DeviceOps.view`'s payload putting the distinct rows `uniq [n]` of the offloaded table
  `t` (a `TierTable`) in cache slots `0..n-1`: `(dst, src, host, from_host)`, each padded;
  cached rows are copied from their slots, the others read by `read_latest(t, rows)`."""
  order = np.argsort(t.resident)
  pos = np.minimum(np.searchsorted(t.resident, uniq, sorter=order), len(order) - 1)
  cached = t.resident[order[pos]] == uniq
  host = np.zeros((len(uniq), t.spec.dim), t.store.array_dtype(TABLE))
  host[~cached] = read_latest(t, uniq[~cached])[TABLE]
  n = padded(len(uniq))
  return (global_rows(t.place, np.arange(len(uniq)), n),
          global_rows(t.place, np.where(cached, order[pos], 0), n),
          pad_rows(host, n), pad_rows(~cached, n))


def remap(batch: Batch, features: Sequence[str], uniq: np.ndarray) -> dict[str, np.ndarray]:
  """`{feature: ids}` of `features` turned into slots: row `uniq[i]` → `i` (-1 stays)."""
  out = {}
  for f in features:
    x = batch.ids[f]
    out[f] = np.where(x >= 0, np.searchsorted(uniq, np.maximum(x, 0)), -1).astype(np.int32)
  return out
