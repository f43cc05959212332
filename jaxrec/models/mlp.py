"""Dense building blocks shared by the models: the MLP and the input check.

Initialisation follows the DLRM reference for weights: normal with std
`sqrt(2 / (fan_in + fan_out))` (Glorot normal, untruncated); biases start at zero. It keeps
activation variance roughly constant through the ReLU stacks used here and matches what
DLRM/TorchRec comparisons expect.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxrec.errors import ConfigError

KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
BIAS_INIT = nn.initializers.zeros


def dense_layer(features: int, dtype: Any = jnp.float32, use_bias: bool = True,
                name: str | None = None) -> nn.Dense:
  """`nn.Dense` with the package's initialisers; params float32, compute in `dtype`."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=KERNEL_INIT, bias_init=BIAS_INIT, name=name)


class MLP(nn.Module):
  """Stack of dense layers with ReLU between them.

  Attributes:
    layer_sizes: output width of each layer; empty is the identity.
    final_activation: also apply ReLU after the last layer.
    dtype: computation dtype (parameters stay float32).
  """

  layer_sizes: Sequence[int]
  final_activation: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """`[..., in]` -> `[..., layer_sizes[-1]]`."""
    n = len(self.layer_sizes)
    for i, size in enumerate(self.layer_sizes):
      x = dense_layer(int(size), self.dtype, name=f"layer_{i}")(x)
      if i < n - 1 or self.final_activation:
        x = nn.relu(x)
    return x


def check_inputs(model: str, dense, emb) -> tuple[int, int, int]:
  """Checks `dense` `[B, num_dense]` and `emb` `[B, F, D]`; returns `(B, F, D)`."""
  if dense.ndim != 2 or emb.ndim != 3 or dense.shape[0] != emb.shape[0]:
    raise ConfigError(f"{model}: expected dense [B, num_dense] and emb [B, F, D], got "
                      f"{tuple(dense.shape)} and {tuple(emb.shape)}")
  return tuple(int(s) for s in emb.shape)


def check_sizes(name: str, sizes: Sequence[int], allow_empty: bool = False) -> None:
  """Raises ConfigError unless `sizes` is a (non-empty) sequence of positive ints."""
  if (not allow_empty and not sizes) or any(int(s) <= 0 for s in sizes):
    raise ConfigError(f"{name} must be a {'' if allow_empty else 'non-empty '}sequence of "
                      f"positive layer widths, got {tuple(sizes)}")
