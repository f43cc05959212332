"""`evaluation.evaluate` dispatches eval batch k+1 before it reads batch k's logits, so
the host's work on a batch overlaps the device's on the previous one; the metrics are
those of every batch, in order."""

import types

import numpy as np

from jaxrec.data.batch import Batch
from jaxrec.data.pipeline import EvalBatch
from jaxrec.train import evaluation
from jaxrec.train.metrics import EvalAccumulator


class _Logits:
  """Device logits stand-in: reading them (`np.asarray`) is recorded."""

  def __init__(self, k, values, events):
    self.k, self.values, self.events = k, values, events

  def __array__(self, dtype=None, copy=None):
    self.events.append(("read", self.k))
    return self.values


def test_the_next_batch_is_dispatched_before_the_previous_logits_are_read(monkeypatch):
  rng = np.random.default_rng(0)
  events, batches = [], []
  for k in range(3):
    dense = np.full((4, 13), float(k), np.float32)
    labels = rng.integers(0, 2, 4).astype(np.float32)
    mask = np.array([1, 1, 1, 0 if k == 2 else 1], np.float32)   # padding in the last
    batches.append(EvalBatch(Batch(dense, labels, {"f": np.zeros((4, 1), np.int32)}), mask))
  logits = rng.normal(size=(3, 4)).astype(np.float32)

  def eval_step(state, batch):
    k = int(batch.dense[0, 0])
    events.append(("dispatch", k))
    return {"logits": _Logits(k, logits[k], events)}
  monkeypatch.setattr(evaluation, "device_batch", lambda collection, batch, sharding: batch)
  collection = types.SimpleNamespace(check_ids=lambda ids: None)
  metrics, _ = evaluation.evaluate(eval_step, collection, {}, batches, None)
  assert events == [("dispatch", 0), ("dispatch", 1), ("read", 0), ("dispatch", 2),
                    ("read", 1), ("read", 2)]
  acc = EvalAccumulator()
  for k, (batch, mask) in enumerate(batches):
    acc.add(logits[k], batch.labels, mask > 0)
  assert metrics == acc.result() and metrics["eval_examples"] == 11
