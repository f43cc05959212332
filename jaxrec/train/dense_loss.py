"""The dense model's loss and gradients on each device's own examples, one all-reduce.

Under plain `jit` the SPMD partitioner all-reduces each dense parameter's gradient on its
own, and XLA combines them into one all-reduce of a tuple of ~15 buffers. On XLA:CPU
every buffer of a tuple all-reduce costs about what a separate collective does: on 8 host
devices the DLRM criteo gradients (1.9 MB in 14 buffers) took 3.1–5.2 ms to reduce as a
tuple, 1.6–2.1 ms as one flat buffer; across processes over gloo a second buffer of one
float added ~2.4 ms to a 1.9 MB all-reduce (8.7–9.5 vs 11.1–11.9 ms).

`per_device_value_and_grad` runs the model's forward and backward in a `shard_map` over
the batch axes, each device on its own examples, and sums the parameter gradients and the
loss value in one all-reduce of one flat vector (`ravel_pytree`; packing it is one copy of
the gradients). The pooled embeddings' gradient stays on its device, batch-sharded like
the embeddings, for the collection's backward.

On GPUs this is unmeasured. There XLA combines the per-parameter all-reduces too, so the
reduction already waited for the whole backward; one buffer changes that only for dense
models past the combiner's threshold (tens of MB), which could overlap reductions before.

Only for losses that are a mean over examples (`bce`). An in-batch softmax scores every
example against all others, so it needs the global batch and keeps the partitioner's path.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec as P

from jaxrec.models import compute_loss
from jaxrec.sharding.mesh import BATCH_AXES

ValueAndGrad = Callable[[object, jax.Array, jax.Array, jax.Array],
                        tuple[jax.Array, object, jax.Array]]


def per_device_value_and_grad(model, mesh: Mesh) -> ValueAndGrad | None:
  """`(params, dense [B, num_dense], emb [B, F, D], labels [B]) -> (loss, d loss / d params,
  d loss / d emb [B, F, D])` for `compute_loss`'s mean loss, computed per device.

  None (differentiate `compute_loss` instead) on one device, where there is nothing to
  reduce (packing the flat vector cost 1-2% of the criteo step there), and when the model's
  loss couples the examples of a batch (`TwoTower.loss='in_batch_softmax'`)."""
  if mesh.size == 1 or getattr(model, "loss", "bce") != "bce":
    return None
  batch = P(BATCH_AXES)
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)

  def local(params, dense, emb, labels):
    # this device's share of the global mean (the mean of equal shards' means)
    share = lambda p, e: compute_loss(model, p, dense, e, labels)[0] / shards
    value, (g_params, g_emb) = jax.value_and_grad(share, argnums=(0, 1))(params, emb)
    flat, unravel = ravel_pytree((value, g_params))
    value, g_params = unravel(jax.lax.psum(flat, BATCH_AXES))
    return value, g_params, g_emb

  def value_and_grad(params, dense, emb, labels):
    # check_vma=False: the layers' custom vjps (`models.mlp.affine`) give each device its
    # own gradient for the replicated parameters; the explicit psum makes them one
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), batch, batch, batch),
                         out_specs=(P(), P(), batch), check_vma=False)(params, dense, emb, labels)

  return value_and_grad


def dense_value_and_grad(model, mesh: Mesh) -> Callable:
  """`(params, dense, emb [B, F, D], labels, item_keys=None, log_q=None) -> (loss, d loss /
  d params, d loss / d emb)`: per device with one all-reduce where that applies
  (`per_device_value_and_grad`), else `compute_loss` over the global batch (one device, or a
  two-tower in-batch softmax, which takes the item keys and log q). The train step and
  `benchmarks/mesh_overhead.py` both differentiate the dense model through it."""
  per_device = per_device_value_and_grad(model, mesh)

  def value_and_grad(params, dense, emb, labels, item_keys=None, log_q=None):
    if per_device is not None:   # a bce loss, which takes neither
      return per_device(params, dense, emb, labels)
    loss = lambda p, e: compute_loss(model, p, dense, e, labels, item_keys, log_q)[0]
    value, (g_params, g_emb) = jax.value_and_grad(loss, argnums=(0, 1))(params, emb)
    return value, g_params, g_emb

  return value_and_grad


__all__ = ["dense_value_and_grad", "per_device_value_and_grad"]
