"""What the compiled train and eval steps take per device beyond the train state: their
activations and other temporaries, measured by XLA, not modelled.

The planner's `--memory_per_device` covers the tables only, and `budget_hint.host_warning`
(before the state is made) adds the dense model's state and gradients; neither counted the
steps' activations. A DLRM over 1,000 features (a `[B, F, F]` dot interaction) was
OOM-killed at its first eval on 8 CPU devices with no warning. `measure` compiles each step
on an abstract batch before the first one runs (`jit(...).lower(...).compile()`): the
compiled executable lands in jit's caches, so the loop's first call compiles nothing again
(the dlrm_synthetic train step's first call took 0.09 s after it, 5.6 s without), and
`memory_analysis()` of it costs milliseconds. Its sizes are per device (one SPMD program).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax
import jax.numpy as jnp

from jaxrec import files
from jaxrec.data.batch import Batch
from jaxrec.planner.result import format_bytes
from jaxrec.sharding import mesh as mesh_lib
from jaxrec.train import budget_hint

log = logging.getLogger("jaxrec")


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """One compiled step's memory on each device (XLA's `memory_analysis()`), at
  `batch_size` (global). `extra`: what the step takes beyond the train state it is given,
  its temporaries (activations, gradients, the lookup's buffers), outputs that are not
  donated state buffers, its share of the batch and its other arguments."""
  name: str          # "train" or "eval"
  batch_size: int
  arguments: int     # the state (tables, dense model), the batch and `inputs`, per device
  temp: int
  outputs: int       # not aliased to a donated argument
  batch: int         # the batch's bytes per device (among `arguments`)
  inputs: int = 0    # the arguments after the batch per device (among `arguments`): the
                     # offload tier's slot-to-row maps (`OffloadTier.step_args`), replicated

  @property
  def extra(self) -> int:
    return self.temp + self.outputs + self.batch + self.inputs

  @property
  def peak(self) -> int:
    return self.arguments + self.temp + self.outputs


def abstract_batch(config, collection, batch_size: int) -> Batch:
  """The device batch the steps take (`placement.device_batch`: ids packed into one
  `[B, S]` int32 array, no weights), as `ShapeDtypeStruct`s split over every device."""
  sharding = mesh_lib.batch_sharding(collection.mesh)

  def s(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return Batch(dense=s((batch_size, config.num_dense), jnp.float32),
               labels=s((batch_size,), jnp.float32),
               ids=s((batch_size, collection.packed_width), jnp.int32), weights={})


def analyse(name: str, jitted, state, batch: Batch, devices: int, args: tuple = ()
            ) -> StepMemory | None:
  """Compiles `jitted(state, batch, *args)` (into jit's caches: the first call reuses it)
  and reads its memory; None where the backend gives no analysis, or for a step that is not
  a jitted function (a test's wrapper: it compiles at its first call, as before)."""
  if not hasattr(jitted, "lower"):
    return None
  stats = jitted.lower(state, batch, *args).compile().memory_analysis()
  if stats is None:
    return None
  size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) // max(devices, 1)
  inputs = sum(math.prod(x.shape if getattr(x, "sharding", None) is None else
                         x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(args))   # replicated: whole on each device
  return StepMemory(name, int(batch.labels.shape[0]), int(stats.argument_size_in_bytes),
                    int(stats.temp_size_in_bytes),
                    max(int(stats.output_size_in_bytes) - int(stats.alias_size_in_bytes), 0),
                    int(size), int(inputs))


def measure(config, collection, state, train_step=None, eval_step=None, train_args=()
            ) -> list[StepMemory]:
  """`analyse` of the steps given (None: not run by this process, e.g. evaluating only) at
  `config.batch_size` and `config.eval_batch_size`. `state`: the train state, arrays or
  `ShapeDtypeStruct`s with shardings; `train_args`: what the train step takes after the
  batch (`OffloadTier.step_args`)."""
  out = []
  for name, fn, size, args in (("train", train_step, config.batch_size, train_args),
                               ("eval", eval_step, config.eval_batch_size, ())):
    if fn is not None:
      found = analyse(name, fn, state, abstract_batch(config, collection, size),
                      collection.mesh.size, args)
      if found is not None:
        out.append(found)
  return out


FLAGS = {"train": "batch_size", "eval": "eval_batch_size"}   # the ExperimentConfig field


def describe(steps: list[StepMemory]) -> str:
  """`the train step's 1.3 MiB (batch_size=512), the eval step's 720.2 KiB
  (eval_batch_size=4096)`: each step's `extra` per device."""
  return ", ".join(f"the {s.name} step's {format_bytes(s.extra)} ({FLAGS[s.name]}="
                   f"{s.batch_size})" for s in steps)


def largest(steps: list[StepMemory]) -> StepMemory:
  """The step with the most `extra`: the one that sets the run's peak."""
  return max(steps, key=lambda s: s.extra)


def name_largest(steps: list[StepMemory]) -> str:
  """`the eval step's activations and temporaries at eval_batch_size=16384 (measured by
  XLA; the train step's: 9.3 MiB at batch_size=512)`, for the warnings."""
  worst = largest(steps)
  others = "".join(f"; the {s.name} step's: {format_bytes(s.extra)} at {FLAGS[s.name]}="
                   f"{s.batch_size}" for s in steps if s is not worst)
  return (f"the {worst.name} step's activations and temporaries at {FLAGS[worst.name]}="
          f"{worst.batch_size} (measured by XLA{others})")


def warnings(steps: list[StepMemory], result, devices, dense: int, offloaded: int,
             early: budget_hint.HostWarning | None, host_bytes: int | None = None,
             saved: int = 0) -> list[str]:
  """The warnings to give once the steps are compiled, before the first one runs, with the
  `dense` model's parameters and optimizer state (`state.DenseBytes.resident`: the train
  step's `extra` holds the gradients): the host warning counting the largest step's
  `extra` on every CPU device (unless the one given before the state was made, `early`,
  said about as much: `_news`), and on a device with a memory limit (a GPU) the step peaks
  over it (`device_warning`)."""
  if not steps:
    return []
  worst = largest(steps)
  out = []
  found = budget_hint.host_warning(result, devices, host_bytes=host_bytes,
                                   offloaded=offloaded, dense=dense, activations=worst.extra,
                                   steps=name_largest(steps), flag=FLAGS[worst.name],
                                   saved=saved)
  if found and _news(early, found):
    out.append(found.text)
  if devices:
    over = device_warning(steps, result, dense, devices[0])
    if over:
      out.append(over)
  return out


# A host warning after `early` is given again when its budget is below this share of
# early's: activations of a few MiB would otherwise repeat most of them, 1 MiB lower.
REPEAT_BELOW = 0.9


def _news(early: budget_hint.HostWarning | None, late: budget_hint.HostWarning) -> bool:
  """Whether the host warning `late` (counting the steps) tells more than `early` (given
  before the state was made): there was none, or its `--memory_per_device` is under
  `REPEAT_BELOW` of early's, or it has none left to give."""
  if early is None:
    return True
  if early.room_mib is None:   # early had no budget to suggest: nothing new in a smaller one
    return False
  return late.room_mib is None or late.room_mib < REPEAT_BELOW * early.room_mib


def device_warning(steps: list[StepMemory], result, dense: int, device) -> str | None:
  """The warning when the plan's resident bytes (tables, optimizer state), the `dense`
  model's parameters and optimizer state and a step's `extra` pass the memory jax has on
  `device` (`memory_stats()["bytes_limit"]`, a GPU's; CPU devices give none and share the
  host: `host_warning`); None otherwise. The plan's lookup buffers and ids and the dense
  gradients are left out: `extra` holds them (an eval step's, its own lookup's)."""
  limit = (device.memory_stats() or {}).get("bytes_limit")
  if not limit:
    return None
  lookup = budget_hint.lookup_bytes(result)
  tables = int(sum(result.memory.values())) - lookup
  worst = largest(steps)
  need = tables + dense + worst.extra
  if need <= limit:
    return None
  flag = FLAGS[worst.name]
  # the budget (not the flag less the excess: a plan may stay well under its budget) that
  # leaves room for the dense state and the step's bytes beyond the plan's lookup parts
  room = (limit - budget_hint.outside_budget(dense, worst.extra, lookup)) >> 20
  budget = (f", or give --memory_per_device={room}MiB or less (--plan=auto then splits or "
            "offloads tables)" if room > 0 else ": the dense model's state and the step "
            "alone take more than the device has")
  return (f"the plan's tables and their optimizer state ({format_bytes(tables)}), the dense "
          f"model's parameters and optimizer state ({format_bytes(dense)}) and "
          f"{format_bytes(worst.extra)} of {name_largest(steps)} come to "
          f"{format_bytes(need)} per device, over the "
          f"{format_bytes(limit)} jax has on this {device.device_kind}: the step may run "
          f"out of memory.{budget_hint.not_counted_again(lookup, flag)} Lower "
          f"ExperimentConfig.{flag}{budget}")


def to_json(steps: list[StepMemory]) -> list[dict]:
  """`steps` as plan.json's `"steps"`: each one's name, global batch size and bytes per
  device."""
  return [{"name": s.name, "batch_size": s.batch_size, "arguments_bytes": s.arguments,
           "temp_bytes": s.temp, "outputs_bytes": s.outputs, "batch_bytes": s.batch,
           "extra_bytes": s.extra} for s in steps]


PLAN_FILE = "plan.json"


def record(workdir: str, result, steps: list[StepMemory]) -> bool:
  """Adds `steps` to `W/plan.json` under `"steps"` (rewritten whole: `files`), when the file
  holds this run's plan (`result`, as the loop wrote it before the steps compiled); a run
  that only evaluates keeps the plan.json of the run that trained, and when that is another
  plan, it is left as it is. A step not measured now (the train step of such a run) keeps
  its entry: the same plan's. Whether it wrote; a file it cannot read or write is warned
  about (the run goes on: the steps' sizes are in its log)."""
  if not steps:
    return False
  path = os.path.join(workdir, PLAN_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      written = json.load(f)
  except (OSError, ValueError) as e:
    log.warning("cannot add the compiled steps' memory to %s: %s", path,
                getattr(e, "strerror", None) or e)
    return False
  if not isinstance(written, dict):
    return False
  before = written.pop("steps", None)
  if written != json.loads(result.dumps()):   # another run's plan
    return False
  by_name = {s.get("name"): s for s in before if isinstance(s, dict)} if isinstance(
      before, list) else {}
  by_name.update((s["name"], s) for s in to_json(steps))
  try:
    files.write_text_atomic(path, result.dumps(
        steps=[by_name[name] for name in FLAGS if name in by_name]))
  except OSError as e:
    log.warning("cannot add the compiled steps' memory to %s: %s", path, e.strerror or e)
    return False
  return True


def check(config, collection, state, train_step, eval_step, result, dense: int,
          offloaded: int, early: budget_hint.HostWarning | None, log_it: bool,
          workdir: str | None = None, train_args: tuple = (), saved: int = 0
          ) -> list[StepMemory]:
  """`measure`, an info line with each step's bytes per device and `warnings` (logged
  where `log_it`, process 0, which also adds them to `workdir`'s plan.json: `record`). The
  loop calls it after making the steps and writing plan.json, before the first one runs:
  every process compiles (they would at their first call anyway). `saved`: the bytes a
  checkpoint copies to the host (`budget_hint.saved_bytes`), for the host warning."""
  steps = measure(config, collection, state, train_step, eval_step, train_args)
  if log_it and steps:
    log.info("compiled steps, activations and temporaries per device (XLA): %s",
             describe(steps))
    for text in warnings(steps, result, collection.mesh.local_devices, dense, offloaded,
                         early, saved=saved):
      log.warning("%s", text)
    if workdir is not None:
      record(workdir, result, steps)
  return steps
