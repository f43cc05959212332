"""Test set-up: 8 host CPU devices for mesh tests, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402


def _session_dir(prefix: str) -> str:
  """A fresh directory, removed when this process exits."""
  path = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


# The planner reads a cached calibration (scripts/plan.py --calibrate) from the user's
# cache; tests get an empty cache of their own so their plans do not depend on the machine.
os.environ["JAXREC_CACHE_DIR"] = _session_dir("jaxrec_test_cache_")
# XLA executables that took over a second to compile are kept on disk for the test session
# (the pytest-xdist workers and the scripts the tests run inherit the directory): the many
# restarts and resumes of scripts/train.py on the same small configs then load their train
# step instead of compiling it again (~5 s of a 12 s run; the suite ~12 → ~10.5 min).
# Keys hash the program and the XLA flags, so a changed program or device count compiles.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_dir("jaxrec_test_xla_cache_")

import jaxrec  # noqa: E402,F401  (adds its XLA flag workarounds before jax starts)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_gin():
  """Gin bindings are process-global: no test sees another's config."""
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  yield
  gin.clear_config()
