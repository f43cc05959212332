"""How host batches reach the devices, and how far the loop lets steps run ahead of the
host: shared by the training loop, the eval and the benchmarks."""

from __future__ import annotations

import jax
import numpy as np

from jaxrec.data.batch import Batch
from jaxrec.errors import DataError

# Steps dispatched ahead of the host on a multi-device XLA:CPU mesh. With `--log_every`
# steps queued (the loop syncs only at log steps), 8 host devices on a busy machine
# deadlocked in the first collective of a step ("waiting for all gather ... may be stuck",
# then an abort after 40 s): 100 queued steps of dlrm_criteo under load 8 died before step
# 100. Two still overlap the host's batch preparation with the device step. One device (no
# collectives) and GPUs are not capped.
MAX_STEPS_IN_FLIGHT = 2


def steps_in_flight(mesh) -> int | None:
  """How many dispatched steps the loop lets run ahead (None: no cap)."""
  cpu = mesh.devices.flat[0].platform == "cpu"
  return MAX_STEPS_IN_FLIGHT if cpu and mesh.devices.size > 1 else None


def device_batch(collection, batch: Batch, sharding) -> Batch:
  """Host batch → device batch split over every device, its ids packed into one array
  (`EmbeddingCollection.pack_batch`: one transfer instead of one per feature). What the
  train and eval steps take; benchmarks place their batches with it too. In one process the
  local batch is the global one: `device_put` places it with less host work (criteo batch:
  ~210 vs ~300 µs per step)."""
  _check_shapes(batch, collection.mesh.size // jax.process_count())
  packed = collection.pack_batch(batch)
  if jax.process_count() == 1:
    return jax.device_put(packed, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), packed)


def _check_shapes(batch: Batch, local_devices: int) -> None:
  """A `DataError` for labels not `[B]` (a `[B, 1]` column broadcast the loss to `[B, B]`
  and trained on it without a word), dense values not `[B, num_dense]`, or a `B` this
  process's devices do not divide (jax's IndivisibleError)."""
  labels, dense = np.shape(batch.labels), np.shape(batch.dense)
  if len(labels) != 1:
    raise DataError(f"Batch.labels has shape {list(labels)}, expected [batch] (one label per "
                    "example)")
  if len(dense) != 2 or dense[0] != labels[0]:
    raise DataError(f"Batch.dense has shape {list(dense)}, expected [{labels[0]}, num_dense] "
                    "(one row per example)")
  if labels[0] % local_devices:
    raise DataError(f"batch of {labels[0]} examples is not divisible by the {local_devices} "
                    "devices it is split over")
