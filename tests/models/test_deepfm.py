"""DeepFM at init, with the shapes of configs/deepfm_synthetic.gin: O(1) logits, a loss near
the label entropy, and first sparse-SGD steps (lr 1.0) that do not blow the loss up; and training without dense
features."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrec.errors import ConfigError
from jaxrec.models import DeepFM, build_model, compute_loss, init_params
from tests.models import init_testlib as lib

MODEL = DeepFM(deep_mlp=(256, 128, 64))
_init = lib.init_fn(MODEL)


def test_initial_logits_are_small_and_loss_near_label_entropy():
  """The Glorot first-order term, over all-positive inputs, shifted the logit by a
  seed-dependent ~N(0, 1): losses up to 1.25 here."""
  lib.assert_initial_loss_near_entropy(MODEL)


def test_logit_gradient_wrt_embeddings_is_small_at_init():
  """What sparse SGD multiplies: `d logit / d emb[f]`. The dense field's FM vector is part of
  it; a Glorot projection of the unnormalised dense inputs made it norm ~10."""
  dense, ids, _, tables = lib.batch(1)
  params = _init(jax.random.key(0))
  g = jax.jit(jax.grad(lambda e: MODEL.apply({"params": params}, dense, e).sum()))(
      lib.pool(tables, ids))                                                   # [B, F, D]
  assert float(jnp.linalg.norm(g, axis=-1).max()) < 1.0


def test_first_sparse_sgd_steps_do_not_blow_up():
  """The config's optimizers (tables: SGD lr 1.0; dense: Adam 1e-3) on a fixed batch with
  hot ids: the loss stays near its start (with the Glorot dense field it reached 3-17)."""
  dense, ids, labels, tables = lib.batch(2, rows=tuple(min(r, 1000) for r in lib.ROWS))
  params = _init(jax.random.key(1))
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, tables):
    loss, (gp, gt) = jax.value_and_grad(
        lambda p, t: compute_loss(MODEL, p, dense, lib.pool(t, ids), labels)[0], (0, 1))(
            params, tables)
    upd, opt = tx.update(gp, opt, params)
    return optax.apply_updates(params, upd), opt, [t - 1.0 * g for t, g in zip(tables, gt)], loss

  losses = []
  for _ in range(6):
    params, opt, tables, loss = step(params, opt, tables)
    losses.append(float(loss))
  assert max(losses) < lib.ENTROPY + 0.4, losses


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_dense_features_trains(dtype):
  # ExperimentConfig.num_dense = 0: the dense field's layer had zero inputs; its backward's
  # reshape(-1, 0) raised ZeroDivisionError (and orbax cannot save its [0, D] kernel).
  model = build_model("deepfm", deep_mlp=(8,), dtype=dtype)
  params = init_params(model, jax.random.key(0), 0, 3, 4)
  emb = jax.random.normal(jax.random.key(1), (6, 3, 4))
  labels = jnp.array([0, 1, 0, 1, 1, 0], jnp.float32)
  loss, (g_params, g_emb) = jax.value_and_grad(
      lambda p, e: compute_loss(model, p, jnp.zeros((6, 0)), e, labels)[0], argnums=(0, 1))(
          params, emb)
  assert np.isfinite(float(loss)) and "dense_field" not in params
  assert all(x.size for x in jax.tree.leaves(params))
  for g in jax.tree.leaves((g_params, g_emb)):
    assert np.all(np.isfinite(g))


def test_bad_deep_mlp_stops_build_model():
  """`DeepFM.deep_mlp = 256` stops when the config is read (like a bad dtype), not only when
  the model is first called after planning."""
  with pytest.raises(ConfigError, match="DeepFM.deep_mlp"):
    build_model("deepfm", deep_mlp=256)
