"""Two pieces of `local_ops` that replace slow XLA:CPU lowerings: `select` (the pooled
features' reorder to collection order, whose gradient is a gather instead of a scatter-add)
and `unique_inverse` (the per-device dedup, without a sort carrying positions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.embedding.local_ops import select, unique_inverse


@pytest.mark.parametrize("n, index", [
    (5, (3, 0, 4, 1, 2)),        # a permutation
    (7, (6, 2, 0, 5)),           # a selection: slots 1, 3, 4 (a slice's padding) dropped
    (4, (1, 2, 3)),              # in order, one dropped
])
def test_value_and_gradient_match_a_gather(n, index):
  rng = np.random.default_rng(n)
  x = jnp.asarray(rng.normal(size=(3, n, 2)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, len(index), 2)), jnp.float32)
  want, want_vjp = jax.vjp(lambda x: x[:, np.array(index)], x)
  got, got_vjp = jax.vjp(lambda x: select(x, index), x)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_vjp(g)[0], want_vjp(g)[0])
  np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: (select(x, index) * g).sum()))(x),
                                want_vjp(g)[0])


def test_identity_is_the_input():
  x = jnp.ones((2, 3, 4))
  assert select(x, (0, 1, 2)) is x


@pytest.mark.parametrize("case", ["random", "all_equal", "all_distinct", "sentinels"])
def test_unique_inverse_matches_jnp_unique(case):
  """The dedup of a stack's local rows (values in `[0, fill]`, `fill` the sentinel)."""
  rng = np.random.default_rng(1)
  fill, n = 40, 64
  x = {"random": rng.integers(0, fill + 1, n), "all_equal": np.full(n, 7),
       "all_distinct": rng.permutation(fill + 1)[:n], "sentinels": np.r_[np.full(n - 3, fill),
                                                                          [3, 0, 3]]}[case]
  x = jnp.asarray(x, jnp.int32)
  size = min(x.size, fill + 1)
  want_uniq, want_inv = jnp.unique(x, size=size, fill_value=fill, return_inverse=True)
  uniq, inv = jax.jit(unique_inverse, static_argnums=(1, 2))(x, size, fill)
  np.testing.assert_array_equal(uniq, want_uniq)
  np.testing.assert_array_equal(inv, want_inv.reshape(-1))
  assert inv.dtype == jnp.int32


def test_the_dedup_searches_on_cpu_and_keeps_jnp_unique_for_gpu():
  """`unique_inverse` picks its branch by the platform it is lowered for: on CPU the key
  sort and a binary search (a while loop), for CUDA `jnp.unique`'s one sort (lowered
  here without a GPU)."""
  f = jax.jit(lambda x: unique_inverse(x, 8, 40))
  x = jnp.zeros(8, jnp.int32)
  cpu, cuda = (f.trace(x).lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda"))
  assert cpu.count("stablehlo.sort") == 1 and "stablehlo.while" in cpu
  assert cuda.count("stablehlo.sort") == 1 and "stablehlo.while" not in cuda
