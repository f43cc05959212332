"""A save's copy of the embedding tables on their own devices, so the copy to host can
run in the background.

A save must hold the tables as of its step while the trainer donates them to the next
step. Copying them to host on the training thread blocks the loop for the whole transfer:
on an H200 106 ms per save of 155 MB against a 1.7 ms step (device-to-host copies into
pageable memory run at ~1.5 GB/s). A copy on the device takes HBM bandwidth instead
(~0.1 ms for that size) and leaves the transfer to the save's background thread; it needs
the tables' size again in free device memory, which `fits` checks. On CPU the "device" copy
is a host memcpy like the transfer it would replace, and devices report no memory
statistics, so `fits` says no and the save copies to host directly, as before.
"""

from __future__ import annotations

import collections
from typing import Any

import jax

HEADROOM = 1.25   # free device memory needed, as a multiple of the copy's bytes


def _copy(tree):
  return jax.tree.map(lambda x: x.copy(), tree)


def copy(tree: Any) -> Any:
  """Fresh device arrays with the values and shardings of `tree`'s arrays, made by one
  jitted program dispatched asynchronously (the caller may donate `tree` after)."""
  shardings = jax.tree.map(lambda x: x.sharding, tree)
  return jax.jit(_copy, out_shardings=shardings)(tree)


def bytes_per_device(tree: Any) -> dict:
  """`{device: bytes}` of the shards of `tree`'s arrays on this process's devices."""
  out = collections.Counter()
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      out[shard.device] += shard.data.nbytes
  return dict(out)


def fits(tree: Any) -> bool:
  """Whether every device holding part of `tree` has `HEADROOM` times its part free
  (False where a device reports no memory statistics, e.g. CPU)."""
  for device, need in bytes_per_device(tree).items():
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
      return False
    if stats["bytes_limit"] - stats.get("bytes_in_use", 0) < HEADROOM * need:
      return False
  return True
