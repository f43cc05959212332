"""`--plan`: auto with the cached calibration, forced kinds, and plan files."""

import json

import pytest

from jaxrec import offload, planner
from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError
from jaxrec.models import DLRM
from jaxrec.planner import calibration
from jaxrec.sharding.plan import Plan, TablePlacement
from jaxrec.train.config import ExperimentConfig, RunOptions

TABLES = (TableSpec("a", 5000, 8), TableSpec("b", 300, 8), TableSpec("c", 40, 8))
FEATURES = tuple(FeatureSpec(f"f_{t.name}", t.name, max_len=2) for t in TABLES)
MESH = {"table": 2, "row": 2}
CONFIG = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((8,), (1,)),
                          sparse_optimizer=optimizers.SGD(), batch_size=64)


def choose(plan):
  return offload.choose_plan(CONFIG, RunOptions(plan=plan), MESH, offload.OffloadConfig())


def test_auto_uses_the_cached_calibration_of_this_platform(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXREC_CACHE_DIR", str(tmp_path))
  assert choose("auto")[1].calibration.source.startswith("defaults")
  coefficients = dict(planner.DEFAULT.coefficients, collectives=1e-3)
  version = calibration.VERSION
  planner.save_calibration(planner.Calibration(coefficients, "measured here",
                                               {"platform": "cpu", "version": version}))
  for plan in ("auto", "tw"):
    assert choose(plan)[1].calibration.source == "measured here"
  # A calibration taken on another platform does not describe this one.
  planner.save_calibration(planner.Calibration(coefficients, "on a gpu",
                                               {"platform": "gpu", "version": version}))
  assert choose("auto")[1].calibration.source.startswith("defaults")


@pytest.mark.parametrize("meta", [{}, {"version": calibration.VERSION - 1}],
                         ids=["unversioned", "older"])
def test_auto_prices_with_the_defaults_and_warns_over_an_older_calibration(
    tmp_path, monkeypatch, caplog, meta):
  """One that timed operations the step no longer runs as it did (a bare sort for the
  dedup) would rank plans by costs that are gone."""
  monkeypatch.setenv("JAXREC_CACHE_DIR", str(tmp_path))
  coefficients = dict(planner.DEFAULT.coefficients, collectives=1e-3)
  path = planner.save_calibration(planner.Calibration(coefficients, "measured here",
                                                      dict(meta, platform="cpu")))
  with caplog.at_level("WARNING"):
    assert choose("auto")[1].calibration.source.startswith("defaults")
  assert f"calibration file {path} was measured by an older jaxrec" in caplog.text
  assert "rerun scripts/plan.py --calibrate" in caplog.text


def test_plan_file_runs_the_plan_it_holds(tmp_path):
  wanted = Plan({"a": TablePlacement("twrw", 1), "b": TablePlacement("dp"),
                 "c": TablePlacement("tw", 0)})
  bare = tmp_path / "bare.json"
  bare.write_text(wanted.dumps())
  plan, result, _, _ = choose(str(bare))
  assert plan == wanted and result.mode == "file"
  # A run's plan.json (PlanResult.to_json) holds the plan under "plan".
  wrapped = tmp_path / "plan.json"
  wrapped.write_text(json.dumps(result.to_json()))
  assert choose(str(wrapped))[0] == wanted


def test_plan_file_from_another_mesh_is_kept_with_a_warning(tmp_path, caplog):
  plan = Plan({"a": TablePlacement("tw", 1), "b": TablePlacement("dp"),
               "c": TablePlacement("tw", 0)})
  _, result, _, _ = choose("tw")
  record = dict(result.to_json(), plan=plan.to_json())
  same, other = tmp_path / "same.json", tmp_path / "other.json"
  same.write_text(json.dumps(record))
  other.write_text(json.dumps(dict(record, mesh={"table": 2, "data": 2})))
  with caplog.at_level("WARNING"):
    assert choose(str(same))[0] == plan
  assert "was made for mesh" not in caplog.text
  with caplog.at_level("WARNING"):
    assert choose(str(other))[0] == plan
  assert (f"--plan={other} was made for mesh data=2,table=2,row=1,col=1, the mesh here is "
          "data=1,table=2,row=2,col=1") in caplog.text


def test_a_plan_file_this_mesh_cannot_hold_names_the_mesh_it_was_made_for(tmp_path):
  """A table slice past this mesh's `table` axis: the error says which mesh the file was
  made for (h92: it named only the slice)."""
  _, result, _, _ = choose("tw")
  record = dict(result.to_json(), mesh={"table": 4, "row": 2})
  record["plan"] = dict(record["plan"], a={"kind": "tw", "table_slice": 3})
  path = tmp_path / "plan.json"
  path.write_text(json.dumps(record))
  with pytest.raises(ConfigError, match=(
      r"table 'a': table_slice 3 is outside mesh axis table=2 \(the file was made for mesh "
      r"data=1,table=4,row=2,col=1, 8 devices; the mesh here is data=1,table=2,row=2,col=1: "
      r"run it on that mesh, or give --plan=auto")):
    choose(str(path))
  record["mesh"] = MESH   # made here: nothing to add
  path.write_text(json.dumps(record))
  with pytest.raises(ConfigError, match=r"outside mesh axis table=2$"):
    choose(str(path))


def test_mesh_auto_takes_the_mesh_a_plan_file_records(tmp_path, caplog):
  """`scripts/plan.py --plan=FILE` checks a file on the mesh it records, while train.py's
  `--mesh=auto` put every device on `data`: a plan checked on table=2,row=2 ran on data=4
  (its tables on one slice each, or refused). Now auto takes the file's mesh when it has
  the devices (otherwise the closest that takes the plan: test_mesh_choice.py)."""
  import jax   # pylint: disable=import-outside-toplevel
  from jaxrec.sharding import mesh as mesh_lib   # pylint: disable=import-outside-toplevel
  from jaxrec.train import loop   # pylint: disable=import-outside-toplevel
  _, result, _, _ = choose("twrw")
  path = tmp_path / "plan.json"
  path.write_text(json.dumps(result.to_json()))
  with caplog.at_level("WARNING"):
    _, plan, info = loop.setup(CONFIG, RunOptions(plan=str(path)), jax.devices()[:4])
  assert info["mesh"] == {"data": 1, "table": 2, "row": 2, "col": 1} and plan == result.plan
  assert "was made for mesh" not in caplog.text
  bare = tmp_path / "bare.json"   # records no mesh
  bare.write_text(result.plan.dumps())
  assert mesh_lib.auto_mesh_shape(str(bare), 4) == {"data": 4, "table": 1, "row": 1, "col": 1}


def test_a_plan_files_kinds_placed_as_another_are_warned_and_auto_avoids_it(tmp_path, caplog):
  """A plan file of `rw` tables: recording no mesh, `--mesh=auto` took data=4 (every table
  whole on every device, as `dp`), and on an explicit `--mesh=data=4` only the file's
  other mesh was warned about; `--plan=rw` itself warned that it is placed as `dp`."""
  import jax   # pylint: disable=import-outside-toplevel
  from jaxrec.train import loop   # pylint: disable=import-outside-toplevel
  bare = tmp_path / "bare.json"
  bare.write_text(json.dumps({t.name: {"kind": "rw"} for t in TABLES}))
  with caplog.at_level("WARNING"):
    _, plan, info = loop.setup(CONFIG, RunOptions(plan=str(bare)), jax.devices()[:4])
  assert info["mesh"] == {"data": 2, "table": 1, "row": 2, "col": 1}
  assert {p.kind for p in plan.placements.values()} == {"rw"} and "placed as" not in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    loop.setup(CONFIG, RunOptions(plan=str(bare), mesh="data=4"), jax.devices()[:4])
  assert (f"--plan={bare}: tables ['a', 'b', 'c'] (rw) split over axis row, of size 1 in mesh "
          "data=4,table=1,row=1,col=1: they are placed as dp here") in caplog.text


@pytest.mark.parametrize("content,message", [
    (None, "--plan: cannot read '{path}'"),
    ('{"a": {"kind": "tw"},\n "b": oops}', "--plan: {path}:2: not valid JSON"),
    ('{"a": {"kind": "zz"}}', "--plan: {path}: unknown placement kind 'zz'"),
    ('{"a": {"kind": "tw", "slice": 1}}', "--plan: {path}: "),
    ('{"a": {"kind": "tw"}, "b": {"kind": "tw"}}', "--plan={path}: plan has no placement for table 'c'"),
    ('{"a": {"kind": "tw", "table_slice": 5}, "b": {"kind": "dp"}, "c": {"kind": "dp"}}',
     "--plan={path}: table 'a': table_slice 5 is outside mesh axis table"),
])
def test_bad_plan_files_name_the_file(tmp_path, content, message):
  path = tmp_path / "p.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(ConfigError) as e:
    choose(str(path))
  assert str(e.value).startswith(message.format(path=path)), str(e.value)


@pytest.mark.parametrize("spec", ["", " ", ","])
def test_an_empty_mesh_is_an_error(spec):
  """`--mesh=` was read as data=1,table=1,row=1,col=1: it ran on one device and on more
  failed with 'has 1 devices but 8 are available'."""
  from jaxrec.sharding.mesh import parse_mesh_spec  # pylint: disable=import-outside-toplevel
  for devices in (1, 8):
    with pytest.raises(ConfigError, match="--mesh: empty"):
      parse_mesh_spec(spec, devices)


def test_mesh_auto_moves_on_when_data_n_cannot_stack_the_tables():
  """Two 1.2e9-row tables fit the budget on `data=8`, but stacked whole they pass the
  2**31 rows int32 numbers reach on one table slice: `--mesh=auto` stopped there with that
  error instead of pricing meshes with a `table` axis."""
  from jaxrec.errors import BudgetError  # pylint: disable=import-outside-toplevel
  from jaxrec.planner import search  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  tables = tuple(TableSpec(f"t{i}", 1_200_000_000, 1) for i in range(2))
  features = tuple(FeatureSpec(f"f{i}", f"t{i}") for i in range(2))
  config = ExperimentConfig(embedding=(tables, features), model=DLRM((8, 1), (1,)),
                            sparse_optimizer=optimizers.SGD(), batch_size=64)
  with pytest.raises(BudgetError, match=r"stack 2,400,000,000 rows on one table slice.* \(mesh "
                     r"data=8,table=1,row=1,col=1 has no table axis to spread them on\)"):
    search.propose_plan(tables, features, {"data": 8}, None, "sgd", 64)
  choice = mesh_choice.choose(config, RunOptions(mesh="auto", plan="auto"), 8)
  assert choice.mesh["table"] > 1, choice.mesh
  assert "data=8,table=1,row=1,col=1 cannot stack the tables (over 2**31 rows on one table " \
      "slice): of the" in choice.why, choice.why


def test_a_forced_kind_placed_as_another_on_the_mesh_is_warned_about(caplog):
  """`--plan=cw --mesh=data=8` holds every table whole, as `dp`, and `--mesh=auto` gave
  `twrw`, `twcw` and `grid` every device on `table` (placed as `tw`): plans compared so
  were one plan under two names, without a word."""
  # pylint: disable-next=import-outside-toplevel
  from jaxrec.sharding import mesh as mesh_lib, plan as plan_lib
  with caplog.at_level("WARNING"):
    offload.choose_plan(CONFIG, RunOptions(plan="cw"), {"data": 4}, offload.OffloadConfig())
  assert ("--plan=cw splits tables over axis col, which is 1 in mesh data=4,table=1,row=1,"
          "col=1: the tables are placed as --plan=dp (whole on every device); for cw give "
          "e.g. --mesh=col=4") in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    plan_lib.warn_collapsed_kind("grid", {"data": 2, "table": 2, "row": 2})
    for kind in plan_lib.KINDS:   # what --mesh=auto gives a kind is that kind, where a
      for n in (1, 4, 6, 8):      # mesh of n devices can be (twrw on 2 cannot)
        plan_lib.warn_collapsed_kind(kind, mesh_lib.auto_mesh_shape(kind, n))
    choose("twrw")                # MESH is table=2,row=2
    plan_lib.warn_collapsed_kind("grid", {"row": 2, "col": 4})   # grid on table=1
    plan_lib.warn_collapsed_kind("rw", {"data": 1})              # one device: all alike
  assert caplog.messages == [
      "--plan=grid splits tables over axes table, row and col, and axis col is 1 in mesh "
      "data=2,table=2,row=2,col=1: the tables are placed as --plan=twrw (split over axes "
      "table and row); for grid give e.g. --mesh=table=2,row=2,col=2"]
  assert mesh_lib.auto_mesh_shape("twrw", 8) == {"data": 1, "table": 2, "row": 4, "col": 1}
  assert mesh_lib.auto_mesh_shape("grid", 4) == {"data": 1, "table": 1, "row": 2, "col": 2}
  assert mesh_lib.auto_mesh_shape("twcw", 2) == {"data": 1, "table": 2, "row": 1, "col": 1}
  assert mesh_lib.auto_mesh_shape("twrw", 9) == {"data": 1, "table": 3, "row": 3, "col": 1}
  caplog.clear()
  with caplog.at_level("WARNING"):
    plan_lib.warn_collapsed_kind("twcw", mesh_lib.auto_mesh_shape("twcw", 2))
    plan_lib.warn_collapsed_kind("grid", {"table": 4})
  assert caplog.messages == [
      "--plan=twcw splits tables over axes table and col, and axis col is 1 in mesh "
      "data=1,table=2,row=1,col=1: the tables are placed as --plan=tw (each whole on one "
      "slice of axis table); no mesh of 2 devices splits all of table and col",
      "--plan=grid splits tables over axes table, row and col, and axes row and col are 1 in "
      "mesh data=1,table=4,row=1,col=1: the tables are placed as --plan=tw (each whole on one "
      "slice of axis table); for grid give e.g. --mesh=row=2,col=2"]
  # choose_plan inside mesh_warning_held (--mesh=auto, elastic re-plans): only the mesh
  # taken is warned about (a warning for data=4 came with col=4 chosen)
  caplog.clear()
  with caplog.at_level("WARNING"), plan_lib.mesh_warning_held() as chosen:
    offload.choose_plan(CONFIG, RunOptions(plan="cw"), {"data": 2, "row": 2},
                        offload.OffloadConfig())
    offload.choose_plan(CONFIG, RunOptions(plan="cw"), {"col": 4}, offload.OffloadConfig())
    chosen({"col": 4})
  assert caplog.messages == []
