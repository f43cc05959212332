"""End-to-end: the real scripts/plan.py (flags -> report, JSON, errors, profile), its
`__main__` run in this process (`tests.scripts.in_process`; the interrupt test starts it)."""

import json
import logging
import os
import re
import subprocess
import sys
import types

from jaxrec import planner
import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import uniform_tables
from jaxrec.errors import ConfigError
from jaxrec.planner import inputs
from jaxrec.sharding.plan import Plan, uniform_plan
from tests.scripts.in_process import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plan(tmp_path, *flags):
  """scripts/plan.py FLAGS with a calibration cache of its own, in this process."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAXREC_CACHE_DIR", str(tmp_path / "cache"))
    return run_script("plan.py", *flags)


def test_tables_flag_prints_table_and_writes_json(tmp_path):
  out = tmp_path / "new" / "dir" / "plan.json"   # missing directories are made (it refused
  # them, while plot_metrics.py --output and --calibration_file made them)
  proc = plan(tmp_path, "--tables=big:30000000:128:4,mid:100000:128:2:1.1,tiny:10:16",
              "--mesh=data=2,table=2,row=2,col=2", "--memory_per_device=8GiB",
              "--batch_size=1024", "--optimizer=rowwise_adagrad", f"--json={out}")
  assert proc.returncode == 0, proc.stderr
  text = proc.stdout
  for needle in ("big", "mid", "tiny", "mem/device", "why", "replicated", "estimated step time",
                 "0,1,2,3,8,9,10,11", "shares the collectives", "per device", "bag"):
    assert needle in text, needle
  obj = json.loads(out.read_text())
  p = Plan.from_json(obj["plan"])
  assert p["big"].kind != "dp"  # 14.4 GiB replicated
  assert p["tiny"].kind in ("dp", p["big"].kind)  # no collectives of its own
  assert obj["mesh"] == {"data": 2, "table": 2, "row": 2, "col": 2}
  assert all(s["memory_bytes"] <= 8 * 2**30 for s in obj["slices"])


def test_gin_config_and_forced_plan(tmp_path):
  proc = plan(tmp_path, "--gin_file=configs/dlrm_criteo.gin", "--mesh=data=2,table=2,row=2,col=1",
              "--plan=tw")
  assert proc.returncode == 0, proc.stderr
  assert "Plan (forced tw) for 26 tables" in proc.stdout and "global batch 512" in proc.stdout


def test_errors_are_one_line(tmp_path):
  proc = plan(tmp_path, "--tables=huge:1000000000:128", "--mesh=row=2,col=2")
  assert proc.returncode == 1
  assert "error: table 'huge'" in proc.stderr and "16.0 GiB" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = plan(tmp_path, "--tables=t:100:16", "--mesh=data=2,model=2")
  assert proc.returncode == 1 and "--mesh" in proc.stderr
  for flags, line in [   # neither named the flag: "table 'a': rows ...", "global batch 512"
      (["--tables=a:0:4", "--mesh=table=2"],
       "error: --tables: 'a:0:4': table 'a': rows must be a positive integer, got 0"),
      (["--tables=a:10:4", "--mesh=table=3"], "error: the default batch_size 512 is not a "
       "multiple of the 3 devices of --mesh=table=3 (batches are split over all devices)"),
      (["--tables=a:10:4", "--mesh=table=3", "--batch_size=10"],
       "error: --batch_size 10 is not a multiple of the 3 devices of --mesh=table=3 "
       "(batches are split over all devices)")]:
    proc = plan(tmp_path, *flags)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == line, proc.stderr


def test_tables_flag_refuses_non_finite_and_fractional_numbers():
  """`nan`/`inf` as a pooling factor or row count ended in a ValueError/OverflowError
  traceback; `100.5` rows planned a 100-row table; a `nan` zipf alpha was accepted."""
  for spec, why in [("t:100:16:nan", "finite"), ("t:100:16:inf", "finite"),
                    ("t:inf:16", "finite"), ("t:100:16:2:nan", "finite"),
                    ("t:100.5:16", "rows must be a whole number, got 100.5")]:
    with pytest.raises(ConfigError, match=rf"--tables: '{re.escape(spec)}': .*{why}"):
      inputs.parse_tables_flag(spec)
  assert inputs.parse_tables_flag("t:1e6:16:2.5:1.1").tables[0].rows == 1_000_000


def test_tables_flag_refuses_a_negative_zipf_alpha():
  """`t:100:16:2:-1` was accepted: a Zipf law with a negative exponent."""
  for spec in ("t:100:16:2:-1", "a:10:8,t:100:16::-0.5"):
    with pytest.raises(ConfigError, match=r"--tables: 't:100:16:2?:-[0-9.]+': table 't': zipf "
                       r"alpha must be >= 0 \(0: uniform\), got -"):
      inputs.parse_tables_flag(spec)
  assert inputs.parse_tables_flag("t:100:16:2:0").table_stats["t"].zipf_alpha == 0


def test_profile_proposes_a_plan(tmp_path):
  tables, _ = uniform_tables(2, [1000, 10], 16)
  mesh = {"data": 2, "table": 2, "row": 1, "col": 1}
  for step in (100, 200, 300):
    planner.append_profile(tmp_path, planner.profile_record(
        step, 0.004, uniform_plan("tw", tables, 2), mesh, steps=100))
  proc = plan(tmp_path, "--tables=t0:1000:16,t1:10:16", f"--profile={tmp_path}",
              "--batch_size=64")
  assert proc.returncode == 0, proc.stderr
  assert "coefficients (profile fit" in proc.stdout
  assert "faster" in proc.stdout or "already the best" in proc.stdout


def test_flags_it_would_ignore_or_misread_are_errors(tmp_path):
  """Each was accepted: --batch_size=0 planned for 512, --plan next to --profile and
  --gin_file next to --tables were ignored, a missing --calibration_file fell back to the
  defaults, an unwritable --json was a traceback after planning, a gin error had no line,
  an empty --memory_per_device planned for the default 16GiB."""
  bad_gin = tmp_path / "bad.gin"
  bad_gin.write_text("uniform_tables.num_tables = 2\n\nuniform_tables.rows = \n")
  for flags, want in [
      (["--tables=t:100:16", "--mesh=row=2", "--batch_size=0"],
       "error: --batch_size must be positive, got 0"),
      (["--tables=t:100:16", f"--profile={tmp_path}", "--plan=tw"],
       "error: --plan: not used with --profile"),
      (["--tables=t:100:16", "--gin_file=configs/dlrm_criteo.gin", "--mesh=row=2"],
       "error: --tables and --gin_file/--gin_bindings: give the tables one way"),
      (["--tables=t:100:16", "--mesh=row=2", f"--calibration_file={tmp_path / 'none.json'}"],
       "error: --calibration_file: no such file"),
      (["--tables=t:100:16", "--mesh=row=2", f"--json={bad_gin / 'p.json'}"],
       f"error: --json: cannot write '{bad_gin / 'p.json'}': a file stands where its directory"),
      (["--tables=t:100:16", "--mesh=row=2", f"--json={tmp_path}"],
       f"error: --json: '{tmp_path}' is a directory; give a file path, e.g. "
       f"{tmp_path / 'plan.json'}"),
      (["--calibrate", "--calibration_devices=0"],
       "error: --calibration_devices must be positive, got 0"),
      ([f"--gin_file={bad_gin}", "--mesh=row=2"], f"error: --gin_file: {bad_gin}:3: "),
      (["--tables=t:100:16", "--mesh=row=2", "--memory_per_device="],
       "error: --memory_per_device: empty; give a size like 16GiB")]:
    proc = plan(tmp_path, *flags)
    assert proc.returncode == 1 and proc.stderr.startswith(want), (flags, proc.stderr[-2000:])
  assert sorted(os.listdir(tmp_path)) == ["bad.gin"]



def test_outputs_never_overwrite_inputs(tmp_path):
  """`--json` naming the `--gin_file`, the profile or the calibration file (or the
  calibration file naming the gin file) overwrote that input with the plan."""
  gin_file = tmp_path / "x.gin"
  gin_file.write_text(open(os.path.join(ROOT, "configs", "dlrm_criteo.gin")).read())
  tables, _ = uniform_tables(2, [1000, 10], 16)
  planner.append_profile(tmp_path, planner.profile_record(
      100, 0.004, uniform_plan("tw", tables, 2), {"table": 2}, steps=100))
  cal = tmp_path / "cal.json"
  cal.write_text(json.dumps(planner.DEFAULT.to_json()))
  including = tmp_path / "inc.gin"
  including.write_text(f"include '{gin_file}'\n")
  inputs = {p: p.read_bytes() for p in (gin_file, tmp_path / "profile.jsonl", cal)}
  for flags, want in [
      ([f"--gin_file={gin_file}", "--mesh=row=2", f"--json={gin_file}"],
       f"error: --json: '{gin_file}' is the --gin_file file"),
      ([f"--gin_file={including}", "--mesh=row=2", f"--json={gin_file}"],   # was replaced
       f"error: --json: '{gin_file}' is a gin file the config includes, writing it would "
       "overwrite it; pick another path"),
      (["--tables=t0:1000:16,t1:10:16", f"--profile={tmp_path}", "--batch_size=64",
        f"--json={tmp_path / 'profile.jsonl'}"], "error: --json: .* is the --profile file"),
      (["--tables=t:100:16", "--mesh=row=2", f"--calibration_file={cal}", f"--json={cal}"],
       "error: --json: .* is the --calibration_file file"),
      (["--calibrate", f"--gin_file={gin_file}", "--mesh=row=2",
        f"--calibration_file={gin_file}"], "error: --calibration_file: .* is the --gin_file")]:
    proc = plan(tmp_path, *flags)
    assert proc.returncode == 1 and re.match(want, proc.stderr), (flags, proc.stderr[-2000:])
  assert {p: p.read_bytes() for p in inputs} == inputs


def test_unwritable_calibration_file_is_refused_before_calibrating(tmp_path):
  """It was found only after the whole calibration, as '[Errno 17] File exists: <parent>'."""
  (tmp_path / "afile").write_text("")
  out = tmp_path / "afile" / "c" / "cal.json"
  proc = plan(tmp_path, "--calibrate", f"--calibration_file={out}")
  assert proc.returncode == 1 and proc.stderr.startswith(
      f"error: --calibration_file: cannot write '{out}': a file stands where"), proc.stderr
  assert "calibration on" not in proc.stdout


def test_an_unwritable_cache_or_a_json_of_nothing_is_refused_before_calibrating(tmp_path):
  """A $JAXREC_CACHE_DIR that is a file was found after the whole calibration and blamed
  on --calibration_file, which was not given; `--calibrate --json=X` alone wrote nothing
  and exited 0."""
  (tmp_path / "afile").write_text("")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAXREC_CACHE_DIR", str(tmp_path / "afile"))
    proc = run_script("plan.py", "--calibrate")
  assert proc.returncode == 1 and proc.stderr.startswith(
      f"error: cannot write the calibration cache '{tmp_path / 'afile' / 'calibration.json'}'"
      ": a file stands where its directory would be ($JAXREC_CACHE_DIR"), proc.stderr
  proc = plan(tmp_path, "--calibrate", f"--json={tmp_path / 'x.json'}")
  assert proc.returncode == 1 and "--json: --calibrate alone plans nothing" in proc.stderr
  assert "calibration on" not in proc.stdout
  for flags in (["--tables=a:0:4"], ["--tables=a:10:4", "--mesh=table=3"]):   # calibrated
    proc = plan(tmp_path, "--calibrate", *flags)                              # first
    assert proc.returncode == 1 and "calibration on" not in proc.stdout, proc.stdout


def test_a_cache_from_another_platform_is_not_used(tmp_path):
  """plan.py took a calibration cached on another platform (GPU) that train.py leaves
  out: the two proposed different plans on one machine."""
  from jaxrec import planner  # pylint: disable=import-outside-toplevel
  cal = planner.Calibration(dict(planner.DEFAULT.coefficients), "calibration on 1 gpu "
                            "device(s)", {"platform": "gpu", "num_devices": 1})
  planner.save_calibration(cal, tmp_path / "cache" / "calibration.json")
  proc = plan(tmp_path, "--tables=a:1000:8", "--mesh=table=8")
  assert proc.returncode == 0 and "coefficients: defaults" in proc.stdout, proc.stdout


def test_an_older_calibration_is_warned_about(tmp_path):
  """The cache: left out as train.py leaves it out (the defaults price); a file given by
  --calibration_file: used, with the same warning."""
  from jaxrec import planner  # pylint: disable=import-outside-toplevel
  cal = planner.Calibration(dict(planner.DEFAULT.coefficients), "calibration on 8 cpu "
                            "device(s)", {"platform": "cpu", "num_devices": 8, "version": 1})
  cache = planner.save_calibration(cal, tmp_path / "cache" / "calibration.json")
  given = planner.save_calibration(cal, tmp_path / "given.json")
  for flags, path, used in (((), cache, "coefficients: defaults"),
                            ((f"--calibration_file={given}",), given,
                             "coefficients: calibration on 8 cpu")):
    proc = plan(tmp_path, "--tables=a:1000:8", "--mesh=table=8", *flags)
    assert proc.returncode == 0 and used in proc.stdout, proc.stdout
    assert (f"calibration file {path} was measured by an older jaxrec (calibration version "
            f"1, now {planner.calibration.VERSION}") in proc.stderr, proc.stderr


def test_interrupted_json_keeps_the_old_one_and_leaves_no_tmp(tmp_path):
  """Only an OSError removed the temporary file: Ctrl-C mid-write left `p.json.tmp-<pid>`."""
  out = tmp_path / "p.json"
  out.write_text("old")
  # Ctrl-C after the temporary file is written, before it replaces the old one.
  interrupt = ("import os, runpy, sys, types\nimport jaxrec.files as files\n"
               "def replace(src, dst):\n  raise KeyboardInterrupt\n"
               "files.os = types.SimpleNamespace(fspath=os.fspath, getpid=os.getpid, path=os.path,"
               " remove=os.remove, replace=replace, environ=os.environ)\nsys.argv = sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")
  env = dict(os.environ, JAXREC_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", interrupt, os.path.join(ROOT, "scripts", "plan.py"),
                         "--tables=t:100:16", "--mesh=row=2", f"--json={out}"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 130 and proc.stderr == (
      f"error: interrupted by SIGINT. Stopping; not written: --json {out}.\n"), proc.stderr[-2000:]
  assert out.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["p.json"]


def test_offloaded_tables_are_planned_as_their_caches(tmp_path):
  """plan.py ignored gin's `OffloadConfig`: a config whose big table the trainer runs as a
  device cache was 'fits no placement', and a fitting one was priced with the whole table.
  Now it plans what the trainer builds (`offload.choose_plan`), with the same notes."""
  from jaxrec import launch, offload   # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions
  bindings = ["uniform_tables.rows = [100000000, 50000, 20000, 10000, 5000, 2000, 1000, 500]",
              "OffloadConfig.tables = {'t0': {'cache_rows': 100000}}"]
  out = tmp_path / "p.json"
  proc = plan(tmp_path, "--gin_file=configs/dlrm_synthetic.gin", "--mesh=table=4,row=2",
              "--memory_per_device=1GiB", f"--json={out}", "--plan=tw",
              *(f"--gin_bindings={b}" for b in bindings))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "offloaded 't0': 100,000-row device cache" in proc.stdout
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], bindings)
  _, want, _, _ = offload.choose_plan(launch.build(ExperimentConfig),
                                      RunOptions(plan="tw", memory_per_device=2**30),
                                      {"table": 4, "row": 2})
  obj = json.loads(out.read_text())
  assert obj["memory_per_device"] == dict(want.memory) and obj["notes"] == list(want.notes)
  proc = plan(tmp_path, "--gin_file=configs/dlrm_synthetic.gin", "--mesh=table=4,row=2",
              "--memory_per_device=1GiB", *(f"--gin_bindings={b}" for b in bindings))
  assert proc.returncode == 0 and "Plan (auto)" in proc.stdout, proc.stderr[-2000:]


def test_a_profile_of_an_auto_offloading_run_proposes_with_its_caches(tmp_path):
  """`--profile` priced the tables `OffloadConfig.auto` had offloaded in the profiled run
  whole: 'does not fit' at that run's own budget, and a JSON naming no `auto_offloaded`
  (train.py then checked a proposal given back with `--plan` whole too)."""
  from jaxrec import launch, offload   # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions
  bindings = ["uniform_tables.rows = [100000000, 50000, 20000, 10000, 5000, 2000, 1000, 500]",
              "OffloadConfig.auto = True"]
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], bindings)
  config, mesh = launch.build(ExperimentConfig), {"table": 4, "row": 2}
  _, ran, _, off = offload.choose_plan(config, RunOptions(plan="auto", memory_per_device=2**30),
                                       mesh)
  assert off.auto_added == ("t0",)
  w = tmp_path / "w"
  w.mkdir()
  (w / "plan.json").write_text(json.dumps(ran.to_json()))   # as the run wrote it
  for step in (100, 200, 300):
    planner.append_profile(w, planner.profile_record(step, 0.004, ran.plan, ran.mesh_shape,
                                                     steps=100, batch_size=512))
  out = tmp_path / "proposed.json"
  proc = plan(tmp_path, "--gin_file=configs/dlrm_synthetic.gin", f"--profile={w}",
              "--memory_per_device=1GiB", f"--json={out}",
              *(f"--gin_bindings={b}" for b in bindings))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "offloaded 't0'" in proc.stdout and "added by OffloadConfig.auto" in proc.stdout
  assert json.loads(out.read_text())["proposed"]["auto_offloaded"] == ["t0"]
  _, again, _, off = offload.choose_plan(   # train.py --plan=proposed.json takes it
      config, RunOptions(plan=str(out), memory_per_device=2**30), mesh)
  assert off.auto_added == ("t0",) and again.mode == "file"


def test_bad_optimizer_flags_are_one_line_errors_naming_the_flag(tmp_path):
  """`--optimizer=-1` said "unknown optimizer '-1'" (the '-' was read as '_'), `nan` did
  not name the flag, `inf` was an OverflowError traceback, an empty value planned for sgd."""
  names = "sgd, adagrad, rowwise_adagrad, adam, ftrl"
  for value, want in [
      ("-1", "a factor of the table size must be a finite number >= 0 (0: sgd, 1: adagrad, "
             "2: adam), got '-1'"),
      ("nan", "a factor of the table size must be a finite number >= 0 (0: sgd, 1: adagrad, "
              "2: adam), got 'nan'"),
      ("inf", "a factor of the table size must be a finite number >= 0"),
      ("", f"empty; give {names} or a factor of the table size (e.g. 1)"),
      ("adamw", f"unknown optimizer 'adamw' (known: {names}, or a factor of the table size "
                ">= 0)")]:
    with pytest.raises(ConfigError) as e:
      inputs.parse_optimizer(value)
    assert str(e.value).startswith(f"--optimizer: {want}"), str(e.value)
  assert inputs.parse_optimizer(" Rowwise-Adagrad ") == "rowwise_adagrad"
  assert inputs.parse_optimizer("1e-3") == 0.001 and inputs.parse_optimizer("2") == 2.0
  proc = plan(tmp_path, "--tables=t:100:16", "--mesh=row=2", "--optimizer=-1")
  assert proc.returncode == 1 and proc.stderr.startswith(
      "error: --optimizer: a factor of the table size must be"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
  proc = plan(tmp_path, "--tables=t:100:16", "--mesh=row=2", "--optimizer=1e-3")
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_plan_file_is_priced_and_checked_as_train_py_checks_it(tmp_path, monkeypatch):
  """`--plan=FILE.json` said "unknown plan": a hand-edited plan could be checked only by
  starting training. Now it is reported like a forced plan, with train.py's messages."""
  from jaxrec import offload  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import RunOptions  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("JAXREC_CACHE_DIR", str(tmp_path / "cache"))   # as plan() runs it
  tables_flag = "--tables=a:1000:16,b:100:16,c:10:16"
  tables = inputs.parse_tables_flag(tables_flag.partition("=")[2]).tables
  mesh = {"data": 1, "table": 2, "row": 2, "col": 1}
  good, out = tmp_path / "good.json", tmp_path / "out.json"
  good.write_text(json.dumps({"plan": uniform_plan("tw", tables, 2).to_json(), "mesh": mesh}))
  proc = plan(tmp_path, tables_flag, f"--plan={good}", f"--json={out}")   # the file's mesh
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("Plan (file) for 3 tables on mesh data=1,table=2,row=2,col=1")
  forced = planner.estimate_plan(uniform_plan("tw", tables, 2), tables,
                                 inputs.parse_tables_flag("a:1000:16,b:100:16,c:10:16").features,
                                 mesh, 16 * 2**30, "sgd", 512, mode="file")
  obj = json.loads(out.read_text())
  assert obj["mode"] == "file" and obj["estimated_step_time_s"] == forced.step_time_s
  assert obj["memory_per_device"] == dict(forced.memory)
  proc = plan(tmp_path, tables_flag, f"--plan={good}", "--mesh=table=4")
  assert proc.returncode == 0 and f"--plan={good} was made for mesh" in proc.stderr
  config = types.SimpleNamespace(  # what train.py plans with
      tables=tables, features=inputs.parse_tables_flag(tables_flag[9:]).features,
      batch_size=512, sparse_tx=lambda: optimizers.sparse_optimizer("sgd"))
  bad = tmp_path / "bad.json"
  for content in (None, '{"a": {"kind": "tw"},\n "b": oops}', '{"a": {"kind": "zz"}}',
                  '{"a": {"kind": "tw"}}', '{"a": {"kind": "tw", "table_slice": 5}, '
                  '"b": {"kind": "dp"}, "c": {"kind": "dp"}}'):
    if content is None:
      bad.unlink(missing_ok=True)
    else:
      bad.write_text(content)
    with pytest.raises(ConfigError) as e:
      offload.choose_plan(config, RunOptions(plan=str(bad), memory_per_device=16 * 2**30),
                          mesh, offload.OffloadConfig())
    proc = plan(tmp_path, tables_flag, f"--plan={bad}", "--mesh=table=2,row=2")
    assert proc.returncode == 1 and proc.stderr == f"error: {e.value}\n", (content, proc.stderr)
  # what plan.py passed and train.py then refused: an "auto_offloaded" naming a table the
  # config lacks; a file's table_slice outside this mesh, said without train.py's hint
  for content, run_mesh, flag in (
      ({"plan": uniform_plan("tw", tables, 2).to_json(), "auto_offloaded": ["nope"]}, mesh,
       "--mesh=table=2,row=2"),
      ({"plan": uniform_plan("tw", tables, 2).to_json(), "mesh": mesh},
       {"data": 1, "table": 1, "row": 4, "col": 1}, "--mesh=row=4")):
    bad.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as e:
      offload.choose_plan(config, RunOptions(plan=str(bad), memory_per_device=16 * 2**30),
                          run_mesh, offload.OffloadConfig())
    proc = plan(tmp_path, tables_flag, f"--plan={bad}", flag)
    assert proc.returncode == 1, (content, proc.stdout[-500:])
    assert proc.stderr.strip().splitlines()[-1] == f"error: {e.value}", (content, proc.stderr)
  proc = plan(tmp_path, tables_flag, f"--plan={good}", "--mesh=table=2,row=2", f"--json={good}")
  assert proc.returncode == 1 and "--json: " in proc.stderr and "is the --plan file" in proc.stderr
  proc = plan(tmp_path, tables_flag, "--plan=zz", "--mesh=row=2")
  assert proc.stderr == ("error: --plan: unknown plan 'zz' (known: auto, dp, tw, rw, cw, twrw, "
                         "twcw, grid, or a plan .json file)\n")


def test_batch_size_with_a_profile_plans_for_that_batch(tmp_path):
  """Profile lines carry the batch they ran at, and it silently won over `--batch_size`,
  for the proposed plan too. Now the flag is the batch planned for; the fit still uses
  each line's own batch and the report names both."""
  tables, _ = uniform_tables(2, [1000, 10], 16)
  mesh = {"data": 2, "table": 2, "row": 1, "col": 1}
  for step in (100, 200, 300):
    planner.append_profile(tmp_path, planner.profile_record(
        step, 0.004, uniform_plan("tw", tables, 2), mesh, steps=100, batch_size=64))
  out = tmp_path / "p.json"
  proc = plan(tmp_path, "--tables=t0:1000:16,t1:10:16", f"--profile={tmp_path}",
              "--batch_size=256", f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert ("/step at global batch 64, fitted model says " in proc.stdout and
          "; planning for global batch 256, not the profiled 64" in proc.stdout), proc.stdout
  obj = json.loads(out.read_text())
  assert obj["proposed"]["batch_size"] == obj["current"]["batch_size"] == 256
  assert obj["measured_batch_size"] == 64
  assert obj["model_step_time_s"] < obj["current"]["estimated_step_time_s"]   # 4x the batch
  proc = plan(tmp_path, "--tables=t0:1000:16,t1:10:16", f"--profile={tmp_path}",
              f"--json={out}")
  assert proc.returncode == 0 and "planning for" not in proc.stdout, proc.stderr[-2000:]
  obj = json.loads(out.read_text())
  assert obj["proposed"]["batch_size"] == 64 and obj["measured_batch_size"] == 64
  assert obj["model_step_time_s"] == obj["current"]["estimated_step_time_s"]


def test_tables_flag_refuses_empty_and_duplicate_names(tmp_path):
  """`a:10:8,a:20:8` planned two tables named 'a'; `:100:16` failed with gin's two-line
  TableSpec error that named no flag."""
  for spec, match in [
      ("a:10:8,a:20:8", r"--tables: table 'a' is given twice \('a:10:8', 'a:20:8'\); table "
                        "names must be unique"),
      (":100:16", r"--tables: ':100:16': the table name is empty"),
      ("t:10:8, :100:16", r"--tables: ':100:16': the table name is empty")]:
    with pytest.raises(ConfigError, match=match):
      inputs.parse_tables_flag(spec)
  proc = plan(tmp_path, "--tables=a:10:8,a:20:8", "--mesh=row=2")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --tables: table 'a' is given")


def test_an_old_profile_without_batch_sizes_needs_a_batch(tmp_path):
  """Lines without `batch_size` (old profiles) counted as --batch_size, the config's or 512
  without a word; with --tables and no --batch_size that was a guess of 512 (the notice
  with a batch: test_profile.py)."""
  tables, _ = uniform_tables(2, [1000, 10], 16)
  mesh = {"data": 2, "table": 2, "row": 1, "col": 1}
  for step in (100, 200, 300):
    planner.append_profile(tmp_path, planner.profile_record(
        step, 0.004, uniform_plan("tw", tables, 2), mesh, steps=100))
  proc = plan(tmp_path, "--tables=t0:1000:16,t1:10:16", f"--profile={tmp_path}")
  assert proc.returncode == 1 and proc.stderr == (
      f"error: --profile {tmp_path}: 3 line(s) record no batch_size (a profile written before "
      "lines recorded it): pass --batch_size=<the global batch they ran at>\n"), proc.stderr


def test_an_eval_batch_over_the_budget_is_warned_as_train_py_warns(tmp_path):
  """train.py warns when the eval batch's lookup passes --memory_per_device (the planner
  prices the training batch); plan.py, run to check a budget before training, said
  nothing. It now gives the same warning, offloaded tables priced as their caches."""
  from jaxrec import launch   # pylint: disable=import-outside-toplevel
  from jaxrec.train import budget_hint   # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib, loop   # pylint: disable=import-outside-toplevel
  flags = ("--gin_file=configs/dlrm_synthetic.gin", "--mesh=row=8", "--plan=rw")
  proc = plan(tmp_path, *flags, "--memory_per_device=3MiB")
  assert proc.returncode == 0, proc.stderr[-2000:]
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], [])
  collection, _, info = loop.setup(config_lib.ExperimentConfig(), config_lib.RunOptions(
      mesh="row=8", plan="rw", memory_per_device=3 * 2**20))
  want = budget_hint.eval_warning(info["plan_result"], collection, 4096)
  assert want and want in proc.stderr, proc.stderr[-2000:]
  for more in ("--memory_per_device=6MiB", "--gin_bindings=ExperimentConfig.eval_batch_size=512"):
    proc = plan(tmp_path, *flags, "--memory_per_device=3MiB", more)
    assert proc.returncode == 0 and "eval_batch_size" not in proc.stderr, proc.stderr[-2000:]
  bindings = ["uniform_tables.rows = [100000000, 50000, 20000, 10000, 5000, 2000, 1000, 500]",
              "OffloadConfig.tables = {'t0': {'cache_rows': 100000}}"]
  for eval_batch, warned in ((4096, False), (65536, True)):
    proc = plan(tmp_path, "--gin_file=configs/dlrm_synthetic.gin", "--mesh=table=4,row=2",
                "--memory_per_device=8.3MiB", "--plan=tw",
                f"--gin_bindings=ExperimentConfig.eval_batch_size={eval_batch}",
                *(f"--gin_bindings={b}" for b in bindings))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("the eval's embedding lookup takes each device to about 26.6 MiB" in proc.stderr
            ) == warned, proc.stderr[-2000:]


def test_a_gin_config_s_table_optimizers_are_planned_per_table(tmp_path):
  """`ExperimentConfig.table_optimizers` was ignored: t0 with Adam was priced with no state
  and in the default's stacks. Now each table is priced with its own optimizer, on the
  stacks train.py builds (`_o1`: Adam's); `--optimizer` replaces the default only."""
  import jax   # pylint: disable=import-outside-toplevel
  from jaxrec import launch   # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jaxrec.embedding.collection import EmbeddingCollection
  from jaxrec.sharding import mesh as mesh_lib   # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig   # pylint: disable=import-outside-toplevel
  binding = "ExperimentConfig.table_optimizers = {'t0': @Adam()}"
  flags = ("--gin_file=configs/dlrm_synthetic.gin", "--mesh=table=4,row=2",
           f"--gin_bindings={binding}", f"--json={tmp_path / 'p.json'}")
  stacks = []
  for optimizer, others in ((None, 0), ("adagrad", 1)):   # the config's SGD, or Adagrad
    proc = plan(tmp_path, *flags, *([f"--optimizer={optimizer}"] if optimizer else []))
    assert proc.returncode == 0, proc.stderr[-2000:]
    obj = json.loads((tmp_path / "p.json").read_text())
    mem = {t["name"]: t["memory"] for t in obj["tables"]}
    assert mem["t0"]["optimizer"] == 2 * mem["t0"]["table"] > 0, optimizer
    assert all(m["optimizer"] == others * m["table"] for n, m in mem.items() if n != "t0")
    assert "sparse optimizers per table: Adam for t0 (stacks ending _o1)" in proc.stdout
    stacks.append((Plan.from_json(obj["plan"]),
                   {s["name"]: s["tables"] for s in obj["stacks"]}))
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], [binding])
  config = launch.build(ExperimentConfig)
  mesh = mesh_lib.make_mesh({"table": 4, "row": 2}, jax.devices()[:8])
  col = EmbeddingCollection.create(config.tables, config.features, stacks[0][0], mesh,
                                   config.sparse_tx())
  assert stacks[0][1] == {l.name: [s.name for s in l.slots] for l in col.layouts}
  assert any(n.endswith("_o1") for n in stacks[0][1])
  proc = plan(tmp_path, *flags[:2], "--gin_bindings=ExperimentConfig.table_optimizers = "
              "{'t9': @Adam()}")
  assert proc.returncode == 1 and proc.stderr.startswith(
      "error: --gin_bindings: ExperimentConfig.table_optimizers['t9'] names no table"
  ), proc.stderr
  assert proc.stderr.count("\n") == 1


def test_a_plan_file_of_tables_of_other_sizes_is_warned_about(tmp_path, caplog):
  """A plan.json of another config whose tables have the same names (other rows) was taken
  without a word; the warning names the sizes there and here. The caches of offloaded
  tables are what a run's plan.json records, and match."""
  from jaxrec import launch, offload   # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions
  small = tmp_path / "small.json"
  proc = plan(tmp_path, "--tables=a:1000:16,b:100:16", "--mesh=table=2", f"--json={small}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  proc = plan(tmp_path, "--tables=a:5000:16,b:100:16", f"--plan={small}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (f"--plan={small} was made for tables of other sizes (a 1,000 x 16 there, 5,000 x "
          "16 here): its placements are kept, but were chosen for those sizes (--plan=auto "
          "re-plans)") in proc.stderr, proc.stderr[-2000:]
  proc = plan(tmp_path, "--tables=a:1000:16,b:100:16", f"--plan={small}")
  assert proc.returncode == 0 and "other sizes" not in proc.stderr, proc.stderr[-2000:]
  bindings = ["OffloadConfig.tables = {'t0': {'cache_rows': 4096}}"]
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], bindings)
  config, mesh = launch.build(ExperimentConfig), {"table": 2}
  _, ran, _, _ = offload.choose_plan(config, RunOptions(plan="tw", memory_per_device=2**30),
                                     mesh)
  ran_file = tmp_path / "ran.json"
  ran_file.write_text(json.dumps(ran.to_json()))   # as the run wrote it: t0 as its cache
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    offload.choose_plan(config, RunOptions(plan=str(ran_file), memory_per_device=2**30), mesh)
  assert "other sizes" not in caplog.text, caplog.text
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")],
                   ["uniform_tables.dim = 8"])
  with caplog.at_level(logging.WARNING):
    offload.choose_plan(launch.build(ExperimentConfig),
                        RunOptions(plan=str(ran_file), memory_per_device=2**30), mesh)
  assert "t0 4,096 x 16 there, 100,000 x 8 here; t1" in caplog.text, caplog.text


def test_mesh_auto_previews_train_py_s_choice(tmp_path):
  """`--mesh=auto` refused ("give axis sizes"): there was no way to preview which mesh
  train.py's default `--mesh=auto` takes. Now it needs the job's `--devices` and chooses as
  train.py does (`mesh_choice.choose`): the tables over a 200 MiB budget on data=8 are
  priced on the split meshes."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions  # pylint: disable=import-outside-toplevel
  out = tmp_path / "p.json"
  proc = plan(tmp_path, "--gin_file=configs/skewed_synthetic.gin", "--mesh=auto",
              "--devices=8", "--memory_per_device=200MiB", f"--json={out}")
  assert proc.returncode == 0, proc.stderr
  try:   # train.py's own choice for the same config, budget and device count
    launch.parse_gin([os.path.join(ROOT, "configs", "skewed_synthetic.gin")], [])
    want = mesh_choice.choose(launch.build(ExperimentConfig),
                              RunOptions(memory_per_device=200 << 20), 8).mesh
  finally:
    import gin  # pylint: disable=import-outside-toplevel
    gin.clear_config()
  assert want != {"data": 8, "table": 1, "row": 1, "col": 1}   # over the budget there
  assert json.loads(out.read_text())["mesh"] == want
  assert proc.stdout.startswith("mesh: ") and "over --memory_per_device" in proc.stdout
  proc = plan(tmp_path, "--gin_file=configs/dlrm_synthetic.gin", "--mesh=auto", "--devices=8",
              "--plan=twrw")
  assert proc.returncode == 0, proc.stderr
  assert "on mesh data=1,table=2,row=4,col=1 (8 devices)" in proc.stdout, proc.stdout


@pytest.mark.parametrize("flags, message", [
    (["--mesh=auto"], "--mesh=auto: give the job's device count, e.g. --devices=8"),
    (["--mesh=auto", "--devices=0"], "got --devices=0"),
    (["--mesh=data=8", "--devices=8"], "--devices: only with --mesh=auto"),
    (["--mesh=auto", "--devices=8", "--batch_size=64"],
     "--batch_size: not with --mesh=auto, which plans as train.py does (bind "
     "ExperimentConfig.batch_size with --gin_bindings)"),
    (["--mesh=auto", "--devices=3"], "of the 3 devices of --mesh=auto --devices=3"),
])
def test_mesh_auto_flag_errors(tmp_path, flags, message):
  proc = plan(tmp_path, "--gin_file=configs/dlrm_synthetic.gin", *flags)
  assert proc.returncode == 1 and message in proc.stderr, proc.stderr
