"""In-batch retrieval metrics of a two-tower eval (`jaxrec.train.retrieval`): ranks against a
brute-force reference, items told apart by their ids, and the eval's metrics the same on 1
and 8 devices and with an offloaded item table evaluated in split passes."""

import json
import logging
import os

import numpy as np
import pytest

from jaxrec.data.batch import Batch
from jaxrec.data.pipeline import EvalBatch
from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError
from jaxrec.models import build_model
from jaxrec.sharding.mesh import batch_sharding
from jaxrec.train import evaluation, retrieval, state as state_lib, step as step_lib
from jaxrec.train.config import ExperimentConfig, dense_optimizer
from tests.dp_collection import dp_collection
from tests.train import test_logq_loop


def _reference(user, item, ids, weights, labels, mask):
  """`(above, tied)` per query by a loop: items told apart by (sorted ids, weights)."""
  def item_of(i):
    return tuple(sorted((int(x), float(w)) for x, w in zip(ids[i], weights[i]) if x >= 0))
  vector = {}
  for i in np.flatnonzero(mask):
    vector.setdefault(item_of(i), item[i])
  ranks = []
  for i in np.flatnonzero(mask & (labels > 0.5)):
    own = item_of(i)
    score = {k: float(np.dot(user[i].astype(np.float64), v)) for k, v in vector.items()}
    ranks.append((sum(s > score[own] for k, s in score.items() if k != own),
                  sum(s == score[own] for k, s in score.items() if k != own)))
  return ranks, len(vector)


def test_ranks_are_the_brute_force_ones_with_repeated_items_and_padding():
  """Rows with the same bag in another order (and -0.0 for a weight 0.0) are one item: one
  candidate, never a competitor of its repeats; padding rows are neither queries nor
  candidates."""
  rng = np.random.default_rng(0)
  b, k = 96, 6
  pool = [(rng.integers(-1, 30, 3), rng.integers(0, 3, 3).astype(np.float32))
          for _ in range(25)]
  pool[1] = (pool[1][0], np.where(pool[1][1] == 0, -0.0, pool[1][1]).astype(np.float32))
  ids, weights, item = np.zeros((b, 3), np.int32), np.zeros((b, 3), np.float32), []
  vectors = rng.normal(size=(len(pool), k)).astype(np.float32)
  for i in range(b):
    j = rng.integers(len(pool))
    order = rng.permutation(3)                       # the bag in any order
    ids[i], weights[i] = pool[j][0][order], pool[j][1][order]
    item.append(vectors[j] + rng.normal(size=k).astype(np.float32) * 1e-7 * (i % 2))
  user = rng.normal(size=(b, k)).astype(np.float32)
  labels = (rng.random(b) < 0.6).astype(np.float32)
  mask = np.arange(b) < 90
  keys = retrieval.item_keys({"f": ids}, {"f": weights}, ["f"])
  ranks, items = retrieval.in_batch_ranks(user, np.stack(item), keys, labels, mask)
  want, want_items = _reference(user, np.stack(item), ids, weights, labels, mask)
  assert items == want_items <= 25
  np.testing.assert_array_equal(ranks, want)
  # unweighted: ids alone (sorted) identify the item
  keys = retrieval.item_keys({"f": ids}, {}, ["f"])
  assert (keys == np.sort(ids, axis=1)).all()


def test_the_accumulator_reports_recall_and_mrr_and_says_when_there_is_no_query(caplog):
  acc = retrieval.RetrievalAccumulator((1, 3), ["f"])
  user = np.eye(4, dtype=np.float32)
  item = np.eye(4, dtype=np.float32)[[0, 1, 3, 2]]   # rows 2, 3: another item scores first
  keys = np.arange(4, dtype=np.int32)[:, None]
  acc.add(user, item, keys, np.ones(4, np.float32))
  got = acc.result()
  # rows 0, 1: first (score 1, the others 0); rows 2, 3: one item above (1), their own (0)
  # tied with two others: ranks 1-3 at random
  assert got == {"eval_recall_at_1": 0.5, "eval_recall_at_3": pytest.approx((2 + 2 * 2 / 3) / 4),
                 "eval_mrr": pytest.approx((2 + 2 * (1 / 2 + 1 / 3 + 1 / 4) / 3) / 4),
                 "eval_queries": 4, "eval_candidates": 4.0}
  none = retrieval.RetrievalAccumulator((1,), ["f"])
  none.add(user, item, keys, np.zeros(4, np.float32))
  with caplog.at_level(logging.WARNING):
    got = none.result()
  assert np.isnan(got["eval_recall_at_1"]) and got["eval_queries"] == 0
  assert "no positive eval example" in caplog.text


def test_ties_are_broken_at_random_in_expectation():
  """Ties counted as won: a collapsed item tower (every item the same vector) scored
  recall@1 = MRR = 1.0, 1-wide normalised towers (scores +-1) recall@1 0.193 at AUC 0.499."""
  acc = retrieval.RetrievalAccumulator((1, 2, 10), ["f"])
  c = 5
  acc.add(np.ones((c, 3), np.float32), np.ones((c, 3), np.float32),
          np.arange(c, dtype=np.int32)[:, None], np.ones(c, np.float32))
  got = acc.result()   # each query ties the 4 others: a random ranking of 5
  assert got["eval_recall_at_1"] == pytest.approx(1 / c)
  assert got["eval_recall_at_2"] == pytest.approx(2 / c)
  assert got["eval_recall_at_10"] == 1.0
  assert got["eval_mrr"] == pytest.approx(np.mean(1 / np.arange(1, c + 1)))
  one = retrieval.RetrievalAccumulator((2,), ["f"])   # one above, two tied: ranks 1..3
  one.add(np.ones((4, 1), np.float32), np.array([[1], [2], [1], [1]], np.float32),
          np.arange(4, dtype=np.int32)[:, None], np.array([1, 0, 0, 0], np.float32))
  got = one.result()
  assert got["eval_recall_at_2"] == pytest.approx(1 / 3)
  assert got["eval_mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)


def test_a_non_finite_score_makes_the_metrics_nan(caplog):
  """NaN compares false: every query of NaN vectors ranked first (recall 1.0) while the
  AUC side was null."""
  acc = retrieval.RetrievalAccumulator((1,), ["f"])
  user = np.ones((4, 2), np.float32)
  user[2] = np.nan
  acc.add(user, np.eye(4, 2, dtype=np.float32), np.arange(4, dtype=np.int32)[:, None],
          np.ones(4, np.float32))
  with caplog.at_level(logging.WARNING):
    got = acc.result()
  assert np.isnan(got["eval_recall_at_1"]) and np.isnan(got["eval_mrr"])
  assert got["eval_queries"] == 4
  assert "1 of 4 retrieval queries have non-finite scores" in caplog.text


@pytest.mark.parametrize("recall_at", [(), (0, 10), (5, 5), 10, (1.5,)])
def test_bad_cutoffs_are_refused(recall_at):
  with pytest.raises(ConfigError, match=r"TwoTower.recall_at must be a sequence of distinct "
                     r"positive integers"):
    build_model("two_tower", user_features=(0,), item_features=(1,), recall_at=recall_at)


B, ITEMS = 32, 12
TOWERS = dict(user_features=(0,), item_features=(1,), user_mlp=(8,), item_mlp=(8,),
              recall_at=(1, 5))
TABLES = (TableSpec("users", 40, 8), TableSpec("items", ITEMS, 8))
FEATURES = (FeatureSpec("user", "users"), FeatureSpec("item", "items", max_len=2))


def _setup(devices):
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=build_model("two_tower",
                                                                            **TOWERS),
                            batch_size=B, eval_batch_size=B, num_dense=1,
                            dense_optimizer=dense_optimizer("adam", 0.01),
                            sparse_optimizer=optimizers.sparse_optimizer("sgd", lr=0.5))
  coll = dp_collection(config, devices)
  return config, coll


def _eval_batches():
  rng = np.random.default_rng(5)
  out = []
  for k in range(3):
    mask = np.ones(B, np.float32)
    mask[B - 7 * (k == 2):] = 0                      # padding in the last batch
    out.append(EvalBatch(Batch(
        dense=rng.normal(size=(B, 1)).astype(np.float32),
        labels=(rng.random(B) < 0.7).astype(np.float32),
        ids={"user": rng.integers(0, 40, (B, 1)).astype(np.int32),
             "item": rng.integers(-1, ITEMS, (B, 2)).astype(np.int32)}), mask))
  return out


def test_the_eval_ranks_as_the_reference_on_one_and_eight_devices():
  """`evaluate` on the towers' vectors (`TwoTower.towers`, numpy ranking) and on 1 vs 8
  devices: the same metrics; the AUC is that of the eval step's logits."""
  batches = _eval_batches()
  got = {}
  for devices in (1, 8):
    config, coll = _setup(devices)
    state = state_lib.create(config, coll, 0)
    eval_step = step_lib.make_eval_step(config, coll, state_lib.shardings(state, coll))
    got[devices], _ = evaluation.evaluate(eval_step, coll, state, batches,
                                          batch_sharding(coll.mesh), model=config.model)
    if devices == 1:
      ranks = []
      for batch, mask in batches:
        ctx = coll.lookup(state["emb"], batch.ids, batch.weights)
        user, item = config.model.apply({"params": state["params"]}, batch.dense,
                                        coll.pool(ctx.rows, ctx), method="towers")
        ranks += _reference(np.asarray(user), np.asarray(item), batch.ids["item"],
                            np.ones((B, 2), np.float32), batch.labels, mask > 0)[0]
      above, tied = np.asarray(ranks, np.float64).T
      assert got[1]["eval_queries"] == len(above) > 40
      for k in (1, 5):
        assert got[1][f"eval_recall_at_{k}"] == pytest.approx(
            np.mean(np.clip((k - above) / (tied + 1), 0, 1)))
      assert got[1]["eval_mrr"] == pytest.approx(np.mean(
          [np.mean(1 / (a + np.arange(t + 1) + 1)) for a, t in zip(above, tied)]))
      assert 1 < got[1]["eval_candidates"] < ITEMS * ITEMS
  assert got[1] == pytest.approx(got[8], rel=1e-6)


@pytest.mark.slow
def test_an_offloaded_item_table_evaluated_in_passes_ranks_as_on_device(tmp_path,
                                                                        monkeypatch):
  """Through the trainer on 8 devices: the item table offloaded with a cache smaller than an
  eval batch's rows (each eval batch taken in several passes) gives the on-device run's
  retrieval metrics; the shipped config's eval reports them."""
  def evals(workdir, extra=()):
    test_logq_loop.run(workdir, 4, extra=["ExperimentConfig.eval_batch_size=512",
                                          "ExperimentConfig.num_eval_examples=1024", *extra])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [l for l in map(json.loads, f) if "eval_mrr" in l]
  from jaxrec.offload import eval_split   # pylint: disable=import-outside-toplevel
  merged = []
  merge = eval_split._merge   # pylint: disable=protected-access
  monkeypatch.setattr(eval_split, "_merge", lambda *a: merged.append(1) or merge(*a))
  on_device = evals(tmp_path / "device")
  offloaded = evals(tmp_path / "offloaded",
                    ["OffloadConfig.tables = {'t4': {'cache_rows': 96}}"])
  assert len(merged) >= 2                          # both eval batches in 2+ passes
  assert len(on_device) == 1 and on_device[0]["eval_queries"] > 100
  assert {k for k in on_device[0] if k.startswith("eval_recall_at_")} == {
      "eval_recall_at_1", "eval_recall_at_10", "eval_recall_at_100"}
  assert offloaded == on_device
