"""Features of tables of mixed dims: padded pooled activations, the models that take them
(DCNv2, TwoTower) and the ones that refuse them (DLRM, DeepFM) with the config named."""

import dataclasses
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import launch
from jaxrec.errors import ConfigError
from jaxrec.models import DCNv2, TwoTower
from jaxrec.models.mlp import flat_fields
from jaxrec.train.config import ExperimentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIMS = (16, 8, 8, 4, 16, 4)   # runs of one dim, and a dim that comes back


def padded_emb(seed, dims=DIMS, b=3):
  """`[b, F, max(dims)]` with feature i's columns past dims[i] filled with garbage, and the
  unpadded concatenation `[b, sum(dims)]` it stands for."""
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((b, len(dims), max(dims))).astype(np.float32)
  flat = np.concatenate([emb[:, i, :d] for i, d in enumerate(dims)], axis=1)
  return emb, flat


def test_flat_fields_takes_each_features_own_columns():
  emb, flat = padded_emb(0)
  np.testing.assert_array_equal(flat_fields("M", jnp.asarray(emb), DIMS), flat)
  np.testing.assert_array_equal(flat_fields("M", jnp.asarray(emb), None),
                                emb.reshape(3, -1))
  with pytest.raises(ConfigError, match=r"M.feature_dims has 5 dims \(widest 16\) for emb of "
                     r"6 features padded to dim 16"):
    flat_fields("M", jnp.asarray(emb), DIMS[:5])


@pytest.mark.parametrize("dims", [DIMS, (16, 8) * 5])
def test_serving_models_take_a_numpy_lookup(dims):
  """docs/python_api.md serves a two-tower from an export with `emb` a numpy lookup: past
  `MAX_SLICED_RUNS` runs of one dim (interleaved dims) `flat_fields` gathered with `.at`,
  which a numpy array lacks (AttributeError for TwoTower and DCNv2)."""
  emb, flat = padded_emb(3, dims, b=4)
  np.testing.assert_array_equal(flat_fields("M", emb, dims), flat)
  dense = np.random.default_rng(4).random((4, 13), dtype=np.float32)
  half = len(dims) // 2
  for model, kwargs in ((TwoTower(user_features=tuple(range(half)),
                                  item_features=tuple(range(half, len(dims))), user_mlp=(8,),
                                  item_mlp=(8,), feature_dims=dims), {"method": "towers"}),
                        (DCNv2(num_cross_layers=1, deep_mlp=(8,), feature_dims=dims), {})):
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(dense), jnp.asarray(emb))
    want = model.apply(params, jnp.asarray(dense), jnp.asarray(emb), **kwargs)
    got = model.apply(params, dense, emb, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("dims", [DIMS, (16, 16, 8, 8, 4), (8, 16) * 40])
def test_flat_fields_gradient_is_each_features_columns_and_linear_in_runs(dims):
  """Sliced (up to `MAX_SLICED_RUNS` runs of one dim) or gathered (more), the gradient puts
  each column back where it came from; each slice's gradient was a pad to the whole
  `[B, F, D]`: 1,000 features of interleaved dims compiled 71 s and stepped 1.3 s."""
  from jaxrec.models import mlp  # pylint: disable=import-outside-toplevel
  emb, flat = padded_emb(1, dims)
  w = np.random.default_rng(2).standard_normal(flat.shape).astype(np.float32)
  fn = lambda e: jnp.sum(flat_fields("M", e, dims) * w)
  want = np.zeros_like(emb)
  col = 0
  for i, d in enumerate(dims):
    want[:, i, :d] = w[:, col:col + d]
    col += d
  np.testing.assert_array_equal(jax.grad(fn)(jnp.asarray(emb)), want)
  pads = str(jax.make_jaxpr(jax.grad(fn))(jnp.asarray(emb))).count(" pad[")
  assert pads <= mlp.MAX_SLICED_RUNS, pads


@pytest.mark.parametrize("model", [
    DCNv2(num_cross_layers=2, low_rank=8, deep_mlp=(16,), feature_dims=DIMS),
    DCNv2(num_cross_layers=1, deep_mlp=(), structure="parallel", feature_dims=DIMS),
    TwoTower(user_features=(0, 3), item_features=(1, 4, 5), user_mlp=(8, 4),
             item_mlp=(8, 4), feature_dims=DIMS)],
    ids=["dcnv2-stacked", "dcnv2-parallel", "two_tower"])
def test_padding_columns_neither_change_the_logits_nor_get_a_gradient(model):
  dense = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)), jnp.float32)
  emb, _ = padded_emb(2)
  params = model.init(jax.random.key(0), dense, jnp.asarray(emb))["params"]
  clean = emb.copy()
  for i, d in enumerate(DIMS):
    clean[:, i, d:] = 0
  logits = model.apply({"params": params}, dense, jnp.asarray(emb))
  np.testing.assert_array_equal(logits, model.apply({"params": params}, dense,
                                                    jnp.asarray(clean)))
  grad = jax.grad(lambda e: model.apply({"params": params}, dense, e).sum())(jnp.asarray(emb))
  for i, d in enumerate(DIMS):
    np.testing.assert_array_equal(grad[:, i, d:], 0)
    assert np.abs(np.asarray(grad[:, i, :d])).sum() > 0 or i == 2   # 2: in no tower


def test_dcnv2_cross_width_is_the_sum_of_the_features_dims():
  model = DCNv2(num_cross_layers=1, low_rank=None, deep_mlp=(), feature_dims=DIMS)
  params = model.init(jax.random.key(0), jnp.zeros((2, 5)), jnp.zeros((2, 6, 16)))["params"]
  widths = {x.shape for x in jax.tree.leaves(params["cross"])}
  assert (5 + sum(DIMS), 5 + sum(DIMS)) in widths


def load(model, dims, *extra):
  launch.parse_gin([os.path.join(ROOT, "configs", f"{model}_synthetic.gin")],
                   [f"uniform_tables.dim = {list(dims) if len(dims) > 1 else dims[0]}", *extra])
  return ExperimentConfig()


@pytest.mark.parametrize("model", ["dcnv2", "two_tower"])
def test_the_config_sets_the_features_dims_on_models_that_take_them(model):
  dims = (16, 8, 4, 16, 8, 8, 4, 16)   # the configs' 8 tables
  config = load(model, dims)
  config.validate(num_devices=1)
  assert tuple(config.model.feature_dims) == dims
  # one dim again (e.g. a script replacing the tables): the model takes [B, F*D] as before
  tables = tuple(dataclasses.replace(t, dim=16) for t in config.tables)
  assert dataclasses.replace(config, embedding=(tables, config.features)).model.feature_dims \
      is None
  assert load(model, (16,)).model.feature_dims is None


@pytest.mark.parametrize("model, name", [("dlrm", "DLRM"), ("deepfm", "DeepFM")])
def test_models_of_one_dim_refuse_mixed_dims_naming_features_and_tables(model, name):
  config = load(model, (16, 8, 16, 16, 16, 16, 16, 16))
  with pytest.raises(ConfigError) as e:
    config.validate(num_devices=1)
  # where both were bound, not only the model's line (the dims came from a flag)
  assert launch.user_message(e.value) == (
      f"the model {name} takes features of one embedding dim (it has no feature_dims field: "
      "DLRM's and DeepFM's interactions pair every two features), but the features read "
      "tables of dims [8, 16] (dim 8: feature 'f1' reads table 't1'; dim 16: feature 'f0' "
      "reads table 't0') (uniform_tables.dim at --gin_bindings; ExperimentConfig.model at "
      f"{ROOT}/configs/{model}_synthetic.gin:10; build_model.name at "
      f"{ROOT}/configs/{model}_synthetic.gin:11); give every table one dim "
      "(uniform_tables.dim, each TableSpec.dim or each embedding_tables.tables entry's), or "
      "use a model that concatenates its features (dcnv2, two_tower)")


def test_a_spec_of_its_own_of_another_dim_is_named_at_its_line(tmp_path):
  """`cat/TableSpec.dim = 4` beside dim-8 tables under DLRM: the error named the model's
  binding, not the table's dim."""
  config = tmp_path / "specs.gin"
  config.write_text(f"include '{ROOT}/configs/dlrm_synthetic.gin'\n"
                    "ExperimentConfig.embedding = ((@user/TableSpec(), @cat/TableSpec()), "
                    "(@u/FeatureSpec(), @c/FeatureSpec()))\n"
                    "user/TableSpec.name = 't_user'\nuser/TableSpec.rows = 10\n"
                    "user/TableSpec.dim = 16\n"
                    "cat/TableSpec.name = 't_cat'\ncat/TableSpec.rows = 10\n"
                    "cat/TableSpec.dim = 4\n"
                    "u/FeatureSpec.name = 'u'\nu/FeatureSpec.table = 't_user'\n"
                    "c/FeatureSpec.name = 'c'\nc/FeatureSpec.table = 't_cat'\n"
                    "user/TableSpec.dim = 16\n")   # the common dim, bound twice: not named
  try:
    launch.parse_gin([str(config)], [])
    with pytest.raises(ConfigError) as e:
      launch.build(ExperimentConfig).validate(num_devices=1)
  finally:
    gin.clear_config()
  message = launch.user_message(e.value)
  assert f"(cat/TableSpec.dim at {config}:8; ExperimentConfig.model at {ROOT}/configs/" \
      in message, message
  assert "user/TableSpec.dim" not in message   # nor the include's unused uniform_tables.dim
  assert "uniform_tables.dim at" not in message


def test_feature_dims_cannot_be_bound():
  """The config sets it from the tables; a binding would be overridden, and config.gin
  recorded `DCNv2.feature_dims = None` for a model that used per-feature dims."""
  with pytest.raises(Exception, match="feature_dims"):
    launch.parse_gin([os.path.join(ROOT, "configs", "dcnv2_synthetic.gin")],
                     ["DCNv2.feature_dims = [3, 3]"])
    ExperimentConfig()
  config = load("dcnv2", (16, 8, 4, 16, 8, 8, 4, 16))
  assert tuple(config.model.feature_dims) == (16, 8, 4, 16, 8, 8, 4, 16)
  assert "feature_dims" not in gin.operative_config_str()
