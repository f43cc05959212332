"""Tests for jaxrec.models: shapes, fitting a planted signal, references, config errors."""

import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrec.errors import ConfigError
from jaxrec.launch import user_message
from jaxrec.models import (DLRM, MODELS, TwoTower, build_model, compute_loss, dot_interaction,
                           in_batch_softmax_loss, init_params)
from jaxrec.models.mlp import affine

B, NUM_DENSE, F, D = 6, 3, 4, 8

SMALL = {
    "dlrm": dict(bottom_mlp=(16, D), top_mlp=(16, 1)),
    "dcnv2": dict(num_cross_layers=2, deep_mlp=(16,)),
    "dcnv2_lowrank_parallel": dict(num_cross_layers=2, low_rank=4, deep_mlp=(16,),
                                   structure="parallel"),
    "deepfm": dict(deep_mlp=(16,)),
    "two_tower": dict(user_features=(0, 1), item_features=(2, 3), user_mlp=(16, 8),
                      item_mlp=(16, 8)),
}


def _model(key):
  return build_model(key.split("_lowrank")[0], **SMALL[key])


def _inputs(n=B, seed=0):
  rng = np.random.default_rng(seed)
  dense = rng.normal(size=(n, NUM_DENSE)).astype(np.float32)
  emb = (rng.normal(size=(n, F, D)) / np.sqrt(D)).astype(np.float32)
  return jnp.asarray(dense), jnp.asarray(emb)


@pytest.mark.parametrize("key", sorted(SMALL))
def test_shapes(key):
  model = _model(key)
  dense, emb = _inputs()
  params = init_params(model, jax.random.key(0), NUM_DENSE, F, D)
  logits = model.apply({"params": params}, dense, emb)
  assert logits.shape == (B,) and logits.dtype == jnp.float32
  loss, logits2 = compute_loss(model, params, dense, emb, jnp.zeros(B))
  assert loss.shape == () and np.isfinite(loss)
  np.testing.assert_allclose(logits, logits2, rtol=1e-6)


@pytest.mark.parametrize("key", sorted(SMALL))
def test_fits_planted_signal(key):
  """Label = [dense_0 + 4 <e_0, e_2> > 0]; every model sees both parts; loss must fall."""
  model = _model(key)
  dense, emb = _inputs(n=256, seed=1)
  labels = (dense[:, 0] + 4 * (emb[:, 0] * emb[:, 2]).sum(-1) > 0).astype(jnp.float32)
  params = init_params(model, jax.random.key(1), NUM_DENSE, F, D)
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    (loss, _), g = jax.value_and_grad(compute_loss, argnums=1, has_aux=True)(
        model, params, dense, emb, labels)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  losses = []
  for _ in range(60):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert losses[-1] < 0.6 * losses[0], losses[::10]


def _np_mlp(p, x, final_relu):
  n = len(p)
  for i in range(n):
    x = x @ np.asarray(p[f"layer_{i}"]["kernel"]) + np.asarray(p[f"layer_{i}"]["bias"])
    if i < n - 1 or final_relu:
      x = np.maximum(x, 0)
  return x


def test_dlrm_matches_numpy_reference():
  model = DLRM(bottom_mlp=(5, D), top_mlp=(7, 1))
  dense, emb = _inputs(n=3, seed=2)
  params = init_params(model, jax.random.key(2), NUM_DENSE, F, D)
  x = _np_mlp(params["bottom_mlp"], np.asarray(dense, np.float64), True)
  e = np.asarray(emb, np.float64)
  feats = []
  for b in range(3):
    vecs = [x[b]] + [e[b, f] for f in range(F)]
    feats.append([vecs[i] @ vecs[j] for i in range(F + 1) for j in range(i)])
  z = np.asarray(feats)
  assert z.shape == (3, (F + 1) * F // 2)
  np.testing.assert_allclose(dot_interaction(jnp.asarray(x, jnp.float32), emb), z,
                             rtol=1e-5, atol=1e-6)
  want = _np_mlp(params["top_mlp"], np.concatenate([x, z], -1), False)[:, 0]
  np.testing.assert_allclose(model.apply({"params": params}, dense, emb), want,
                             rtol=1e-4, atol=1e-5)


def test_dot_interaction_gradient_matches_autodiff_of_the_plain_form():
  """The interaction's own backward (one matmul with the symmetric pair-gradient matrix)
  equals autodiff of einsum + pair gather, for both inputs."""
  rng = np.random.default_rng(5)
  bottom = jnp.asarray(rng.standard_normal((6, D)), jnp.float32)
  emb = jnp.asarray(rng.standard_normal((6, F, D)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((F + 1) * F // 2), jnp.float32)

  def plain(bottom, emb):
    t = jnp.concatenate([bottom[:, None], emb], axis=1)
    rows, cols = np.tril_indices(F + 1, k=-1)
    return jnp.einsum("bid,bjd->bij", t, t)[:, rows, cols]

  for fn in (plain, dot_interaction):
    np.testing.assert_allclose(fn(bottom, emb), plain(bottom, emb), rtol=1e-6)
  got = jax.grad(lambda b, e: (dot_interaction(b, e) * weights).sum(), (0, 1))(bottom, emb)
  want = jax.grad(lambda b, e: (plain(b, e) * weights).sum(), (0, 1))(bottom, emb)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_dlrm_bottom_width_mismatch():
  model = DLRM(bottom_mlp=(16, 4), top_mlp=(8, 1))
  with pytest.raises(ConfigError, match=r"DLRM.bottom_mlp .*ends in width 4.*embedding dim is 8"):
    init_params(model, jax.random.key(0), NUM_DENSE, F, D)


def test_dlrm_top_must_end_in_one():
  with pytest.raises(ConfigError, match="DLRM.top_mlp"):
    init_params(DLRM(bottom_mlp=(D,), top_mlp=(8, 2)), jax.random.key(0), NUM_DENSE, F, D)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_mlp=(8, 2)), r"DLRM.top_mlp = \(8, 2\) must end in 1 unit"),
    (dict(bottom_mlp=()), "DLRM.bottom_mlp"), (dict(top_mlp=(8, -1, 1)), "DLRM.top_mlp")])
def test_dlrm_bad_widths_stop_build_model(kwargs, match):
  """Checked when the config is read (as DCNv2's and DeepFM's), not at the first apply
  after planning."""
  with pytest.raises(ConfigError, match=match):
    build_model("dlrm", **{**dict(bottom_mlp=(D,), top_mlp=(8, 1)), **kwargs})


def test_in_batch_softmax_matches_numpy():
  rng = np.random.default_rng(3)
  u, v = rng.normal(size=(2, 5, 4)).astype(np.float32)
  labels = np.array([1, 0, 1, 1, 0], np.float32)
  t = 0.5
  s = (u @ v.T) / t
  logp = s - np.log(np.exp(s).sum(1, keepdims=True))
  want = -np.mean([logp[i, i] for i in range(5) if labels[i] == 1])
  got = in_batch_softmax_loss(jnp.asarray(u), jnp.asarray(v), jnp.asarray(labels), t)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(in_batch_softmax_loss(u, v, np.zeros(5), t)) == 0.0


def test_two_tower_compute_loss_in_batch_softmax():
  model = build_model("two_tower", loss="in_batch_softmax", temperature=0.2,
                      **{k: v for k, v in SMALL["two_tower"].items()})
  dense, emb = _inputs(seed=4)
  labels = jnp.asarray([1, 1, 0, 1, 0, 1], jnp.float32)
  params = init_params(model, jax.random.key(4), NUM_DENSE, F, D)
  loss, logits = compute_loss(model, params, dense, emb, labels)
  user, item = model.apply({"params": params}, dense, emb, method="towers")
  np.testing.assert_allclose(np.linalg.norm(user, axis=-1), 1.0, rtol=1e-5)
  want = in_batch_softmax_loss(user, item, labels, 0.2)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(logits, model.apply({"params": params}, dense, emb), rtol=1e-6)
  np.testing.assert_allclose(logits, (user * item).sum(-1) / 0.2, rtol=1e-5)


def test_two_tower_in_batch_softmax_learns():
  """Each row's item is a noisy copy of its user features: in-batch retrieval is learnable."""
  model = TwoTower(user_features=(0,), item_features=(1,), user_mlp=(16,), item_mlp=(16,),
                   dense_to_user=False, loss="in_batch_softmax")
  rng = np.random.default_rng(5)
  e0 = rng.normal(size=(64, D))
  emb = np.stack([e0, e0 + 0.1 * rng.normal(size=e0.shape), e0, e0], 1).astype(np.float32)
  dense, labels = jnp.zeros((64, NUM_DENSE)), jnp.ones(64)
  params = init_params(model, jax.random.key(5), NUM_DENSE, F, D)
  tx = optax.adam(1e-2)
  opt = tx.init(params)
  grad = jax.jit(jax.value_and_grad(lambda p: compute_loss(model, p, dense, emb, labels)[0]))
  losses = []
  for _ in range(40):
    loss, g = grad(params)
    upd, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, upd)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("kwargs,match", [
    (dict(user_features=(0, 1), item_features=(1, 2)), "overlap"),
    (dict(user_features=(0, 9), item_features=(1,)), r"TwoTower.user_features .*\[0, 4\)"),
    (dict(user_features=(0,), item_features=(1,), user_mlp=(8,), item_mlp=(4,)), "same width"),
])
def test_two_tower_config_errors(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    init_params(TwoTower(**kwargs), jax.random.key(0), NUM_DENSE, F, D)


def test_build_model_from_gin():
  gin.clear_config()
  try:
    gin.parse_config("""
        build_model.name = 'dlrm'
        DLRM.bottom_mlp = (32, 16)
        DLRM.top_mlp = (8, 1)
    """)
    model = build_model()
    assert isinstance(model, DLRM)
    assert tuple(model.bottom_mlp) == (32, 16) and tuple(model.top_mlp) == (8, 1)
    assert tuple(build_model(name="dlrm", top_mlp=(4, 1)).top_mlp) == (4, 1)
  finally:
    gin.clear_config()


def test_dlrm_without_dense_features_is_a_clear_error():
  """`ExperimentConfig.num_dense = 0`: DLRM's bottom MLP had no input (a ZeroDivisionError
  in its initialiser); DCNv2 and DeepFM train without dense features."""
  with pytest.raises(ConfigError, match=r"^ExperimentConfig.num_dense = 0: DLRM needs dense "
                     r"features \(its bottom MLP"):
    init_params(DLRM((8, 4), (8, 1)), jax.random.key(0), 0, 3, 4)


def test_build_model_errors():
  assert set(MODELS) == {"dlrm", "dcnv2", "deepfm", "two_tower"}
  with pytest.raises(ConfigError, match=r"unknown model 'nope' \(known: [a-z0-9_, ]+\)\n"):
    build_model("nope")
  with pytest.raises(ConfigError, match=r"unknown model 'two-tower' .*; did you mean "
                     r"'two_tower'\?\n"):
    build_model("two-tower")
  with pytest.raises(ConfigError, match=r"unknown model 'DCNv2' .*; did you mean 'dcnv2'\?"):
    build_model("DCNv2")   # the class's spelling
  # build_model passes other keywords on to the model (build_model.low_rank = 4 works): a
  # misspelt one named neither its binding nor the parameter it meant
  with pytest.raises(ConfigError, match=r"^build_model.lowrank: DCNv2 \(build_model.name = "
                     r"'dcnv2'\) has no parameter 'lowrank'; did you mean 'low_rank'\?"):
    build_model("dcnv2", lowrank=4)
  with pytest.raises(ConfigError, match=r"^build_model.no_such_arg: DLRM .* it has: "
                     r"bottom_mlp, top_mlp"):
    build_model("dlrm", no_such_arg=1)


def test_an_unbound_required_hyperparameter_is_one_line_naming_the_binding():
  """gin appended "No values supplied by Gin or caller ..." lines to the TypeError."""
  gin.clear_config()
  try:
    gin.parse_config("TwoTower.item_features = (2, 3)")
    with pytest.raises(ConfigError) as e:
      build_model("two_tower")
  finally:
    gin.clear_config()
  # what scripts/train.py prints after 'error: '
  assert user_message(e.value) == (
      "build_model('two_tower'): TwoTower.user_features not bound: the model has no default "
      "for it; bind it in the gin file or with --gin_bindings")
  with pytest.raises(ConfigError, match=r"TwoTower.user_features and TwoTower.item_features "
                     "not bound: the model has no default for them; bind them in"):
    build_model("two_tower")


def test_affine_gradient_matches_autodiff_of_the_plain_form():
  """`affine`'s own backward (kernel gradient as one `[in, out]` dot) equals autodiff of
  `x @ kernel + bias`, for 2-D and 3-D inputs, with and without a bias."""
  rng = np.random.default_rng(7)
  kernel = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(3), jnp.float32)
  for shape in ((6, 5), (4, 2, 5)):
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    out_w = jnp.asarray(rng.standard_normal(shape[:-1] + (3,)), jnp.float32)
    for b in (bias, None):
      plain = lambda x, k, b=b: x @ k + (0.0 if b is None else b)
      np.testing.assert_allclose(affine(x, kernel, b), plain(x, kernel), rtol=1e-6)
      got = jax.grad(lambda x, k: (jnp.tanh(affine(x, k, b)) * out_w).sum(), (0, 1))(x, kernel)
      want = jax.grad(lambda x, k: (jnp.tanh(plain(x, k)) * out_w).sum(), (0, 1))(x, kernel)
      for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  got_b = jax.grad(lambda b: jnp.tanh(affine(x, kernel, b)).sum())(bias)
  want_b = jax.grad(lambda b: jnp.tanh(x @ kernel + b).sum())(bias)
  np.testing.assert_allclose(got_b, want_b, rtol=1e-5)


def test_sharded_batch_gradients_match_single_device():
  """Parameter gradients with the batch split over 8 devices (the kernel gradients are
  all-reduced as `[in, out]`) match one device, for every model."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  dense, emb = _inputs(n=16, seed=8)
  labels = jnp.asarray(np.arange(16) % 3 == 0, jnp.float32)
  for key in sorted(SMALL):
    model = _model(key)
    params = init_params(model, jax.random.key(8), NUM_DENSE, F, D)
    fn = jax.jit(jax.grad(lambda p, d, e, y, m=model: compute_loss(m, p, d, e, y)[0]))
    want = fn(params, dense, emb, labels)
    got = fn(params, *(jax.device_put(x, spec) for x in (dense, emb, labels)))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=key)


def test_sharded_batch_matches_single_device():
  """Under jit with the batch split over 8 devices, loss and logits match one device."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  dense, emb = _inputs(n=16, seed=6)
  labels = jnp.asarray(np.arange(16) % 3 == 0, jnp.float32)
  for model in (_model("dlrm"), build_model("two_tower", loss="in_batch_softmax",
                                            **SMALL["two_tower"])):
    params = init_params(model, jax.random.key(6), NUM_DENSE, F, D)
    fn = jax.jit(lambda p, d, e, y, m=model: compute_loss(m, p, d, e, y))
    want = fn(params, dense, emb, labels)
    got = fn(params, *(jax.device_put(x, spec) for x in (dense, emb, labels)))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_returns_float32():
  model = build_model("dlrm", dtype="bfloat16", **SMALL["dlrm"])
  dense, emb = _inputs()
  params = init_params(model, jax.random.key(0), NUM_DENSE, F, D)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  assert model.apply({"params": params}, dense, emb).dtype == jnp.float32


@pytest.mark.parametrize("name,kwargs,match", [
    ("dlrm", dict(bottom_mlp=(16, D), top_mlp=1), r"DLRM.top_mlp must be .*sequence.*got 1"),
    ("dlrm", dict(bottom_mlp=D, top_mlp=(16, 1)), r"DLRM.bottom_mlp must be .*got 8"),
    ("dcnv2", dict(deep_mlp=64), r"DCNv2.deep_mlp must be .*got 64"),
    ("deepfm", dict(deep_mlp=64), r"DeepFM.deep_mlp must be .*got 64"),
    ("two_tower", dict(user_features=(0, 1), item_features=(2, 3), user_mlp=8, item_mlp=(8,)),
     r"TwoTower.user_mlp must be .*got 8"),
    ("two_tower", dict(user_features=0, item_features=(2, 3)), r"TwoTower.user_features = 0"),
])
def test_a_width_or_index_that_is_not_a_sequence_names_the_binding(name, kwargs, match):
  with pytest.raises(ConfigError, match=match):
    init_params(build_model(name, **kwargs), jax.random.key(0), NUM_DENSE, F, D)


@pytest.mark.parametrize("name,cls,widths", [("dcnv2", "DCNv2", (256, 128, 1)),
                                             ("deepfm", "DeepFM", (1,))])
def test_a_deep_mlp_ending_in_one_is_refused(name, cls, widths):
  """Written as DLRM's top_mlp is (ending in 1), DCNv2's deep network fed its own logit
  layer through one ReLU unit: the shipped config trained to eval AUC 0.5000."""
  with pytest.raises(ConfigError, match=rf"^{cls}.deep_mlp = {re.escape(str(widths))} ends "
                     rf"in width 1, .* drop the last 1 \({cls}.deep_mlp = "
                     rf"{re.escape(str(widths[:-1]))}\)"):
    build_model(name, deep_mlp=widths)


@pytest.mark.parametrize("name,kwargs,match", [
    ("dlrm", dict(bottom_mlp=(16.5, D), top_mlp=(16, 1)), r"DLRM.bottom_mlp .*got \(16.5, 8\)"),
    ("dlrm", dict(bottom_mlp=("16", D), top_mlp=(16, 1)), r"DLRM.bottom_mlp .*got \('16', 8\)"),
    ("dlrm", dict(bottom_mlp=(16, D), top_mlp=(True, 1)), r"DLRM.top_mlp .*got \(True, 1\)"),
    ("dcnv2", dict(deep_mlp=(16, 8.0)), r"DCNv2.deep_mlp .*got \(16, 8.0\)"),
    ("dcnv2", dict(num_cross_layers=2.7), r"DCNv2.num_cross_layers must be an integer .*2.7"),
    ("dcnv2", dict(num_cross_layers="3"), r"DCNv2.num_cross_layers must be an integer .*'3'"),
    ("dcnv2", dict(low_rank=4.5), r"DCNv2.low_rank must be a positive integer .*4.5"),
    ("dcnv2", dict(low_rank=35), r"DCNv2.low_rank = 35 is not below the cross network's width "
                                 r"35 \(num_dense 3 \+ 4 features x dim 8\).*use None"),
    ("dcnv2", dict(num_cross_layers=0, low_rank=4), r"DCNv2.low_rank = 4 applies to cross "
                                                     r"layers, but DCNv2.num_cross_layers = 0"),
    ("two_tower", dict(user_features=(0.5, 1), item_features=(2, 3)),
     r"TwoTower.user_features = \(0.5, 1\)"),
    ("two_tower", dict(user_features=(0, 1), item_features=("2", 3)),
     r"TwoTower.item_features = \('2', 3\)"),
    ("two_tower", dict(user_features=(0, 1), item_features=(2, 3), temperature="0.1"),
     r"TwoTower.temperature must be a positive finite number, got '0.1'"),
])
def test_a_non_integer_width_index_or_layer_count_names_the_binding(name, kwargs, match):
  """Not truncated (`int(16.5)` = 16, index 0.5 -> 0) nor a bare ValueError traceback."""
  with pytest.raises(ConfigError, match=match):
    init_params(build_model(name, **kwargs), jax.random.key(0), NUM_DENSE, F, D)


@pytest.mark.parametrize("shape", [(6, 13), (4, 3, 16), (64, 367)])
def test_bfloat16_affine_gradients_match_float32_on_the_rounded_operands(shape):
  """bfloat16 `affine` (products accumulate in float32; the kernel gradient goes through
  the padded transposed copy) gives the float32 results of the bfloat16-rounded operands:
  bfloat16 x bfloat16 products are exact in float32, so only summation order differs."""
  rng = np.random.default_rng(11)
  n_in, n_out = shape[-1], 24
  x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.bfloat16)
  bias = jnp.asarray(rng.standard_normal(n_out), jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape[:-1] + (n_out,)), jnp.bfloat16)
  y, vjp = jax.vjp(affine, x, kernel, bias)
  d_x, d_kernel, d_bias = vjp(g)
  assert (y.dtype, d_x.dtype, d_kernel.dtype) == (jnp.bfloat16,) * 3
  x64, k64, g64 = (np.asarray(a, np.float64) for a in (x, kernel, g))
  np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ k64 + np.asarray(bias),
                             rtol=1e-2, atol=1e-2)   # the output is rounded to bfloat16
  x2, g2 = x64.reshape(-1, n_in), g64.reshape(-1, n_out)
  for got, want in ((d_kernel, x2.T @ g2), (d_x, g64 @ k64.T)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(d_bias, g2.sum(0), rtol=1e-6, atol=1e-5)
  # Before the final rounding, the kernel gradient is exact to float32 summation.
  with jax.default_matmul_precision("highest"):
    raw = jax.jit(lambda a, b: jax.vjp(affine, a, kernel.astype(jnp.float32), bias)[1](b)[1])(
        x.astype(jnp.float32), g.astype(jnp.float32))
  np.testing.assert_allclose(raw, x2.T @ g2, rtol=1e-5, atol=1e-4)


def test_bfloat16_dlrm_step_tracks_float32():
  """A bfloat16-compute DLRM's loss and parameter gradients stay within bfloat16 rounding
  of the float32 model on the same parameters (parameters and loss stay float32). Small
  gradient entries are sums that cancel, so gradients compare by relative norm: up to
  ~11% on a 32-example batch of this tiny model (the exact kernel gradient is checked in
  the `affine` test above; a wrong transpose or pad here is off by ~100%)."""
  dense, emb = _inputs(n=32, seed=12)
  labels = jnp.asarray(np.arange(32) % 3 == 0, jnp.float32)
  f32 = build_model("dlrm", **SMALL["dlrm"])
  bf16 = build_model("dlrm", dtype="bfloat16", **SMALL["dlrm"])
  params = init_params(f32, jax.random.key(12), NUM_DENSE, F, D)
  grads = {}
  for name, model in (("f32", f32), ("bf16", bf16)):
    fn = jax.jit(jax.value_and_grad(lambda p, m=model: compute_loss(m, p, dense, emb, labels)[0]))
    grads[name] = fn(params)
  assert grads["bf16"][0].dtype == jnp.float32
  np.testing.assert_allclose(grads["bf16"][0], grads["f32"][0], rtol=1e-2)
  for g, w in zip(jax.tree.leaves(grads["bf16"][1]), jax.tree.leaves(grads["f32"][1])):
    assert g.dtype == jnp.float32
    assert np.linalg.norm(g - w) <= 0.2 * np.linalg.norm(w), (g.shape, np.linalg.norm(g - w))


def test_bfloat16_sharded_batch_gradients_match_single_device():
  """bfloat16 compute with the batch over 8 devices: the float32 kernel gradients (each
  device's padded-transpose dot, then the all-reduce) match one device up to summation
  order (a changed float32 sum can move a bfloat16 rounding by one step)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  dense, emb = _inputs(n=64, seed=9)
  labels = jnp.asarray(np.arange(64) % 3 == 0, jnp.float32)
  model = build_model("dlrm", dtype="bfloat16", **SMALL["dlrm"])
  params = init_params(model, jax.random.key(9), NUM_DENSE, F, D)
  fn = jax.jit(jax.grad(lambda p, d, e, y: compute_loss(model, p, d, e, y)[0], argnums=(0, 2)))
  want = fn(params, dense, emb, labels)
  got = fn(params, *(jax.device_put(x, spec) for x in (dense, emb, labels)))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.float32
    assert np.linalg.norm(g - w) <= 1e-2 * np.linalg.norm(w), (g.shape, np.linalg.norm(g - w))


@pytest.mark.parametrize("dtype,want", [
    ("bfloat16", jnp.bfloat16), ("bf16", jnp.bfloat16), ("BF16", jnp.bfloat16),
    (jnp.bfloat16, jnp.bfloat16), (jnp.dtype("bfloat16"), jnp.bfloat16),
    ("float32", jnp.float32), ("fp32", jnp.float32), (np.float32, jnp.float32),
    (None, jnp.float32)])
@pytest.mark.parametrize("key", sorted(SMALL))
def test_dtype_spellings_give_the_same_model(key, dtype, want):
  """'bf16' is the usual short name: the same model as 'bfloat16' (it was a bare numpy
  TypeError 'data type not understood')."""
  name = key.split("_lowrank")[0]
  dense, emb = _inputs()
  params = init_params(_model(key), jax.random.key(0), NUM_DENSE, F, D)
  got = build_model(name, dtype=dtype, **SMALL[key]).apply({"params": params}, dense, emb)
  ref = build_model(name, dtype=jnp.dtype(want).name, **SMALL[key]).apply(
      {"params": params}, dense, emb)
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype,match", [
    ("float16", r"float16.*loss scaling.*'bfloat16'"), (jnp.float16, r"loss scaling"),
    ("int8", r"got 'int8'"), ("nonsense", r"got 'nonsense'"), (jnp.int32, r"int32"),
    ("float64", r"got 'float64'"), (3, r"got 3")])
@pytest.mark.parametrize("key", sorted(SMALL))
def test_an_unsupported_dtype_names_the_binding(key, dtype, match):
  """float16 (no loss scaling: silently underflowing gradients), integer, unknown and
  float64 (silently float32 without jax_enable_x64) dtypes: a ConfigError naming e.g.
  `DLRM.dtype`, not a TypeError/ValueError from numpy or flax deep in `init`."""
  name = key.split("_lowrank")[0]
  binding = type(build_model(name, **SMALL[key])).__name__ + ".dtype"
  with pytest.raises(ConfigError, match=rf"{binding} must be 'float32' or 'bfloat16'.*{match}"):
    init_params(build_model(name, dtype=dtype, **SMALL[key]), jax.random.key(0), NUM_DENSE, F, D)


@pytest.mark.parametrize("key", sorted(SMALL))
def test_bfloat16_logits_are_not_rounded_to_bfloat16(key):
  """The logit is the last layer's float32 sum (DeepFM: its FM term in float32 too). It was
  rounded to bfloat16 (8 significant bits) before the cast to float32: ~200 distinct
  logits in a batch of 4096, ties for the eval AUC and a coarse loss."""
  name = key.split("_lowrank")[0]
  dense, emb = _inputs(n=512, seed=5)
  params = init_params(_model(key), jax.random.key(5), NUM_DENSE, F, D)
  # Zero-initialised layers (DCNv2's cross, DeepFM's first order) made non-zero.
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(6), a.shape),
                        params)
  f32 = np.asarray(_model(key).apply({"params": params}, dense, emb))
  got = build_model(name, dtype="bfloat16", **SMALL[key]).apply({"params": params}, dense, emb)
  assert got.dtype == jnp.float32
  got = np.asarray(got)
  as_bf16 = np.asarray(jnp.asarray(got).astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(as_bf16 != got) > 0.9, np.unique(got).size
  assert np.unique(got).size > 0.9 * got.size
  np.testing.assert_allclose(got, f32, atol=0.03 * np.abs(f32).max() + 1e-3)


def test_affine_out_dtype_float32_keeps_the_float32_sum():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((5, 2, 24)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((24, 3)), jnp.bfloat16)
  bias = jnp.asarray(rng.standard_normal(3), jnp.float32)
  y, vjp = jax.vjp(lambda a, k, c: affine(a, k, c, jnp.float32), x, kernel, bias)
  assert y.dtype == jnp.float32
  want = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  d_x, d_kernel, d_bias = vjp(g)
  assert (d_x.dtype, d_kernel.dtype, d_bias.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  # The bias gradient sums the float32 cotangent (not its bfloat16 rounding).
  np.testing.assert_allclose(d_bias, np.asarray(g).reshape(-1, 3).sum(0), rtol=1e-6)
  assert affine(x, kernel, None).dtype == jnp.bfloat16


@pytest.mark.parametrize("key", sorted(SMALL))
def test_build_model_rejects_a_bad_dtype_before_init(key):
  """Checked when gin builds the model (scripts stop before planning or starting elastic
  workers), not first when the model is initialised."""
  with pytest.raises(ConfigError, match=r"\.dtype must be 'float32' or 'bfloat16'.*'float16'"):
    build_model(key.split("_lowrank")[0], dtype="float16", **SMALL[key])


@pytest.mark.parametrize("shape", [(64, 37), (8, 3, 16)])
def test_bfloat16_dense_parameter_gradients_are_the_float32_sums(shape):
  """Mixed precision keeps the parameter gradients float32: Dense's kernel gradient is the
  float32 sum of bfloat16 x bfloat16 products (exact in float32), not that sum rounded to
  bfloat16 (relative error up to 2^-9, what the kernel's cast to bfloat16 outside `affine`
  did on its way back); the bias is added and differentiated in float32."""
  from jaxrec.models.mlp import Dense  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(4)
  n_out = 24
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  layer = Dense(n_out, dtype="bfloat16", out_dtype=jnp.float32)
  params = layer.init(jax.random.key(0), x)["params"]
  params = {"kernel": params["kernel"],
            "bias": jnp.asarray(rng.standard_normal(n_out) * (1 + 2**-12), jnp.float32)}
  g = jnp.asarray(rng.standard_normal(shape[:-1] + (n_out,)), jnp.float32)
  y, vjp = jax.vjp(lambda p: layer.apply({"params": p}, x), params)
  (grads,) = vjp(g)
  assert grads["kernel"].dtype == jnp.float32 and grads["bias"].dtype == jnp.float32
  rounded = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
  x64, k64, g64 = rounded(x), rounded(params["kernel"]), rounded(g)
  want = x64.reshape(-1, shape[-1]).T @ g64.reshape(-1, n_out)
  np.testing.assert_allclose(grads["kernel"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(grads["bias"], np.asarray(g).reshape(-1, n_out).sum(0), rtol=1e-5,
                             atol=1e-5)
  # The bias is not rounded to bfloat16 in the forward pass either.
  np.testing.assert_allclose(y, x64 @ k64 + np.asarray(params["bias"], np.float64),
                             rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("config", ["dlrm_synthetic", "dcnv2_synthetic", "deepfm_synthetic",
                                    "two_tower_synthetic"])
def test_config_gin_records_no_flax_module_fields(config):
  """gin recorded `DLRM.name = None` (flax's own field) in every run's config.gin; an
  older config.gin that binds it still parses (its header says to rerun it)."""
  import os  # pylint: disable=import-outside-toplevel
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train import config_gin  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  model = {"dlrm_synthetic": "DLRM", "dcnv2_synthetic": "DCNv2", "deepfm_synthetic": "DeepFM",
           "two_tower_synthetic": "TwoTower"}[config]
  try:
    launch.parse_gin([os.path.join(root, "configs", f"{config}.gin")], [])
    built = ExperimentConfig()
    operative = gin.operative_config_str()
    text, _ = config_gin.recorded(built, operative)
    gin.clear_config()
    launch.parse_gin([os.path.join(root, "configs", f"{config}.gin")],
                     [f"{model}.name = None"])   # an older config.gin's line
  finally:
    gin.clear_config()
  assert f"{model}.name = None" in operative   # gin's own record
  assert "build_model.name" in text
  assert not re.search(r"^[A-Z]\w*\.(name|parent) =", text, re.M), text
