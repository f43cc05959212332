"""`per_device_value_and_grad`: the dense loss per device gives `compute_loss`'s value and
gradients on every mesh shape, and the train step reduces them in one flat buffer."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models import build_model, compute_loss, init_params
from jaxrec.sharding import mesh as mesh_lib
from jaxrec.train.dense_loss import per_device_value_and_grad
from tests.offload import offload_helpers as oh

B, NUM_DENSE, F, D = 32, 3, 4, 8
MODELS = {
    "dlrm": dict(bottom_mlp=(16, D), top_mlp=(16, 1)),
    "dcnv2": dict(num_cross_layers=2, deep_mlp=(16,)),
    "deepfm": dict(deep_mlp=(16,)),
    "two_tower": dict(user_features=(0, 1), item_features=(2, 3), user_mlp=(16, 8),
                      item_mlp=(16, 8), loss="bce"),
}
MESHES = ("data=8", "table=2,row=2,col=2", "data=2,row=4", "data=2")


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(B, NUM_DENSE)), jnp.float32),
          jnp.asarray(rng.normal(size=(B, F, D)) / np.sqrt(D), jnp.float32),
          jnp.asarray(rng.integers(0, 2, B), jnp.float32))


@functools.cache
def _reference(name):
  """Model `name`, its parameters, and `compute_loss`'s value and gradients on `_inputs()`
  (jax arrays: immutable), once per worker: each model is compared on every mesh with it."""
  model = build_model(name, **MODELS[name])
  params = init_params(model, jax.random.key(1), NUM_DENSE, F, D)
  dense, emb, labels = _inputs()
  ref_loss, (ref_gp, ref_ge) = jax.jit(jax.value_and_grad(
      lambda p, e: compute_loss(model, p, dense, e, labels)[0], argnums=(0, 1)))(params, emb)
  return model, params, ref_loss, ref_gp, ref_ge


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("spec", MESHES)
def test_value_and_gradients_match_compute_loss(name, spec):
  model, params, ref_loss, ref_gp, ref_ge = _reference(name)
  dense, emb, labels = _inputs()

  n = 2 if spec == "data=2" else 8
  mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec(spec, n), jax.devices()[:n])
  put = lambda x: jax.device_put(x, mesh_lib.batch_sharding(mesh))
  loss, gp, ge = jax.jit(per_device_value_and_grad(model, mesh))(params, put(dense), put(emb),
                                                                 put(labels))

  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(ge, ref_ge, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(gp) == jax.tree.structure(ref_gp)
  for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(ref_gp)):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_global_batch_losses_and_one_device_use_compute_loss():
  tower = build_model("two_tower", **{**MODELS["two_tower"], "loss": "in_batch_softmax"})
  mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("data=8", 8), jax.devices()[:8])
  assert per_device_value_and_grad(tower, mesh) is None
  one = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("data=1", 1), jax.devices()[:1])
  assert per_device_value_and_grad(build_model("dlrm", **MODELS["dlrm"]), one) is None


def test_train_step_reduces_the_dense_gradient_as_one_buffer():
  """The compiled 8-device step all-reduces one buffer, f32[1 + all dense params] (the loss
  value and the gradient), and nothing else: no per-parameter gradient and no separate
  loss value (a tuple all-reduce costs XLA:CPU about a collective per buffer)."""
  run = oh.Run(oh.experiment(), oh.mesh_of("data=2,table=2,row=2"), plan="twrw",
               iterator=oh.train_iterator())
  batch = run.put(next(oh.train_iterator()))
  hlo = run.step_fn.lower(run.state, batch).compile().as_text()
  params = jax.tree.leaves(run.state["params"])
  total = 1 + sum(p.size for p in params)
  reduces = [line for line in hlo.splitlines() if re.search(r"\ball-reduce\(", line)]
  assert len(reduces) == 1, reduces
  assert re.search(rf"= f32\[{total}\]\S* all-reduce\(", reduces[0]), reduces[0]
