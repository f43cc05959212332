"""DCNv2 (Wang et al., 2021): cross network plus deep network over all inputs."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from jaxrec.errors import ConfigError
from jaxrec.models.mlp import MLP, check_inputs, check_sizes, dense_layer

STRUCTURES = ("stacked", "parallel")


class CrossNetwork(nn.Module):
  """`x_{l+1} = x0 * (W_l x_l + b_l) + x_l`, for `num_layers` layers.

  With `low_rank = r`, `W_l = U_l V_l^T` (`[d, r] [r, d]`), i.e. a rank-`r` projection.

  Attributes:
    num_layers: number of cross layers (0 is the identity).
    low_rank: rank `r` of each `W_l`; `None` for full rank `[d, d]`.
    dtype: computation dtype.
  """

  num_layers: int
  low_rank: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x0):
    """`[B, d]` -> `[B, d]`."""
    d = x0.shape[-1]
    x = x0
    for i in range(self.num_layers):
      h = x
      if self.low_rank is not None:
        h = dense_layer(int(self.low_rank), self.dtype, use_bias=False, name=f"cross_{i}_v")(h)
      h = dense_layer(d, self.dtype, name=f"cross_{i}")(h)
      x = x0 * h + x
    return x


@gin.configurable
class DCNv2(nn.Module):
  """DCNv2 dense network over `x0 = concat(dense, flatten(emb))` `[B, num_dense + F*D]`.

  `stacked`: `logit = w . deep(cross(x0))`; `parallel`: `logit = w . [cross(x0), deep(x0)]`.

  Attributes:
    num_cross_layers: cross layers.
    low_rank: rank of the cross weights; `None` = full rank.
    deep_mlp: widths of the deep network (ReLU after every layer); may be empty.
    structure: `stacked` or `parallel`.
    dtype: computation dtype (parameters float32, logits float32).
  """

  num_cross_layers: int = 3
  low_rank: int | None = None
  deep_mlp: Sequence[int] = (512, 256)
  structure: str = "stacked"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, dense, emb):
    """`dense` `[B, num_dense]`, `emb` `[B, F, D]` -> logits float32 `[B]`."""
    b, f, d = check_inputs("DCNv2", dense, emb)
    if self.structure not in STRUCTURES:
      raise ConfigError(f"DCNv2.structure must be one of {STRUCTURES}, got '{self.structure}'")
    if int(self.num_cross_layers) < 0:
      raise ConfigError(f"DCNv2.num_cross_layers must be >= 0, got {self.num_cross_layers}")
    if self.low_rank is not None and int(self.low_rank) <= 0:
      raise ConfigError(f"DCNv2.low_rank must be positive or None, got {self.low_rank}")
    check_sizes("DCNv2.deep_mlp", self.deep_mlp, allow_empty=True)
    x0 = jnp.concatenate([dense, emb.reshape(b, f * d)], axis=-1).astype(self.dtype)
    cross = CrossNetwork(int(self.num_cross_layers), self.low_rank, self.dtype, name="cross")
    deep = MLP(self.deep_mlp, final_activation=True, dtype=self.dtype, name="deep_mlp")
    if self.structure == "stacked":
      h = deep(cross(x0))
    else:
      h = jnp.concatenate([cross(x0), deep(x0)], axis=-1)
    return MLP((1,), dtype=self.dtype, name="logit")(h)[:, 0].astype(jnp.float32)
