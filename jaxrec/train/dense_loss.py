"""The dense model's training loss on each device's own examples, one gradient all-reduce.

Under plain `jit` the SPMD partitioner all-reduces each dense parameter's gradient on its
own, and XLA combines them into one all-reduce of a tuple of ~15 buffers. On XLA:CPU
every buffer of a tuple all-reduce costs about what a separate collective does: on 8 host
devices the DLRM criteo gradients (1.9 MB in 14 buffers) took 3.1–5.2 ms to reduce as a
tuple, 1.6–2.1 ms as one flat buffer.

`per_device_loss` runs the model in a `shard_map` over the batch axes and hands it the
parameters as one flat vector (`ravel_pytree`): the backward pass then reduces the whole
dense gradient as that one vector. The forward copies the parameters into it (~2 MB on
criteo) and the update reads the gradient back out of it as slices.

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

LossFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def per_device_loss(model, mesh: Mesh) -> LossFn | None:
  """`loss(params, dense [B, num_dense], emb [B, F, D], labels [B]) -> scalar`, the same
  mean loss as `compute_loss`, computed per device. None (use `compute_loss`) on one device,
  where there is nothing to reduce and the flat copy cost 1-2% of the criteo step, and when
  the model's loss couples the examples of a batch (`TwoTower.loss='in_batch_softmax'`)."""
  if mesh.size == 1 or getattr(model, "loss", "bce") != "bce":
    return None
  batch = P(BATCH_AXES)
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)

  def loss(params, dense, emb, labels):
    flat, unravel = ravel_pytree(params)

    def local(flat, dense, emb, labels):
      mean = compute_loss(model, unravel(flat), dense, emb, labels)[0]   # this shard's
      # The value is the global mean (the mean of equal shards' means), but only `mean` is
      # differentiated: the transpose of the replicated output hands each device 1/shards
      # of the cotangent, which is its share. Differentiating the psum instead would add
      # a second, scalar all-reduce to the backward.
      return mean + jax.lax.stop_gradient(jax.lax.psum(mean, BATCH_AXES) / shards - mean)

    # check_vma=False: the transpose psums the replicated input's cotangent, `flat`'s
    # gradient, over every batch axis (one all-reduce of one buffer)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), batch, batch, batch),
                         out_specs=P(), check_vma=False)(flat, dense, emb, labels)

  return loss


__all__ = ["per_device_loss"]
