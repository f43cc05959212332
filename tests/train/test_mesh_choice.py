"""How a run picks its mesh and plan (`train.mesh_choice`): a resumed checkpoint's plan and
mesh, and plan files made for another device count (train.py and launch.py agree)."""

import dataclasses
import json

import jax
import pytest

from jaxrec.checkpoint import CheckpointManager, convert
from jaxrec.elastic import replan
from jaxrec.errors import ConfigError
from jaxrec.embedding import optimizers
from jaxrec.models import DLRM
from jaxrec.sharding.plan import Plan, format_mesh, uniform_plan
from jaxrec.train import loop
from jaxrec.train.config import ExperimentConfig, RunOptions
from tests.checkpoint import ckpt_helpers as h
from tests.planning_calls import record_shapes

CONFIG = ExperimentConfig(embedding=h.specs(), model=DLRM((8,), (1,)),
                          sparse_optimizer=optimizers.Adagrad(), batch_size=64)
TW = {"data": 2, "table": 4, "row": 1, "col": 1}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """W: a checkpoint saved with twrw on data=2,table=2,row=2; W2: its copy converted
  (`convert_checkpoint.py --format=checkpoint --mesh=data=2,table=4 --plan=tw`)."""
  root = tmp_path_factory.mktemp("runs")
  coll = h.collection("twrw", 8)
  with CheckpointManager(root / "W" / "checkpoints") as mgr:
    mgr.save(5, h.train_state(coll, step=5), coll, force=True)
  convert.export_checkpoint(root / "W" / "checkpoints", root / "W2" / "checkpoints", None,
                            TW, "tw")
  return root / "W", root / "W2", coll.plan


def _setup(workdir, devices=8, **options):
  return loop.setup(CONFIG, RunOptions(**options), jax.devices()[:devices], str(workdir))


def test_auto_resumes_the_plan_and_mesh_the_checkpoint_records(workdirs):
  """A converted copy resumed without --mesh/--plan ran data=8 with a fresh plan and never
  mentioned the plan and mesh the conversion recorded."""
  w, w2, saved_plan = workdirs
  coll, plan, info = _setup(w2)
  assert info["mesh"] == TW and plan == uniform_plan("tw", coll.tables, 4)
  assert "checkpoint" in info["why"] and "W2" in info["why"]
  _, plan, info = _setup(w)
  assert info["mesh"] == h.MESHES[8]["twrw"] | {"col": 1} and plan == saved_plan
  assert info["plan_result"].mode == "checkpoint"


def test_explicit_flags_and_other_device_counts_plan_afresh(workdirs, caplog):
  w, w2, _ = workdirs
  _, plan, info = _setup(w2, plan="dp")
  assert info["mesh"] == {"data": 8, "table": 1, "row": 1, "col": 1}
  assert {p.kind for p in plan.placements.values()} == {"dp"}
  _, _, info = _setup(w2, mesh="data=2,table=2,row=2")
  assert info["mesh"] == h.MESHES[8]["twrw"] | {"col": 1} and info["why"].startswith("--mesh=")
  with caplog.at_level("WARNING"):
    _, _, info = _setup(w2, devices=4)
  assert "records mesh data=2,table=4,row=1,col=1 (8 devices), this run has 4: planned afresh" \
      in caplog.text and "planned afresh" in info["why"]


def test_a_fresh_plan_tries_the_recorded_mesh_before_data_only(workdirs):
  """A resume whose recorded plan no longer fit (a lower --memory_per_device) planned only on
  `data=N`, which replicates every table: 'does not fit' though the recorded mesh had a
  fresh plan that fit. Another device count plans as a fresh run does: `data=N`, then
  `auto_mesh`'s priced search (the four shapes closest to the recorded mesh came next,
  first fit taken: a job shrunk and grown back ran a slower mesh than a fresh one)."""
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  w, w2, _ = workdirs
  data8 = {"data": 8, "table": 1, "row": 1, "col": 1}
  assert mesh_choice.afresh_meshes("auto", 8, str(w2)) == [TW, data8]
  assert mesh_choice.afresh_meshes("auto", 4, str(w2)) == [
      {"data": 4, "table": 1, "row": 1, "col": 1}]
  assert mesh_choice.afresh_meshes("auto", 8, None) == [data8]
  tried = []

  def plan_for(shape, plan=None):
    tried.append((dict(shape), plan is not None))
    if shape != TW or plan is not None:   # only a fresh plan on the recorded mesh fits
      raise ConfigError("does not fit (test)")
    return "fresh"
  choice, why = mesh_choice.resumed(RunOptions(), 8, str(w2), plan_for)
  assert choice is None and "does not fit here" in why
  shape, planned = mesh_choice.first_fitting(mesh_choice.afresh_meshes("auto", 8, str(w2)),
                                             plan_for, "--plan=auto")
  assert (shape, planned) == (TW, "fresh") and tried == [(TW, True), (TW, False)]


def test_unreadable_records_plan_afresh_with_a_warning(workdirs, tmp_path, caplog):
  _, w2, _ = workdirs
  copy = tmp_path / "W3" / "checkpoints"
  convert.export_checkpoint(w2 / "checkpoints", copy)
  manifest = copy / "5" / "manifest" / "metadata"
  manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), saved_mesh={"x": 2})))
  with caplog.at_level("WARNING"):
    _, _, info = _setup(copy.parent)
  assert info["mesh"]["data"] == 8 and "recorded plan and mesh do not read" in caplog.text


def test_the_records_name_the_tables_the_checkpoint_offloaded(workdirs, tmp_path):
  """`mesh_choice.Recorded.offloaded`: the tables the checkpoint's meta records that
  `OffloadConfig.auto` offloaded (it offloads them again, tests/offload/test_planning.py;
  not those the saved run's OffloadConfig.tables listed); none when it offloaded none,
  unknown (None) when the meta does not read or does not say which auto chose."""
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  _, w2, _ = workdirs
  assert mesh_choice.recorded(str(w2)).offloaded == ()
  copy = tmp_path / "W4" / "checkpoints"
  convert.export_checkpoint(w2 / "checkpoints", copy)
  meta = copy / "5" / "meta" / "metadata"
  tables = {"t2": {"rows": 900, "cache_rows": 90, "auto": False},   # configured
            "t1": {"rows": 1000, "cache_rows": 100, "auto": True},
            "t0": {"rows": 50, "cache_rows": 10, "auto": True}}
  original = json.loads(meta.read_text())
  meta.write_text(json.dumps(dict(original, offload={"tables": tables})))
  assert mesh_choice.recorded(str(copy.parent)).offloaded == ("t0", "t1")
  del tables["t1"]["auto"]   # from before the meta said
  meta.write_text(json.dumps(dict(original, offload={"tables": tables})))
  assert mesh_choice.recorded(str(copy.parent)).offloaded is None
  meta.write_text("{")
  assert mesh_choice.recorded(str(copy.parent)).offloaded is None


def test_unreadable_records_warn_once_however_often_the_supervisor_asks(tmp_path, caplog):
  """The elastic supervisor asks for the recorded plan and mesh per process count and per
  generation tried: the warning was logged each time."""
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)   # no manifest
  refuse = lambda *_: pytest.fail("nothing to resume: not planned")
  with caplog.at_level("WARNING"):
    for devices in (8, 4, 8, 2):
      assert mesh_choice.resumed(RunOptions(), devices, str(tmp_path), refuse) == (None, "")
  assert caplog.text.count("recorded plan and mesh do not read") == 1, caplog.text
  assert f"checkpoint {tmp_path}/checkpoints/7: its recorded plan" in caplog.text


@pytest.mark.parametrize("devices", [8, 2])
def test_plan_file_of_another_device_count_runs_where_the_supervisor_would(tmp_path, devices):
  """--mesh=auto with a plan file made for table=2,row=2 (4 devices): train.py ran data=N
  with a warning (on 2 devices the plan's second table slice did not even fit), while
  launch.py took the closest mesh that takes the plan; both now take that mesh."""
  tables, _ = h.specs()
  plan = Plan({t.name: p for t, p in zip(tables, uniform_plan("twrw", tables, 2).placements
                                        .values())})
  path = tmp_path / "plan.json"
  path.write_text(json.dumps({"mesh": {"data": 1, "table": 2, "row": 2, "col": 1},
                              "plan": plan.to_json()}))
  _, got, info = _setup(None, devices, plan=str(path))
  args = replan.TrainArgs.parse(["--workdir=w", "--gin_file=g", f"--plan={path}"])
  assert info["mesh"] == replan.choose(CONFIG, args, 1, devices).mesh
  assert info["mesh"]["table"] == 2 and got == plan
  assert "closest mesh" in info["why"]


def test_a_plan_file_recording_no_mesh_takes_the_first_mesh_that_takes_it(tmp_path):
  """Only data=N was tried: 'table_slice 1 is outside mesh axis table=1', with no hint."""
  tables, _ = h.specs()
  path = tmp_path / "plan.json"
  path.write_text(json.dumps({"plan": uniform_plan("tw", tables, 4).to_json()}))
  _, got, info = _setup(None, 8, plan=str(path))
  assert info["mesh"] == TW and got == uniform_plan("tw", tables, 4)
  assert info["why"] == ("--mesh=auto with a plan file recording no mesh: the first mesh, "
                         "from all on data on, that takes the plan, placing fewest of its "
                         "tables as another kind")
  args = replan.TrainArgs.parse(["--workdir=w", "--gin_file=g", f"--plan={path}"])
  assert replan.choose(CONFIG, args, 1, 8).mesh == TW   # launch.py: the same


def test_a_plan_file_of_another_mesh_warns_once_naming_the_mesh_taken(tmp_path, caplog):
  """--mesh=auto logged "--plan=F was made for mesh X" once per mesh it tried (here 2 on 2
  devices: table=1,row=2 refuses the plan's second table slice), and the supervisor again
  for each re-plan."""
  tables, _ = h.specs()
  path = tmp_path / "plan.json"
  path.write_text(json.dumps({"mesh": {"data": 1, "table": 2, "row": 2, "col": 1},
                              "plan": uniform_plan("twrw", tables, 2).to_json()}))
  args = replan.TrainArgs.parse(["--workdir=w", "--gin_file=g", f"--plan={path}"])
  with caplog.at_level("WARNING"):
    _, _, info = _setup(None, 2, plan=str(path))
    for _ in range(2):                        # two generations of the same job
      assert replan.choose(CONFIG, args, 1, 2).mesh == info["mesh"]
  assert caplog.text.count("was made for mesh") == 1
  assert f"the mesh here is {format_mesh(info['mesh'])}" in caplog.text
  assert info["mesh"]["table"] == 2


def test_a_recorded_plan_that_does_not_fit_is_replanned_with_a_warning(workdirs, caplog):
  _, w2, _ = workdirs
  tables, features = h.specs(rows=h.ROWS + (9,))   # a table the recorded plan lacks
  config = ExperimentConfig(embedding=(tables, features), model=DLRM((8,), (1,)),
                            sparse_optimizer=optimizers.Adagrad(), batch_size=64)
  with caplog.at_level("WARNING"):
    _, _, info = loop.setup(config, RunOptions(), jax.devices()[:8], str(w2))
  assert "does not fit here (plan has no placement for table 't4')" in caplog.text
  assert info["plan_result"].mode != "checkpoint" and "does not fit" in info["why"]


def test_launch_py_resumes_the_recorded_plan_and_mesh_as_train_py_does(workdirs):
  """A resume through scripts/launch.py re-planned (data=8, a fresh plan) where train.py
  took the plan and mesh the checkpoint records."""
  _, w2, _ = workdirs
  _, _, info = _setup(w2)
  args = replan.TrainArgs.parse([f"--workdir={w2}", "--gin_file=g"])
  choice = replan.choose(CONFIG, args, 2, 4)
  assert choice.mesh == info["mesh"] == TW and choice.plan_kinds == {"tw": len(h.specs()[0])}
  assert "checkpoint" in choice.resumed and choice.to_json()["resumed"] == choice.resumed
  assert args.with_mesh_plan(*choice.worker_mesh_plan)[-2:] == ["--mesh=auto", "--plan=auto"]
  other = replan.choose(CONFIG, args, 1, 4)            # another device count: re-planned
  assert not other.resumed and other.worker_mesh_plan == (other.mesh_flag, "auto")
  assert other.to_json()["note"].endswith(
      "records mesh data=2,table=4,row=1,col=1 (8 devices), this run has 4: planned afresh")
  forced = replan.TrainArgs.parse([f"--workdir={w2}", "--gin_file=g", "--plan=dp"])
  assert replan.choose(CONFIG, forced, 2, 4).mesh["data"] == 8


def test_an_error_every_mesh_shares_is_said_once():
  """A plan file naming a table the config lacks failed on each mesh tried, and the error
  listed the same reason three times under 'no mesh of 8 devices fits'; reasons that differ
  by mesh are still listed per mesh."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  shapes = [{"data": 1, "table": 4, "row": 2, "col": 1}, {"data": 2, "table": 2, "row": 2,
                                                         "col": 1}]

  def unknown(shape):
    raise ConfigError("--plan=p.json: plan names unknown tables ['t99']")

  with pytest.raises(ConfigError, match=r"^--plan=p.json: plan names unknown tables \['t99'\]$"):
    mesh_choice.first_fitting(shapes, unknown, "--plan=p.json")

  def by_mesh(shape):
    raise ConfigError(f"needs {shape['table']} slices")

  with pytest.raises(ConfigError, match=r"^no mesh of 8 devices fits --plan=p.json: "
                     r"data=1,table=4,row=2,col=1: needs 4 slices; data=2,table=2,row=2,col=1: "
                     r"needs 2 slices$"):
    mesh_choice.first_fitting(shapes, by_mesh, "--plan=p.json")


def test_a_plan_file_of_other_tables_is_said_once_without_the_mesh_advice(tmp_path):
  """A plan file of another config (other tables), made on 1 device, on 8: 'no mesh of 8
  devices fits', the same reason for each of 3 meshes, each advising to run on the file's
  mesh; its tables, not the mesh, are wrong."""
  tables, _ = h.specs()
  path = tmp_path / "plan.json"
  path.write_text(json.dumps({"mesh": {"data": 1, "table": 1, "row": 1, "col": 1},
                              "plan": {"x": {"kind": "dp", "table_slice": 0},
                                       **uniform_plan("dp", tables[1:], 1).to_json()}}))
  with pytest.raises(ConfigError) as e:
    _setup(None, 8, plan=str(path))
  assert str(e.value) == (f"--plan={path}: plan names unknown tables ['x'] (tables: "
                          f"{[t.name for t in tables]}); it has no placement for table "
                          f"'{tables[0].name}'")


def test_tables_too_big_for_data_only_take_the_cheapest_splitting_mesh(tmp_path):
  """`--mesh=auto --plan=auto` on a fresh run tried only data=N, which holds every table
  whole on every device: 'does not fit' though data=4,table=2 fit (16 KiB here) and
  `--mesh=table=8` fit dlrm_synthetic at 8 MiB. Now the meshes that split tables on one
  axis are priced and the cheapest taken; a forced kind keeps data=N."""
  from jaxrec.sharding import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice, plan_choice  # pylint: disable=import-outside-toplevel
  options = RunOptions(memory_per_device=2**14)
  choice = mesh_choice.choose(CONFIG, options, 8)
  tier = mesh_choice.split_meshes([{"data": 8, "table": 1, "row": 1, "col": 1}], 8)[0]
  assert {mesh_choice._model_axes(s) for s in tier} == {1} and len(tier) == 9   # pylint: disable=protected-access
  priced = {}
  for shape in tier:
    try:
      priced[format_mesh(shape)] = plan_choice.choose(CONFIG, options, shape)[1].step_time_s
    except ConfigError:
      pass
  assert 2 <= len(priced) < len(tier)   # some fit, some do not: a real choice
  assert format_mesh(choice.mesh) == min(priced, key=priced.get)
  assert choice.planned[1].step_time_s == min(priced.values())
  assert "data=8,table=1,row=1,col=1 over --memory_per_device: of the 9 meshes that split " \
      "tables on one axis, the one with the lowest estimated step time" in choice.why
  with pytest.raises(ConfigError, match=r"^plan \(forced\) does not fit.* on mesh data=8,"):
    mesh_choice.choose(CONFIG, RunOptions(memory_per_device=2**14, plan="dp"), 8)
  elastic = replan.choose(CONFIG, replan.TrainArgs.parse(
      [f"--workdir={tmp_path}", "--gin_file=g", f"--memory_per_device={2**14}b"]), 2, 4)
  assert elastic.mesh == choice.mesh and "lowest estimated step time" in elastic.note
  assert mesh_lib.format_mesh(elastic.mesh) in replan.TrainArgs.parse(
      [f"--workdir={tmp_path}", "--gin_file=g"]).with_mesh_plan(*elastic.worker_mesh_plan)[-2]


def test_no_mesh_fits_says_so_after_every_tier():
  """Tier 2 (two or three model axes) is priced only when no tier-1 mesh fits; when none
  fits at all the error keeps data=N's reason and names how many meshes were tried."""
  from jaxrec.errors import BudgetError  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  with pytest.raises(BudgetError, match=r"^the 4 tables together .* does not fit.*; nor does "
                     r"any other mesh of 8 devices \(20 tried; e\.g\. data=1,table=1,"
                     r"row=8,col=1: .*\)$"):
    mesh_choice.choose(CONFIG, RunOptions(memory_per_device=2**12), 8)
  asked = []

  def plan_for(shape, recorded=None, device_only=False):
    asked.append((format_mesh(shape), device_only))
    if shape["data"] == 8 or mesh_choice._model_axes(shape) == 1:   # pylint: disable=protected-access
      raise BudgetError("over")
    return None, _Priced(shape.get("col", 1) - shape["data"] / 10)   # cheapest: col=1, data=2

  shape, _, why = mesh_choice.auto_mesh([{"data": 8}], plan_for, "auto", 8, offload_auto=True)
  assert shape == {"data": 2, "table": 2, "row": 2, "col": 1} and "split tables further" in why
  assert len(asked) == 20 and all(device_only for _, device_only in asked)
  assert mesh_choice.auto_mesh([{"data": 1}], plan_for, "auto", 1)[0] == {"data": 1}


def test_a_budget_no_mesh_can_meet_prices_no_other_mesh(monkeypatch):
  """With 200 tables that fit nowhere the search priced 20 meshes (18 s) on 8 devices, 84
  (158 s) on 64, and the elastic supervisor that again for each process count. When the
  tables and their optimizer state alone, split over every device, are over the budget,
  no other mesh is priced and the error says why."""
  from jaxrec.errors import BudgetError  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice, plan_choice  # pylint: disable=import-outside-toplevel
  asked = record_shapes(monkeypatch, plan_choice, "choose")
  floor = mesh_choice.min_bytes_per_device(CONFIG.tables, _no_offload(), CONFIG.sparse_tx(), 8)
  assert 0 < floor < 2**12
  with pytest.raises(BudgetError, match=r"; nor can any other mesh of 8 devices: the tables "
                     r"and their optimizer state alone need .* a device split over all of "
                     r"them$"):
    replan.choose(CONFIG, replan.TrainArgs.parse(
        ["--workdir=/nonexistent/w", "--gin_file=g", f"--memory_per_device={int(floor) - 1}b"]),
        2, 4)
  assert asked == [{"data": 8, "table": 1, "row": 1, "col": 1}]


def _no_offload():
  from jaxrec import offload  # pylint: disable=import-outside-toplevel
  return offload.OffloadConfig()


def test_the_offloading_pass_prefers_meshes_offloading_fewer_tables():
  """Offloading more looked cheaper (the estimate leaves the host store's cost out): at
  20 MiB `col=8` offloading two tables was taken over `row=8` offloading one."""
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import BudgetError  # pylint: disable=import-outside-toplevel

  class Off:
    def __init__(self, n):
      self.tables = ("t",) * n

  def plan_for(shape, recorded=None, device_only=False):
    if device_only or shape["data"] == 8:
      raise BudgetError("over")
    two = shape.get("col", 1) > 1
    return None, _Priced(1.0 if two else 2.0), None, Off(2 if two else 1)

  shape, planned, why = mesh_choice.auto_mesh([{"data": 8}], plan_for, "auto", 8, True)
  assert len(planned[3].tables) == 1 and shape["col"] == 1 and "OffloadConfig.auto" in why


class _Priced:
  def __init__(self, step_time_s, memory=1):
    self.step_time_s = step_time_s
    self.memory = {"table": memory}

@pytest.mark.parametrize("dense_optimizer", ["sgd", "adam"])
def test_the_plan_report_names_the_dense_model_the_budget_leaves_out(dense_optimizer):
  """`--memory_per_device` prices tables only: a `dlrm_criteo` step with a dense Adam held
  12% more than a budget its plan filled, with no word of it. The report's note gives the
  dense model's bytes: its parameters, their gradients and the optimizer's state."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from jaxrec.planner.result import format_bytes  # pylint: disable=import-outside-toplevel
  from jaxrec.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import dense_optimizer as make  # pylint: disable=import-outside-toplevel
  config = dataclasses.replace(CONFIG, dense_optimizer=make(dense_optimizer))
  coll, _, info = loop.setup(config, RunOptions(mesh="data=8", plan="dp"), jax.devices()[:8])
  state = state_lib.create(config, coll, 0)
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  want = 2 * size(state["params"]) + size(state["opt_state"])
  parts = state_lib.dense_bytes(config, coll.dim)   # the gradients apart: a step measures them
  assert parts == (size(state["params"]) + size(state["opt_state"]), size(state["params"]))
  assert parts.total == want
  assert (size(state["opt_state"]) > size(state["params"])) == (dense_optimizer == "adam")
  assert (f"not in the budget: the dense model's parameters, gradients and optimizer state, "
          f"{format_bytes(want)} on every device") in " ".join(info["plan_result"].notes)


def test_data_n_gives_way_to_table_n_only_when_priced_much_faster():
  """On data=N every table is replicated and every device applies the whole batch's
  updates: 100 features (a third multi-hot) on 8 CPU devices trained at 2.6-2.9k ex/s
  there and 8.3k on table=8, which the planner priced 2.7x faster; auto never priced it."""
  from jaxrec.errors import BudgetError  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  # col=N too (its cw was priced 3.5x faster than data=N where table=N's was 1.3x); on a
  # tie, the fewer bytes a device (tw pads every device to the widest slice)
  for table_time, col_time, expected in [(1.0, 2.0, "table"), (1.6, 1.7, "data"),
                                         (None, None, "data"), (2.5, 1.0, "col"),
                                         (1.0, 1.0, "col")]:
    asked = []

    def plan_for(shape, recorded=None, device_only=False, times=(table_time, col_time)):
      asked.append(format_mesh(shape))
      for axis, t in zip(("table", "col"), times):
        if shape.get(axis, 1) > 1:
          if t is None:
            raise BudgetError("over")
          return None, _Priced(t, memory=2 if axis == "table" else 1)
      return None, _Priced(3.0)

    shape, _, why = mesh_choice.auto_mesh([{"data": 8}], plan_for, "auto", 8)
    assert shape[expected] == 8 and asked == ["data=8,table=1,row=1,col=1",
                                              "data=1,table=8,row=1,col=1",
                                              "data=1,table=1,row=1,col=8"]
    assert ("estimated 3.0x faster" in why) == (expected != "data"), why
  # a forced kind, a mesh already split, or one device: nothing else is priced
  asked = []
  assert mesh_choice.auto_mesh([{"data": 8}], plan_for, "dp", 8)[0] == {"data": 8}
  assert mesh_choice.auto_mesh([{"data": 4, "row": 2}], plan_for, "auto", 8)[0] == {
      "data": 4, "row": 2}
  assert mesh_choice.auto_mesh([{"data": 1}], plan_for, "auto", 1)[0] == {"data": 1}
  assert len(asked) == 3


def test_the_shipped_configs_stay_on_data_n():
  """Their plans on table=N are priced the same per device (every table stays dp)."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib, mesh_choice  # pylint: disable=import-outside-toplevel
  for name in ("dlrm_synthetic", "dlrm_criteo", "skewed_synthetic"):
    launch.parse_gin([f"configs/{name}.gin"], [])
    choice = mesh_choice.choose(launch.build(config_lib.ExperimentConfig), RunOptions(), 8)
    assert choice.mesh["data"] == 8, (name, choice.why)


def test_per_table_optimizers_are_planned_with_each_tables_state():
  """`--mesh=auto --plan=auto` with `ExperimentConfig.table_optimizers`: the floor on every
  mesh (`min_bytes_per_device`) and the planner took one optimizer for all tables, and
  failed on a per-table one; each table's own state is counted now."""
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  config = dataclasses.replace(CONFIG, table_optimizers={"t1": optimizers.Adam()})
  result = mesh_choice.choose(config, RunOptions(), 8).planned[1]
  mem = {t.name: t.memory for t in result.tables}
  assert mem["t1"]["optimizer"] == 2 * mem["t1"]["table"] > 0   # Adam; the others Adagrad
  assert all(m["optimizer"] == m["table"] for n, m in mem.items() if n != "t1")
  assert [s.tables for s in result.stacks if s.name.endswith("_o1")] == [("t1",)]
  from jaxrec.offload import OffloadConfig  # pylint: disable=import-outside-toplevel
  per_table, adagrad = (mesh_choice.min_bytes_per_device(c.tables, OffloadConfig(),
                                                        c.sparse_tx(), 8)
                        for c in (config, CONFIG))
  t1 = next(t for t in config.tables if t.name == "t1")
  assert per_table == adagrad + t1.rows * t1.dim * 4 / 8   # Adam's second value
