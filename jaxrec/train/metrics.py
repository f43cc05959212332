"""Evaluation metrics over a whole eval set: exact ROC AUC, log loss, normalized entropy,
calibration, and a streaming accumulator.

AUC is exact (not a mean of per-batch AUCs) and handles tied scores like
`sklearn.metrics.roc_auc_score`: a tied (positive, negative) pair counts 1/2. Normalized
entropy (He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook", 2014) is
the log loss divided by the entropy of the eval set's positive rate, so that it compares
across datasets of different click rates (below 1: better than predicting that rate for
every example); calibration is the mean prediction over the positive rate (1: as many
clicks predicted as happened).
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger("jaxrec")


def _as_binary(labels) -> np.ndarray:
  return np.asarray(labels).reshape(-1) > 0.5


def roc_auc(labels, scores) -> float:
  """Exact ROC AUC; ties count 1/2 (the average-rank / Mann-Whitney statistic).

  Args:
    labels: `[N]` 0/1 (values > 0.5 are positive).
    scores: `[N]` any monotone score (logits or probabilities).

  Returns:
    AUC in [0, 1], or `nan` when the labels hold only one class (AUC is undefined) or a
    score is `nan` (it has no rank).
  """
  y = _as_binary(labels)
  s = np.asarray(scores, np.float64).reshape(-1)
  if y.shape != s.shape:
    raise ValueError(f"roc_auc: labels {y.shape} and scores {s.shape} differ in shape")
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
    return math.nan
  order = np.argsort(s, kind="stable")
  s, y = s[order], y[order]
  starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each tie group
  pos = np.add.reduceat(y.astype(np.int64), starts)
  neg = np.diff(np.r_[starts, y.size]) - pos
  neg_below = np.cumsum(neg) - neg
  wins = (pos * neg_below).sum(dtype=np.float64) + 0.5 * (pos * neg).sum(dtype=np.float64)
  return float(wins / (float(n_pos) * float(n_neg)))


def log_loss(labels, probs, eps: float = 1e-7) -> float:
  """Mean binary cross-entropy with probabilities clipped to `[eps, 1 - eps]`."""
  y = np.asarray(labels, np.float64).reshape(-1)
  p = np.clip(np.asarray(probs, np.float64).reshape(-1), eps, 1.0 - eps)
  if y.size == 0:
    return math.nan
  return float(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean())


def normalized_entropy(labels, probs, eps: float = 1e-7) -> float:
  """`log_loss` over the entropy of the positive rate (nan when one class only)."""
  return log_loss(labels, probs, eps) / _rate_entropy(labels)


def _rate_entropy(labels) -> float:
  """Entropy of the labels' positive rate (nan when one class only or none)."""
  y = np.asarray(labels, np.float64).reshape(-1)
  rate = float(y.mean()) if y.size else math.nan
  if not 0.0 < rate < 1.0:
    return math.nan
  return -(rate * math.log(rate) + (1.0 - rate) * math.log1p(-rate))


def calibration(labels, probs) -> float:
  """Mean predicted probability over the mean label (nan without positives)."""
  y = np.asarray(labels, np.float64).reshape(-1)
  p = np.asarray(probs, np.float64).reshape(-1)
  if not y.size or not y.sum() > 0:
    return math.nan
  return float(p.sum() / y.sum())


def sigmoid(x) -> np.ndarray:
  """Numerically stable float64 sigmoid."""
  x = np.asarray(x, np.float64)
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class EvalAccumulator:
  """Collects logits and labels batch by batch; `result()` scores everything seen.

  Host-side (numpy); `add` accepts jax arrays and copies them to the host.
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self._logits: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []

  def add(self, logits, labels, mask=None) -> None:
    """Adds one batch: `logits` `[B]`, `labels` `[B]`, optional bool `mask` `[B]` (padding)."""
    logits = np.asarray(logits, np.float32).reshape(-1)
    labels = np.asarray(labels, np.float32).reshape(-1)
    if logits.shape != labels.shape:
      raise ValueError(f"EvalAccumulator.add: logits {logits.shape} and labels "
                       f"{labels.shape} differ in shape")
    if mask is not None:
      keep = np.asarray(mask, bool).reshape(-1)
      logits, labels = logits[keep], labels[keep]
    self._logits.append(logits)
    self._labels.append(labels)

  @property
  def num_examples(self) -> int:
    return sum(x.size for x in self._labels)

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """Everything added, in order, padding left out: float32 `(logits, labels)` `[N]`."""
    logits = np.concatenate(self._logits) if self._logits else np.zeros(0, np.float32)
    labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.float32)
    return logits, labels

  def result(self) -> dict[str, float | int]:
    """`{'eval_auc', 'eval_logloss', 'eval_ne', 'eval_calibration', 'eval_examples'}`; AUC
    and normalized entropy are `nan` if one class only, calibration without positives, all
    four if a logit is `nan` (logged as a warning saying which)."""
    logits, labels = self.arrays()
    n_pos = int(_as_binary(labels).sum())
    n_nan = int(np.isnan(logits).sum())
    if n_nan:
      log.warning("eval: %d of %d logits are nan: eval_auc, eval_logloss, eval_ne and "
                  "eval_calibration are nan (null in metrics.jsonl)", n_nan, labels.size)
    elif not labels.size:
      log.warning("eval: no eval examples: eval_auc, eval_logloss, eval_ne and "
                  "eval_calibration are nan")
    elif n_pos in (0, labels.size):
      log.warning("eval: all %d eval examples are %s: eval_auc and eval_ne are undefined "
                  "(nan; null in metrics.jsonl)%s", labels.size,
                  "positive" if n_pos else "negative",
                  "" if n_pos else ", and so is eval_calibration")
    probs = sigmoid(logits)
    logloss = log_loss(labels, probs)   # once: normalized entropy divides the same value
    return {
        "eval_auc": roc_auc(labels, logits),
        "eval_logloss": logloss,
        "eval_ne": logloss / _rate_entropy(labels),
        "eval_calibration": calibration(labels, probs),
        "eval_examples": int(labels.size),
    }
