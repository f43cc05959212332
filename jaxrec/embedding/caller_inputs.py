"""What a caller of the embedding collection hands it, checked or converted: eager calls
(`concrete`: run jitted), tables for `stack_tables` (`as_table`), per-id weights as the
packed ids' bits (`weight_bits`, not differentiable) and packed ids beside weights
(`check_packed_alone`)."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jaxrec.errors import ConfigError
from jaxrec.kernels import quant


def concrete(*trees) -> bool:
  """Whether no leaf of `trees` is traced: an eager call (not under jit, grad or vmap)."""
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def as_table(x, dtype: str):
  """A table's array for `stack_tables` in its spec's dtype (an int8 table: quantized; a
  `QuantizedTable` as it is): the stack took the given arrays' dtype."""
  if isinstance(x, quant.QuantizedTable):
    return x
  x = jnp.asarray(x)
  return quant.quantize(x.astype(jnp.float32)) if dtype == "int8" else x.astype(dtype)


@jax.custom_jvp
def weight_bits(w):
  """Per-id weights as the int32 bits the packed ids carry."""
  return jax.lax.bitcast_convert_type(w, jnp.int32)


@weight_bits.defjvp
def _weight_bits_jvp(primals, tangents):
  del primals, tangents   # only called when the weights are differentiated
  raise ConfigError("gradients with respect to per-id weights are not supported: the "
                    "lookup carries them as bits, and jax.grad gave zeros; differentiate "
                    "the tables or the pooled activations instead")


def check_packed_alone(ids, weights, where: str) -> None:
  """ConfigError for `weights` given beside packed ids (`pack`): the packed array carries
  the weighted features' weights, so separate ones would be ignored."""
  if not isinstance(ids, Mapping) and weights:
    raise ConfigError(f"{where}: ids are packed (`pack`), which already holds the weights, "
                      f"but weights for {sorted(weights)} were passed too (pass them to "
                      "`pack`, or ids by feature with their weights)")
