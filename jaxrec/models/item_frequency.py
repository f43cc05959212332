"""Streaming item frequency estimation, for the sampling-bias (logQ) correction of an
in-batch softmax (Yi et al., RecSys 2019, "Sampling-Bias-Corrected Neural Modeling for
Large Corpus Item Recommendations", Algorithm 2).

Each row's item key is hashed into one of `H` buckets. Per bucket the estimator keeps when
it was last seen and an exponential moving average (learning rate `alpha`) of the gap
between its occurrences; the item's probability is `p = 1 / gap`. Time counts examples
(row `r` of step `t` of a global batch of `N` rows is example `t * N + r`), so `p` estimates
the probability that one example holds the item, and rows of one step holding the same item
are successive occurrences, taken in row order. The state (replicated, in the train state
under `item_freq`):

    {"last_step": int32 [H],   step of the last occurrence (before any: the step the
                               estimate started, 0 unless a resume switched it on)
     "last_row":  int32 [H],   its row in that step's global batch (-1 before any)
     "gap":       float32 [H]} estimated examples between occurrences (0: never seen)

A bucket's first occurrence sets its gap to the examples since the start (`t * N + r + 1`;
`(t - s) * N + r + 1` for an estimate started at step `s`, `started_at`).
Integer arithmetic on the global batch except the moving average, which is a fixed-order
scan: the result does not depend on how the batch is split over devices.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_MIX = (0x85EBCA6B, 0xC2B2AE35)   # murmur3's finaliser constants


def init(num_buckets: int) -> dict:
  """Fresh estimator state with `num_buckets` buckets (nothing seen)."""
  return {"last_step": jnp.zeros((num_buckets,), jnp.int32),
          "last_row": jnp.full((num_buckets,), -1, jnp.int32),
          "gap": jnp.zeros((num_buckets,), jnp.float32)}


def started_at(state: dict, step: int) -> dict:
  """`state` as an estimate that starts at step `step` when it has seen nothing (a resume
  that switched the correction on: a first occurrence's gap counted the examples since
  step 0, and ten steps in, hot items' `log p` was 4-7 nats low); one that has seen any
  item as it is (its unseen buckets count from step 0, as in the run that never stopped)."""
  if step <= 0 or bool(jnp.any(state["last_row"] >= 0)):
    return state
  return dict(state, last_step=state["last_step"] + jnp.int32(step))


def _fmix(h):
  h ^= h >> 16
  h *= jnp.uint32(_MIX[0])
  h ^= h >> 13
  h *= jnp.uint32(_MIX[1])
  return h ^ (h >> 16)


def buckets(keys: Sequence[jax.Array], num_buckets: int) -> jax.Array:
  """int32 `[B]` bucket in `[0, num_buckets)` of each row's item; `keys` are `[B, ...]`
  arrays (e.g. `two_tower.item_bag_keys`): rows with equal keys get equal buckets."""
  h = None
  for k in keys:
    k = jax.lax.stop_gradient(k)
    k = k.reshape(k.shape[0], -1)
    if jnp.issubdtype(k.dtype, jnp.floating):
      k = k.astype(jnp.float32) + 0.0          # -0.0 -> 0.0: equal values, equal bits
    else:
      k = k.astype(jnp.int32)
    words = jax.lax.bitcast_convert_type(k, jnp.uint32)
    if h is None:
      h = jnp.full((k.shape[0],), 0x9E3779B9, jnp.uint32)
    for c in range(words.shape[1]):
      h = _fmix(h ^ (words[:, c] + jnp.uint32(c) * jnp.uint32(0x27D4EB2F)))
  return (h % jnp.uint32(num_buckets)).astype(jnp.int32)


def update(state: dict, bucket: jax.Array, step: jax.Array, alpha: float) -> dict:
  """The state after step `step` saw the items in buckets `bucket` (int32 `[N]`, the
  global batch, rows in order): per occurrence `gap <- (1 - alpha) gap + alpha * (examples
  since the bucket's last occurrence)`, then `last <- (step, row)`."""
  n = bucket.shape[0]
  num = state["gap"].shape[0]
  rows = jnp.arange(n, dtype=jnp.int32)
  order = jnp.argsort(bucket, stable=True)           # by bucket, rows ascending within
  b, r = bucket[order], rows[order]
  first = jnp.concatenate([jnp.ones((1,), bool), b[1:] != b[:-1]])
  last = jnp.concatenate([b[1:] != b[:-1], jnp.ones((1,), bool)])
  # examples since the previous occurrence: in this batch, or at (last_step, last_row)
  steps_back = (step - state["last_step"][b]).astype(jnp.float32)
  from_state = steps_back * n + (r - state["last_row"][b]).astype(jnp.float32)
  within = jnp.concatenate([jnp.zeros((1,), jnp.int32), r[1:] - r[:-1]]).astype(jnp.float32)
  gap = jnp.where(first, from_state, within)
  # The moving average as affine maps x -> a x + c, composed left to right; a bucket's
  # first occurrence starts from the stored gap (or its own gap if never seen): a = 0.
  old = state["gap"][b]
  start = jnp.where(old > 0, old, gap)
  a = jnp.where(first, 0.0, 1.0 - alpha).astype(jnp.float32)
  c = jnp.where(first, (1.0 - alpha) * start + alpha * gap, alpha * gap).astype(jnp.float32)

  def compose(x, y):   # y after x
    return x[0] * y[0], y[0] * x[1] + y[1]

  _, avg = jax.lax.associative_scan(compose, (a, c))
  at = jnp.where(last, b, num)                        # one write per bucket seen
  return {"last_step": state["last_step"].at[at].set(step.astype(jnp.int32), mode="drop"),
          "last_row": state["last_row"].at[at].set(r, mode="drop"),
          "gap": state["gap"].at[at].set(avg, mode="drop")}


def log_prob(state: dict, bucket: jax.Array) -> jax.Array:
  """float32 `[B]` `log p` of each row's item (`-log gap`; buckets must have been seen)."""
  return -jnp.log(state["gap"][bucket])
