"""Plans as data: JSON round trip and hand-edited plan files."""

import json

import pytest

from jaxrec import planner
from jaxrec.embedding.specs import FeatureSpec, TableSpec, uniform_tables
from jaxrec.errors import ConfigError
from jaxrec.planner import estimate_plan
from jaxrec.sharding.plan import Plan, TablePlacement, uniform_plan

GiB = 2**30


def test_plan_json_round_trip():
  plan = Plan({"a": TablePlacement("tw", 1), "b": TablePlacement("rw")})
  assert Plan.from_json(json.loads(plan.dumps())) == plan


@pytest.mark.parametrize("table_slice", ["1", 1.0, None, True])
def test_non_integer_table_slice_is_a_config_error(tmp_path, table_slice):
  # A hand-edited plan file: was a TypeError traceback (or, for `true`, slice 1).
  path = tmp_path / "p.json"
  path.write_text(json.dumps({"a": {"kind": "tw", "table_slice": table_slice}}))
  with pytest.raises(ConfigError, match=r"p.json: table_slice must be an integer, got .* "
                     r"\(table 'a'\)"):
    plan = Plan.load(str(path))
    estimate_plan(plan, [TableSpec("a", 10, 8)], [FeatureSpec("f", "a")], {"table": 2}, GiB)


@pytest.mark.parametrize("content", [[1, 2], {"plan": "dp"}])
def test_a_plan_file_of_the_wrong_shape_shows_the_expected_shape(tmp_path, content):
  path = tmp_path / "plan.json"
  path.write_text(json.dumps(content))
  with pytest.raises(ConfigError) as e:
    Plan.load(str(path))
  assert 'expected {table: {"kind": ..., "table_slice": ...}} or a plan.json' in str(e.value)


def test_the_plan_a_profile_proposes_loads(tmp_path):
  """README: write what `scripts/plan.py --profile` proposed with `--json=PATH` and run it
  with `--plan=PATH`; that JSON holds the plan under "proposed", and loading it said
  'expected {table: ...}'."""
  tables, features = uniform_tables(2, [1000, 10], 16)
  for step in (100, 200, 300):
    planner.append_profile(tmp_path, planner.profile_record(
        step, 0.004, uniform_plan("tw", tables, 2), {"table": 2}, steps=100, batch_size=64))
  ref = planner.refine_from_profile(tmp_path, tables, features, 2**30, 0.0, 64)
  path = tmp_path / "proposed.json"
  path.write_text(json.dumps(ref.to_json()))
  plan, mesh = Plan.load_with_mesh(str(path))
  assert plan == ref.proposed.plan
  assert mesh == {"data": 1, "table": 2, "row": 1, "col": 1}


def test_an_unknown_placement_field_names_the_table(tmp_path):
  """`"slice"` for `"table_slice"` said only `TablePlacement.__init__() got an unexpected
  keyword argument 'slice'`."""
  path = tmp_path / "p.json"
  path.write_text(json.dumps({"t0": {"kind": "tw"}, "t1": {"kind": "tw", "slice": 1}}))
  with pytest.raises(ConfigError, match=r"table 't1': unknown placement field\(s\) \['slice'\] "
                     r"\(fields: kind, table_slice"):
    Plan.load(str(path))



@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00", b'{"t\xe9": {"kind": "tw"}}'])
def test_a_plan_file_that_is_not_utf8_is_a_config_error(tmp_path, content):
  """A binary or Latin-1 file (e.g. `--plan=W/plan.json.gz` renamed) ended in a
  UnicodeDecodeError traceback."""
  path = tmp_path / "p.json"
  path.write_bytes(content)
  with pytest.raises(ConfigError, match=rf"--plan: {path}: not a JSON text file \(byte \d+ "
                     r"is not UTF-8\)"):
    Plan.load(str(path))



def test_a_table_listed_twice_in_a_plan_file_is_an_error(tmp_path):
  """A hand-edited plan that lists a table twice silently ran the last entry (json keeps
  the last of duplicate keys); the first was dropped without a word."""
  path = tmp_path / "p.json"
  path.write_text('{"plan": {\n "t0": {"kind": "tw"},\n "t1": {"kind": "rw"},\n'
                  ' "t0": {"kind": "dp"}\n}}')
  with pytest.raises(ConfigError, match=rf"--plan: {path}: key 't0' appears twice"):
    Plan.load(str(path))



@pytest.mark.parametrize("placement, why", [
    ({"table_slice": 1}, "no \"kind\""),
    ({"kind": ["tw"]}, r"unknown placement kind \['tw'\]"),
    ({"kind": {"tw": 1}}, r"unknown placement kind \{'tw': 1\}")])
def test_a_placement_without_a_kind_string_names_the_table(tmp_path, placement, why):
  """A missing "kind" said only `TablePlacement.__init__() missing 1 required positional
  argument: 'kind'`, a list or object `unhashable type`: neither named the table."""
  path = tmp_path / "p.json"
  path.write_text(json.dumps({"t0": {"kind": "tw"}, "t1": placement}))
  with pytest.raises(ConfigError, match=rf"--plan: {path}: .*{why}") as e:
    Plan.load(str(path))
  assert "table 't1'" in str(e.value)


@pytest.mark.parametrize("mesh,why", [
    ({"tabel": 4}, r"unknown axes \['tabel'\] \(axes: data, table, row, col\)"),
    ({"data": 2.5, "table": 2}, "axis 'data': size 2.5 is not a positive integer"),
    ({"data": 0, "table": 8}, "axis 'data': size 0 is not a positive integer"),
    ({"data": True, "table": 4}, "axis 'data': size true is not a positive integer"),
    ({"table": "4"}, "axis 'table': size \"4\" is not a positive integer"),
    ([4], "expected an object of axis sizes")])
def test_a_damaged_recorded_mesh_is_an_error_naming_it(tmp_path, mesh, why):
  """A damaged `"mesh"` was read as a guess (`{"tabel": 4}`: one device, `{"data": 2.5}`:
  data=2), then as no mesh at all, silently: `--mesh=auto` took the first mesh from all on
  `data` on, where a hand-edited file's `rw` tables (`"rows": 8`) were each held whole on
  every device."""
  path = tmp_path / "plan.json"
  path.write_text(json.dumps({"plan": {"a": {"kind": "tw"}}, "mesh": mesh}))
  with pytest.raises(ConfigError, match=rf'^--plan: {path}: "mesh" .*: {why}'):
    Plan.load_with_mesh(str(path))
  path.write_text(json.dumps({"plan": {"a": {"kind": "tw"}}, "mesh": {"table": 4}}))
  assert Plan.load_with_mesh(str(path))[1] == {"data": 1, "table": 4, "row": 1, "col": 1}
  path.write_text(json.dumps({"plan": {"a": {"kind": "tw"}}}))   # a bare plan: no mesh
  assert Plan.load_with_mesh(str(path))[1] is None


def test_a_plan_file_without_json_in_its_name_is_a_plan_file(tmp_path, monkeypatch):
  """`cp W/plan.json smallplan; --plan=smallplan`: train.py and plan.py said 'unknown plan',
  convert_checkpoint.py read it only with --mesh (and asked for one it records)."""
  from jaxrec.checkpoint import convert  # pylint: disable=import-outside-toplevel
  from jaxrec.sharding.plan import check_plan_flag, is_plan_file, recorded_mesh  # pylint: disable=C0415
  monkeypatch.chdir(tmp_path)
  mesh = {"data": 2, "table": 2, "row": 1, "col": 1}
  (tmp_path / "smallplan").write_text(json.dumps(
      {"mesh": mesh, "plan": {"a": {"kind": "tw", "table_slice": 1}}}))
  (tmp_path / "rw").write_text("{}")   # a kind stays the kind, whatever files are here
  assert is_plan_file("smallplan") and recorded_mesh("smallplan") == mesh
  check_plan_flag("smallplan")
  assert not is_plan_file("rw") and not is_plan_file("auto")
  assert not is_plan_file("no_such_plan") and is_plan_file("no/such")
  with pytest.raises(ConfigError, match=r"^--plan: unknown plan 'no_such_plan'"):
    check_plan_flag("no_such_plan")
  for typed, meant in (("TW", "tw"), ("Auto", "auto"), ("twr", "twrw")):   # did you mean
    with pytest.raises(ConfigError, match=rf"plan .json file\); did you mean '{meant}'\?$"):
      check_plan_flag(typed)
  loaded = convert.resolve_plan("smallplan", [TableSpec("a", 10, 8)], mesh)
  assert loaded.placements["a"] == TablePlacement("tw", 1)


def test_convert_mesh_errors_do_not_offer_auto():
  """`--mesh=,` said 'give AXIS=SIZE,... or auto', and `--mesh=auto` was then refused."""
  from jaxrec.checkpoint import convert  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=r"^--mesh: empty; give AXIS=SIZE,\.\.\. \(e\.g\. "
                     r"data=2,table=2,row=2,col=1\)$"):
    convert.parse_mesh(",")
  with pytest.raises(ConfigError, match=r"^--mesh=auto: a copy is laid out for one mesh; "
                     r"give it as AXIS=SIZE"):
    convert.parse_mesh("auto")
