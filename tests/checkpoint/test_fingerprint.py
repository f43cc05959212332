"""Checkpoint fingerprints: numpy pieces of an array add up to the device fingerprint."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.checkpoint import canonical


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "float16", "int32"])
def test_row_pieces_sum_to_the_fingerprint(dtype, monkeypatch):
  """`fingerprint_np` goes over row pieces (a save's 1.2 GB piece of a table needed 1.2 GB
  of temporaries more, whole): small pieces, and blocks placed at an offset, give the
  device fingerprint of the whole array."""
  x = (np.random.default_rng(0).normal(size=(1003, 24)) * 50).astype(jnp.dtype(dtype))
  want = int(canonical.fingerprint(jnp.asarray(x)))
  assert canonical.fingerprint_np(x, x.shape) == want
  monkeypatch.setattr(canonical, "_FINGERPRINT_ROWS_BYTES", 7 * x[0].nbytes + 3)
  assert canonical.fingerprint_np(x, x.shape) == want
  top, bottom = x[:500], x[500:]
  parts = canonical.fingerprint_np(top, x.shape) + canonical.fingerprint_np(
      bottom, x.shape, (500,))
  assert parts & 0xFFFFFFFF == want
  v = x[:, 0].copy()   # one axis
  assert canonical.fingerprint_np(v, v.shape) == int(canonical.fingerprint(jnp.asarray(v)))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_temporaries_are_a_piece_not_the_block(dtype):
  """Whole, a block's uint32 temporaries were its size (4x for int8 codes): a save's 1.2 GB
  piece of a table needed 1.2 GB more. They are now ~16 MiB of words a piece."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  x = np.ones((2**20, 32), jnp.dtype(dtype))   # 128 MiB of words either way
  tracemalloc.start()
  try:
    canonical.fingerprint_np(x, x.shape)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 3 * canonical._FINGERPRINT_ROWS_BYTES, peak   # pylint: disable=protected-access
