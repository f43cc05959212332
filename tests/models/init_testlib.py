"""Inputs with the shapes of the synthetic configs, for the models' checks at init: O(1)
logits and a loss near the label entropy (unnormalised dense inputs made DeepFM's and
DCNv2's Glorot-initialised layers start far from it)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.models import compute_loss, init_params

B, NUM_DENSE, D = 512, 13, 16
ROWS = (100000, 50000, 20000, 10000, 5000, 2000, 1000, 500)   # the config's tables
MAX_LEN = (1, 1, 1, 4, 1, 8, 1, 1)
DENSE_SCALES = (2.0, 20.0, 200.0, 5.0, 2000.0, 50.0, 10.0, 1.0, 100.0, 3.0, 30.0, 0.5, 500.0)
ENTROPY = -(0.26 * np.log(0.26) + 0.74 * np.log(0.74))   # 0.573 at the synthetic click rate


def batch(seed, rows=ROWS):
  """(dense `[B, 13]`, ids `[B, F, 8]`, labels `[B]`, tables `[rows_f, D]` each).

  dense: Criteo-like `log(1 + count)` (as the synthetic source and the TSV reader), 20%
  missing: all >= 0, row norm ~11. ids: Zipf, so hot ids recur across the batch; -1 pads
  bags of 1..max_len. labels: 26% positives. tables: uniform in `+-1/sqrt(rows)`, the
  collection's init (`TableSpec.scale`).
  """
  rng = np.random.default_rng(seed)
  counts = np.floor(rng.exponential(DENSE_SCALES, size=(B, NUM_DENSE)))
  counts[rng.random((B, NUM_DENSE)) < 0.2] = 0
  ids = np.minimum(rng.zipf(1.3, size=(B, len(rows), 8)) - 1, np.array(rows)[:, None] - 1)
  bag = rng.integers(1, np.array(MAX_LEN)[:, None] + 1, size=(B, len(rows), 1))
  ids[np.arange(8) >= bag] = -1
  tables = [jnp.asarray(rng.uniform(-r ** -0.5, r ** -0.5, (r, D)), jnp.float32) for r in rows]
  return (np.log1p(counts).astype(np.float32), ids.astype(np.int32),
          (rng.random(B) < 0.26).astype(np.float32), tables)


def pool(tables, ids):
  """Sum pooling: `[B, F, L]` ids -> `[B, F, D]`."""
  return jnp.stack([jnp.where(ids[:, f, :, None] >= 0, t[jnp.maximum(ids[:, f], 0)], 0).sum(1)
                    for f, t in enumerate(tables)], 1)


def init_fn(model):
  """Jitted `key -> params` of `model` for the configs' shapes."""
  return jax.jit(lambda key: init_params(model, key, NUM_DENSE, len(ROWS), D))


def assert_initial_loss_near_entropy(model, seeds=8):
  """For `seeds` parameter seeds on one batch: logit mean and std < 1, BCE < entropy + 0.4."""
  dense, ids, labels, tables = batch(0)
  init = init_fn(model)
  loss_fn = jax.jit(lambda p: compute_loss(model, p, dense, pool(tables, ids), labels))
  for seed in range(seeds):
    loss, logits = loss_fn(init(jax.random.key(seed)))
    assert float(logits.std()) < 1.0 and abs(float(logits.mean())) < 1.0, (
        seed, float(logits.mean()), float(logits.std()))
    assert float(loss) < ENTROPY + 0.4, (seed, float(loss))
