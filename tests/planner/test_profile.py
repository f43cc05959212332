"""Profile refinement: NNLS fit of the cost coefficients, re-planning from a profile."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from jaxrec import planner
from jaxrec.embedding.specs import uniform_tables
from jaxrec.errors import ConfigError, DataError
from jaxrec.planner import cost_model as cm
from jaxrec.planner import (COST_TERMS, DEFAULT, Calibration, estimate_plan, fit_coefficients,
                            propose_plan)
from jaxrec.sharding.plan import uniform_plan

GiB = 2**30


def test_nnls_recovers_known_coefficients():
  rng = np.random.default_rng(0)
  true = rng.uniform(0.5, 2.0, len(COST_TERMS)) * np.logspace(-3, -12, len(COST_TERMS))
  true[3] = 0.0  # a term that costs nothing stays at 0
  scales = np.logspace(0, 9, len(COST_TERMS))
  samples = []
  for _ in range(40):
    x = rng.uniform(0, 1, len(COST_TERMS)) * scales
    samples.append((dict(zip(COST_TERMS, x)), float(x @ true)))
  fit = fit_coefficients(samples).vector()
  np.testing.assert_allclose(fit, true, rtol=1e-6, atol=1e-18)
  noisy = [(x, t * (1 + 0.01 * rng.standard_normal())) for x, t in samples]
  fit = fit_coefficients(noisy).vector()
  big = true > 0
  assert np.all(np.abs(fit[big] - true[big]) / true[big] < 0.2)


def test_fit_keeps_the_prior_ratios_at_a_common_scale():
  x = {"const": 1.0, "collectives": 10.0, "all_to_all_bytes": 1e6, "gather_bytes": 1e6}
  prior_t = sum(v * DEFAULT.coefficients[k] for k, v in x.items())
  # One sample 300x slower than the prior says (a CPU, not an accelerator): one sample
  # cannot tell the terms apart, so all scale alike, unexercised ones too.
  fit = fit_coefficients([(x, 300 * prior_t)], DEFAULT)
  predicted = sum(v * fit.coefficients[k] for k, v in x.items())
  assert predicted == pytest.approx(300 * prior_t, rel=0.01)
  scale = fit.meta["scale"]
  for k in ("collectives", "all_to_all_bytes", "gather_bytes", "pool_bytes", "stacks"):
    assert fit.coefficients[k] / DEFAULT.coefficients[k] == pytest.approx(scale, rel=0.05), k


def test_fit_moves_one_term_by_orders_of_magnitude_when_the_data_demand_it():
  """The machine is 100x slower than the prior everywhere, pooling 30x more again, and has a
  2 ms dense part: samples that vary pooling and all-reduce recover both coefficients."""
  truth = Calibration({k: 100 * v for k, v in DEFAULT.coefficients.items()}
                      | {"pool_bytes": 3000 * DEFAULT.coefficients["pool_bytes"],
                         "const": 2e-3}, "truth")
  rng = np.random.default_rng(0)
  samples = []
  for _ in range(6):
    x = {"const": 1.0, "collectives": 3.0, "stacks": 4.0, "gather_bytes": 2e6,
         "pool_bytes": rng.uniform(1e6, 8e6), "all_reduce_bytes": rng.uniform(0, 8e6),
         "update_bytes": 4e6}
    samples.append((x, sum(v * truth.coefficients[k] for k, v in x.items())))
  fit = fit_coefficients(samples, DEFAULT)
  for k in ("pool_bytes", "all_reduce_bytes"):
    assert fit.coefficients[k] == pytest.approx(truth.coefficients[k], rel=0.1), k
  assert fit.meta["rms_relative_error"] < 0.01


def _setup():
  tables, features = uniform_tables(
      8, [4_000_000, 2_000_000, 1_000_000, 10**5, 10**4, 1000, 100, 10], 64,
      max_len=[1, 2, 1, 4, 1, 8, 1, 1])
  mesh = {"data": 2, "table": 2, "row": 2, "col": 1}
  # "The machine": collectives 30x slower than the defaults think, a 2 ms dense part.
  truth = Calibration(dict(DEFAULT.coefficients, all_to_all_bytes=3e-10,
                           reduce_scatter_bytes=3e-10, gather_bytes=2e-11, const=2e-3), "truth")
  return tables, features, mesh, truth


def _true_time(plan, tables, features, mesh, truth, batch=4096):
  return estimate_plan(plan, tables, features, mesh, None, 0.0, batch, truth,
                       check=False).step_time_s


def test_refine_from_synthetic_profile(tmp_path):
  tables, features, mesh, truth = _setup()
  plans = [uniform_plan(k, tables, 2) for k in ("tw", "rw", "twrw")]
  plans.append(propose_plan(tables, features, mesh, GiB, 0.0, 4096).plan)  # the job ran this
  rng = np.random.default_rng(1)
  step = 0
  for plan in plans:
    t = _true_time(plan, tables, features, mesh, truth)
    for _ in range(4):
      step += 100
      planner.append_profile(tmp_path, planner.profile_record(
          step, t * (1 + 0.01 * rng.standard_normal()), plan, mesh, steps=100,
          batch_size=4096))
  ref = planner.refine_from_profile(tmp_path, tables, features, GiB, 0.0, None)
  assert ref.samples == 4
  assert ref.current.plan == plans[-1]
  for plan in plans:  # the fitted model reproduces what was measured
    fitted = _true_time(plan, tables, features, mesh, ref.fitted)
    assert fitted == pytest.approx(_true_time(plan, tables, features, mesh, truth), rel=0.1)
  current = _true_time(plans[-1], tables, features, mesh, truth)
  proposed = _true_time(ref.proposed.plan, tables, features, mesh, truth)
  assert proposed < current and ref.speedup > 1
  assert all(s.memory_bytes <= GiB for s in ref.proposed.slices)
  text = ref.report()
  assert "faster" in text and "profile fit" in text
  json.dumps(ref.to_json())
  # the current plan kept: a profile of a dp run on data=8 said "keep it", where col=8 ran
  # 1.3-1.6x faster; it names the one mesh it priced and how to price others
  kept = dataclasses.replace(ref, proposed=ref.current).report()
  assert (f"the current plan is already the best found on mesh "
          f"{cm.mesh_str(ref.current.mesh_shape)}; keep it (only that mesh was priced: give "
          "--mesh to price another") in kept, kept


def test_profile_in_trainer_format(tmp_path):
  """The trainer's lines carry no batch_size/steps: the caller's batch is used."""
  tables, features, mesh, truth = _setup()
  plan = uniform_plan("dp", tables, 2)
  with open(tmp_path / "profile.jsonl", "w") as f:
    for step in (100, 200, 300):
      f.write(json.dumps({"step": step, "step_time_s": 0.01, "mesh": mesh,
                          "plan": plan.to_json()}) + "\n")
  # dp holds all 1.8 GB of tables on every device: a budget it fits, so it may be kept.
  ref = planner.refine_from_profile(tmp_path / "profile.jsonl", tables, features, 4 * GiB,
                                    0.0, 4096)
  assert ref.measured_step_time_s == pytest.approx(0.01)
  assert ref.current.step_time_s == pytest.approx(0.01, rel=0.05)
  assert ref.speedup >= 1
  with pytest.raises(ConfigError, match="batch_size"):
    planner.refine_from_profile(tmp_path, tables, features, GiB, 0.0, None)


def test_old_profile_lines_without_a_batch_say_which_batch_they_count_as(tmp_path):
  """Lines without `batch_size` silently took the caller's batch: the report now says how
  many lines and which batch, and where it came from; without one it is an error."""
  tables, features, mesh, _ = _setup()
  plan = uniform_plan("dp", tables, 2)
  for step, batch in ((100, None), (200, None), (300, 4096)):
    planner.append_profile(tmp_path, planner.profile_record(step, 0.01, plan, mesh,
                                                            batch_size=batch))
  ref = planner.refine_from_profile(tmp_path, tables, features, 4 * GiB, 0.0, 2048,
                                    batch_size_from="--batch_size")
  assert ref.notes == ("note: 2 of 3 profile line(s) record no batch_size (an old profile): "
                       "counted as global batch 2048 (--batch_size)",)
  assert ref.report().startswith(ref.notes[0] + "\n") and ref.to_json()["notes"] == [
      ref.notes[0]]
  with pytest.raises(ConfigError, match=r"2 line\(s\) record no batch_size .*pass "
                     r"--batch_size=<the global batch they ran at>"):
    planner.refine_from_profile(tmp_path, tables, features, GiB, 0.0, None)
  (tmp_path / "profile.jsonl").unlink()
  planner.append_profile(tmp_path, planner.profile_record(100, 0.01, plan, mesh,
                                                          batch_size=4096))
  assert planner.refine_from_profile(tmp_path, tables, features, 4 * GiB, 0.0, None).notes == ()


def test_bad_profiles(tmp_path):
  with pytest.raises(ConfigError, match="no profile"):
    planner.read_profile(tmp_path)
  (tmp_path / "profile.jsonl").write_text('{"step": 1, "step_time_s": 0.1, "mesh": {}, '
                                          '"plan": {}}\n{"step": 2}\n')
  with pytest.raises(DataError, match=r"profile.jsonl:2: .*missing 'step_time_s'"):
    planner.read_profile(tmp_path)


def test_damaged_profile_lines_name_the_line(tmp_path):
  """A hand-edited or damaged line (mesh not an object, a size or count that is not an
  integer, steps 0, an infinite time) ended in a ValueError/TypeError/IndexError traceback
  from the fit, or an error without file:line."""
  tables, features = uniform_tables(2, [1000, 10], 16)
  good = {"step": 100, "step_time_s": 0.01, "mesh": {"table": 2}, "steps": 10,
          "plan": uniform_plan("tw", tables, 2).to_json(), "batch_size": 64}
  path = tmp_path / "profile.jsonl"
  for change, why in [({"mesh": "table=2"}, "mesh must be an object"),
                      ({"mesh": {"table": "x"}}, "mesh: axis sizes must be positive integers"),
                      ({"mesh": {"foo": 2}}, "unknown axes"),
                      ({"steps": 0}, "steps must be a positive integer, got 0"),
                      ({"steps": -5}, "steps must be a positive integer"),
                      ({"batch_size": "abc"}, "batch_size must be a positive integer"),
                      ({"step": "x"}, "step must be a non-negative integer"),
                      ({"step_time_s": float("inf")}, "step_time_s must be a positive")]:
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "step": 200, **change})
                    + "\n")
    with pytest.raises(DataError, match=rf"profile.jsonl:2: bad profile line \(.*{why}"):
      planner.refine_from_profile(tmp_path, tables, features, GiB, 0.0, 64)
  path.write_text(json.dumps(dict(good, warmup=True)) + "\n")
  with pytest.raises(DataError, match="every line is marked warmup"):
    planner.refine_from_profile(tmp_path, tables, features, GiB, 0.0, 64)
  path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, step=200)) + "\n")
  assert planner.refine_from_profile(tmp_path, tables, features, GiB, 0.0, 64).samples == 1


def test_profile_lines_with_a_wrong_kind_of_value_name_the_field(tmp_path):
  """step_time_s null or "abc" said only float()'s message (no field), true was read as
  1 second; a plan that is not an object said "'list' object has no attribute 'items'"."""
  tables, features = uniform_tables(2, [1000, 10], 16)
  good = {"step": 100, "step_time_s": 0.01, "mesh": {"table": 2}, "steps": 10,
          "plan": uniform_plan("tw", tables, 2).to_json(), "batch_size": 64}
  path = tmp_path / "profile.jsonl"
  for change, why in [({"step_time_s": None}, "step_time_s must be a positive number, got None"),
                      ({"step_time_s": "abc"}, "step_time_s must be a positive number, got 'abc'"),
                      ({"step_time_s": True}, "step_time_s must be a positive number, got True"),
                      ({"plan": [1]}, r"plan must be an object of table placements, got \[1\]")]:
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "step": 200, **change})
                    + "\n")
    with pytest.raises(DataError, match=rf"profile.jsonl:2: bad profile line \({why}"):
      planner.refine_from_profile(tmp_path, tables, features, GiB, 0.0, 64)


def test_refine_does_not_keep_a_current_plan_over_the_budget(tmp_path):
  """The profiled plan (dp, 49 MiB/device) is the fastest, but the budget asked for now is
  20 MiB: the proposal must fit it, not 'keep' the current plan."""
  tables, features = uniform_tables(4, 200_000, 16)
  mesh = {"table": 2, "row": 2}
  plan = uniform_plan("dp", tables, 2)
  with open(tmp_path / "profile.jsonl", "w") as f:
    for step in (100, 200, 300):
      f.write(json.dumps({"step": step, "step_time_s": 1e-4, "mesh": mesh,
                          "plan": plan.to_json()}) + "\n")
  budget = 20 * 2**20
  ref = planner.refine_from_profile(tmp_path, tables, features, budget, 0.0, 512)
  assert sum(ref.current.memory.values()) > budget
  assert sum(ref.proposed.memory.values()) <= budget
  assert ref.proposed.plan != plan
  assert "keep it" not in ref.report() and "slower: the current plan needs" in ref.report()


def test_profile_of_a_killed_job_and_of_other_tables(tmp_path, caplog):
  """An incomplete last line (the job stopped while writing it) refused the whole profile;
  a profile of other tables gave an error that did not name the profile."""
  tables, features = uniform_tables(2, [1000, 10], 16)
  mesh = {"table": 2}
  for step in (100, 200):
    planner.append_profile(tmp_path, planner.profile_record(
        step, 0.004, uniform_plan("tw", tables, 2), mesh, steps=100))
  with open(tmp_path / "profile.jsonl", "a") as f:
    f.write('{"step": 300, "step_ti')
  with caplog.at_level("WARNING"):
    assert len(planner.read_profile(tmp_path)) == 2
  assert "profile.jsonl:3: left out an incomplete last line" in caplog.text
  other, other_features = uniform_tables(1, [50], 16)
  with pytest.raises(ConfigError, match=r"--profile .*: the plan profiled at step 200 does "
                     r"not fit the tables given: plan names unknown tables"):
    planner.refine_from_profile(tmp_path, other, other_features, GiB, 0.0, 64)


def test_report_on_another_mesh_says_so(tmp_path):
  """A slower proposal for another --mesh was blamed on the memory budget."""
  tables, features = uniform_tables(2, [1000, 10], 16)
  for step in (100, 200):
    planner.append_profile(tmp_path, planner.profile_record(
        step, 0.004, uniform_plan("tw", tables, 2), {"table": 2}, steps=100))
  ref = planner.refine_from_profile(tmp_path, tables, features, GiB, 0.0, 64,
                                    mesh_shape={"row": 4})
  slower = dataclasses.replace(ref, speedup=0.5)
  assert ("slower: planned for mesh data=1,table=1,row=4,col=1, the profiled plan ran on "
          "data=1,table=2,row=1,col=1") in slower.report()


@pytest.mark.parametrize("line,kind", [('[{"step": 1}]', "an array"), ('"step"', "a string"),
                                       ("3", "a number"), ("null", "null"), ("true", "true")])
def test_a_profile_line_that_is_not_an_object_says_so(tmp_path, line, kind):
  """An array or a string said "missing 'step'" (a string containing 'step' passed that
  check), a number "argument of type 'int' is not iterable"."""
  good = {"step": 100, "step_time_s": 0.01, "mesh": {"table": 2}, "plan": {}}
  path = tmp_path / "profile.jsonl"
  path.write_text(json.dumps(good) + "\n" + line + "\n")
  with pytest.raises(DataError) as e:
    planner.read_profile(path)
  assert str(e.value) == f"{path}:2: bad profile line (must be a JSON object, got {kind})"


def test_lines_after_a_runs_first_refer_to_its_plan(tmp_path, caplog):
  """Every trainer line repeated the whole plan (~31 KB a line at 1,000 tables); a run now
  writes it in its first line and `same_plan` after it. A resumed run with another plan
  writes its own first."""
  tables, _ = uniform_tables(2, [1000, 10], 16)
  mesh = {"table": 2}
  tw, dp = uniform_plan("tw", tables, 2), uniform_plan("dp", tables, 2)
  for step, plan in ((100, tw), (200, None), (300, None), (400, dp), (500, None)):
    planner.append_profile(tmp_path, planner.profile_record(step, 0.01, plan, mesh,
                                                            batch_size=64))
  lines = (tmp_path / "profile.jsonl").read_text().splitlines()
  assert ["plan" in json.loads(l) for l in lines] == [True, False, False, True, False]
  assert [r["plan"] for r in planner.read_profile(tmp_path)] == [tw, tw, tw, dp, dp]
  (tmp_path / "profile.jsonl").write_text("\n".join(lines[1:]) + "\n")   # first line cut off
  with caplog.at_level(logging.WARNING):
    assert [r["plan"] for r in planner.read_profile(tmp_path)] == [dp, dp]
  assert "left out 2 line(s) from line 1 on that say 'same_plan' with no line holding a plan " \
      "before them" in caplog.text
  (tmp_path / "profile.jsonl").write_text("\n".join(lines[1:3]) + "\n")
  with pytest.raises(DataError, match="profile is empty"):
    planner.read_profile(tmp_path)


def test_the_trainer_writes_the_plan_once(tmp_path):
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib, loop  # pylint: disable=import-outside-toplevel
  from tests.train.test_loop_eval_ids import BINDINGS  # pylint: disable=import-outside-toplevel
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  options = config_lib.RunOptions(num_steps=4, mesh="data=8", plan="dp", log_every=1,
                                  progress=False)
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / "profile.jsonl").read_text().splitlines()]
  assert len(lines) == 3 and "plan" in lines[0] and all(l["same_plan"] for l in lines[1:])
  assert len({json.dumps(r["plan"].to_json()) for r in planner.read_profile(tmp_path)}) == 1


def test_the_current_plan_is_the_last_line_of_the_newest_step(tmp_path):
  """Two fresh runs' profiles in one file, both ending at step 300: the first run's plan
  was called the current one (max over steps took the first of a tie)."""
  tables, features, mesh, _ = _setup()
  plans = [uniform_plan("tw", tables, 2), uniform_plan("dp", tables, 2)]
  with open(tmp_path / "profile.jsonl", "w") as f:
    for plan, t in zip(plans, (0.02, 0.04)):
      for step in (100, 200, 300):
        f.write(json.dumps({"step": step, "step_time_s": t, "mesh": mesh,
                            "plan": plan.to_json()}) + "\n")
  ref = planner.refine_from_profile(tmp_path / "profile.jsonl", tables, features, 4 * GiB,
                                    0.0, 4096)
  assert ref.current.plan == plans[1] and ref.measured_step_time_s == pytest.approx(0.04)
