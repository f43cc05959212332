"""A note when the planner's default budget is far below what the device has.

`--memory_per_device` defaults to `planner.DEFAULT_MEMORY_PER_DEVICE` (16 GiB) on every
device, so every process of a job plans alike. On a GPU with much more memory (jax's
allocator may take 75% of it by default, ~104 GiB of an H200's 139) tables that would fit
are then offloaded (`OffloadConfig.auto`) or refused; the note says so once, with the
device's own figure, and leaves the choice to the user.

CPU devices (e.g. `--xla_force_host_platform_device_count=8`) all take the host's memory:
a plan within the budget on each may not fit them together (`host_warning`), nor with the
dense model's state and the compiled steps' activations (`step_memory` measures those).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from jaxrec import planner
from jaxrec.offload import config as offload_config
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


# A plan taking more than this fraction of the host's memory on its CPU devices is warned
# about: the host's own copies (data, checkpoints) come on top.
HOST_FRACTION = 0.75


def _host_memory(host_bytes: int | None) -> int:
  """`host_bytes`, or this host's physical memory when None."""
  if host_bytes is not None:
    return host_bytes
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_budget(memory_per_device: int | None, plan: str, devices, dense: int,
                processes: int = 1, host_bytes: int | None = None) -> int | None:
  """The budget `--plan=auto` plans with on the CPU `devices` of one process when
  `--memory_per_device` is unset, where the default (16 GiB a device) is more than the host
  holds for them: `HOST_FRACTION` of the host's memory, halved (a checkpoint's save copies
  the tables to the host beside them: a plan filling the suggested budget peaked at 2.4x
  it), split over the devices, less the `dense` bytes each holds. None otherwise: a budget
  given, a forced plan (warned about instead), other devices, or several processes (their
  hosts may differ: every process must plan alike)."""
  if (memory_per_device is not None or plan != "auto" or processes > 1 or not devices
      or getattr(devices[0], "platform", None) != "cpu"):
    return None
  budget = int(HOST_FRACTION * _host_memory(host_bytes) / 2 / len(devices)) - dense
  return max(budget, 1 << 20) if budget < planner.DEFAULT_MEMORY_PER_DEVICE else None

# The parts of `PlanResult.memory` a step holds while it runs (the lookup's buffers and the
# gathered ids): among its temporaries once it is compiled and measured (`step_memory`).
LOOKUP_PARTS = ("buffers", "ids")


def lookup_bytes(result) -> int:
  """The plan's `LOOKUP_PARTS` bytes per device; the rest (`table`, `optimizer`) is resident:
  the train state holds it through the run."""
  return int(sum(result.memory.get(k, 0) for k in LOOKUP_PARTS))


def outside_budget(dense: int, extra: int, lookup: int) -> int:
  """Bytes on each device that `--memory_per_device` does not cover: the dense model's
  state and a measured step's `extra` less the plan's `lookup` parts (the budget holds
  those)."""
  return dense + max(extra - lookup, 0)


def not_counted_again(lookup: int, flag: str = "batch_size") -> str:
  """The sentence a warning counting a measured step adds for the plan's `lookup` bytes it
  left out ("" for none). `flag`: the ExperimentConfig batch size of that step; the plan
  prices a train step's lookup, so an eval step (`eval_batch_size`) holds its own lookup's
  buffers instead of those."""
  if not lookup:
    return ""
  if flag == "eval_batch_size":
    return (f" The plan's {format_bytes(lookup)} of lookup buffers and ids, priced for a "
            "train step, are left out: the eval step's temporaries hold its own lookup's.")
  return (f" The plan's {format_bytes(lookup)} of lookup buffers and ids are among those "
          "temporaries, not counted again.")


@dataclasses.dataclass(frozen=True)
class HostWarning:
  """A `host_warning`: its `text` (what `str` gives: it logs as the text) and the
  `--memory_per_device` it suggests in MiB (`room_mib`; None: it suggests none), which
  `step_memory` compares with the one given before the steps were measured."""
  text: str
  room_mib: int | None

  def __str__(self) -> str:
    return self.text


def host_warning(result, devices, host_bytes: int | None = None, offloaded: int = 0,
                 dense: int = 0, activations: int = 0, steps: str = "",
                 flag: str = "", gradients: int = 0, saved: int = 0) -> HostWarning | None:
  """The warning for a plan (`PlanResult`) whose tables on this process's CPU `devices`,
  with the `dense` bytes each of them holds (the dense model's parameters and optimizer
  state, `state.dense_bytes`: not in the budget) and its `gradients`, the `activations` of
  the largest compiled step on each (`step_memory`: `steps` names it, `flag` is the
  ExperimentConfig batch size that sets them) and the `offloaded` bytes the offload tier
  keeps on the host (`offload.config.host_bytes`, on any platform), take more than
  `HOST_FRACTION` of the host's memory (`host_bytes`, default the physical memory); None
  otherwise. The budget is per device: a 1.2 GiB table replicated (`dp`) on 8 CPU devices
  fit 16 GiB on each, and took 10 GiB of the host before the first step; a model of 1,000
  features had 244 MiB of dense state on each, 2 GiB uncounted, and its eval step's
  `[B, F, F]` interaction was OOM-killed unannounced. Before the steps are measured
  (`activations=0`) the plan and the dense model count whole; with them, the plan's lookup
  buffers and ids (`LOOKUP_PARTS`) and the dense `gradients` are left out: the train
  step's temporaries hold them (an eval step's, its own lookup's and no gradients).
  Several processes on one host each count their own devices. `saved`: the bytes a
  checkpoint's save copies to the host beside them (the tables and their optimizer state,
  once: `saved_bytes`); a plan filling the suggested budget peaked at 2.4x it at its save."""
  cpus = len(devices) if devices and devices[0].platform == "cpu" else 0
  host = _host_memory(host_bytes)
  lookup = lookup_bytes(result) if activations else 0
  tables = int(sum(result.memory.values())) - lookup
  dense += 0 if activations else gradients
  each = tables + dense + activations
  saved = saved if cpus else 0   # a GPU's tables copied to the host: not the devices' too
  if each * cpus + offloaded + saved <= HOST_FRACTION * host:
    return None
  fixed = outside_budget(dense, activations, lookup)
  parts = [f"{format_bytes(tables)} of tables " + (
      "and their optimizer state" if activations else
      "with their optimizer state, lookup buffers and ids")]   # the plan's whole estimate
  if dense:
    what = "parameters, gradients and" if gradients and not activations else "parameters and"
    parts.append(f"{format_bytes(dense)} of the dense model's {what} optimizer state")
  if activations:
    parts.append(f"{format_bytes(activations)} of {steps}")
  split = f"{', '.join(parts[:-1])} and {parts[-1]}" if len(parts) > 1 else ""
  counted = not_counted_again(lookup if cpus else 0, flag)
  if offloaded:
    room = (int(HOST_FRACTION * host - offloaded) // max(cpus, 1) - fixed) >> 20
    room = room if cpus and room > 0 else None
    return HostWarning(
        f"the offload tier keeps about {format_bytes(offloaded)} in host memory (its "
        f"buffered rows and their optimizer state, 12 bytes per table row and "
        f"{offload_config.SLOT_BYTES} per cache slot, and the whole table of a "
        "kvstore='memory' store)"
        + (f", and the plan puts {format_bytes(each * cpus)} on the {cpus} CPU devices "
           "of this process" + (f" ({format_bytes(each)} on each: {split})" if activations
                                else "") if cpus else "")
        + f", of this host's {format_bytes(host)}: the run may run out of it.{counted} Give "
        "a memory store's table a file store (kvstore='file'), lower "
        "OffloadConfig.host_buffer_rows"
        + (f", give --memory_per_device={room}MiB or less" if room else "")
        + " or offload fewer tables", room)
  room = (int((HOST_FRACTION * host - saved) / cpus) - fixed) >> 20
  smaller = f"lower ExperimentConfig.{flag}, " if activations and flag else ""
  copy = (f" (and a checkpoint's save copies {format_bytes(saved)} of tables and optimizer "
          "state to the host beside them)" if saved else "")
  return HostWarning(
      f"the plan puts {format_bytes(each)}{f' ({split})' if split else ''} on each of the "
      f"{cpus} CPU devices of this process, {format_bytes(each * cpus)} in all{copy}, and "
      f"they share this host's {format_bytes(host)} of memory: the run may run out of "
      f"it.{counted} "
      + (f"Give --memory_per_device={room}MiB or less (with --plan=auto the planner then "
         f"splits or offloads tables), {smaller}or fewer devices" if room > 0 else
         ("The dense model and the steps' activations alone take more than each device's "
          f"share: {smaller}use fewer devices or a smaller dense model" if activations else
          "The dense model alone takes more than each device's share: use fewer devices or "
          "a smaller dense model")), room if room > 0 else None)


def saved_bytes(collection) -> int:
  """Bytes a checkpoint's save copies to the host: every table and its optimizer state,
  once (`tables.stored_arrays`)."""
  from jaxrec.checkpoint import tables  # pylint: disable=import-outside-toplevel
  return int(sum(math.prod(shape) * np.dtype(dtype).itemsize
                 for shape, dtype in tables.stored_arrays(collection).values()))


def eval_warning(result, collection, eval_batch_size: int) -> str | None:
  """`eval_memory_warning` for the built `collection` (its stacks, its resolved kernel,
  xla or pallas, and dedup)."""
  options = collection.options
  return eval_memory_warning(result, collection.layouts, collection.features,
                             collection.optimizer, options.kernel, options.dedup,
                             eval_batch_size)


def eval_memory_warning(result, layouts, features, optimizer, kernel: str, dedup,
                        eval_batch_size: int) -> str | None:
  """The warning for a plan (`PlanResult`) whose embedding memory at the eval batch, the
  lookup's forward buffers of the stacks `layouts` priced at `eval_batch_size`
  (`cost_model.plan_cost(forward=True)`; `optimizer` the sparse optimizer, or one per table
  as `layouts` were built with), passes its budget; None otherwise, and for an
  eval batch no larger than the training batch. The planner prices the training batch
  only: a `row=8`, `rw` plan at 87% of a 3 MiB budget held 1.34x it in the eval step at
  batch 4096 (8x the training batch). train.py and scripts/plan.py both give it."""
  from jaxrec.planner import cost_model  # pylint: disable=import-outside-toplevel
  if eval_batch_size <= int(result.batch_size):
    return None
  need = cost_model.plan_cost(layouts, features, eval_batch_size, optimizer, kernel, dedup,
                              forward=True).memory_bytes   # (per table: each stack's own)
  budget = int(result.memory_per_device_bytes)
  if need <= budget:
    return None
  return (f"ExperimentConfig.eval_batch_size={eval_batch_size}: the eval's embedding lookup "
          f"takes each device to about {format_bytes(int(need))}, over --memory_per_device="
          f"{format_bytes(budget)} (the plan was priced at the training batch, "
          f"{int(result.batch_size)}); lower eval_batch_size, or give the eval room")
