"""Tests for jaxrec.train.metrics against brute-force pairwise AUC."""

import math

import numpy as np
import pytest

from jaxrec.train.metrics import (EvalAccumulator, calibration, log_loss, normalized_entropy,
                                  roc_auc, sigmoid)


def _brute_auc(labels, scores):
  pos = scores[labels == 1]
  neg = scores[labels == 0]
  diff = pos[:, None] - neg[None, :]
  return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (pos.size * neg.size)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 300
  labels = (rng.random(n) < 0.3).astype(np.float32)
  scores = rng.integers(0, 8, n) + labels * rng.integers(0, 3, n)  # many ties
  np.testing.assert_allclose(roc_auc(labels, scores), _brute_auc(labels, scores), rtol=1e-12)


def test_auc_edge_cases():
  assert roc_auc([0, 1], [0.1, 0.9]) == 1.0
  assert roc_auc([0, 1], [0.9, 0.1]) == 0.0
  assert roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
  assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
  assert math.isnan(roc_auc([], []))
  with pytest.raises(ValueError, match="shape"):
    roc_auc([0, 1], [0.1])


def test_log_loss_clips():
  np.testing.assert_allclose(log_loss([1, 0], [0.8, 0.4]), -(np.log(0.8) + np.log(0.6)) / 2)
  assert np.isfinite(log_loss([1, 0], [0.0, 1.0]))
  np.testing.assert_allclose(sigmoid([-1000.0, 0.0, 1000.0]), [0.0, 0.5, 1.0])


def test_accumulator_is_exact_over_all_batches():
  rng = np.random.default_rng(7)
  labels = (rng.random(500) < 0.25).astype(np.float32)
  logits = (rng.normal(size=500).round(1) + labels).astype(np.float32)  # ties across batches
  acc = EvalAccumulator()
  for i in range(0, 500, 64):
    acc.add(logits[i:i + 64], labels[i:i + 64])
  acc.add(np.array([9.0, -9.0]), np.array([0.0, 1.0]), mask=np.array([False, False]))
  res = acc.result()
  assert res["eval_examples"] == 500
  np.testing.assert_allclose(res["eval_auc"], _brute_auc(labels, logits), rtol=1e-12)
  np.testing.assert_allclose(res["eval_logloss"], log_loss(labels, sigmoid(logits)), rtol=1e-6)
  acc.reset()
  assert acc.num_examples == 0 and math.isnan(acc.result()["eval_auc"])


def _rank_auc(labels, scores):
  """Mann-Whitney U from average ranks (ties share the mean of their ranks)."""
  y, s = np.asarray(labels) > 0.5, np.asarray(scores, np.float64)
  order = np.argsort(s, kind="stable")
  ranks = np.empty(s.size)
  i = 0
  while i < s.size:
    j = i
    while j + 1 < s.size and s[order[j + 1]] == s[order[i]]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  n_pos, n_neg = y.sum(), (~y).sum()
  return (ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@pytest.mark.parametrize("seed", range(3))
def test_auc_matches_average_rank_mann_whitney(seed):
  rng = np.random.default_rng(100 + seed)
  for n in (2, 17, 1000, 5000):
    labels = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(np.float32)
    labels[:2] = (0, 1)
    scores = (rng.normal(size=n) + labels).astype(np.float32).round(1)   # ties
    np.testing.assert_allclose(roc_auc(labels, scores), _rank_auc(labels, scores), rtol=1e-12)


def test_auc_of_a_nan_score_is_nan():
  """A nan score has no rank: the AUC is nan, not whatever the sort made of it (was 0.5)."""
  assert math.isnan(roc_auc([0, 1, 0, 1], [np.nan, 0.1, 0.2, np.nan]))
  assert math.isnan(roc_auc([0, 1, 0, 1], [0.3, np.nan, 0.2, 0.4]))
  assert roc_auc([0, 1, 0, 1], [-np.inf, np.inf, 0.2, np.inf]) == 1.0


def test_an_undefined_auc_is_explained(caplog):
  """One class only or nan logits: `eval_auc` is nan (null in metrics.jsonl) and a warning
  says why."""
  acc = EvalAccumulator()
  acc.add(np.array([0.5, 2.0, -1.0]), np.array([1.0, 1.0, 0.0]), mask=np.array([1, 1, 0]))
  with caplog.at_level("WARNING", logger="jaxrec"):
    res = acc.result()
  assert math.isnan(res["eval_auc"]) and np.isfinite(res["eval_logloss"])
  assert math.isnan(res["eval_ne"]) and np.isfinite(res["eval_calibration"])
  assert "all 2 eval examples are positive: eval_auc and eval_ne are undefined" in caplog.text
  caplog.clear()
  acc.add(np.array([np.nan, 1.0]), np.array([0.0, 0.0]))
  with caplog.at_level("WARNING", logger="jaxrec"):
    res = acc.result()
  assert all(math.isnan(res[k]) for k in ("eval_auc", "eval_logloss", "eval_ne",
                                           "eval_calibration"))
  assert "1 of 4 logits are nan" in caplog.text


def test_normalized_entropy_and_calibration():
  """NE: the log loss over the entropy of the positive rate (1.0 for a model that predicts
  that rate everywhere, below 1 when it does better); calibration: predicted over actual
  positives."""
  rng = np.random.default_rng(3)
  labels = (rng.random(2000) < 0.2).astype(np.float32)
  rate = labels.mean()
  constant = np.full(labels.size, np.log(rate / (1 - rate)), np.float32)   # logit of rate
  acc = EvalAccumulator()
  acc.add(constant, labels)
  res = acc.result()
  np.testing.assert_allclose([res["eval_ne"], res["eval_calibration"]], [1.0, 1.0], rtol=1e-5)
  logits = (2.0 * labels - 1.0 + rng.normal(size=labels.size) - 1.0).astype(np.float32)
  acc.reset()
  acc.add(logits, labels)
  res = acc.result()
  probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
  entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
  np.testing.assert_allclose(res["eval_ne"], res["eval_logloss"] / entropy, rtol=1e-6)
  np.testing.assert_allclose(res["eval_calibration"], probs.sum() / labels.sum(), rtol=1e-6)
  assert res["eval_ne"] < 1.0
  assert math.isnan(calibration([0.0, 0.0], [0.3, 0.4]))       # no positives
  assert math.isnan(normalized_entropy([0.0, 0.0], [0.3, 0.4]))
