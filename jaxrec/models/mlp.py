"""Dense building blocks shared by the models: the MLP, the input check and the
flattening of features of mixed dims.

Initialisation follows the DLRM reference for weights: normal with std
`sqrt(2 / (fan_in + fan_out))` (Glorot normal, untruncated); biases start at zero. It keeps
activation variance roughly constant through the ReLU stacks used here and matches what
DLRM/TorchRec comparisons expect.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.errors import ConfigError
from jaxrec.kernels import quant

KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
BIAS_INIT = nn.initializers.zeros


def _dot(a, b, contracting):
  """`dot_general` of `a` and `b` over `contracting` (no batch dims), accumulated and
  returned in float32 whatever the operand dtype."""
  return jax.lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32)


def _kernel_grad(x, g):
  """`x^T g`: `[rows, in]`, `[rows, out]` → float32 `[in, out]`.

  float32: one dot contracting the rows. bfloat16: XLA:CPU runs a dot in bfloat16 only when
  each operand contracts its last dimension in row-major layout; otherwise it converts
  both operands to float32 first (the contraction over rows here, and a plain transpose,
  which XLA folds back into the dot or leaves column-major). `x^T` is therefore written
  as a padded copy (`[in + pad, rows]`, a real row-major array) and the pad rows of the
  product are dropped: the bfloat16 dot then runs at ~2x the float32 rate on CPUs with
  AVX512-BF16 (one 512x512x256 product: 0.9 vs 1.1 ms, 367x512x512: 0.78 vs 1.18 ms).
  """
  if x.dtype != jnp.bfloat16:
    return _dot(x, g, ((0,), (0,)))
  n_in = x.shape[1]
  pad = -n_in % 8 or 8
  x_t = jnp.concatenate([x.T, jnp.zeros((pad, x.shape[0]), x.dtype)], axis=0)
  return _dot(x_t, g, ((1,), (0,)))[:n_in]


def affine(x, kernel, bias, out_dtype=None):
  """`x @ kernel + bias`: `[..., in]`, `[in, out]`, `[out]` (or None) → `[..., out]`.

  `x` in the compute dtype (float32, or bfloat16 for mixed precision); `kernel` is rounded
  to it for the matmuls (a float32 kernel keeps its gradient float32: the float32 sum, not
  a bfloat16 rounding of it); the products accumulate in float32, the bias (any float
  dtype) is added in float32, and the result is rounded to
  `out_dtype` (default: the operands' dtype; float32 keeps the float32 sum, e.g. for a
  logit, which rounded to bfloat16 keeps only ~3 significant digits). Its own backward: the
  kernel gradient is one dot contracting the batch that yields `[in, out]` directly
  (`_kernel_grad`). Autodiff of `x @ kernel` yields `[out, in]` plus a transpose that XLA
  folds into the dot on one device; with a batch-sharded mesh the gradient all-reduce sits
  between them, and every device then transposes every kernel gradient in the update (a
  strided copy the size of the layer).
  """
  return _affine(x, kernel, bias, jnp.dtype(x.dtype if out_dtype is None else out_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _affine(x, kernel, bias, out_dtype):
  y = _dot(x, kernel.astype(x.dtype), ((x.ndim - 1,), (0,)))
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype)


def _affine_fwd(x, kernel, bias, out_dtype):
  return _affine(x, kernel, bias, out_dtype), (x, kernel, bias)


def _affine_bwd(out_dtype, res, g):
  del out_dtype
  x, kernel, bias = res
  d_bias = (None if bias is None
            else g.reshape(-1, g.shape[-1]).astype(jnp.float32).sum(axis=0).astype(bias.dtype))
  g = g.astype(x.dtype)
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  d_kernel = _kernel_grad(x2, g2)                                          # [in, out]
  d_x = _dot(g, kernel.astype(x.dtype), ((g.ndim - 1,), (1,)))             # [..., in]
  return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype), d_bias


_affine.defvjp(_affine_fwd, _affine_bwd)


class Dense(nn.Module):
  """A dense layer (`nn.Dense`'s parameters, names and dtype rules) computed by `affine`.

  Attributes:
    features: output width.
    use_bias: add a bias.
    dtype: computation dtype: the input and the kernel are rounded to it for the matmul,
      which accumulates in float32 (`affine`); `'bfloat16'` is mixed precision (parameters
      and their gradients stay float32, the bias is added in float32).
    kernel_init: the kernel's initialiser (default `KERNEL_INIT`).
    out_dtype: the output's dtype (default: `dtype`); float32 keeps the float32 sum.
  """

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = KERNEL_INIT
  out_dtype: Any = None

  @nn.compact
  def __call__(self, x):
    """`[..., in]` → `[..., features]`."""
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = (self.param("bias", BIAS_INIT, (self.features,), jnp.float32)
            if self.use_bias else None)
    dtype = compute_dtype("Dense.dtype", self.dtype)
    # Only `x` is cast here: `affine` rounds the float32 kernel for its matmuls, so the
    # kernel gradient it returns is the float32 sum (with the cast here, its transpose
    # rounded the gradient to bfloat16), and it adds the float32 bias.
    return affine(jnp.asarray(x, dtype), kernel, bias, self.out_dtype)


def dense_layer(features: int, dtype: Any = jnp.float32, use_bias: bool = True,
                name: str | None = None, kernel_init: Any = KERNEL_INIT,
                out_dtype: Any = None) -> Dense:
  """`Dense` with the package's initialisers (or `kernel_init`); params float32, compute in
  `dtype`, output in `out_dtype` (default `dtype`)."""
  return Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, name=name,
               out_dtype=out_dtype)


class MLP(nn.Module):
  """Stack of dense layers with ReLU between them.

  Attributes:
    layer_sizes: output width of each layer; empty is the identity.
    final_activation: also apply ReLU after the last layer.
    dtype: computation dtype (parameters stay float32).
    out_dtype: the last layer's output dtype (default `dtype`); float32 for a logit or an
      output that leaves the MLP for float32 math, so it is not rounded to bfloat16.
  """

  layer_sizes: Sequence[int]
  final_activation: bool = False
  dtype: Any = jnp.float32
  out_dtype: Any = None

  @nn.compact
  def __call__(self, x):
    """`[..., in]` -> `[..., layer_sizes[-1]]`."""
    n = len(self.layer_sizes)
    for i, size in enumerate(self.layer_sizes):
      x = dense_layer(int(size), self.dtype, name=f"layer_{i}",
                      out_dtype=self.out_dtype if i == n - 1 else None)(x)
      if i < n - 1 or self.final_activation:
        x = nn.relu(x)
    return x


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, value) -> Any:
  """The compute dtype a model's `dtype` attribute names: float32, or bfloat16 (mixed
  precision). Accepts those names and their short forms (`quant.DTYPE_ALIASES`: `f32`,
  `fp32`, `bf16`) in any case, the dtype objects (`jnp.bfloat16`, `np.float32`,
  `jnp.dtype('bfloat16')`) and None (float32). Anything else, float16 included (it needs
  loss scaling, which jaxrec does not do), raises a ConfigError naming the binding `name`,
  e.g. `DLRM.dtype`."""
  if value is None:
    return jnp.float32
  if isinstance(value, str):
    key = value.strip().lower()
    dtype_name = quant.DTYPE_ALIASES.get(key, key)
  else:
    dtype_name = quant.dtype_name(value)
  found = COMPUTE_DTYPES.get(dtype_name)
  if found is None:
    hint = (": float16 would need loss scaling, which jaxrec does not do; use 'bfloat16'"
            if quant.dtype_name(dtype_name) == "float16" else "")
    raise ConfigError(f"{name} must be 'float32' or 'bfloat16' (mixed precision; also "
                      f"'bf16'), got {value!r}{hint}")
  return found


def check_inputs(model: str, dense, emb) -> tuple[int, int, int]:
  """Checks `dense` `[B, num_dense]` and `emb` `[B, F, D]`; returns `(B, F, D)`."""
  if dense.ndim != 2 or emb.ndim != 3 or dense.shape[0] != emb.shape[0]:
    raise ConfigError(f"{model}: expected dense [B, num_dense] and emb [B, F, D], got "
                      f"{tuple(dense.shape)} and {tuple(emb.shape)}")
  return tuple(int(s) for s in emb.shape)


def check_feature_dims(model: str, feature_dims: Sequence[int], f: int, d: int) -> list[int]:
  """`feature_dims` as ints; `ConfigError` unless it has `f` dims, the widest `d` (emb
  `[B, f, d]`)."""
  dims = [int(x) for x in feature_dims]
  if len(dims) != f or max(dims, default=0) != d:
    raise ConfigError(f"{model}.feature_dims has {len(dims)} dims (widest "
                      f"{max(dims, default=0)}) for emb of {f} features padded to dim {d}; "
                      "it is set from the config's features, not bound by hand")
  return dims


def flat_fields(model: str, emb, feature_dims: Sequence[int] | None):
  """`emb` `[B, F, D]` -> `[B, sum(dims)]`: each feature's embedding, in order.

  Features of mixed dims arrive padded with zero columns to the widest (`D`); feature `i`
  keeps its first `feature_dims[i]` columns. `None` (one dim): a reshape to `[B, F*D]`.
  Up to `MAX_SLICED_RUNS` runs of consecutive features of one dim are sliced, a run at a
  time; more are one gather of the kept columns: each slice's gradient is a pad to the
  whole `[B, F, D]`, so interleaved dims cost runs x B*F*D (1,000 features of dims 8/16/32
  at random, 672 runs: a 71 s compile and 1.3 s steps; the gather's backward is linear)."""
  b, f, d = emb.shape
  if feature_dims is None:
    return emb.reshape(b, f * d)
  dims = check_feature_dims(model, feature_dims, f, d)
  starts = [0] + [i for i in range(1, f) if dims[i] != dims[i - 1]]
  if len(starts) > MAX_SLICED_RUNS:
    kept = np.concatenate([i * d + np.arange(k) for i, k in enumerate(dims)])
    return jnp.asarray(emb).reshape(b, f * d).at[:, kept].get(   # a numpy `emb` (serving
        indices_are_sorted=True, unique_indices=True)              # an export) has no `.at`
  runs = [emb[:, s:e, :dims[s]].reshape(b, (e - s) * dims[s])
          for s, e in zip(starts, starts[1:] + [f])]
  return runs[0] if len(runs) == 1 else jnp.concatenate(runs, axis=-1)


# `flat_fields` slices up to this many runs of one dim (1,000 features in 3 runs: 2.5 ms
# for the slices' forward and backward at batch 64, 5.0 ms for the gather); more, it gathers.
MAX_SLICED_RUNS = 4


def is_int(value) -> bool:
  """An integer (Python or numpy), not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sizes(name: str, sizes: Sequence[int], allow_empty: bool = False) -> None:
  """Raises ConfigError unless `sizes` is a (non-empty) sequence of positive ints."""
  if (not isinstance(sizes, (list, tuple)) or (not allow_empty and not sizes)
      or any(not is_int(s) or s <= 0 for s in sizes)):
    raise ConfigError(f"{name} must be a {'' if allow_empty else 'non-empty '}sequence of "
                      f"positive integer layer widths, got {sizes!r}")


def check_not_ending_in_one(name: str, sizes: Sequence[int]) -> None:
  """Raises ConfigError for a hidden MLP `sizes` ending in width 1 that a model follows
  with a ReLU and its own 1-unit logit layer (DCNv2's and DeepFM's `deep_mlp`): written as
  DLRM's `top_mlp` is, it squeezed the network through one ReLU unit (DCNv2 on
  configs/dcnv2_synthetic.gin trained to eval AUC 0.5000)."""
  if sizes and int(sizes[-1]) == 1:
    raise ConfigError(f"{name} = {tuple(sizes)} ends in width 1, but the model adds its own "
                      "1-unit logit layer after it, with a ReLU between: its output would "
                      f"pass through one ReLU unit; drop the last 1 ({name} = "
                      f"{tuple(sizes[:-1])})")
