"""A note when the planner's default budget is far below what the device has.

`--memory_per_device` defaults to `planner.DEFAULT_MEMORY_PER_DEVICE` (16 GiB) on every
device, so every process of a job plans alike. On a GPU with much more memory (jax's
allocator may take 75% of it by default, ~104 GiB of an H200's 139) tables that would fit
are then offloaded (`OffloadConfig.auto`) or refused; the note says so once, with the
device's own figure, and leaves the choice to the user.
"""

from __future__ import annotations

from jaxrec import planner
from jaxrec.planner.result import format_bytes

# Device memory this many times the default or more gets the note.
NOTE_FACTOR = 2


def note(memory_per_device: int | None, device) -> str | None:
  """The note for a run planned with `memory_per_device` (None: the default) on `device`
  (a jax device), or None: a budget given, a device without memory statistics (CPU), or
  one with less than `NOTE_FACTOR` times the default."""
  if memory_per_device is not None:
    return None
  stats = device.memory_stats() or {}
  limit = stats.get("bytes_limit")
  default = planner.DEFAULT_MEMORY_PER_DEVICE
  if not limit or limit < NOTE_FACTOR * default:
    return None
  return (f"note: the plan's budget is the default {format_bytes(default)} per device "
          f"(--memory_per_device unset); this {device.device_kind} gives jax "
          f"{format_bytes(limit)}: set --memory_per_device to plan with more of it (leave "
          "room for the dense model and its activations)")
