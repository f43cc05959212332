"""The note when the default planner budget is far below the device's memory (a GPU)."""

import jax

from jaxrec import planner
from jaxrec.train import budget_hint

GIB = 2**30


class FakeDevice:
  device_kind = "NVIDIA H200"

  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_a_large_gpu_with_the_default_budget_gets_the_note():
  text = budget_hint.note(None, FakeDevice({"bytes_limit": 104 * GIB, "bytes_in_use": 0}))
  assert text == ("note: the plan's budget is the default 16.0 GiB per device "
                  "(--memory_per_device unset); this NVIDIA H200 gives jax 104.0 GiB: set "
                  "--memory_per_device to plan with more of it (leave room for the dense "
                  "model and its activations)")


def test_no_note_with_a_budget_given_a_small_device_or_no_statistics():
  big = FakeDevice({"bytes_limit": 104 * GIB})
  assert budget_hint.note(80 * GIB, big) is None
  small = FakeDevice({"bytes_limit": budget_hint.NOTE_FACTOR * planner.DEFAULT_MEMORY_PER_DEVICE
                      - 1})
  assert budget_hint.note(None, small) is None
  assert budget_hint.note(None, FakeDevice(None)) is None
  assert budget_hint.note(None, FakeDevice({})) is None
  assert budget_hint.note(None, jax.devices()[0]) is None   # CPU: no memory statistics


class _Noted(Exception):
  pass


def test_the_loop_asks_for_the_note_beside_the_plan_report(monkeypatch, tmp_path):
  """Wiring: after the plan's report, the note with the run's budget and its first local
  device, then the host warning with the plan and the mesh's local devices (stopped there
  by the fake warning)."""
  from jaxrec import launch   # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib, loop   # pylint: disable=import-outside-toplevel
  from tests.train.test_loop_eval_ids import BINDINGS   # pylint: disable=import-outside-toplevel

  def fake_note(memory_per_device, device):
    asked.append((memory_per_device, device))

  def fake_host_warning(result, devices):
    raise _Noted(result, devices)
  asked = []
  monkeypatch.setattr(budget_hint, "note", fake_note)
  monkeypatch.setattr(budget_hint, "host_warning", fake_host_warning)
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  options = config_lib.RunOptions(num_steps=1, mesh="data=8", plan="dp", progress=False,
                                  memory_per_device=3 * GIB)
  try:
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path / "w"))
  except _Noted as e:
    assert asked == [(3 * GIB, jax.local_devices()[0])]
    assert e.args[0].mode == "forced" and list(e.args[1]) == jax.local_devices()[:8]
  else:
    raise AssertionError("the loop never asked for the note")


def test_a_plan_the_cpu_devices_cannot_hold_together_is_warned_about():
  """A 1.2 GiB table replicated on 8 CPU devices fit the 16 GiB default on each and took
  10 GiB of the host's memory before the first step, unannounced: the budget is per
  device, and CPU devices share the host."""
  import types  # pylint: disable=import-outside-toplevel
  result = types.SimpleNamespace(memory={"table": GIB, "optimizer": GIB // 4,
                                         "buffers": GIB // 4})
  cpus = jax.devices()[:8]
  text = budget_hint.host_warning(result, cpus, host_bytes=15 * GIB)
  assert text == ("the plan puts 1.5 GiB on each of the 8 CPU devices of this process, 12.0 "
                  "GiB in all, and they share this host's 15.0 GiB of memory: the run may "
                  "run out of it. Give --memory_per_device=1440MiB or less (with --plan=auto "
                  "the planner then splits or offloads tables), or fewer devices")
  assert budget_hint.host_warning(result, cpus[:4], host_bytes=15 * GIB) is None   # 6 GiB
  gpus = [types.SimpleNamespace(platform="gpu")] * 8
  assert budget_hint.host_warning(result, gpus, host_bytes=15 * GIB) is None
  tiny = types.SimpleNamespace(memory={"table": 2**20})   # the physical memory, by default
  assert budget_hint.host_warning(tiny, cpus) is None
