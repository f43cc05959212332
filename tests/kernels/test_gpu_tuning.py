"""`platform.GpuTuning`, the kernels' Triton launch settings: gin-configurable for another
GPU than the H200 the defaults were swept on, checked, and overridden by `platform.tuned`."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import launch
from jaxrec.errors import ConfigError
from jaxrec.kernels import lookup_pool, platform
from tests.kernels.kernel_helpers import lower_for_gpu


@pytest.fixture(autouse=True)
def _clean():
  gin.clear_config()
  jax.clear_caches()
  yield
  gin.clear_config()
  jax.clear_caches()


def _lowered() -> str:
  table = jnp.zeros((64, 128), jnp.float32)
  idx, w = jnp.zeros((256, 2), jnp.int32), jnp.ones((256, 2), jnp.float32)
  return lower_for_gpu(
      lambda t, i, v: lookup_pool(t, i, v, kernel="pallas", interpret=False), table, idx, w)


def test_gin_bindings_reach_the_traced_kernels():
  """`GpuTuning.num_warps = 8` in a gin file or binding: the Triton call is launched with 8
  warps and 2048-element programs (16 bags of 128 columns: 16 programs for 256 bags)."""
  default = _lowered()
  assert "num_warps = 4" in default and "grid_x = 256 :" not in default
  launch.parse_gin([], ["GpuTuning.num_warps = 8", "GpuTuning.lookup_block = 2048"])
  assert platform.tuning() == platform.GpuTuning(num_warps=8, lookup_block=2048)
  jax.clear_caches()
  text = _lowered()
  assert "num_warps = 8" in text and "grid_x = 16 :" in text
  with platform.tuned(platform.GpuTuning(num_warps=2)):   # the sweep's override wins
    assert platform.tuning().num_warps == 2


@pytest.mark.parametrize("kwargs, says", [
    ({"num_warps": 3}, "GpuTuning.num_warps must be a power of two (Triton), got 3"),
    ({"num_stages": 0}, "GpuTuning.num_stages must be a positive integer, got 0"),
    ({"lookup_block": 1024.5}, "GpuTuning.lookup_block must be a positive integer, got 1024.5"),
    ({"update_block": True}, "GpuTuning.update_block must be a positive integer, got True"),
    ({"num_stages": np.True_}, "GpuTuning.num_stages must be a positive integer, got "
                               "np.True_"),
    ({"unroll_slots": 1}, "GpuTuning.unroll_slots must be True or False, got 1"),
])
def test_bad_settings_are_refused_by_name(kwargs, says):
  with pytest.raises(ConfigError) as e:
    platform.GpuTuning(**kwargs)
  assert str(e.value).splitlines()[0] == says   # (gin adds the configurable's name below)


def test_whole_floats_and_numpy_integers_are_counts():
  """`lookup_block=2e3` (gin writes it as a float) was refused while `uniform_tables.rows`,
  `OffloadConfig` sizes and (now) `ExperimentConfig.batch_size` take whole floats."""
  tuning = platform.GpuTuning(lookup_block=2e3, num_warps=np.int64(8))
  assert (tuning.lookup_block, tuning.num_warps) == (2000, 8)
  assert type(tuning.lookup_block) is int and type(tuning.num_warps) is int
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  config = ExperimentConfig(embedding=None, model=None, batch_size=128.0,
                            num_eval_examples=1e3, eval_batch_size=np.int32(256))
  assert (config.batch_size, config.num_eval_examples, config.eval_batch_size) == (128, 1000,
                                                                                  256)
  assert all(type(v) is int for v in (config.batch_size, config.num_eval_examples,
                                       config.eval_batch_size))


def test_a_bad_gin_binding_is_refused_when_the_kernels_are_traced():
  launch.parse_gin([], ["GpuTuning.num_warps = 6"])
  with pytest.raises(ConfigError, match="GpuTuning.num_warps must be a power of two"):
    platform.tuning()
