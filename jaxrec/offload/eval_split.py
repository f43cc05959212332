"""Eval batches through the offloaded tables' caches (`OffloadTier.eval_logits`).

An eval pass looks a batch up through the device caches: a row it reads is read from its
cache slot when cached, else written into a spare slot (one no row of the batch occupies)
for the pass and put back after, in place: no copy of a stack. So each offloaded table's
distinct rows of the batch must fit its cache. A batch that reads more is evaluated in
pieces: consecutive runs of examples that fit (greedy, in example order), each looked up as
the whole batch with the other examples' ids set to -1 (padding). Every pass has the
batch's shape (no new compilation) and each example's logits are the ones the all-on-device
eval gives; a batch that fits takes one pass.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from jaxrec.data.batch import Batch
from jaxrec.errors import ConfigError
from jaxrec.offload.cache import batch_rows
from jaxrec.offload.device import global_rows, pad_rows, padded


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


def pieces(batch: Batch, tables: Mapping[str, tuple[Sequence[str], int]],
           advice: Callable[[str], str]) -> list[np.ndarray]:
  """Example masks `[B] bool` of the passes `batch` needs (one when it fits).

  Args:
    tables: `{table: (features, cache_rows)}` of the offloaded tables.
    advice: how to enlarge a table's cache, for the error (`OffloadConfig.cache_advice`).

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
                          f"{advice(name)}")
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


def slots(t, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`(slot [n], missing [n] bool)`: the cache slot each distinct row `uniq [n]` of table `t`
  (a `TierTable`) is read from in an eval pass: its own when cached, else (`missing`) a slot
  no row of `uniq` occupies, free ones first, whose value the pass replaces and puts back.
  O(n log cache rows): the sorts of the cache (`t.eval_index`) are made once per cache
  state, not per batch (0.75 s an eval batch for a 6M-row cache)."""
  if t.eval_index is None:   # slots by row; every slot, free ones first (in slot order)
    t.eval_index = (np.argsort(t.resident, kind="stable"),
                    np.argsort(t.resident >= 0, kind="stable"))
  order, spare = t.eval_index
  pos = np.minimum(np.searchsorted(t.resident, uniq, sorter=order), len(order) - 1)
  cached = t.resident[order[pos]] == uniq
  slot = np.where(cached, order[pos], -1)
  need = np.count_nonzero(~cached)
  first = spare[:need + np.count_nonzero(cached)]   # holds `need` slots no cached row has
  slot[~cached] = first[~np.isin(first, slot[cached])][:need]
  return slot, ~cached


def remap(batch: Batch, features: Sequence[str], uniq: np.ndarray, slot: np.ndarray
          ) -> dict[str, np.ndarray]:
  """`{feature: ids}` of `features` turned into slots: row `uniq[i]` → `slot[i]` (-1 stays)."""
  out = {}
  for f in features:
    x = batch.ids[f]
    if not len(slot):   # only padding (e.g. every bag empty): nothing to look up
      out[f] = np.full(x.shape, -1, np.int32)
      continue
    i = np.searchsorted(uniq, np.maximum(x, 0))
    out[f] = np.where(x >= 0, slot[np.minimum(i, len(slot) - 1)], -1).astype(np.int32)
  return out


def logits_in_place(tier, state: dict, batch: Batch, run) -> tuple[dict, np.ndarray]:
  """`OffloadTier.eval_logits` (see there), per pass: writes the rows the pass reads that are
  not cached into spare cache slots of `state` (donated), calls `run`, puts the slots'
  values back. An exception carries the state to go on with as `.state` (`state` itself
  may be donated by then)."""
  tables = tier.tables
  parts = pieces(batch, {n: (t.features, t.cache.cache_rows) for n, t in tables.items()},
                 tier.config.cache_advice)
  features = [f for t in tables.values() for f in t.features]
  live, logits = {"emb": state["emb"]}, None   # `live["emb"]`: the newest, undonated one
  try:
    for keep in parts:
      part = batch if len(parts) == 1 else only(batch, keep, features)
      out = _one_pass(tier, state, live, part, run)
      logits = out if logits is None else _merge(keep, out, logits)
  except Exception as e:
    e.state = dict(state, emb=live["emb"])
    raise
  return dict(state, emb=live["emb"]), logits


def _merge(keep: np.ndarray, out, before):
  """`out`'s rows where `keep` `[B]` is true, `before`'s elsewhere: arrays `[B, ...]`, or
  dicts of them (an eval step's outputs)."""
  if isinstance(out, Mapping):
    return {k: _merge(keep, v, before[k]) for k, v in out.items()}
  out = np.asarray(out)
  return np.where(keep.reshape((-1,) + (1,) * (out.ndim - 1)), out, before)


def _one_pass(tier, state, live, part, run) -> np.ndarray:
  """`run`'s logits `[B]` (or its dict of `[B, ...]` outputs) of one pass of
  `logits_in_place` over `part`; `live["emb"]` is replaced by each install (its values the
  same once the pass ends, also on an error)."""
  ids, rows, values = dict(part.ids), {}, {}
  for name, t in tier.tables.items():
    uniq, _ = batch_rows(t.spec, t.features, part)
    slot, missing = slots(t, uniq)
    ids.update(remap(part, t.features, uniq, slot))
    if missing.any():
      # at least a training install's rows: the same program (no compilation) when it fits
      n = max(padded(int(missing.sum())), tier.install_rows(name))
      rows[name] = global_rows(t.place, slot[missing], n)
      values[name] = {k: pad_rows(v, n) for k, v in tier.read_latest(t, uniq[missing]).items()}
  part = part.replace(ids=ids)
  tier.collection.check_ids(part.ids)            # before the state changes
  if not rows:
    return run(dict(state, emb=live["emb"]), part)
  rows = tier.ops.put(rows)
  none = {n: tier.no_bounces(n, len(r)) for n, r in rows.items()}
  saved = tier.ops.gather(live["emb"], rows)
  live["emb"] = tier.ops.install(live["emb"], tier.ops.put(
      {n: (rows[n], values[n]) for n in rows}), none)
  try:
    return run(dict(state, emb=live["emb"]), part)
  finally:
    live["emb"] = tier.ops.install(live["emb"], {n: (rows[n], saved[n]) for n in rows}, none)
