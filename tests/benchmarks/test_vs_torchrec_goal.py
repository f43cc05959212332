"""The vs_torchrec goal verdict (best against best, and with 3+ runs the medians too), and
the facts it reports of its data file."""

import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "benchmarks")
import vs_torchrec  # noqa: E402  (benchmarks/ is a script folder, not a package)


def _runs(*speeds, auc=0.64):
  return [{"examples_per_sec": s, "auc": auc} for s in speeds]


def test_one_fast_run_does_not_meet_the_goal_alone():
  got = vs_torchrec.goal_verdict(_runs(52e3, 53e3, 74e3), _runs(30e3, 33e3, 36e3))
  assert got["ratio"] == round(74 / 36, 3) and got["ratio_runs_median"] == round(53 / 33, 3)
  assert not got["met"] and got["auc_ok"]


def test_met_when_best_and_median_runs_both_reach_two():
  got = vs_torchrec.goal_verdict(_runs(62e3, 64e3, 66e3), _runs(30e3, 31e3, 32e3))
  assert got["met"] and got["ratio_runs_median"] == round(64 / 31, 3)


def test_fewer_than_three_runs_compare_the_fastest_only():
  assert vs_torchrec.goal_verdict(_runs(40e3, 70e3), _runs(30e3, 34e3))["met"]


def test_worse_auc_fails_and_failed_runs_are_left_out():
  jx = _runs(70e3, 70e3, 70e3, auc=0.63) + [{"error": "crashed"}]
  got = vs_torchrec.goal_verdict(jx, _runs(30e3, 30e3, 30e3, auc=0.64))
  assert not got["auc_ok"] and not got["met"]
  assert vs_torchrec.goal_verdict(jx, _runs(30e3, 30e3, 30e3, auc=0.64),
                                   auc_tolerance=0.02)["met"]
  with pytest.raises(ValueError, match="at least one finished run"):
    vs_torchrec.goal_verdict([{"error": "crashed"}], _runs(30e3))


def test_a_reused_data_file_reports_what_it_holds(tmp_path):
  """`--data` of an existing file skips writing it: the summary's example counts and
  positive rate come from the file, not from `--eval_examples` (which it does not hold)."""
  path = str(tmp_path / "d.npz")
  vs_torchrec.write_data(path, 96, 40, seed=0)
  facts = vs_torchrec.data_facts(path)
  assert facts["train_examples"] == 96 and facts["eval_examples"] == 40
  assert 0 < facts["positive_rate"] < 1


def test_bfloat16_emulated_by_the_cpu_meets_nothing():
  """2026-12-04, a host without bfloat16 instructions: TorchRec's autocast ran 20x slower
  than its float32 and the ratio came out 18.9, "met"; it measured the emulation."""
  jx, tr = _runs(25e3, 25e3, 25e3), _runs(1.3e3, 1.3e3, 1.3e3)
  assert vs_torchrec.goal_verdict(jx, tr)["met"]
  got = vs_torchrec.goal_verdict(jx, tr, emulated_bf16=True)
  assert not got["met"] and got["ratio"] > 18 and "no bfloat16 instructions" in got["note"]


def test_too_few_timed_steps_withhold_the_verdict():
  """2 timed steps reported `"met": true`."""
  got = vs_torchrec.goal_verdict(_runs(70e3), _runs(30e3), timed_steps=2)
  assert got["met"] is None and "2 timed steps" in got["note"]
  got = vs_torchrec.goal_verdict(_runs(70e3), _runs(30e3), timed_steps=vs_torchrec.MIN_TIMED_STEPS)
  assert got["met"] is True and "note" not in got


def test_a_disturbed_run_withholds_the_verdict():
  """2026-12-06, one run each at load ~2.9 on 2 cores: TorchRec's mean step was 428 ms, its
  median 72 ms, and the summary read ratio 32, "met", without a warning."""
  jx = [{"framework": "jaxrec", "examples_per_sec": 38382.1,
         "examples_per_sec_median": 39884.8, "auc": 0.6414}]
  tr = [{"framework": "torchrec", "examples_per_sec": 1195.4,
         "examples_per_sec_median": 7070.6, "auc": 0.5688}]
  got = vs_torchrec.goal_verdict(jx, tr, timed_steps=55)
  assert got["met"] is None and got["ratio"] > 30
  assert got["note"].startswith("torchrec run's mean step is 5.9x its median"), got["note"]
  tr[0]["examples_per_sec_median"] = 1.4 * 1195.4   # steadier: judged
  assert vs_torchrec.goal_verdict(jx, tr, timed_steps=55)["met"] is True


def test_applied_nice_is_what_a_child_gets():
  """`--nice -20` as a user: `nice` ran the runs unchanged and the summary said -20 (and
  the load warning was off). Here: a process at 15 can go up by 4 only (niceness <= 19)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = f"import os, sys; sys.path.insert(0, {BENCH!r}); import vs_torchrec; " \
         "print(os.nice(0), vs_torchrec.applied_nice(10), vs_torchrec.applied_nice(2))"
  out = subprocess.run(["nice", "-n", "15", sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, check=True)
  base, ten, two = map(int, out.stdout.split())   # base: 15, or more under a niced pytest
  assert base >= 15 and ten == 19 - base < 10 and two == min(19, base + 2) - base


def test_a_failed_run_is_null_not_nan():
  best = vs_torchrec._best([{"framework": "jaxrec", "error": "exit code 1"},
                            {"examples_per_sec": 5.04, "examples_per_sec_median": 5.0}])
  assert best["runs_examples_per_sec"] == [None, 5.0]


def test_emit_writes_non_finite_numbers_as_null(capsys):
  import common   # pylint: disable=import-outside-toplevel
  common.emit("x", a=float("nan"), b=[1.0, float("inf")], c={"d": -float("inf")})
  assert capsys.readouterr().out == ('{"benchmark": "x", "a": null, "b": [1.0, null], '
                                     '"c": {"d": null}}\n')
