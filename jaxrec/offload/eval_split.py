"""Eval batches through the offloaded tables' caches (`OffloadTier.eval_views`): the view's
payload (`view_payload`, `remap`) and the split of a batch too big for a cache (`pieces`).

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


def _ids(batch: Batch, features: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """`(row [n], example [n])` of every non-padding id `features` read."""
  rows, examples = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
  for f in features:
    x = np.asarray(batch.ids[f]).reshape(batch.size, -1)
    valid = x >= 0
    rows.append(x[valid].astype(np.int64))
    examples.append(np.broadcast_to(np.arange(batch.size)[:, None], x.shape)[valid])
  return np.concatenate(rows), np.concatenate(examples)


def _distinct(rows: np.ndarray) -> int:
  """How many distinct values `rows` holds (a sort: numpy's hashing `unique` is ~100x slower
  here)."""
  s = np.sort(rows)
  return int(len(s) > 0) + int(np.count_nonzero(s[1:] != s[:-1]))


def _first_uses(rows: np.ndarray, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`(example [n], previous [n])`: the ids' examples, and the example of the same row's
  previous id in example order (-1: none), the ids reordered. An id starts its row's use
  in the examples `[s, ...)` iff `example >= s > previous`."""
  order = np.lexsort((examples, rows))                 # by row, then example
  rows, examples = rows[order], examples[order]
  previous = np.full(len(rows), -1, np.int64)
  same = rows[1:] == rows[:-1]
  previous[1:][same] = examples[:-1][same]
  return examples, previous


def pieces(batch: Batch, tables: Mapping[str, tuple[Sequence[str], int]]) -> list[np.ndarray]:
  """Example masks `[B] bool` of the passes `batch` needs (one when it fits).

  Args:
    tables: `{table: (features, cache_rows)}` of the offloaded tables.

  Raises:
    ConfigError: one example alone reads more distinct rows of a table than its cache.
  """
  ids = {n: _ids(batch, f) for n, (f, _) in tables.items()}
  if all(_distinct(ids[n][0]) <= c for n, (_, c) in tables.items()):
    return [np.ones(batch.size, bool)]              # the common case: one pass
  uses = {n: _first_uses(*ids[n]) for n in tables}
  out, start = [], 0
  while start < batch.size:
    end = batch.size
    for name, (_, cache_rows) in tables.items():
      examples, previous = uses[name]
      new = np.bincount(examples[(examples >= start) & (previous < start)],
                        minlength=batch.size)[start:]   # rows each example adds to the run
      fit = int(np.searchsorted(np.cumsum(new), cache_rows, side="right"))
      if fit == 0:
        raise ConfigError(f"offloaded table '{name}': example {start} of an eval batch alone "
                          f"reads {new[0]} distinct rows, more than its cache of {cache_rows}; "
                          "raise its cache_rows/cache_bytes (OffloadConfig.tables)")
      end = min(end, start + fit)
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
