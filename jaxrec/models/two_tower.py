"""Two-tower retrieval model: a user tower and an item tower scored by a dot product.

Features are split by index into the `F` axis of `emb` (config order): `user_features` feed
the user tower, `item_features` the item tower; the sets must be disjoint, and features in
neither are ignored (a warning names them). Dense features feed the user tower when
`dense_to_user` is true and are ignored otherwise.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import gin_usage
from jaxrec.embedding.specs import flag
from jaxrec.errors import ConfigError
from jaxrec.models.mlp import (MLP, check_feature_dims, check_inputs, check_sizes,
                               compute_dtype, flat_fields, is_int)
from jaxrec.sharding.plan import warn_once

log = logging.getLogger(__name__)

LOSSES = ("bce", "in_batch_softmax")


def in_batch_softmax_loss(user, item, labels, temperature: float, item_keys=None,
                          log_q=None):
  """In-batch sampled softmax over positives.

  Rows with label 1 are queries; every item of the batch is a candidate and the row's own
  item is the target: `loss = mean_{i: y_i = 1} -log softmax_j(<u_i, v_j> / T - log q_j)[i]`
  (`log q = 0` without `log_q`: no sampling-bias correction).
  Zero when the batch has no positive. Under `jit` with the batch split over devices, `B` is
  the global batch: every device's items are candidates. Without `item_keys` an item in
  several rows is a negative for the others; with them, a candidate `j != i` whose key equals
  row `i`'s (the same item: an *accidental hit*) is left out of row `i`'s softmax.

  Args:
    user: `[B, K]` user vectors.
    item: `[B, K]` item vectors.
    labels: `[B]` 0/1.
    temperature: softmax temperature `T`.
    item_keys: optional `[B, ...]` array, or a sequence of them, identifying each row's item
      (rows are the same item when all their key values are equal), e.g. `item_bag_keys`.
    log_q: optional float32 `[B]` log sampling probability of each row's item (logQ
      correction; e.g. `item_frequency.log_prob`), subtracted from its column of logits.

  Returns:
    scalar float32 loss.
  """
  scores = (user @ item.T).astype(jnp.float32) / temperature
  if log_q is not None:
    scores = scores - jax.lax.stop_gradient(log_q).astype(jnp.float32)[None, :]
  if item_keys is not None:
    same = jnp.ones(scores.shape, bool)
    for k in (item_keys if isinstance(item_keys, (list, tuple)) else [item_keys]):
      k = jax.lax.stop_gradient(k).reshape(k.shape[0], -1)
      same &= (k[:, None, :] == k[None, :, :]).all(-1)
    hit = same & ~jnp.eye(scores.shape[0], dtype=bool)
    scores = jnp.where(hit, -jnp.inf, scores)
  logp = jnp.diagonal(jax.nn.log_softmax(scores, axis=-1))
  w = (labels > 0.5).astype(jnp.float32)
  return -(w * logp).sum() / jnp.maximum(w.sum(), 1.0)


def _bound_at(name: str) -> str:
  """` (FILE:LINE)` (or ` (--gin_bindings)`) where binding `name` was written, if known:
  for an error naming two bindings, which `gin_usage.locate` would place at the first."""
  where = gin_usage.bound_at(name)
  return f" ({where})" if where else ""


def item_bag_keys(bags) -> list:
  """What identifies a row's item from the batch, for `in_batch_softmax_loss`: `bags` has
  each item feature's `(ids [B, max_len], weights [B, max_len] or None)`; its key is the ids
  sorted (absent slots, -1, first) and the weights in the same order (0 at absent slots).
  Rows with the same bags in any order get equal keys; their pooled embeddings can differ
  in the last bit (float sums in another order)."""
  out = []
  for x, w in bags:
    x = jnp.asarray(x, jnp.int32)
    if w is None:
      out.append(jnp.sort(x, axis=-1))
      continue
    w = jnp.where(x >= 0, jnp.asarray(w, jnp.float32), 0.0)
    order = jnp.lexsort((w, x), axis=-1)          # by id, ties by weight
    out += [jnp.take_along_axis(x, order, -1), jnp.take_along_axis(w, order, -1)]
  return out


def freeze_unused_item_bias(model: "TwoTower", params):
  """`params` with the item tower's last bias behind `stop_gradient` when the loss cannot
  depend on it (`in_batch_softmax` without `normalize`): it adds `<u_i, b>` to every score
  of row `i`, which the softmax cancels, so its gradient is 0 in exact arithmetic. Its
  computed gradient was rounding noise (~1e-8) that Adam, which normalises step sizes, turned
  into lr-sized steps set by the reduction order: the eval scores `<u, v>` then depended on
  the device count. Now it keeps its value (the parameter tree is unchanged)."""
  if getattr(model, "loss", None) != "in_batch_softmax" or model.normalize:
    return params
  last = f"layer_{len(model.item_mlp) - 1}"
  tower = dict(params["item_tower"])
  tower[last] = dict(tower[last], bias=jax.lax.stop_gradient(tower[last]["bias"]))
  return dict(params, item_tower=tower)


# `feature_dims` comes from the tables (`ExperimentConfig`): a binding of it is refused
@gin.configurable(denylist=["feature_dims"])
class TwoTower(nn.Module):
  """Two-tower model: `logit = <user(x_u), item(x_i)> / temperature`.

  Attributes:
    user_features: indices into `F` of the user tower's features.
    item_features: indices into `F` of the item tower's features (disjoint from the user's).
    user_mlp: widths of the user tower (ReLU between layers, none after the last).
    item_mlp: widths of the item tower; must end in the same width as `user_mlp`.
    dense_to_user: feed the dense features to the user tower.
    normalize: L2-normalise both tower outputs (the score is then a cosine / temperature);
      a zero output (e.g. an item of empty bags at the zero-bias init) stays 0, gradient 0.
    temperature: divides the dot product; positive and finite.
    loss: `bce` (pointwise on labels) or `in_batch_softmax` (see `in_batch_softmax_loss`);
      read by `jaxrec.models.compute_loss`. `__call__` returns the pairwise score either way.
    remove_accidental_hits: with `in_batch_softmax`, rows whose item features are the same
      (the same ids, in any bag order, and weights: `item_bag_keys`; without the batch's ids,
      bit-equal pooled embeddings of `item_features`) are not negatives for each other.
    logq_correction: with `in_batch_softmax`, subtract `log p_j` from every logit of item
      `j` in training, `p_j` its sampling probability estimated by the trainer from the
      stream of training items (`jaxrec.models.item_frequency`, keyed as
      `remove_accidental_hits`; state `item_freq` of the train state, checkpointed). Not
      applied when scoring (`__call__`, eval, serving): scores stay `<u, v> / T`.
    logq_buckets: hash buckets of the estimator (items sharing one share an estimate).
    logq_alpha: learning rate of the estimator's moving average, in (0, 1].
    recall_at: the eval's retrieval cutoffs: each positive eval example ranks its eval
      batch's distinct items by score and `eval_recall_at_<k>` is the fraction whose own
      item is among the top `k` (with `eval_mrr`; `jaxrec.train.retrieval`).
    dtype: computation dtype (parameters float32, logits float32).
    feature_dims: each feature's dim when the features' tables have mixed dims (set by
      `ExperimentConfig` from the tables, not bound): `emb` then comes padded to the widest
      and each tower takes its features' own columns (`flat_fields`).
  """

  user_features: Sequence[int]
  item_features: Sequence[int]
  user_mlp: Sequence[int] = (256, 128, 64)
  item_mlp: Sequence[int] = (256, 128, 64)
  dense_to_user: bool = True
  normalize: bool = True
  temperature: float = 0.1
  loss: str = "bce"
  remove_accidental_hits: bool = False
  logq_correction: bool = False
  logq_buckets: int = 1 << 20
  logq_alpha: float = 0.01
  recall_at: Sequence[int] = (1, 10, 100)
  dtype: Any = jnp.float32
  feature_dims: Sequence[int] | None = None

  def setup(self):
    self.check_config()
    self.compute_dtype = compute_dtype("TwoTower.dtype", self.dtype)
    # Tower outputs are their float32 sums (the score is a float32 dot product of them).
    self.user_tower = MLP(self.user_mlp, dtype=self.compute_dtype, out_dtype=jnp.float32)
    self.item_tower = MLP(self.item_mlp, dtype=self.compute_dtype, out_dtype=jnp.float32)

  def check_config(self) -> None:
    """Raises ConfigError for a bad hyper-parameter that needs no input shapes (also called
    by `build_model`, so a bad binding stops a run when the config is read, before planning;
    the feature indices' range is checked against the batch when called)."""
    check_sizes("TwoTower.user_mlp", self.user_mlp)
    check_sizes("TwoTower.item_mlp", self.item_mlp)
    if int(self.user_mlp[-1]) != int(self.item_mlp[-1]):
      # each named with where it was bound (the error blamed user_mlp's line in the config
      # for an item_mlp given by a flag)
      raise ConfigError(
          "the towers must end in the same width: TwoTower.user_mlp = "
          f"{tuple(self.user_mlp)}{_bound_at('TwoTower.user_mlp')} and TwoTower.item_mlp = "
          f"{tuple(self.item_mlp)}{_bound_at('TwoTower.item_mlp')}")
    if (not isinstance(self.temperature, numbers.Real) or isinstance(self.temperature, bool)
        or not 0 < self.temperature < float("inf")):   # inf: every score 0, nothing learns
      raise ConfigError(f"TwoTower.temperature must be a positive finite number, got "
                        f"{self.temperature!r}")
    if self.loss not in LOSSES:
      raise ConfigError(f"TwoTower.loss must be one of {LOSSES}, got '{self.loss}'")
    # A string such as 'no' or 'False' is truthy: without the check it switched the
    # option on, silently.
    for attr in ("dense_to_user", "normalize", "remove_accidental_hits"):
      flag(getattr(self, attr), f"TwoTower.{attr}")
    if self.remove_accidental_hits and self.loss != "in_batch_softmax":   # else ignored
      raise ConfigError(f"TwoTower.remove_accidental_hits applies to loss='in_batch_softmax' "
                        f"only, not loss='{self.loss}' (a pointwise loss has no negatives)")
    self._check_feature_lists()
    flag(self.logq_correction, "TwoTower.logq_correction")
    if self.logq_correction and self.loss != "in_batch_softmax":
      raise ConfigError(f"TwoTower.logq_correction applies to loss='in_batch_softmax' only, "
                        f"not loss='{self.loss}' (it corrects the in-batch negatives' logits)")
    # checked whether or not the correction is on: off, a bad value was taken unchecked
    if not is_int(self.logq_buckets) or not 0 < self.logq_buckets < 2 ** 31:
      raise ConfigError(f"TwoTower.logq_buckets must be a positive integer below 2**31, got "
                        f"{self.logq_buckets!r}")
    if (not isinstance(self.logq_alpha, numbers.Real) or isinstance(self.logq_alpha, bool)
        or not 0 < self.logq_alpha <= 1):
      raise ConfigError(f"TwoTower.logq_alpha must be in (0, 1], got {self.logq_alpha!r}")
    k = self.recall_at
    if (not isinstance(k, (list, tuple)) or not k or len(set(k)) != len(k)
        or any(not is_int(x) or x < 1 for x in k)):
      raise ConfigError(f"TwoTower.recall_at must be a sequence of distinct positive integers "
                        f"(the eval's recall@k cutoffs), got {k!r}")
    changed = [f"TwoTower.{a} = {getattr(self, a)!r}" for a in ("logq_buckets", "logq_alpha")
               if getattr(self, a) != getattr(type(self), a)]
    if changed and not self.logq_correction:   # a shared config may set them: a warning
      warn_once(f"{' and '.join(changed)} set, but TwoTower.logq_correction is False: they do "
                "nothing (bind TwoTower.logq_correction = True to use them)", log)

  def _check_feature_lists(self, num_features: int | None = None) -> None:
    """`user_features` / `item_features`: disjoint sequences of distinct indices (below
    `num_features`, the batch's `F`, when known)."""
    for attr in ("user_features", "item_features"):
      idx = getattr(self, attr)
      if (not isinstance(idx, (list, tuple)) or not idx
          or any(not is_int(i) or i < 0 or (num_features is not None and i >= num_features)
                 for i in idx)
          or len(set(idx)) != len(idx)):
        within = ("indices >= 0 (into the config's features)" if num_features is None else
                  f"indices in [0, {num_features}) (the batch has {num_features} sparse "
                  f"features)")
        raise ConfigError(f"TwoTower.{attr} = {idx!r} must be a sequence of distinct {within}")
    both = set(map(int, self.user_features)) & set(map(int, self.item_features))
    if both:   # each with where it was bound (the config's user_features line was blamed
      raise ConfigError(   # for an item_features given by a flag)
          f"the towers' features overlap: TwoTower.user_features = "
          f"{tuple(self.user_features)}{_bound_at('TwoTower.user_features')} and "
          f"TwoTower.item_features = {tuple(self.item_features)}"
          f"{_bound_at('TwoTower.item_features')} share {sorted(both)} (a feature feeds one "
          "tower)")
    unread = sorted(set(range(num_features or 0)) - set(map(int, self.user_features))
                    - set(map(int, self.item_features)))
    if unread:   # ignored without a word: a feature left out of both lists by mistake
      warn_once(f"TwoTower: features {unread} (indices into the config's features) are in "
                "neither TwoTower.user_features nor TwoTower.item_features: they are looked "
                "up every step and never trained; add them to a tower or drop them from the "
                "config", log)

  def item_keys(self, emb):
    """`emb` `[B, F, D]` -> `[B, len(item_features), D]`: what identifies a row's item."""
    return emb[:, np.asarray(self.item_features, np.int32)]

  def _tower_input(self, side, features):
    """`[B, len(features) * D]`: `side` `[B, len(features), D]`, the embeddings of
    `features` (indices into `F`), each trimmed to its own dim when dims are mixed
    (`feature_dims`)."""
    dims = None if self.feature_dims is None else [self.feature_dims[int(i)] for i in features]
    return flat_fields("TwoTower", side[:, :, :max(dims or [side.shape[2]])], dims)

  def _normalize(self, x):
    if not self.normalize:
      return x
    # A zero vector (an item of empty bags, at the zero-bias init) stays 0 with a zero
    # gradient: through max(|x|^2, 1e-12) its gradient was scaled by 1e6, which pushed the
    # tower's last bias so far that every item vector pointed one way for good.
    x = x.astype(jnp.float32)
    n2 = (x * x).sum(-1, keepdims=True)
    ok = ~(n2 <= 1e-12)   # NaN passes (`n2 > 1e-12` made a NaN row 0: --on_nan never saw it)
    return jnp.where(ok, x * jax.lax.rsqrt(jnp.where(ok, n2, 1.0)), 0.0)

  def towers(self, dense, emb):
    """`dense` `[B, num_dense]`, `emb` `[B, F, D]` -> (user `[B, K]`, item `[B, K]`) float32."""
    _, f, _ = check_inputs("TwoTower", dense, emb)
    self._check_feature_lists(f)
    if self.feature_dims is not None:
      check_feature_dims("TwoTower", self.feature_dims, f, emb.shape[2])
    return (self.user_vectors(dense, emb[:, np.asarray(self.user_features, np.int32)]),
            self.item_vectors(emb[:, np.asarray(self.item_features, np.int32)]))

  def user_vectors(self, dense, user_emb):
    """Serving's user side: `dense` `[B, num_dense]` (read only with `dense_to_user`),
    `user_emb` `[B, len(user_features), D]` (the user features' pooled embeddings, in
    `user_features`' order) -> `[B, K]` float32; `towers`' user vectors."""
    xu = self._tower_input(self._side(user_emb, "user_features"), self.user_features)
    if self.dense_to_user:
      xu = jnp.concatenate([jnp.asarray(dense).astype(self.compute_dtype), xu], axis=-1)
    return self._normalize(self.user_tower(xu)).astype(jnp.float32)

  def item_vectors(self, item_emb):
    """Serving's item side (e.g. a whole catalog, no user needed): `item_emb`
    `[B, len(item_features), D]` (the item features' pooled embeddings, in
    `item_features`' order) -> `[B, K]` float32; `towers`' item vectors."""
    xi = self._tower_input(self._side(item_emb, "item_features"), self.item_features)
    return self._normalize(self.item_tower(xi)).astype(jnp.float32)

  def _side(self, side, attr: str):
    """`side` as a tower's input, checked: `[B, len(getattr(self, attr)), D]`."""
    side = jnp.asarray(side)
    n = len(getattr(self, attr))
    if side.ndim != 3 or side.shape[1] != n:
      raise ConfigError(f"TwoTower: the {attr.split('_')[0]} side's embeddings must be "
                        f"[batch, {n}, dim] (one per TwoTower.{attr} entry, in its order), "
                        f"got shape {tuple(side.shape)}")
    return side.astype(self.compute_dtype)

  def __call__(self, dense, emb):
    """`dense` `[B, num_dense]`, `emb` `[B, F, D]` -> pairwise scores float32 `[B]`."""
    user, item = self.towers(dense, emb)
    return (user * item).sum(-1) / self.temperature
