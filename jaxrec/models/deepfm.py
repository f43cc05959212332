"""DeepFM (Guo et al., 2017): first-order + FM second-order + deep network.

Embeddings arrive pooled, so there is no separate 1-d "weight table" for the first-order
term. We use a linear layer over `concat(dense, flatten(emb))` instead: a learned scalar
per dense feature and per (feature, dim) coordinate, i.e. each id's first-order weight is a
learned projection of its embedding. Dense features also enter the FM as one extra field:
a linear projection of `dense` to `D` (none when there are no dense features).

Initialisation follows the FM convention (libFM: linear weights 0, factors small): the
first-order layer and the dense field's projection start at zero, so the FM starts as the
FM of the embedding fields (rows uniform in `+-TableSpec.scale`, norm ~0.007-0.1 for
`configs/deepfm_synthetic.gin`) and the initial logit is the deep network's, O(0.3). Both
layers learn from the first step (their inputs are non-zero). With the package's Glorot
init instead, the dense field (13 unnormalised `log(1 + count)` inputs, norm ~11) had norm
~10 and was part of `d logit / d emb` for every field, so the first sparse SGD steps (lr
1.0) threw hot rows far out: the loss went 0.73, 4.0, 16.6 over steps 1-3; and the
first-order term, over all-positive inputs, shifted the initial logit by a seed-dependent
O(1) offset.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from jaxrec.models.mlp import (MLP, check_inputs, check_not_ending_in_one, check_sizes,
                               compute_dtype, dense_layer)


def fm_second_order(v):
  """Sum over field pairs `i < j` of `<v_i, v_j>`; `[B, fields, D]` -> `[B]`."""
  s = v.sum(axis=1)
  return 0.5 * (s * s - (v * v).sum(axis=1)).sum(axis=-1)


@gin.configurable
class DeepFM(nn.Module):
  """DeepFM dense network: `logit = first_order + fm + deep`.

  `first_order` and the dense field's projection are zero at init (see the module
  docstring); the deep network uses the package's Glorot init.

  Attributes:
    deep_mlp: widths of the deep network on `concat(dense, flatten(emb))` (ReLU after every
      layer), followed by a 1-unit linear layer.
    dtype: computation dtype (parameters float32, logits float32).
  """

  deep_mlp: Sequence[int] = (400, 400, 400)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, dense, emb):
    """`dense` `[B, num_dense]`, `emb` `[B, F, D]` -> logits float32 `[B]`."""
    b, f, d = check_inputs("DeepFM", dense, emb)
    self.check_config()
    dtype = compute_dtype("DeepFM.dtype", self.dtype)
    f32 = jnp.float32
    flat = jnp.concatenate([dense, emb.reshape(b, f * d)], axis=-1).astype(dtype)
    zeros = nn.initializers.zeros
    # The three terms of the logit are float32: the layers' outputs are their float32 sums
    # and the FM (elementwise, `s^2 - sum v^2` cancels) runs on the float32 embeddings;
    # in bfloat16 the logit kept ~3 significant digits.
    first = dense_layer(1, dtype, name="first_order", kernel_init=zeros, out_dtype=f32)(
        flat)[:, 0]
    fields = emb.astype(f32)
    # Without dense features (ExperimentConfig.num_dense = 0) there is no dense field: its
    # layer would have a [0, D] kernel, which the backward could not reshape and orbax
    # cannot save.
    if dense.shape[-1]:
      dense_field = dense_layer(d, dtype, use_bias=False, name="dense_field",
                                kernel_init=zeros, out_dtype=f32)(dense.astype(dtype))
      fields = jnp.concatenate([dense_field[:, None, :], fields], axis=1)
    fm = fm_second_order(fields)
    deep = MLP(tuple(self.deep_mlp) + (1,), final_activation=False, dtype=dtype,
               out_dtype=f32, name="deep_mlp")(flat)[:, 0]
    return first + fm + deep

  def check_config(self) -> None:
    """Raises ConfigError for a bad hyper-parameter that needs no input shapes (also called
    by `build_model`, so a bad binding stops a run when the config is read)."""
    check_sizes("DeepFM.deep_mlp", self.deep_mlp, allow_empty=True)
    check_not_ending_in_one("DeepFM.deep_mlp", self.deep_mlp)
