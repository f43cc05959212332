"""DCNv2 (Wang et al., 2021): cross network plus deep network over all inputs.

Each cross layer's output projection (`W_l`, or `U_l` when low-rank) starts at zero, so the
cross network starts as the identity (`x_{l+1} = x_l`) and learns from the first step (its
gradient is `x0 * dL/dx_{l+1}` times `x_l`; with low rank, `V_l` follows once `U_l` moves).
With the package's Glorot init instead, the cross terms of the unnormalised dense inputs
(13 `log(1 + count)` values, norm ~11, all >= 0) grew the input 2-4x over 3 layers, and
the shapes of `configs/dcnv2_synthetic.gin` started at a seed-dependent loss of up to 1.14
(logit mean up to 2.9; full-rank `parallel`: loss up to 4.7) against a label entropy of
0.57; with the cross network as the identity, 0.63-1.01 over seeds 0-3 (the deep
network's Glorot init sets the rest; measured 2026-12-07).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from jaxrec.errors import ConfigError
from jaxrec.models.mlp import (MLP, check_inputs, check_not_ending_in_one, check_sizes,
                               compute_dtype, dense_layer, flat_fields, is_int)

STRUCTURES = ("stacked", "parallel")


class CrossNetwork(nn.Module):
  """`x_{l+1} = x0 * (W_l x_l + b_l) + x_l`, for `num_layers` layers.

  With `low_rank = r`, `W_l = U_l V_l^T` (`[d, r] [r, d]`), i.e. a rank-`r` projection.
  `W_l` (or `U_l`) and `b_l` start at zero: the identity at init (see the module docstring).

  Attributes:
    num_layers: number of cross layers (0 is the identity).
    low_rank: rank `r` of each `W_l`; `None` for full rank `[d, d]`.
    dtype: the matmuls' operand dtype; the residual stream `x_l` (and `x0 * h`) stays
      float32 (each layer's `W_l x_l + b_l` leaves it as its float32 sum).
  """

  num_layers: int
  low_rank: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x0):
    """`[B, d]` -> float32 `[B, d]`."""
    d = x0.shape[-1]
    x0 = x0.astype(jnp.float32)
    x = x0
    for i in range(self.num_layers):
      h = x
      if self.low_rank is not None:
        h = dense_layer(int(self.low_rank), self.dtype, use_bias=False, name=f"cross_{i}_v")(h)
      h = dense_layer(d, self.dtype, name=f"cross_{i}", kernel_init=nn.initializers.zeros,
                      out_dtype=jnp.float32)(h)
      x = x0 * h + x
    return x


# `feature_dims` comes from the tables (`ExperimentConfig`): a binding of it is refused
@gin.configurable(denylist=["feature_dims"])
class DCNv2(nn.Module):
  """DCNv2 dense network over `x0 = concat(dense, flatten(emb))` `[B, num_dense + F*D]`
  (features of mixed dims: see `feature_dims`).

  `stacked`: `logit = w . deep(cross(x0))`; `parallel`: `logit = w . [cross(x0), deep(x0)]`.

  Attributes:
    num_cross_layers: cross layers.
    low_rank: rank of the cross weights, below the width `num_dense + F*D`; `None` = full
      rank (the only value with `num_cross_layers = 0`).
    deep_mlp: widths of the deep network (ReLU after every layer); may be empty.
    structure: `stacked` or `parallel`.
    dtype: computation dtype (parameters float32, logits float32).
    feature_dims: each feature's dim when the features' tables have mixed dims (set by
      `ExperimentConfig` from the tables, not bound): `emb` then comes padded to the widest
      and `x0` takes each feature's own columns (`flat_fields`), `[B, num_dense + sum]`.
  """

  num_cross_layers: int = 3
  low_rank: int | None = None
  deep_mlp: Sequence[int] = (512, 256)
  structure: str = "stacked"
  dtype: Any = jnp.float32
  feature_dims: Sequence[int] | None = None

  @nn.compact
  def __call__(self, dense, emb):
    """`dense` `[B, num_dense]`, `emb` `[B, F, D]` -> logits float32 `[B]`."""
    b, f, d = check_inputs("DCNv2", dense, emb)
    self.check_config()
    dtype = compute_dtype("DCNv2.dtype", self.dtype)
    # float32: the cross network's residual stream uses it as is; each Dense rounds its
    # input to `dtype` for the matmul.
    x0 = jnp.concatenate([dense, flat_fields("DCNv2", emb, self.feature_dims)],
                         axis=-1).astype(jnp.float32)
    width = x0.shape[-1]
    if self.low_rank is not None and self.low_rank >= width:
      # a [width, r] [r, width] product has rank <= width: full rank, with more parameters
      sizes = (f"{f} features x dim {d}" if self.feature_dims is None else
               f"{f} features of dims summing to {width - dense.shape[-1]}")
      raise ConfigError(f"DCNv2.low_rank = {self.low_rank} is not below the cross network's "
                        f"width {width} (num_dense {dense.shape[-1]} + {sizes}): it would "
                        "not be low-rank; use None for full rank")
    cross = CrossNetwork(int(self.num_cross_layers), self.low_rank, dtype, name="cross")
    deep = MLP(self.deep_mlp, final_activation=True, dtype=dtype, name="deep_mlp")
    if self.structure == "stacked":
      h = deep(cross(x0))
    else:
      h = jnp.concatenate([cross(x0), deep(x0)], axis=-1)
    return MLP((1,), dtype=dtype, out_dtype=jnp.float32, name="logit")(h)[:, 0]

  def check_config(self) -> None:
    """Raises ConfigError for a bad hyper-parameter that needs no input shapes (also called
    by `build_model`, so a typo stops a run when the config is read)."""
    if self.structure not in STRUCTURES:
      raise ConfigError(f"DCNv2.structure must be one of {STRUCTURES}, got '{self.structure}'")
    if not is_int(self.num_cross_layers) or self.num_cross_layers < 0:
      raise ConfigError(f"DCNv2.num_cross_layers must be an integer >= 0, got "
                        f"{self.num_cross_layers!r}")
    if self.low_rank is not None and (not is_int(self.low_rank) or self.low_rank <= 0):
      raise ConfigError(f"DCNv2.low_rank must be a positive integer or None, got "
                        f"{self.low_rank!r}")
    if self.low_rank is not None and self.num_cross_layers == 0:   # as TwoTower's contradictions
      raise ConfigError(f"DCNv2.low_rank = {self.low_rank} applies to cross layers, but "
                        "DCNv2.num_cross_layers = 0: bind DCNv2.low_rank = None, or add layers")
    check_sizes("DCNv2.deep_mlp", self.deep_mlp, allow_empty=True)
    check_not_ending_in_one("DCNv2.deep_mlp", self.deep_mlp)
