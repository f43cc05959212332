"""Test set-up: 8 host CPU devices for mesh tests, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The planner reads a cached calibration (scripts/plan.py --calibrate) from the user's
# cache; tests get an empty cache of their own so their plans do not depend on the machine.
import tempfile  # noqa: E402
os.environ["JAXREC_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxrec_test_cache_")

import jaxrec  # noqa: E402,F401  (adds its XLA flag workarounds before jax starts)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_gin():
  """Gin bindings are process-global: no test sees another's config."""
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  yield
  gin.clear_config()
