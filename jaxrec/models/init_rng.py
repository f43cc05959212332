"""The key the dense parameters are initialised from: jax's `threefry2x32` keys and bits,
computed by the unrolled `table_init.threefry2x32`.

On CPU jax lowers its threefry to a while loop, one per parameter drawn and per key split
or fold, and XLA compiles each apart: a 1,000-feature DCNv2's init compiled in 1.1-1.2 s on
one CPU device, 0.8-1.05 s with this key (replicated on 8: 1.7-3.4 s, 1.0-1.9 s), and ran
twice as fast. The values are jax's own bit for bit (`tests/models/test_init_rng.py`): its
partitionable threefry (`jax_threefry_partitionable`, jax's default) numbers the elements
of an array of `shape` row-major and takes `b1 ^ b2` of threefry(key, (i >> 32, i &
0xFFFFFFFF)) for element `i`, which is what is computed here. With that option off, and
for 64-bit draws or 2**32 elements or more, jax's functions run.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import random as jex_random

from jaxrec.embedding.table_init import threefry2x32

_JAX = jex_random.threefry_prng_impl
_BITS = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}


def _unrolled(size: int) -> bool:
  """Whether jax's partitionable numbering applies to `size` elements with a zero high word."""
  return bool(jax.config.jax_threefry_partitionable) and size < 2**32


def _counts(shape) -> jax.Array:
  """uint32 `shape`: the row-major element index (the counter's low word)."""
  return lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)


def _random_bits(key: jax.Array, bit_width: int, shape) -> jax.Array:
  """Random bits `shape` of key data `key` uint32 `[2]`, as jax's threefry draws them."""
  shape = tuple(shape)
  if bit_width not in _BITS or not shape or not _unrolled(math.prod(shape)):
    return _JAX.random_bits(key, bit_width, shape)
  lo = _counts(shape)
  b1, b2 = threefry2x32(key[0], key[1], jnp.zeros_like(lo), lo)
  return (b1 ^ b2).astype(_BITS[bit_width])


def _split(key: jax.Array, shape) -> jax.Array:
  """uint32 `[*shape, 2]`: key data of `jax.random.split(key, shape)`."""
  shape = tuple(shape)
  if not shape or not _unrolled(math.prod(shape)):
    return _JAX.split(key, shape)
  lo = _counts(shape)
  return jnp.stack(threefry2x32(key[0], key[1], jnp.zeros_like(lo), lo), axis=-1)


def _fold_in(key: jax.Array, data) -> jax.Array:
  """uint32 `[2]`: key data of `jax.random.fold_in(key, data)` (threefry of `(0, data)`)."""
  data = jnp.asarray(data, jnp.uint32)
  return jnp.stack(threefry2x32(key[0], key[1], jnp.zeros_like(data), data))


UNROLLED_THREEFRY = jex_random.define_prng_impl(
    key_shape=(2,), seed=_JAX.seed, split=_split, random_bits=_random_bits, fold_in=_fold_in,
    name="threefry2x32_unrolled", tag="fry_u")


def unrolled_key(key: jax.Array) -> jax.Array:
  """A threefry2x32 typed `key` as a key of `UNROLLED_THREEFRY`: the same key data, so every
  key split or folded from it and every value drawn from it are the same. A key of another
  implementation (`jax_default_prng_impl`) is returned as it is."""
  if str(jax.random.key_impl(key)) != "threefry2x32":
    return key
  return jax.random.wrap_key_data(jax.random.key_data(key), impl=UNROLLED_THREEFRY)
