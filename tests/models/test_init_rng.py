"""The dense init's key (`models.init_rng`): jax's threefry2x32 keys and bits, bit for bit,
so the initial dense params of every model are those `model.init` draws from a plain key."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import gin_usage, launch
from jaxrec.models import init_rng
from jaxrec.train import state
from jaxrec.train.config import ExperimentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = [(), (1,), (7,), (3, 5), (1001, 3), (2, 3, 4)]


@pytest.fixture(autouse=True)
def _forget_binding_origins():
  """`launch.parse_gin` records where each binding was made (`gin_usage`), a record that the
  suite's `gin.clear_config` keeps: a later test's error message in this worker named these
  config files (`test_two_tower`'s expected message failed so)."""
  yield
  gin_usage.clear()


def keys(seed=11):
  """(a plain threefry key, the same key as `unrolled_key`)."""
  key = jax.random.key(seed)
  return key, init_rng.unrolled_key(key)


def assert_same(fn, *args):
  """`fn(key, *args)` equal for both keys, eagerly and jitted."""
  key, fast = keys()
  for run in (fn, jax.jit(fn, static_argnums=tuple(range(1, 1 + len(args))))):
    want, got = run(key, *args), run(fast, *args)
    jax.tree.map(lambda w, g: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
                 want, got)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.uint16, jnp.uint32])
def test_random_bits_are_jaxs(shape, dtype):
  assert_same(lambda k, s: jax.random.bits(k, s, dtype), shape)


@pytest.mark.parametrize("shape", [(5,), (64, 3), (4, 8, 2)])
def test_initialisers_draw_jaxs_values(shape):
  by_fan = [jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal"),
            jax.nn.initializers.glorot_uniform()]
  for init in (by_fan if len(shape) >= 2 else []) + [jax.nn.initializers.normal(0.1)]:
    assert_same(lambda k, s, i=init: i(k, s, jnp.float32), shape)
  assert_same(lambda k, s: jax.random.truncated_normal(k, -2.0, 2.0, s), shape)
  assert_same(lambda k, s: jax.random.uniform(k, s, jnp.bfloat16), shape)


@pytest.mark.parametrize("shape", [(), (3,), (2, 4)])
def test_split_and_fold_in_are_jaxs(shape):
  split = lambda k, s: jax.random.key_data(jax.random.split(k, s))   # noqa: E731
  assert_same(split, shape)
  for data in (0, 1, 12345, 2**31 + 5, 2**32 - 1):
    assert_same(lambda k, d: jax.random.key_data(jax.random.fold_in(k, d)), data)
  assert_same(lambda k: jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(
      k, jnp.arange(6, dtype=jnp.uint32))))


def test_without_partitionable_threefry_jaxs_functions_draw():
  with jax.threefry_partitionable(False):
    assert_same(lambda k, s: jax.random.bits(k, s), (3, 5))
    assert_same(lambda k, s: jax.random.key_data(jax.random.split(k, s)), (4,))


def test_64_bit_draws_are_jaxs():
  with jax.enable_x64(True):
    assert_same(lambda k, s: jax.random.bits(k, s, jnp.uint64), (9,))


def test_a_key_of_another_implementation_is_kept():
  key = jax.random.key(0, impl="rbg")
  assert init_rng.unrolled_key(key) is key


@pytest.mark.parametrize("gin, bindings", [
    ("dlrm_synthetic.gin", []), ("dcnv2_synthetic.gin", []),
    ("dcnv2_synthetic.gin", ["DCNv2.structure='parallel'", "DCNv2.low_rank=None"]),
    ("deepfm_synthetic.gin", []), ("two_tower_synthetic.gin", [])])
def test_dense_params_are_model_inits_with_a_plain_key(gin, bindings):
  """`state.init_dense` (the unrolled key) against the model's own `init` (jax's key): the
  values every run drew before the key was introduced."""
  launch.parse_gin([os.path.join(ROOT, "configs", gin)], bindings)
  config = launch.build(ExperimentConfig)
  dense = jnp.zeros((2, config.num_dense), jnp.float32)
  emb = jnp.zeros((2, len(config.features), 16), jnp.float32)
  key = jax.random.key(5)
  want = jax.jit(lambda k: config.model.init(k, dense, emb)["params"])(key)
  got = jax.jit(lambda k: state.init_dense(config, k, 16))(key)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda w, g: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
               want, got)
