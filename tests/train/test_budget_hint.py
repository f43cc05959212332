"""The note when the default planner budget is far below the device's memory (a GPU)."""

import jax
import numpy as np

from jaxrec import planner
from jaxrec.train import budget_hint

GIB = 2**30
MIB = 2**20


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
  from jaxrec.train import state as state_lib   # pylint: disable=import-outside-toplevel
  from tests.train.test_loop_eval_ids import BINDINGS   # pylint: disable=import-outside-toplevel

  def fake_note(memory_per_device, device):
    asked.append((memory_per_device, device))

  def fake_host_warning(result, devices, offloaded, dense, gradients, saved):
    assert saved == budget_hint.saved_bytes(collection[0]) > 0
    raise _Noted(result, devices, offloaded, dense, gradients)
  collection = []
  real_setup = loop.setup
  monkeypatch.setattr(loop, "setup", lambda *a, **k: collection.append(
      (out := real_setup(*a, **k))[0]) or out)
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
    assert e.args[2] == 0   # nothing offloaded
    parts = state_lib.dense_bytes(config_lib.ExperimentConfig(), 16)
    assert e.args[3:] == parts and min(parts) > 0   # the gradients count before a step does
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
  found = budget_hint.host_warning(result, cpus, host_bytes=15 * GIB)
  text = found.text
  assert found.room_mib == 1440 and str(found) == text   # the budget it suggests, as data
  assert text == ("the plan puts 1.5 GiB on each of the 8 CPU devices of this process, 12.0 "
                  "GiB in all, and they share this host's 15.0 GiB of memory: the run may "
                  "run out of it. Give --memory_per_device=1440MiB or less (with --plan=auto "
                  "the planner then splits or offloads tables), or fewer devices")
  assert budget_hint.host_warning(result, cpus[:4], host_bytes=15 * GIB) is None   # 6 GiB
  gpus = [types.SimpleNamespace(platform="gpu")] * 8
  assert budget_hint.host_warning(result, gpus, host_bytes=15 * GIB) is None
  tiny = types.SimpleNamespace(memory={"table": 2**20})   # the physical memory, by default
  assert budget_hint.host_warning(tiny, cpus) is None
  # the dense model's state on every device counts too (a 1,000-feature DLRM: 244 MiB each)
  small = types.SimpleNamespace(memory={"table": GIB // 2})
  assert budget_hint.host_warning(small, cpus, host_bytes=15 * GIB) is None   # 4 GiB
  found = budget_hint.host_warning(small, cpus, host_bytes=15 * GIB, dense=GIB // 2,
                                   gradients=GIB // 2)
  text = found.text
  assert found.room_mib == 416
  assert text.startswith("the plan puts 1.5 GiB (512.0 MiB of tables with their optimizer "
                         "state, lookup buffers and ids and 1.0 GiB of the dense model's "
                         "parameters, gradients and optimizer state) on each of the 8 "
                         "CPU devices of this process, 12.0 GiB in all") and text.endswith(
                             "Give --memory_per_device=416MiB or less (with --plan=auto the "
                             "planner then splits or offloads tables), or fewer devices")
  found = budget_hint.host_warning(small, cpus, host_bytes=15 * GIB, dense=2 * GIB)
  text = found.text
  assert found.room_mib is None
  assert text.endswith("The dense model alone takes more than each device's share: use fewer "
                       "devices or a smaller dense model")


def test_the_offload_tiers_host_memory_is_counted_on_any_platform():
  """The host warning left the offload tier's host memory out (and looked at CPU devices
  only): a `kvstore='memory'` store holds its whole table in host RAM, and every
  offloaded table takes 12 bytes per row of bookkeeping, on a GPU host too."""
  import types  # pylint: disable=import-outside-toplevel
  from jaxrec import offload  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding import optimizers  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import TableSpec  # pylint: disable=import-outside-toplevel
  tables = (TableSpec("big", 100_000_000, 32), TableSpec("small", 1000, 32))
  adagrad = optimizers.RowWiseAdagrad()   # 32 x 4 + 4 = 132 bytes a row
  config = offload.OffloadConfig(tables={"big": {"cache_rows": 1000, "kvstore": "memory"}},
                                 host_buffer_rows=1000)
  slots = 1000 * offload.config.SLOT_BYTES   # a 1000-row cache's bookkeeping
  assert offload.host_bytes(tables, config, adagrad) == (
      12 * 100_000_000 + slots + 1000 * (132 + 24) + 100_000_000 * 132)
  filed = offload.OffloadConfig(tables={"big": {"cache_rows": 1000}}, host_buffer_rows=1000)
  assert offload.host_bytes(tables, filed, adagrad) == 12 * 100_000_000 + slots + 1000 * 156
  # a buffer holds a row once: one of a table smaller than host_buffer_rows has its rows (it
  # was counted, and allocated, at 1,048,576 rows whatever the table)
  small = offload.OffloadConfig(tables={"small": {"cache_rows": 100}})
  assert small.buffer_rows(tables[1]) == 1000 < small.host_buffer_rows
  assert offload.host_bytes(tables, small, adagrad) == (
      12 * 1000 + 100 * offload.config.SLOT_BYTES + 1000 * 156)
  # SLOT_BYTES is what the cache map and the tier hold per slot (~45 B a slot were left
  # out: 0.5 GB of a 10M-row cache)
  from jaxrec.offload.cache import CacheMap   # pylint: disable=import-outside-toplevel
  cache = CacheMap("big", 5000, 1000)
  per_slot = sum(a.nbytes for a in (cache.id_of, cache.last, cache.uses, cache._pin,   # pylint: disable=protected-access
                                    cache._soft, cache._free)) / 1000   # pylint: disable=protected-access
  assert offload.config.SLOT_BYTES == per_slot + 8 + 1   # + the tier's resident, dirty
  from jaxrec.offload.buffer import HostBuffer   # pylint: disable=import-outside-toplevel
  buffer = HostBuffer("big", 5000, 1000, {"table": (32,)}, {"table": np.float32})
  assert offload.config.BUFFER_ROW_BYTES == sum(
      a.nbytes for a in (buffer.row_at, buffer.version, buffer._free)) / 1000   # pylint: disable=protected-access
  result = types.SimpleNamespace(memory={"table": GIB})
  gpus = [types.SimpleNamespace(platform="gpu")] * 8
  found = budget_hint.host_warning(result, gpus, host_bytes=15 * GIB, offloaded=13 * GIB)
  text = found.text
  assert found.room_mib is None   # no CPU devices: no budget to give
  assert text == ("the offload tier keeps about 13.0 GiB in host memory (its buffered rows and "
                  "their optimizer state, 12 bytes per table row and 53 per cache slot, and "
                  "the whole table of a kvstore='memory' store), of this host's 15.0 GiB: the run may run out of it. "
                  "Give a memory store's table a file store (kvstore='file'), lower "
                  "OffloadConfig.host_buffer_rows or offload fewer tables")
  assert budget_hint.host_warning(result, gpus, host_bytes=15 * GIB, offloaded=GIB) is None
  cpus = jax.devices()[:2]   # 2 GiB on the devices + 8 GiB offloaded > 75% of 12 GiB
  found = budget_hint.host_warning(result, cpus, host_bytes=12 * GIB, offloaded=8 * GIB)
  text = found.text
  assert found.room_mib == 512
  assert ", and the plan puts 2.0 GiB on the 2 CPU devices of this process, of this host's " \
      "12.0 GiB" in text and "give --memory_per_device=512MiB or less or offload" in text
  assert budget_hint.host_warning(result, cpus, host_bytes=12 * GIB, offloaded=6 * GIB) is None


def test_an_eval_batch_the_plan_cannot_hold_is_warned_about():
  """The planner prices the training batch: a `row=8`, `rw` plan at 87% of a 3 MiB budget
  held 1.34x it in the eval step at batch 4096 (the compiled eval step: 1.7 MB of
  arguments, 2.5 MB of temporaries). Its forward buffers are priced at the eval batch."""
  from jaxrec import launch   # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib, loop   # pylint: disable=import-outside-toplevel
  launch.parse_gin(["configs/dlrm_synthetic.gin"], [])
  config = config_lib.ExperimentConfig()
  texts = []
  for budget in (3, 6):
    options = config_lib.RunOptions(mesh="row=8", plan="rw", memory_per_device=budget * MIB)
    collection, _, info = loop.setup(config, options)
    texts.append(budget_hint.eval_warning(info["plan_result"], collection, 4096))
  assert texts[0].startswith("ExperimentConfig.eval_batch_size=4096: the eval's embedding "
                             "lookup takes each device to about 4.")
  assert "over --memory_per_device=3.0 MiB (the plan was priced at the training batch, 512)" \
      in texts[0] and texts[1] is None
  assert budget_hint.eval_warning(info["plan_result"], collection, 512) is None


def test_the_eval_warning_prices_each_stack_with_its_tables_optimizer():
  """With per-table optimizers (`optimizers.per_table`) the eval lookup's memory counts
  each table's own state and dedup: one optimizer's state for every table
  (`optimizer_state(TableOptimizers)`) was a TypeError. Adam on one of two tables needs
  more than SGD on both, less than Adam on both."""
  from jaxrec.embedding import optimizers   # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.collection import EmbeddingCollection  # pylint: disable=C0415
  from jaxrec.embedding.specs import FeatureSpec, TableSpec  # pylint: disable=C0415
  from jaxrec.sharding import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from jaxrec.sharding.plan import uniform_plan  # pylint: disable=import-outside-toplevel
  tables = [TableSpec("a", 1000, 16), TableSpec("b", 1000, 16)]
  features = [FeatureSpec("fa", "a", 2), FeatureSpec("fb", "b", 2)]
  plan, mesh = uniform_plan("dp", tables, 1), mesh_lib.make_mesh({"data": 8}, jax.devices()[:8])
  need = {}
  for name in ("sgd", "adam"):
    opt = optimizers.sparse_optimizer(name)
    col = EmbeddingCollection.create(tables, features, plan, mesh, opt)
    need[name] = planner.plan_cost(col.layouts, features, 512, opt, col.options.kernel,
                                   col.options.dedup, forward=True).memory_bytes
  opt = optimizers.per_table(optimizers.SGD(), {"b": optimizers.Adam()})
  col = EmbeddingCollection.create(tables, features, plan, mesh, opt)
  for budget, warned in ((need["sgd"], True), (need["adam"] - 1, False)):
    result = planner.estimate_plan(plan, tables, features, {"data": 8}, budget, opt, 64,
                                   check=False)
    assert (budget_hint.eval_warning(result, col, 512) is not None) == warned, budget


class CpuDevice:
  platform = "cpu"


def test_auto_plans_on_cpu_devices_get_the_hosts_share_as_their_budget():
  """The default 16 GiB a device let --plan=auto replicate a 10M x 64 item table on 8 CPU
  devices (21.5 GiB of a 23.5 GiB host): warned, then OOM-killed after 35 s."""
  cpus = [CpuDevice()] * 8
  got = budget_hint.host_budget(None, "auto", cpus, dense=10 * MIB, host_bytes=24 * GIB)
  assert got == int(0.75 * 24 * GIB / 2 / 8) - 10 * MIB   # half: a checkpoint's host copy
  # not: a budget given, a forced plan, several processes, other devices, a big host
  assert budget_hint.host_budget(2 * GIB, "auto", cpus, 0, host_bytes=24 * GIB) is None
  assert budget_hint.host_budget(None, "dp", cpus, 0, host_bytes=24 * GIB) is None
  assert budget_hint.host_budget(None, "auto", cpus, 0, processes=2, host_bytes=24 * GIB) is None
  assert budget_hint.host_budget(None, "auto", [FakeDevice({})], 0, host_bytes=24 * GIB) is None
  assert budget_hint.host_budget(None, "auto", cpus[:1], 0, host_bytes=1024 * GIB) is None


def test_the_loop_plans_auto_with_the_hosts_share(monkeypatch, caplog):
  from jaxrec import launch   # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib, loop   # pylint: disable=import-outside-toplevel
  from tests.train.test_loop_eval_ids import BINDINGS   # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(budget_hint, "host_budget", lambda *a, **k: MIB)
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  options = config_lib.RunOptions(num_steps=1, mesh="data=8", plan="auto", progress=False)
  with caplog.at_level("INFO"):
    try:
      loop.setup(config_lib.ExperimentConfig(), options)
    except Exception as e:   # 1 MiB a device holds no plan of these tables
      assert "1.0 MiB/device" in str(e), e
    else:
      raise AssertionError("planned within 1 MiB")
  assert "planning with --memory_per_device=1MiB: the host's memory shared by its 8 CPU " \
      "devices" in caplog.text


def test_the_host_warning_counts_a_checkpoints_copy_of_the_tables():
  """A plan filling the suggested budget peaked at 2.4x it: the save copies the tables to
  the host beside the devices' (CPU devices: both in host memory)."""
  fake = type("R", (), {"memory": {"table": GIB}, "batch_size": 64})()
  cpus = [type("D", (), {"platform": "cpu"})()] * 8
  assert budget_hint.host_warning(fake, cpus, host_bytes=12 * GIB) is None   # 8 of 9 GiB
  warned = budget_hint.host_warning(fake, cpus, host_bytes=12 * GIB, saved=2 * GIB)
  assert "8.0 GiB in all (and a checkpoint's save copies 2.0 GiB of tables and optimizer " \
      "state to the host beside them)" in warned.text, warned.text
  assert warned.room_mib == (int((0.75 * 12 * GIB - 2 * GIB) / 8) - 0) >> 20
