"""Data order: keyed permutations, epochs, process slices."""

import numpy as np
import pytest

from jaxrec.data import indexing


@pytest.mark.parametrize("n", [1, 2, 3, 10, 97, 1000, 4099])
def test_permute_is_a_bijection(n):
  p = indexing.permute(np.arange(n), n, indexing.key(7, 0))
  np.testing.assert_array_equal(np.sort(p), np.arange(n))


def test_permute_depends_on_key_and_shuffles():
  n = 10000
  a = indexing.permute(np.arange(n), n, indexing.key(1, 0)).astype(float)
  b = indexing.permute(np.arange(n), n, indexing.key(1, 1)).astype(float)
  assert (a != b).mean() > 0.99
  assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05
  assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.05


def test_epochs_cover_every_example_once():
  n = 37
  idx = indexing.example_indices(np.arange(3 * n), n, seed=5, shuffle=True)
  for e in range(3):
    np.testing.assert_array_equal(np.sort(idx[e * n:(e + 1) * n]), np.arange(n))
  assert not np.array_equal(idx[:n], idx[n:2 * n])  # a fresh order per epoch
  np.testing.assert_array_equal(indexing.example_indices(np.arange(2 * n), n, 5, False),
                                np.tile(np.arange(n), 2))
  np.testing.assert_array_equal(indexing.example_indices(np.arange(5), None, 5, True),
                                np.arange(5))


def test_local_positions_partition_the_global_batch():
  for procs in [1, 2, 4, 8]:
    parts = [indexing.local_positions(96, 64, p, procs) for p in range(procs)]
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(96, 160))
