"""Supervisor flag checks made before any worker starts."""

import os
import re
import subprocess
import sys

import pytest

from jaxrec.elastic import supervisor as sup, worker
from jaxrec.errors import ConfigError
from tests.elastic import elastic_testlib as t


def test_a_mesh_that_does_not_fill_the_job_is_an_error(tmp_path):
  """`--mesh=data=3` on 2 x 4 devices was silently replaced by data=8."""
  w = tmp_path / "w"
  options = sup.Options(num_processes=2, devices_per_process=4)
  with pytest.raises(ConfigError, match=r"--mesh: data=3,table=1,row=1,col=1 has 3 devices "
                     r"but 8 are available \(--num_processes=2 x --devices_per_process=4\)"):
    sup.Supervisor(options, [f"--workdir={w}", "--gin_file=configs/x.gin", "--mesh=data=3"])
  assert not os.path.exists(w)
  for mesh in ("auto", "data=2,table=2,row=2"):
    sup.Supervisor(options, [f"--workdir={w}", "--gin_file=configs/x.gin", f"--mesh={mesh}"])


def test_a_misspelled_train_flag_is_a_user_error_not_a_lost_worker(tmp_path):
  """absl's `FATAL Flags parsing error` (no `error:` line) counted as a worker failure: the
  job restarted on ever fewer processes and stopped 'below --min_processes', never naming
  the flag."""
  w = str(tmp_path / "w")
  proc = t.launch(w, ["--num_processes=2", "--devices_per_process=1"],
                  [*t.TINY, "--num_step=10"])
  assert t.finish(proc) == 1
  ev = t.events(w)
  assert t.names(ev).count("launch") == 1
  assert ev[-1]["event"] == "give_up" and ev[-1]["reason"] == "user_error"
  # printed once after `error: `; either worker may be the first to exit
  assert re.match(r"worker [01]: scripts/train\.py has no flag --num_step \(did you mean "
                  r"--num_steps\?\)\. Stopping", ev[-1]["message"]), ev[-1]


@pytest.mark.parametrize("log,message", [
    ("step 1\nerror: scripts/train.py has no flag --num_step (did you mean --num_steps?)\n",
     "worker 1: scripts/train.py has no flag --num_step (did you mean --num_steps?)"),
    ("FATAL Flags parsing error: Unknown command line flag 'x'\nPass --helpshort ...\n",
     "worker 1: train flags: Unknown command line flag 'x'"),
    ("step 1\nTraceback (most recent call last):\n", "")])
def test_a_workers_flag_error_line_is_its_user_error(tmp_path, log, message):
  """train.py's flag errors are `error:` lines now (jaxrec.cli_flags); absl's FATAL line of
  another --train_script program still counts. A crash without either is no user error."""
  from jaxrec.elastic import procs, worker
  (tmp_path / worker.WORKERS_DIR).mkdir()
  (tmp_path / worker.WORKERS_DIR / "1.log").write_text("=== generation 0\n" + log)
  assert procs.user_error(str(tmp_path), [0, 1]) == message


@pytest.mark.parametrize("flag,value,why", [
    ("straggler_windows", 0, "--straggler_windows must be >= 1, got 0"),
    ("straggler_window_steps", 0, "--straggler_window_steps must be >= 1, got 0"),
    ("startup_timeout", 0.0, "--startup_timeout must be > 0, got 0.0"),
    ("check_every", -5, "--check_every must be >= 1, got -5"),
    ("hang_timeout", float("nan"), "--hang_timeout must be > 0, got nan"),
    # these said `need --max_restarts >= 0, --hang_timeout > 0, --straggler_threshold > 1`
    # (which one, and its value?), and --inject_delay=0:inf crashed every worker in sleep
    ("straggler_threshold", 1.0, "--straggler_threshold must be > 1, got 1.0"),
    ("max_restarts", -1, "--max_restarts must be >= 0, got -1"),
    ("min_processes", 0, "--min_processes must be in [1, --num_processes], got 0"),
    ("inject_delay", "0:inf", "--inject_delay must be PROCESS:SECONDS (e.g. 1:0.5), got "
                              "'0:inf'"),
    ("stop_timeout", -1.0, "--stop_timeout must be > 0"),
    ("inject_delay", "abc", "--inject_delay must be PROCESS:SECONDS"),
    ("inject_delay", "5:1", "--inject_delay=5:1: process 5 is not one of the job's processes "
                            "0 to 1 (--num_processes=2)"),
    ("inject_delay", "2:1", "--inject_delay=2:1: process 2 is not one of the job's"),
])
def test_launch_flags_out_of_range_are_one_line_errors(tmp_path, flag, value, why):
  """--straggler_windows=0 and --straggler_window_steps=0 ended in a ValueError traceback
  after the workers had started; --inject_delay=abc crashed every worker (the job stopped
  'below --min_processes'); --startup_timeout=0 killed every worker as hung; NaN timeouts
  never fired; --inject_delay=5:1 on 2 processes delayed nothing, silently."""
  options = sup.Options(num_processes=2, devices_per_process=1, **{flag: value})
  with pytest.raises(ConfigError, match=re.escape(why)):
    sup.Supervisor(options, [f"--workdir={tmp_path / 'w'}", "--gin_file=configs/x.gin"])
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("flag,why", [
    ("--plan=xx", "--plan: unknown plan 'xx' (known: auto, dp, tw"),
    ("--plan=missing/plan.json", "--plan: cannot read 'missing/plan.json': No such file"),
    ("--memory_per_device=abc", "--memory_per_device: 'abc' is not a size"),
])
def test_train_flags_no_mesh_can_fix_are_user_errors(tmp_path, flag, why):
  """These failed the planning of every mesh: the job stopped 'below --min_processes'
  (`no usable mesh: 1 process(es): ...`, exit 2) instead of a user error naming the flag."""
  options = sup.Options(num_processes=1, devices_per_process=1)
  with pytest.raises(ConfigError, match=re.escape(why)):
    sup.Supervisor(options, [f"--workdir={tmp_path / 'w'}", "--gin_file=configs/x.gin", flag])
  assert not os.path.exists(tmp_path / "w")
  sup.Supervisor(options, [f"--workdir={tmp_path / 'w'}", "--gin_file=configs/x.gin",
                           "--plan=tw", "--memory_per_device=1GiB"])


def test_a_config_the_processes_asked_for_cannot_run_is_a_user_error(tmp_path):
  """An eval batch the 2 devices do not divide: the first generation ran silently on 1
  process of 1 device (mesh data=1, not the --mesh=table=2 asked for) and exited 0."""
  w = str(tmp_path / "w")
  os.makedirs(os.path.join(w, "checkpoints", "3"))     # it said: run the same command again
  proc = t.launch(w, ["--num_processes=2", "--devices_per_process=1"],
                  [*t.TINY, "--mesh=table=2", "--plan=tw", "--num_steps=2",
                   "--gin_bindings=ExperimentConfig.eval_batch_size=127"])
  assert t.finish(proc) == 1
  ev = t.events(w)
  assert "launch" not in t.names(ev)
  assert ev[-1]["event"] == "give_up" and ev[-1]["reason"] == "user_error"
  assert ev[-1]["message"].startswith("2 process(es): ExperimentConfig.eval_batch_size=127 "
                                      "is not divisible by the 2 devices")
  assert "run the same command again" not in ev[-1]["message"], ev[-1]
  assert ("Stopping; fix the config (--gin_file, --gin_bindings) or --num_processes, "
          "--devices_per_process, --mesh, then run again to resume from the latest "
          "checkpoint, step 3 in ") in ev[-1]["message"], ev[-1]


def test_a_refused_second_supervisor_leaves_events_jsonl_alone(tmp_path):
  """The second supervisor 'refused before it writes anything' still cut what looked like a
  torn last line off events.jsonl, before it asked for the lock: a line the running one was
  writing at that moment."""
  from jaxrec import files  # pylint: disable=import-outside-toplevel
  w = tmp_path / "w"
  os.makedirs(w / "elastic")
  events = w / "events.jsonl"
  events.write_bytes(b'{"event": "start"}\n{"event": "laun')   # the first one mid-write
  options = sup.Options(num_processes=1, devices_per_process=1)
  second = sup.Supervisor(options, [f"--workdir={w}", "--gin_file=configs/x.gin"])
  with files.workdir_lock(str(w), worker.LAUNCH_LOCK):   # the first one
    with pytest.raises(ConfigError, match="in use by another scripts/launch.py"):
      second.run()
  assert events.read_bytes() == b'{"event": "start"}\n{"event": "laun'


def test_a_missing_train_script_is_a_user_error(tmp_path):
  """Every worker exited 2 (python: can't open file): the job shrank twice and stopped
  'only 0 process(es) ... below --min_processes=1' (exit 2), never naming the flag."""
  missing = str(tmp_path / "fake_trian.py")
  options = sup.Options(num_processes=2, devices_per_process=1, train_script=missing)
  with pytest.raises(ConfigError, match=re.escape(f"--train_script: {missing} is not a file")):
    sup.Supervisor(options, [f"--workdir={tmp_path / 'w'}", "--gin_file=configs/x.gin"])
  assert not os.path.exists(tmp_path / "w")


def test_a_capacity_file_in_a_missing_directory_is_a_user_error(tmp_path):
  """A file there can never be written (a typo in the path): the supervisor looked for it
  every poll, found nothing and said nothing; capacity changes written elsewhere were lost."""
  path = str(tmp_path / "typo" / "capacity")
  options = sup.Options(num_processes=2, devices_per_process=1, capacity_file=path)
  with pytest.raises(ConfigError, match=re.escape(
      f"--capacity_file: {path}: directory {tmp_path / 'typo'} does not exist")):
    sup.Supervisor(options, [f"--workdir={tmp_path / 'w'}", "--gin_file=configs/x.gin"])
  assert not os.path.exists(tmp_path / "w")
  options.capacity_file = str(tmp_path / "capacity")       # not there yet: fine
  sup.Supervisor(options, [f"--workdir={tmp_path / 'w'}", "--gin_file=configs/x.gin"])


@pytest.mark.slow
@pytest.mark.parametrize("saved", [True, False])
def test_ctrl_c_before_the_supervisor_loop_names_the_checkpoint(tmp_path, saved):
  """Ctrl-C while the launcher loaded the config (or imported, or stopped the workers)
  printed a bare `interrupted`: which checkpoint the run resumes from was not said."""
  w = tmp_path / "w"
  if saved:
    for step in (5, 10):
      (w / "checkpoints" / str(step)).mkdir(parents=True)
    (w / "checkpoints" / "15.orbax-checkpoint-tmp-1").mkdir()   # a save in flight
  ctrl_c = ("import runpy, sys\nfrom jaxrec.elastic import replan\n"
            "def load_config(args):\n  raise KeyboardInterrupt\n"
            "replan.load_config = load_config\nsys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", ctrl_c, os.path.join(t.ROOT, "scripts", "launch.py"),
                         "--quiet", "--", f"--workdir={w}", "--gin_file=configs/x.gin"],
                        capture_output=True, text=True, env=t.env(), cwd=t.ROOT, timeout=120)
  where = os.path.join(w, "checkpoints")
  want = (f"the latest checkpoint is step 10 in {where} (run the same command again to "
          "resume)" if saved else f"no checkpoint was saved in {where}")
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert proc.stderr == f"error: interrupted by SIGINT. Stopping; {want}.\n", proc.stderr


@pytest.mark.parametrize("flag", ["--num_processes=2", "--devices_per_process", "--quiet",
                                  "--noreplan_on_straggler"])
def test_a_launcher_flag_after_the_separator_is_a_user_error(tmp_path, flag):
  """`launch.py -- --workdir=W ... --num_processes=2` started the workers, which stopped
  with `scripts/train.py has no flag --num_processes`, not saying where it goes."""
  options = sup.Options(num_processes=1, devices_per_process=1)
  name = flag[2:].split("=")[0]
  with pytest.raises(ConfigError, match=re.escape(
      f"--{name} is a flag of scripts/launch.py, not of scripts/train.py: put it before "
      "`--` (launch.py [launcher flags] -- --workdir=W --gin_file=...)")):
    sup.Supervisor(options, [f"--workdir={tmp_path / 'w'}", "--gin_file=configs/x.gin", flag])
  assert not os.path.exists(tmp_path / "w")


def test_the_launcher_flags_known_to_the_supervisor_are_launch_pys():
  with open(os.path.join(t.ROOT, "scripts", "launch.py")) as f:
    defined = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', f.read()))
  from jaxrec.elastic import options   # pylint: disable=import-outside-toplevel
  assert options.LAUNCH_FLAGS == defined
