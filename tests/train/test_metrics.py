"""Tests for jaxrec.train.metrics against brute-force pairwise AUC."""

import math

import numpy as np
import pytest

from jaxrec.train.metrics import EvalAccumulator, log_loss, roc_auc, sigmoid


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
