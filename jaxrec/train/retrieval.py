"""In-batch retrieval metrics of a two-tower model's eval: recall@k and MRR.

Each positive eval example (label 1) is a query: its user vector `u` ranks the distinct
items of its eval batch (the global batch, padding left out) by `<u, v>`; its *rank* is
the number of other items scoring above its own item (0 = first), ties broken at random in
expectation (counted as won, a model of constant scores was a perfect retriever). The
items of a batch are told apart by their item features' ids and weights on the host (bags
in any order are the same item, as `TwoTower.remove_accidental_hits` keys them), so an
item repeated in the batch is one candidate, whatever the device count, the offload tier's
split passes or the float rounding of the item vectors (the scores themselves are rounded
as the vectors are: another plan's sums moved a helper's MRR by 1.7e-9).

`recall@k` = the fraction of queries whose rank is below `k`; `mrr` = the mean of
`1 / (rank + 1)`; a query with a non-finite score makes both `nan` (with a warning). Both
depend on the eval batches (more items, more competitors): compare runs at one
`ExperimentConfig.eval_batch_size` and one eval set (a short last batch has fewer);
`eval_candidates` says how many items a query met on average.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

QUERY_CHUNK = 1024   # queries scored at once: `[chunk, items]` float32 scores on the host


def item_keys(ids: dict, weights: dict, features: Sequence[str]) -> np.ndarray:
  """`int32 [B, W]`: what identifies each row's item, from host batch arrays: per item
  feature (`features`, in order) its ids sorted (absent slots, -1, first), and for a
  weighted feature its weights (as int32 bits) in the same order, 0 at absent slots."""
  cols = []
  for name in features:
    x = np.asarray(ids[name]).astype(np.int32)
    x = x.reshape(x.shape[0], -1)
    if name not in weights:
      cols.append(np.sort(x, axis=-1))
      continue
    w = np.where(x >= 0, np.asarray(weights[name], np.float32).reshape(x.shape), 0.0)
    w = w.astype(np.float32) + np.float32(0.0)   # -0.0 and 0.0: one item
    order = np.lexsort((w, x), axis=-1)            # by id, ties by weight
    cols += [np.take_along_axis(x, order, -1),
             np.take_along_axis(w, order, -1).view(np.int32)]
  return np.concatenate(cols, axis=1) if cols else np.zeros((0, 0), np.int32)


def in_batch_ranks(user, item, keys, labels, mask=None) -> tuple[np.ndarray, int]:
  """`(ranks, items)` of one eval batch: `user` / `item` float32 `[B, K]` (the towers'
  vectors), `keys` `[B, W]` (`item_keys`), `labels` `[B]`, `mask` bool `[B]` (False:
  padding, neither a query nor a candidate). `ranks` is int64 `[Q, 2]`, per query (the
  real rows with label 1) the number of the other distinct items scoring strictly above its
  own and the number scoring the same, or -1 and -1 when one of its scores is not finite;
  `items` = the distinct items of the real rows."""
  user = np.asarray(user, np.float32)
  item = np.asarray(item, np.float32)
  keys = np.ascontiguousarray(np.asarray(keys, np.int32).reshape(len(user), -1))
  real = np.ones(len(user), bool) if mask is None else np.asarray(mask, bool).reshape(-1)
  labels = np.asarray(labels, np.float32).reshape(-1)
  rows = np.flatnonzero(real)
  if not len(rows):
    return np.zeros((0, 2), np.int64), 0
  # one id per distinct item: equal key rows (a void view compares whole rows)
  view = keys[rows].view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1])))
  _, first, which = np.unique(view.reshape(-1), return_index=True, return_inverse=True)
  candidates = item[rows[first]]                     # [C, K]: each item's first row
  queries = np.flatnonzero(labels[rows] > 0.5)       # positions in `rows`
  ranks = np.zeros((len(queries), 2), np.int64)
  for start in range(0, len(queries), QUERY_CHUNK):
    q = queries[start:start + QUERY_CHUNK]
    with np.errstate(invalid="ignore", over="ignore"):
      scores = user[rows[q]] @ candidates.T          # [chunk, C]
    own = scores[np.arange(len(q)), which.reshape(-1)[q]][:, None]
    above, tied = (scores > own).sum(1), (scores == own).sum(1) - 1   # not its own
    bad = ~np.isfinite(scores).all(1)   # NaN compares false: it ranked first
    ranks[start:start + len(q)] = np.where(bad[:, None], -1, np.stack([above, tied], 1))
  return ranks, len(first)


def accumulator(model, collection) -> "RetrievalAccumulator | None":
  """The eval's `RetrievalAccumulator` for a model with towers (`TwoTower`: its
  `recall_at` and item features, named by `collection`), else None."""
  if model is None or not has_towers(model):
    return None
  names = [collection.features[int(i)].name for i in model.item_features]
  return RetrievalAccumulator(model.recall_at, names)


def has_towers(model) -> bool:
  """Whether `model` scores a user and an item vector (`TwoTower`): its eval step returns
  them and its eval ranks the batch's items."""
  return callable(getattr(model, "towers", None)) and hasattr(model, "item_features")


class RetrievalAccumulator:
  """Collects `in_batch_ranks` batch by batch; `result()` gives `eval_recall_at_<k>` for
  each `k` of `recall_at`, `eval_mrr`, `eval_queries` and `eval_candidates` (the mean
  number of items a query was ranked among). `item_features`: the names of the features
  that identify an item (`item_keys`)."""

  def __init__(self, recall_at: Sequence[int], item_features: Sequence[str]):
    self.recall_at = tuple(int(k) for k in recall_at)
    self.item_features = list(item_features)
    self._ranks: list[np.ndarray] = []
    self._items: list[np.ndarray] = []

  def keys(self, batch) -> np.ndarray:
    """`item_keys` of a host batch `[B, W]`."""
    return item_keys(batch.ids, batch.weights, self.item_features)

  def add(self, user, item, keys, labels, mask=None) -> None:
    ranks, items = in_batch_ranks(user, item, keys, labels, mask)
    self._ranks.append(ranks)
    self._items.append(np.full(len(ranks), items, np.int64))

  def result(self) -> dict[str, float | int]:
    """A tie is broken at random, in expectation: a query whose own item ties `t` others
    below `a` items above it counts `min(1, max(0, (k - a) / (t + 1)))` towards recall@k
    and the mean of `1 / (a + j + 1)`, `j` in `0..t`, towards the MRR (ties won made a
    model of constant scores a perfect retriever)."""
    ranks = np.concatenate(self._ranks) if self._ranks else np.zeros((0, 2), np.int64)
    items = np.concatenate(self._items) if self._items else np.zeros(0, np.int64)
    bad = int((ranks[:, 0] < 0).sum())
    out = {"eval_queries": int(len(ranks)),
           "eval_candidates": float(items.mean()) if len(items) else float("nan")}
    nan = {f"eval_recall_at_{k}": float("nan") for k in self.recall_at}
    if not len(ranks) or bad:
      log.warning("eval: %s: eval_recall_at_* and eval_mrr are nan (null in metrics.jsonl)",
                  f"{bad} of {len(ranks)} retrieval queries have non-finite scores" if bad
                  else "no positive eval example, so no retrieval query")
      return {**nan, "eval_mrr": float("nan"), **out}
    above, tied = ranks[:, 0].astype(np.float64), ranks[:, 1].astype(np.float64)
    recall = {f"eval_recall_at_{k}": float(np.mean(np.clip((k - above) / (tied + 1), 0, 1)))
              for k in self.recall_at}
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(items.max()) + 2))])
    mrr = (harmonic[ranks[:, 0] + ranks[:, 1] + 1] - harmonic[ranks[:, 0]]) / (tied + 1)
    return {**recall, "eval_mrr": float(mrr.mean()), **out}
