"""Synthetic source: a pure function of (seed, index), Criteo-like, with a learnable signal."""

import numpy as np
import pytest

import data_testlib as lib
from jaxrec.data import synthetic
from jaxrec.data.source import make_layout
from jaxrec.embedding.specs import FeatureSpec
from jaxrec.errors import ConfigError


def auc(scores, labels):
  """Rank AUC with ties averaged."""
  order = np.argsort(scores, kind="stable")
  s = scores[order]
  _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
  avg = np.cumsum(counts) - (counts - 1) / 2.0
  ranks = np.empty(len(s))
  ranks[order] = avg[inv]
  pos = labels > 0.5
  npos, nneg = pos.sum(), (~pos).sum()
  return (ranks[pos].sum() - npos * (npos + 1) / 2.0) / (npos * nneg)


def test_pure_function_of_seed_and_index():
  src = synthetic.SyntheticSource(lib.layout(max_lens={1: 4}, weighted={1}), seed=3)
  whole = src.gather(np.arange(100))
  picked = src.gather(np.array([99, 5, 42]))
  again = synthetic.SyntheticSource(lib.layout(max_lens={1: 4}, weighted={1}), seed=3)
  for k in whole.ids:
    np.testing.assert_array_equal(picked.ids[k], whole.ids[k][[99, 5, 42]])
    np.testing.assert_array_equal(again.gather(np.arange(100)).ids[k], whole.ids[k])
  np.testing.assert_array_equal(picked.dense, whole.dense[[99, 5, 42]])
  np.testing.assert_array_equal(picked.labels, whole.labels[[99, 5, 42]])
  np.testing.assert_array_equal(picked.weights["f1"], whole.weights["f1"][[99, 5, 42]])
  other = synthetic.SyntheticSource(lib.layout(max_lens={1: 4}, weighted={1}), seed=4)
  assert (other.gather(np.arange(100)).ids["f0"] != whole.ids["f0"]).mean() > 0.5
  held_out = synthetic.SyntheticSource(lib.layout(max_lens={1: 4}, weighted={1}), 3, split=1)
  assert (held_out.gather(np.arange(100)).ids["f0"] != whole.ids["f0"]).mean() > 0.5


def test_batch_contract_and_power_law():
  rows = {f"t{k}": 100 + k for k in range(26)}
  feats = lib.features(max_lens={0: 5}, weighted={0, 3})
  src = synthetic.SyntheticSource(make_layout(feats, rows), seed=0)
  b = src.gather(np.arange(20000))
  assert b.dense.shape == (20000, 13) and b.dense.dtype == np.float32
  assert (b.dense >= 0).all() and (b.dense == 0).mean() > 0.15  # missing values
  assert set(np.unique(b.labels)) == {0.0, 1.0} and 0.15 < b.labels.mean() < 0.4
  for k, f in enumerate(feats):
    ids = b.ids[f.name]
    assert ids.dtype == np.int32 and ids.shape == (20000, f.max_len)
    assert ids.max() < rows[f.table]
  bag = b.ids["f0"]
  lens = (bag >= 0).sum(1)
  assert lens.min() == 1 and lens.max() == 5
  assert ((bag >= 0) == (np.arange(5) < lens[:, None])).all()  # -1 only after the ids
  np.testing.assert_array_equal(b.weights["f0"] > 0, bag >= 0)
  assert b.weights["f3"].shape == (20000, 1) and (b.weights["f3"] >= 0.5).all()
  counts = np.sort(np.bincount(b.ids["f7"][:, 0]))[::-1]
  assert counts[:10].sum() > 0.2 * counts.sum()  # a few ids are hot
  assert counts[0] > 20 * np.median(counts)


@pytest.mark.parametrize("rows, max_len", [(100_000, 1), (1000, 3)])
def test_bayes_auc_is_in_documented_range(rows, max_len):
  lay = make_layout(lib.features(max_lens={k: max_len for k in range(0, 26, 3)}),
                    lib.rows(rows))
  src = synthetic.SyntheticSource(lay, seed=11)
  idx = np.arange(100_000)
  b = src.gather(idx)
  labels = b.labels
  assert 0.78 <= auc(src.probabilities(idx), labels) <= 0.83
  # The dense values alone carry much less of the signal.
  dense_term = b.dense.astype(np.float64) @ src._dense_w
  assert auc(dense_term, labels) < 0.68


def test_ids_are_learnable_in_a_few_hundred_steps():
  """SGD on a linear model over one-hot ids (+ dense) beats the dense-only model clearly."""
  rows, batch, steps = 100_000, 512, 300
  src = synthetic.SyntheticSource(make_layout(lib.features(), lib.rows(rows)), seed=1)
  table = np.zeros((26, rows))
  w, w_dense_only = np.zeros(14), np.zeros(14)

  def logits(b, weights, use_ids):
    z = b.dense @ weights[:13] + weights[13]
    if use_ids:
      z = z + sum(table[k, b.ids[f"f{k}"][:, 0]] for k in range(26))
    return z

  for s in range(steps):
    b = src.gather(np.arange(s * batch, (s + 1) * batch))
    for weights, use_ids in [(w, True), (w_dense_only, False)]:
      g = (1 / (1 + np.exp(-logits(b, weights, use_ids))) - b.labels) / batch
      weights[:13] -= 0.1 * b.dense.T @ g
      weights[13] -= 0.1 * g.sum()
      if use_ids:
        for k in range(26):
          np.add.at(table[k], b.ids[f"f{k}"][:, 0], -1.0 * g)
  held_out = synthetic.SyntheticSource(src.layout, seed=1, split=1)
  e = held_out.gather(np.arange(50_000))
  with_ids, dense_only = auc(logits(e, w, True), e.labels), auc(logits(e, w_dense_only, False),
                                                                 e.labels)
  assert with_ids > 0.70 and with_ids > dense_only + 0.06, (with_ids, dense_only)


def test_config_is_validated():
  with pytest.raises(ConfigError, match="sparse_share"):
    synthetic.SyntheticConfig(sparse_share=1.5)
  with pytest.raises(ConfigError, match="hot_ids"):
    synthetic.SyntheticConfig(hot_ids=0)
  # wrong kinds and non-finite values: were a traceback later (a string, a fraction, a
  # negative seed) or silently degenerate data (NaN logit_std: every label 0)
  for field, value in [("zipf_exponent", float("nan")), ("zipf_exponent", "x"),
                       ("logit_std", float("nan")), ("bias", float("inf")),
                       ("dense_missing", True), ("hot_ids", 2.5), ("model_seed", -1)]:
    with pytest.raises(ConfigError, match=f"SyntheticConfig.{field} must be"):
      synthetic.SyntheticConfig(**{field: value})
  assert synthetic.SyntheticConfig(hot_ids=1e3).hot_ids == 1000


def test_shared_tables_share_the_hidden_effects():
  feats = [FeatureSpec("a", "t"), FeatureSpec("b", "t")]
  src = synthetic.SyntheticSource(make_layout(feats, {"t": 50}), seed=0)
  b = src.gather(np.arange(2000))
  assert b.ids["a"].max() < 50 and b.ids["b"].max() < 50


def test_the_calibration_is_computed_once_per_layout_and_config(monkeypatch):
  """A run's train and eval sources share it (it depends on neither seed nor split); a
  fresh computation gives the same examples."""
  layout = make_layout(lib.features(), lib.rows(1000))
  synthetic._NORMS.clear()
  calls = []
  raw = synthetic.SyntheticSource._raw
  monkeypatch.setattr(synthetic.SyntheticSource, "_raw",
                      lambda self, *a: calls.append(len(a[0])) or raw(self, *a))
  train = synthetic.SyntheticSource(layout, seed=3, split=0)
  evals = synthetic.SyntheticSource(layout, seed=4, split=1)
  other = synthetic.SyntheticSource(layout, config=synthetic.SyntheticConfig(model_seed=1))
  blocks = synthetic._CALIBRATION_EXAMPLES // synthetic._CALIBRATION_BLOCK
  assert calls == [synthetic._CALIBRATION_BLOCK] * blocks * 2   # train's, then other's config
  synthetic._NORMS.clear()
  fresh = synthetic.SyntheticSource(layout, seed=4, split=1)
  assert fresh._norm == evals._norm == train._norm != other._norm
  # in blocks (3,000 features at once held 5.4 GB): the same numbers as all at once
  synthetic._NORMS.clear()
  monkeypatch.setattr(synthetic, "_CALIBRATION_BLOCK", synthetic._CALIBRATION_EXAMPLES)
  assert synthetic.SyntheticSource(layout, seed=4, split=1)._norm == train._norm
  assert calls[-1] == synthetic._CALIBRATION_EXAMPLES
  idx = np.arange(32)
  np.testing.assert_array_equal(fresh.probabilities(idx), evals.probabilities(idx))
