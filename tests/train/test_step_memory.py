"""The compiled steps' activations, measured by XLA and counted in the memory warnings
before the first step runs (`step_memory`): a DLRM over 1,000 features was OOM-killed at
its first eval on 8 CPU devices with no warning, its `[B, F, F]` interaction uncounted."""

import json
import logging
import types

import jax
import numpy as np
import pytest

from jaxrec import launch
from jaxrec.train import budget_hint, step_memory

GIB = 2**30
MIB = 2**20
SMALL = ["ExperimentConfig.batch_size=64", "DLRM.bottom_mlp=(16,)", "DLRM.top_mlp=(16,1)"]


def _steps(train_extra, eval_extra):
  return [step_memory.StepMemory("train", 512, 10 * MIB, train_extra, 0, 0),
          step_memory.StepMemory("eval", 16384, 10 * MIB, eval_extra, 0, 0)]


def test_the_host_warning_counts_the_largest_steps_activations():
  """Tables and dense state that fit 75% of the host with room to spare are warned about
  once the eval step's activations on each of the 8 CPU devices are added; the text names
  them, the step and its batch size, and the smaller budget to give."""
  result = types.SimpleNamespace(memory={"table": 512 * MIB})
  cpus = jax.devices()[:8]
  assert budget_hint.host_warning(result, cpus, host_bytes=12 * GIB, dense=GIB // 2) is None
  steps = _steps(9 * MIB, GIB // 4)
  texts = step_memory.warnings(steps, result, cpus, GIB // 2, 0, None, host_bytes=12 * GIB)
  assert texts == [
      "the plan puts 1.2 GiB (512.0 MiB of tables and their optimizer state, 512.0 MiB of "
      "the dense model's parameters and optimizer state and 256.0 MiB of the eval step's "
      "activations and temporaries at eval_batch_size=16384 (measured by XLA; the train "
      "step's: 9.0 MiB at batch_size=512)) on each of the 8 CPU devices of this process, "
      "10.0 GiB in all, and they share this host's 12.0 GiB of memory: the run may run out "
      "of it. Give --memory_per_device=384MiB or less (with --plan=auto the planner then "
      "splits or offloads tables), lower ExperimentConfig.eval_batch_size, or fewer devices"]
  # activations that leave no room for tables: the batch size is what to lower
  text, = step_memory.warnings(_steps(GIB, 2 * GIB), result, cpus, GIB // 2, 0, None,
                               host_bytes=12 * GIB)
  assert text.endswith("The dense model and the steps' activations alone take more than "
                       "each device's share: lower ExperimentConfig.eval_batch_size, use "
                       "fewer devices or a smaller dense model")
  assert step_memory.warnings(_steps(MIB, MIB), result, cpus, GIB // 2, 0, None,
                              host_bytes=12 * GIB) == []
  # the warning before the state was made suggested about the same budget: not repeated
  small = types.SimpleNamespace(memory={"table": 256 * MIB})
  early = budget_hint.host_warning(small, cpus, host_bytes=2 * GIB)
  assert early.room_mib == 192
  assert step_memory.warnings(_steps(MIB, 2 * MIB), small, cpus, 0, 0, early,
                              host_bytes=2 * GIB) == []
  late = step_memory.warnings(_steps(MIB, 32 * MIB), small, cpus, 0, 0, early,
                              host_bytes=2 * GIB)
  assert len(late) == 1 and "Give --memory_per_device=160MiB or less" in late[0]
  assert budget_hint.host_warning(small, cpus, host_bytes=2 * GIB, activations=32 * MIB
                                  ).room_mib == 160   # the figure _news compares, as data
  gpus = [types.SimpleNamespace(platform="gpu", memory_stats=lambda: None)] * 8
  assert step_memory.warnings(steps, result, gpus, GIB // 2, 0, None, host_bytes=15 * GIB) == []


def test_the_lookups_buffers_and_ids_are_counted_once_when_measured():
  """A step's measured `extra` holds the lookup's buffers and gathered ids that the plan's
  `buffers` and `ids` estimate: both warnings counted them twice (768 + 256 + 300 MiB on a
  1,152 MiB share, where 512 + 256 + 300 are taken). Measured, the plan counts its resident
  parts only, and
  the budget suggested takes the lookup's parts out of the step's bytes; before the steps
  are compiled (`activations=0`) the plan counts whole."""
  plan = types.SimpleNamespace(memory={"table": 384 * MIB, "optimizer": 128 * MIB,
                                       "buffers": 192 * MIB, "ids": 64 * MIB})
  cpus = jax.devices()[:8]   # 12 GiB: a 1,152 MiB share each
  assert budget_hint.lookup_bytes(plan) == 256 * MIB
  assert budget_hint.host_warning(plan, cpus, host_bytes=12 * GIB, dense=256 * MIB) is None
  assert step_memory.warnings(_steps(MIB, 300 * MIB), plan, cpus, 256 * MIB, 0, None,
                              host_bytes=12 * GIB) == []   # 512 + 256 + 300 MiB
  text, = step_memory.warnings(_steps(MIB, 640 * MIB), plan, cpus, 256 * MIB, 0, None,
                               host_bytes=12 * GIB)
  assert text == (
      "the plan puts 1.4 GiB (512.0 MiB of tables and their optimizer state, 256.0 MiB of "
      "the dense model's parameters and optimizer state and 640.0 MiB of the eval "
      "step's activations and temporaries at eval_batch_size=16384 (measured by XLA; the "
      "train step's: 1.0 MiB at batch_size=512)) on each of the 8 CPU devices of this "
      "process, 11.0 GiB in all, and they share this host's 12.0 GiB of memory: the run may "
      "run out of it. The plan's 256.0 MiB of lookup buffers and ids, priced for a train "
      "step, are left out: the eval step's temporaries hold its own lookup's. Give "
      "--memory_per_device=512MiB or less (with "
      "--plan=auto the planner then splits or offloads tables), lower "
      "ExperimentConfig.eval_batch_size, or fewer devices")   # 1,152 - 256 - (640 - 256)
  # before the steps are measured the plan's estimate counts whole: 768 + 256 MiB x 8
  early = budget_hint.host_warning(plan, cpus, host_bytes=9 * GIB, dense=256 * MIB)
  assert early.text.startswith("the plan puts 1.0 GiB (768.0 MiB of tables with their "
                               "optimizer state, lookup buffers and ids and 256.0 MiB of ")
  assert early.room_mib == 864 - 256 and "counted again" not in early.text
  # the train step the largest: its temporaries hold the plan's lookup parts
  text, = step_memory.warnings(_steps(640 * MIB, MIB), plan, cpus, 256 * MIB, 0, None,
                               host_bytes=12 * GIB)
  assert "run out of it. The plan's 256.0 MiB of lookup buffers and ids are among those " \
      "temporaries, not counted again. Give --memory_per_device=512MiB or less" in text
  # offloaded tables too: the breakdown per device adds up
  text = budget_hint.host_warning(plan, cpus, host_bytes=12 * GIB, offloaded=GIB,
                                  dense=256 * MIB, activations=640 * MIB, steps="S",
                                  flag="batch_size").text
  assert ", and the plan puts 11.0 GiB on the 8 CPU devices of this process (1.4 GiB on " \
      "each: 512.0 MiB of tables and their optimizer state, 256.0 MiB of the dense model's " \
      "parameters and optimizer state and 640.0 MiB of S), of this host's 12.0 " \
      "GiB: the run may run out of it. The plan's 256.0 MiB of lookup buffers and ids are " \
      "among those temporaries" in text
  # a GPU: 34 GiB of tables and state + 30 GiB measured fit 64 GiB (counted twice: 66 GiB)
  gpu = types.SimpleNamespace(memory={"table": 24 * GIB, "optimizer": 8 * GIB,
                                      "buffers": GIB, "ids": GIB})
  assert step_memory.warnings(_steps(GIB, 30 * GIB), gpu, [FakeGpu(64 * GIB)], 2 * GIB, 0,
                              None) == []
  text, = step_memory.warnings(_steps(GIB, 30 * GIB), gpu, [FakeGpu(60 * GIB)], 2 * GIB, 0,
                               None)
  assert text.startswith(
      "the plan's tables and their optimizer state (32.0 GiB), the dense model's parameters "
      "and optimizer state (2.0 GiB) and 30.0 GiB of the eval step's ") and (
          "come to 64.0 GiB per device, over the 60.0 GiB jax has on this NVIDIA H100: the "
          "step may run out of memory. The plan's 2.0 GiB of lookup buffers and ids, priced "
          "for a train step, are left out: the eval step's temporaries hold its own lookup's. "
          "Lower ExperimentConfig.eval_batch_size, or give --memory_per_device=30720MiB or "
          "less") in text   # 60 - 2 - (30 - 2) GiB
  text, = step_memory.warnings(_steps(30 * GIB, GIB), gpu, [FakeGpu(60 * GIB)], 2 * GIB, 0,
                               None)
  assert "The plan's 2.0 GiB of lookup buffers and ids are among those temporaries, not " \
      "counted again. Lower ExperimentConfig.batch_size, or give " \
      "--memory_per_device=30720MiB or less" in text


def test_the_dense_gradients_are_counted_once_when_measured():
  """`state.dense_bytes` counted the dense gradients (the parameters again) and the train
  step's measured temporaries hold them too: once the steps were measured, both warnings
  counted them twice. The split is explicit (`DenseBytes`): before the steps are measured
  the dense model counts whole, with them its parameters and optimizer state only."""
  plan = types.SimpleNamespace(memory={"table": 512 * MIB})
  cpus = jax.devices()[:8]   # 9 GiB: an 864 MiB share each
  early = budget_hint.host_warning(plan, cpus, host_bytes=9 * GIB, dense=256 * MIB,
                                   gradients=128 * MIB)   # 512 + 256 + 128 MiB
  assert early.text.startswith(
      "the plan puts 896.0 MiB (512.0 MiB of tables with their optimizer state, lookup "
      "buffers and ids and 384.0 MiB of the dense model's parameters, gradients and "
      "optimizer state) on each") and early.room_mib == 864 - 384
  # the train step's 90 MiB hold the gradients: 512 + 256 + 90 MiB fit (384 + 90 did not)
  assert step_memory.warnings(_steps(90 * MIB, MIB), plan, cpus, 256 * MIB, 0, None,
                              host_bytes=9 * GIB) == []
  assert budget_hint.host_warning(plan, cpus, host_bytes=9 * GIB, dense=256 * MIB,
                                  gradients=128 * MIB, activations=90 * MIB) is None
  late = budget_hint.host_warning(plan, cpus, host_bytes=9 * GIB, dense=256 * MIB,
                                  gradients=128 * MIB, activations=100 * MIB, steps="S")
  assert late.text.startswith(
      "the plan puts 868.0 MiB (512.0 MiB of tables and their optimizer state, 256.0 MiB of "
      "the dense model's parameters and optimizer state and 100.0 MiB of S) on each") and (
          late.room_mib == 864 - 256 - 100)


class FakeGpu:
  platform = "gpu"
  device_kind = "NVIDIA H100"

  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return {"bytes_limit": self.limit}


def test_a_device_with_a_memory_limit_is_warned_when_a_step_passes_it():
  """On a GPU the budget is per device: tables, dense state and the largest step's
  activations over jax's `bytes_limit` are warned about, with the budget to give."""
  result = types.SimpleNamespace(memory={"table": 40 * GIB})
  steps = _steps(GIB, 30 * GIB)
  text, = step_memory.warnings(steps, result, [FakeGpu(60 * GIB)], 2 * GIB, 0, None)
  assert text == (
      "the plan's tables and their optimizer state (40.0 GiB), the dense model's parameters "
      "and optimizer state (2.0 GiB) and 30.0 GiB of the eval step's activations "
      "and temporaries at "
      "eval_batch_size=16384 (measured by XLA; the train step's: 1.0 GiB at batch_size=512) "
      "come to 72.0 GiB per device, over the 60.0 GiB jax has on this NVIDIA H100: the step "
      "may run out of memory. Lower ExperimentConfig.eval_batch_size, or give "
      "--memory_per_device=28672MiB or less (--plan=auto then splits or offloads tables)")
  assert step_memory.warnings(steps, result, [FakeGpu(80 * GIB)], 2 * GIB, 0, None) == []


def test_the_device_warning_gives_a_budget_that_shrinks_the_plan():
  """`--memory_per_device` is a budget the plan may stay well under (16 GiB by default, the
  same on every device): taking the excess off the flag ("by 4.0 GiB": 40 -> 36 GiB for a
  34 GiB plan) changed no plan. The warning gives the budget itself, as the host warning
  does: the device's memory less the dense state and the step's bytes beyond the plan's
  lookup parts (60 - 2 - (30 - 2) GiB), and none where those alone pass it."""
  plan = types.SimpleNamespace(memory={"table": 24 * GIB, "optimizer": 8 * GIB,
                                       "buffers": GIB, "ids": GIB},
                               memory_per_device_bytes=40 * GIB)
  text, = step_memory.warnings(_steps(GIB, 30 * GIB), plan, [FakeGpu(60 * GIB)], 2 * GIB, 0,
                               None)
  assert text.endswith("Lower ExperimentConfig.eval_batch_size, or give "
                       "--memory_per_device=30720MiB or less (--plan=auto then splits or "
                       "offloads tables)"), text
  text, = step_memory.warnings(_steps(GIB, 60 * GIB), plan, [FakeGpu(60 * GIB)], 2 * GIB, 0,
                               None)
  assert "--memory_per_device" not in text and text.endswith(
      "Lower ExperimentConfig.eval_batch_size: the dense model's state and the step alone "
      "take more than the device has"), text


def _fake_result(plan_json: dict):
  """A `PlanResult`'s `to_json` and `dumps` (the text the loop writes to plan.json)."""
  return types.SimpleNamespace(
      to_json=lambda: plan_json,
      dumps=lambda **extra: json.dumps(dict(plan_json, **extra), indent=2, sort_keys=True))


def test_the_measured_steps_are_added_to_the_runs_plan_json(tmp_path, caplog):
  """plan.json said how much of each device the plan takes, not the compiled steps: they
  are added under "steps" (bytes per device) when the file holds this run's plan. A run
  that only evaluates keeps the training run's entry of the train step; another plan's file
  is left as it is; the same measurements write the same file again (a resume)."""
  plan = _fake_result({"plan": {"t0": {"kind": "dp"}}, "mode": "auto"})
  path = tmp_path / "plan.json"
  path.write_text(plan.dumps())   # as the loop does
  steps = [step_memory.StepMemory("train", 512, 10 * MIB, 3 * MIB, 100, 2 * MIB),
           step_memory.StepMemory("eval", 4096, 9 * MIB, 5 * MIB, 16384, 4 * MIB)]
  assert step_memory.record(str(tmp_path), plan, steps)
  written = json.loads(path.read_text())
  assert written == dict(plan.to_json(), steps=[
      {"name": "train", "batch_size": 512, "arguments_bytes": 10 * MIB,
       "temp_bytes": 3 * MIB, "outputs_bytes": 100, "batch_bytes": 2 * MIB,
       "extra_bytes": 5 * MIB + 100},
      {"name": "eval", "batch_size": 4096, "arguments_bytes": 9 * MIB, "temp_bytes": 5 * MIB,
       "outputs_bytes": 16384, "batch_bytes": 4 * MIB, "extra_bytes": 9 * MIB + 16384}])
  first = path.read_text()
  path.write_text(plan.dumps())   # a resume's
  assert step_memory.record(str(tmp_path), plan, steps) and path.read_text() == first
  smaller = step_memory.StepMemory("eval", 1024, 9 * MIB, MIB, 4096, MIB)
  assert step_memory.record(str(tmp_path), plan, [smaller])   # evaluates only
  assert [(s["name"], s["batch_size"]) for s in json.loads(path.read_text())["steps"]] == [
      ("train", 512), ("eval", 1024)]
  other = _fake_result({"plan": {"t0": {"kind": "rw"}}, "mode": "forced"})
  before = path.read_text()
  assert not step_memory.record(str(tmp_path), other, steps) and path.read_text() == before
  assert not step_memory.record(str(tmp_path), plan, [])
  with caplog.at_level(logging.WARNING, "jaxrec"):
    assert not step_memory.record(str(tmp_path / "gone"), plan, steps)
  assert "cannot add the compiled steps' memory to " in caplog.text


def _built(bindings, mesh, plan):
  from jaxrec.train import config as config_lib, loop   # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jaxrec.train import state as state_lib, step as step_lib
  launch.parse_gin(["configs/dlrm_synthetic.gin"], bindings)
  config = config_lib.ExperimentConfig()
  collection, _, info = loop.setup(config, config_lib.RunOptions(mesh=mesh, plan=plan))
  state = state_lib.create(config, collection, 0)
  shardings = state_lib.shardings(state, collection)
  return (config, collection, state, info,
          step_lib.make_train_step(config, collection, shardings),
          step_lib.make_eval_step(config, collection, shardings))


def test_the_analysis_is_per_device_and_the_first_calls_compile_nothing_more():
  """XLA's sizes are one device's (row-sharded tables: each device's shards of the state,
  its 1/8 of the batch), the eval step's temporaries grow with its batch, and the first
  calls reuse the executables compiled for the analysis (no second compile)."""
  from jaxrec.train import data_adapter   # pylint: disable=import-outside-toplevel
  from jaxrec.train.placement import device_batch   # pylint: disable=import-outside-toplevel
  from jaxrec.sharding import mesh as mesh_lib   # pylint: disable=import-outside-toplevel
  config, collection, state, _, train, evaluate = _built(
      SMALL + ["ExperimentConfig.eval_batch_size=4096"], "row=8", "rw")
  steps = step_memory.measure(config, collection, state, train, evaluate)
  assert [s.name for s in steps] == ["train", "eval"]
  shard = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
  assert sum(x.nbytes for x in jax.tree.leaves(state)) > 4 * shard   # the tables are split
  assert steps[0].arguments == shard + steps[0].batch
  # the eval step leaves out what it does not read (the dense optimizer's state, the step)
  assert shard + steps[1].batch - 4096 < steps[1].arguments < shard + steps[1].batch
  for s in steps:
    assert s.batch == s.batch_size // 8 * (13 + 1 + 18) * 4   # dense, label, packed ids
  assert steps[1].temp > 4 * steps[0].temp > 0   # 64 vs 4096 examples
  assert steps[0].outputs < 1000 and steps[1].outputs == 4096 * 4   # donated; the logits
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event) if "backend_compile" in event else None)
  from jaxrec.train import config as config_lib   # pylint: disable=import-outside-toplevel
  options = config_lib.RunOptions()
  bsharding = mesh_lib.batch_sharding(collection.mesh)
  batch = next(data_adapter.train_iterator(config, options))
  eval_batch, _ = next(iter(data_adapter.eval_data(config, options)))
  logits = evaluate(state, device_batch(collection, eval_batch, bsharding))
  state, metrics = train(state, device_batch(collection, batch, bsharding))
  assert np.isfinite(float(metrics["loss"])) and logits["logits"].shape == (4096,)
  assert compiles == []


def test_the_loop_warns_before_the_first_step(monkeypatch, tmp_path, caplog):
  """Wiring: with a host just big enough for the tables and dense state on 8 CPU devices
  (no warning before the state is made), the eval step's activations are warned about
  after the plan and before the first train step runs."""
  from jaxrec.train import config as config_lib, loop   # pylint: disable=import-outside-toplevel
  from jaxrec.train import step as step_lib   # pylint: disable=import-outside-toplevel
  events = []
  real_host_warning = budget_hint.host_warning

  def host_warning(result, devices, host_bytes=None, offloaded=0, dense=0, gradients=0, **kw):
    fits = ((sum(result.memory.values()) + dense + gradients) * len(devices)
            + kw.get("saved", 0)) / budget_hint.HOST_FRACTION   # a checkpoint's copy too
    return real_host_warning(result, devices, host_bytes=int(fits) + MIB,
                             offloaded=offloaded, dense=dense, gradients=gradients, **kw)

  class Recorded:   # the train step, noting its calls
    def __init__(self, jitted):
      self.jitted = jitted

    def lower(self, *args):
      return self.jitted.lower(*args)

    def __call__(self, *args):
      events.append("train step")
      return self.jitted(*args)

  class Handler(logging.Handler):
    def emit(self, record):
      events.append(record.getMessage())

  real_make = step_lib.make_train_step
  monkeypatch.setattr(budget_hint, "host_warning", host_warning)
  monkeypatch.setattr(step_lib, "make_train_step", lambda *a: Recorded(real_make(*a)))
  handler = Handler(logging.WARNING)
  logging.getLogger("jaxrec").addHandler(handler)
  try:
    launch.parse_gin(["configs/dlrm_synthetic.gin"],
                     SMALL + ["ExperimentConfig.eval_batch_size=4096",
                              "ExperimentConfig.num_eval_examples=4096"])
    options = config_lib.RunOptions(num_steps=1, mesh="data=8", plan="dp", progress=False)
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path / "w"))
  finally:
    logging.getLogger("jaxrec").removeHandler(handler)
  warned = [i for i, e in enumerate(events) if "activations and temporaries" in e]
  assert warned and warned[0] < events.index("train step"), events
  text = events[warned[0]]
  assert text.startswith("the plan puts ") and "of the eval step's activations and " \
      "temporaries at eval_batch_size=4096 (measured by XLA; the train step's: " in text
  assert "lower ExperimentConfig.eval_batch_size" in text
  # the dense model's parameters and optimizer state: the gradients are the train step's
  from jaxrec.planner.result import format_bytes  # pylint: disable=import-outside-toplevel
  from jaxrec.train import state as state_lib   # pylint: disable=import-outside-toplevel
  dense = state_lib.dense_bytes(config_lib.ExperimentConfig(), 16)
  assert f"{format_bytes(dense.resident)} of the dense model's parameters and optimizer " \
      "state and " in text and dense.gradients > 0
  written = json.loads((tmp_path / "w" / "plan.json").read_text())   # process 0 added them
  assert [(s["name"], s["batch_size"]) for s in written["steps"]] == [("train", 64),
                                                                      ("eval", 4096)]
  assert written["steps"][1]["extra_bytes"] > written["steps"][0]["extra_bytes"] > 0
  assert {p["kind"] for p in written["plan"].values()} == {"dp"}   # the rest is kept
  assert written["mesh"]["data"] == 8 and written["memory_per_device"]["table"] > 0


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (its bytes_limit): "
                    "benchmarks/gpu_checks.sh runs it with CHECKS=memory_warning")
def test_a_real_gpus_limit_is_read_and_a_step_past_it_is_warned():
  """On a real GPU: `bytes_limit` is read, an eval batch whose measured activations stay
  well under it gives no warning, and one sized past it (extrapolated from the first
  measurement: compiled only, never run) is warned about, naming the device."""
  device = jax.devices()[0]
  limit = device.memory_stats()["bytes_limit"]
  config, collection, state, info, _, evaluate = _built(
      SMALL + ["ExperimentConfig.eval_batch_size=4096"], "auto", "auto")
  small, = step_memory.measure(config, collection, state, None, evaluate)
  dense = info["dense_bytes"].resident   # the train step measures the gradients
  assert step_memory.device_warning([small], info["plan_result"], dense, device) is None
  per_example = small.extra / small.batch_size
  big_batch = 1 << max(12, int(np.ceil(np.log2(2 * limit / per_example))))
  config, collection, state, info, _, evaluate = _built(
      SMALL + [f"ExperimentConfig.eval_batch_size={big_batch}"], "auto", "auto")
  big, = step_memory.measure(config, collection, state, None, evaluate)
  assert big.extra > limit, (big, limit)
  text = step_memory.device_warning([big], info["plan_result"], dense, device)
  assert text is not None and device.device_kind in text and f"{big_batch}" in text


def test_the_train_steps_extra_counts_an_offloaded_tables_slot_to_row_map(tmp_path):
  """Stochastic rounding on a reduced-precision offloaded table gives the train step a third
  argument, the tier's slot-to-row map (`uint32 [cache_rows]`, replicated: on every device,
  however the cache is split), which neither the state nor the plan holds. `extra` left it
  out (XLA's `arguments` had it): the warnings and plan.json's `extra_bytes` did not count
  it, 4 bytes a slot on each device (a 100M-slot cache: 400 MB each)."""
  import dataclasses   # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import EmbeddingOptions   # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from tests.offload.offload_helpers import Run, experiment, mesh_of, offload_config
  cfg = experiment("sgd")
  cfg = dataclasses.replace(cfg, embedding=(
      tuple(dataclasses.replace(t, dtype="bfloat16") for t in cfg.tables), cfg.features))
  run = Run(cfg, mesh_of("data=2"), offload_config(tmp_path, cache_rows=9000),
            options=EmbeddingOptions(stochastic_rounding=True))
  try:
    args = run.tier.step_args()
    train, = step_memory.measure(cfg, run.collection, run.state, run.step_fn, None, args)
    shard = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(run.state))
    assert sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(args)) == 36_000
    assert train.arguments == shard + train.batch + 36_000
    assert train.extra == train.temp + train.outputs + train.batch + 36_000
    assert train.peak == shard + train.extra   # what the step takes beyond the state
  finally:
    run.close()
