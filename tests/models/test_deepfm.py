"""DeepFM at init, with the shapes of configs/deepfm_synthetic.gin: O(1) logits, a loss near
the label entropy, and first sparse-SGD steps (lr 1.0) that do not blow the loss up."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.models import DeepFM, compute_loss, init_params

B, NUM_DENSE, D = 512, 13, 16
ROWS = (100000, 50000, 20000, 10000, 5000, 2000, 1000, 500)   # the config's tables
MAX_LEN = (1, 1, 1, 4, 1, 8, 1, 1)
DENSE_SCALES = (2.0, 20.0, 200.0, 5.0, 2000.0, 50.0, 10.0, 1.0, 100.0, 3.0, 30.0, 0.5, 500.0)
MODEL = DeepFM(deep_mlp=(256, 128, 64))
ENTROPY = -(0.26 * np.log(0.26) + 0.74 * np.log(0.74))   # 0.573 at the synthetic click rate

_init = jax.jit(lambda key: init_params(MODEL, key, NUM_DENSE, len(ROWS), D))


def _batch(seed, rows=ROWS):
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


def _pool(tables, ids):
  """Sum pooling: `[B, F, L]` ids -> `[B, F, D]`."""
  return jnp.stack([jnp.where(ids[:, f, :, None] >= 0, t[jnp.maximum(ids[:, f], 0)], 0).sum(1)
                    for f, t in enumerate(tables)], 1)


def test_initial_logits_are_small_and_loss_near_label_entropy():
  """Over 8 parameter seeds (the Glorot first-order term, over all-positive inputs, shifted
  the logit by a seed-dependent ~N(0, 1): losses up to 1.25 here)."""
  dense, ids, labels, tables = _batch(0)
  loss_fn = jax.jit(lambda p: compute_loss(MODEL, p, dense, _pool(tables, ids), labels))
  for seed in range(8):
    loss, logits = loss_fn(_init(jax.random.key(seed)))
    assert float(logits.std()) < 1.0 and abs(float(logits.mean())) < 1.0, (
        seed, float(logits.mean()), float(logits.std()))
    assert float(loss) < ENTROPY + 0.4, (seed, float(loss))


def test_logit_gradient_wrt_embeddings_is_small_at_init():
  """What sparse SGD multiplies: `d logit / d emb[f]`. The dense field's FM vector is part of
  it; a Glorot projection of the unnormalised dense inputs made it norm ~10."""
  dense, ids, _, tables = _batch(1)
  params = _init(jax.random.key(0))
  g = jax.jit(jax.grad(lambda e: MODEL.apply({"params": params}, dense, e).sum()))(
      _pool(tables, ids))                                                   # [B, F, D]
  assert float(jnp.linalg.norm(g, axis=-1).max()) < 1.0


def test_first_sparse_sgd_steps_do_not_blow_up():
  """The config's optimizers (tables: SGD lr 1.0; dense: Adam 1e-3) on a fixed batch with
  hot ids: the loss stays near its start (with the Glorot dense field it reached 3-17)."""
  dense, ids, labels, tables = _batch(2, rows=tuple(min(r, 1000) for r in ROWS))
  params = _init(jax.random.key(1))
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, tables):
    loss, (gp, gt) = jax.value_and_grad(
        lambda p, t: compute_loss(MODEL, p, dense, _pool(t, ids), labels)[0], (0, 1))(
            params, tables)
    upd, opt = tx.update(gp, opt, params)
    return optax.apply_updates(params, upd), opt, [t - 1.0 * g for t, g in zip(tables, gt)], loss

  losses = []
  for _ in range(6):
    params, opt, tables, loss = step(params, opt, tables)
    losses.append(float(loss))
  assert max(losses) < ENTROPY + 0.4, losses
