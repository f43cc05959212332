"""DLRM (Naumov et al., 2019): bottom MLP, pairwise dot interaction, top MLP."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.errors import ConfigError
from jaxrec.models.mlp import MLP, check_inputs, check_sizes, compute_dtype


def dot_interaction(bottom, emb):
  """Pairwise dot products of the `F + 1` vectors `[bottom] + emb`, without self pairs.

  Args:
    bottom: `[B, D]` bottom-MLP output.
    emb: `[B, F, D]` pooled embeddings.

  Returns:
    `[B, (F + 1) * F / 2]`: the strictly lower triangle of `T T^T` with
    `T = [bottom; emb]` `[B, F + 1, D]`, row-major (`(1,0), (2,0), (2,1), (3,0), ...`),
    the order of the DLRM reference.
  """
  t = jnp.concatenate([bottom[:, None, :], emb], axis=1)
  return _lower_gram(t)


@jax.custom_vjp
def _lower_gram(t):
  """`[B, n, D]` → `[B, n (n - 1) / 2]`, the strictly lower triangle of `t t^T`.

  Its own backward because autodiff of `einsum(t, t)` then a pair gather does two batched
  matmuls (one per use of `t`) and a scatter into `[B, n, n]`; the gradient is one
  matmul with the symmetric matrix of pair gradients, built by a gather:
  `dt = S t`, `S[i, j] = S[j, i] = dz[pair(i, j)]`, `S[i, i] = 0` (~2x faster on CPU)."""
  n = t.shape[1]
  rows, cols = np.tril_indices(n, k=-1)
  return jnp.einsum("bid,bjd->bij", t, t).reshape(t.shape[0], n * n)[:, rows * n + cols]


def _lower_gram_fwd(t):
  return _lower_gram(t), t


def _lower_gram_bwd(t, dz):
  n = t.shape[1]
  rows, cols = np.tril_indices(n, k=-1)
  pair = np.full((n, n), len(rows), np.int32)       # the diagonal reads the zero column
  pair[rows, cols] = pair[cols, rows] = np.arange(len(rows))
  s = jnp.concatenate([dz, jnp.zeros_like(dz[:, :1])], axis=1)[:, pair]   # [B, n, n]
  return (jnp.einsum("bij,bjd->bid", s, t).astype(t.dtype),)


_lower_gram.defvjp(_lower_gram_fwd, _lower_gram_bwd)


@gin.configurable
class DLRM(nn.Module):
  """DLRM dense network.

  `logit = top_mlp([x, dot_interaction(x, emb)])` with `x = bottom_mlp(dense)`.

  Attributes:
    bottom_mlp: widths of the bottom MLP (ReLU after every layer); the last must equal the
      embedding dim `D`.
    top_mlp: widths of the top MLP; the last must be 1 (the logit, no activation).
    dtype: the MLPs' matmul operand dtype, e.g. `'bfloat16'` for mixed precision
      (parameters, products' accumulation, the interaction and the logits stay float32).
  """

  bottom_mlp: Sequence[int] = (512, 256, 64, 16)
  top_mlp: Sequence[int] = (512, 256, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, dense, emb):
    """`dense` `[B, num_dense]`, `emb` `[B, F, D]` -> logits float32 `[B]`."""
    _, _, dim = check_inputs("DLRM", dense, emb)
    self.check_config()
    if int(self.bottom_mlp[-1]) != dim:
      raise ConfigError(
          f"DLRM.bottom_mlp = {tuple(self.bottom_mlp)} ends in width {self.bottom_mlp[-1]}, "
          f"but the embedding dim is {dim}; the last bottom layer must equal the embedding dim")
    if not dense.shape[-1]:   # a [0, width] bottom layer crashed in its initialiser
      raise ConfigError("ExperimentConfig.num_dense = 0: DLRM needs dense features (its "
                        "bottom MLP turns them into an interaction field); DCNv2 and DeepFM "
                        "train without them (build_model.name)")
    dtype = compute_dtype("DLRM.dtype", self.dtype)
    x = MLP(self.bottom_mlp, final_activation=True, dtype=dtype, out_dtype=jnp.float32,
            name="bottom_mlp")(dense.astype(dtype))
    # The interaction stays float32: it is ~1% of the FLOPs, and rounding the pooled
    # embeddings to bfloat16 fused into their lookup made that fusion 2x slower on CPU.
    z = dot_interaction(x, emb.astype(jnp.float32))
    # The logit leaves the last layer as its float32 sum: rounded to bfloat16 it kept ~3
    # significant digits (~200 distinct values in a batch of 4096, ties for the AUC).
    out = MLP(self.top_mlp, dtype=dtype, out_dtype=jnp.float32, name="top_mlp")(
        jnp.concatenate([x, z], -1))
    return out[:, 0]

  def check_config(self) -> None:
    """Raises ConfigError for a bad hyper-parameter that needs no input shapes (also called
    by `build_model`, so a bad binding stops a run when the config is read)."""
    check_sizes("DLRM.bottom_mlp", self.bottom_mlp)
    check_sizes("DLRM.top_mlp", self.top_mlp)
    if int(self.top_mlp[-1]) != 1:
      raise ConfigError(f"DLRM.top_mlp = {tuple(self.top_mlp)} must end in 1 unit (the logit)")
