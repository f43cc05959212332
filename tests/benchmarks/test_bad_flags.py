"""Benchmark scripts reject bad flags with a usage error before any work.

Each case runs the benchmark's `__main__` in this process (`in_process.run_script`: a
process start is ~3.5 s of jax imports): every flag error here is raised before the script
does anything that a process of its own would do differently (its XLA_FLAGS, read when jax
starts, already hold the test process's 8 devices; os.environ is put back). The slow suite
runs the first case of each script again as a real process (ids ending `:process`).
"""

import os
import subprocess
import sys

import pytest

from tests.scripts.in_process import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, flags, in_process=True):
  """benchmarks/SCRIPT FLAGS from the repository root: its exit code, stdout and stderr."""
  if in_process:
    return run_script(script, *flags, folder="benchmarks")
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *flags],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


def _in_and_out_of_process(cases):
  """`cases` as pytest params (script, flags, message, in_process): each in this process,
  and the first of each script again as a real process, marked slow."""
  seen = set()
  first = [c for c in cases if not (c[0] in seen or seen.add(c[0]))]
  return ([pytest.param(*c, True, id=f"{c[0]}:{' '.join(c[1])}") for c in cases] +
          [pytest.param(*c, False, id=f"{c[0]}:{' '.join(c[1])}:process",
                        marks=pytest.mark.slow) for c in first])


USAGE_ERRORS = [
    ("vs_torchrec.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("dense_dots.py", ["--config", "nope"], "--config: no configs/nope.gin"),
    ("dense_dots.py", ["--reps", "0"], "--reps must be at least 1"),
    ("offload.py", ["--steps", "3", "--rounds", "5"], "--rounds must be in [1, --steps=3]"),
    ("offload.py", ["--runs", "device,ofload"], "--runs: unknown ['ofload']"),
    ("mesh_overhead.py", ["--plans", "dp,foo"], "--plans: unknown ['foo']"),
    ("embedding_scaling.py", ["--rows", "1e5,abc"], "--rows: comma-separated row counts"),
    # timed nothing: NaN lines (not JSON), exit 0; a numpy traceback
    ("kernels.py", ["--iters", "0"], "--iters must be at least 1, got 0"),
    ("kernels.py", ["--rows", "0"], "--rows must be at least 1, got 0"),
    # were tracebacks (median of no times, ConfigError, gin ValueError, FileNotFoundError)
    ("checkpoint.py", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("checkpoint.py", ["--plan", "foo"], "--plan: unknown plan 'foo'"),
    ("checkpoint.py", ["--gin_bindings", "Nope.x=1"], "--gin_bindings: No configurable"),
    ("naive_dlrm.py", ["--data", "/nonexistent/d.npz"], "--data: no file '/nonexistent/d.npz'"),
    ("naive_dlrm.py", ["--data", "x", "--warmup", "0"], "--warmup must be in [1, --steps=300)"),
    ("mesh_overhead.py", ["--configs", "foo"], "--configs: no configs/<name>.gin for ['foo']"),
    ("mesh_overhead.py", ["--rounds", "0"], "--rounds must be at least 1, got 0"),   # NaN out
    ("embedding_scaling.py", ["--optimizer", "foo"], "--optimizer: unknown 'foo'"),
    ("embedding_scaling.py", ["--tables", "0"], "--tables must be at least 1, got 0"),
    # were ConfigError/gin tracebacks (after building the data, for offload.py)
    ("offload.py", ["--cache_fraction", "2"], "--cache_fraction must be in (0, 1), got 2.0"),
    ("offload.py", ["--optimizer", "foo"], "--optimizer: unknown 'foo'"),
    ("offload.py", ["--kvstore", "foo"], "--kvstore: unknown 'foo' (known: file, memory)"),
    ("planner.py", ["--gin_file", "/nonexistent/x.gin"], "--gin_file: cannot read"),
    ("planner.py", ["--probe", "dp,foo"], "--probe: unknown ['foo']"),   # said --plan
    ("planner.py", ["--mesh", "bad"], "--mesh: 'bad' is not AXIS=SIZE"),
    # were tracebacks after compiling or building data (ZeroDivisionError, ValueError, ...)
    ("planner.py", ["--batches", "0"], "--batches must be at least 1, got 0"),
    ("planner.py", ["--iterations", "-1"], "--iterations must be at least 0, got -1"),
    ("planner.py", ["--profile_dir", "/etc/passwd"], "--profile_dir: /etc/passwd is not a directory"),
    # an earlier run's records were fitted too: another --mesh crashed in `describe`
    ("planner.py", ["--profile_dir", ROOT], f"--profile_dir: {ROOT} is not empty and not a "
     "directory of an earlier run"),
    ("planner_search.py", ["--tables", "10,,20"], "--tables must be positive integers"),
    ("planner_search.py", ["--dims", "4,0"], "--dims must be positive integers, got '4,0'"),
    ("planner_search.py", ["--mesh", "table4"],
     "--mesh: 'table4' is not AXIS=SIZE with AXIS in data, table, row, col"),
    # tracebacks naming 'mesh:' (or the last of a repeated axis taken), and a missing
    # --record directory failed after the first search
    ("planner_search.py", ["--mesh", "tabel=4"], "--mesh: 'tabel=4' is not AXIS=SIZE"),
    ("planner_search.py", ["--mesh", "table=0"], "--mesh: size of 'table' must be positive"),
    ("planner_search.py", ["--mesh", "data=3"], "--mesh: data=3 does not divide the batch"),
    ("planner_search.py", ["--mesh", "table=4,table=2"], "--mesh: axis 'table' given twice"),
    ("planner_search.py", ["--record", "/nonexistent/x.jsonl"],
     "--record: cannot write /nonexistent/x.jsonl: No such file or directory"),
    ("offload.py", ["--stream_steps", "0"], "--stream_steps must be at least 1, got 0"),
    ("offload.py", ["--prefetch", "-1"], "--prefetch must be at least 0, got -1"),
    ("offload.py", ["--rows", "5"], "--rows=5 x --cache_fraction=0.1 leaves a cache of no rows"),
    ("offload.py", ["--store_dir", "/etc/passwd"], "--store_dir: /etc/passwd is not a directory"),
    ("offload.py", ["--host_buffer_rows", "-5"], "--host_buffer_rows must be at least 1, got -5"),
    # tracebacks (after the data was generated for --data), or no check at all
    ("vs_torchrec.py", ["--data", "/nonexistent/d/x.npz"], "--data: no file /nonexistent/d/x.npz"),
    ("vs_torchrec.py", ["--data", "/tmp"], "--data: /tmp is a directory"),
    ("vs_torchrec.py", ["--eval_examples", "0"], "--eval_examples must be at least 1, got 0"),
    # skipped as if the venv were not built, exit 0
    ("vs_torchrec.py", ["--torchrec_python", "/opt/nope/bin/python"],
     "--torchrec_python: no file /opt/nope/bin/python"),
    ("vs_torchrec.py", ["--eval_examples", "-1"], "--eval_examples must be at least 1, got -1"),
    ("embedding_scaling.py", ["--rows", "inf"], "--rows: comma-separated row counts"),
    ("embedding_scaling.py", ["--rows", "1e5,5e9"],
     "--rows: 5,000,000,000 rows is over the 2,147,483,647 that int32 ids reach"),
    # the warm-up waited forever for a cache the id stream could never fill
    ("offload.py", ["--rows", "100000", "--cache_fraction", "0.5", "--batch", "64",
                    "--stream_steps", "10", "--runs", "offload"],
     "--stream_steps=10 x --batch=64 ids cannot fill a cache of 50000 rows"),
    # a file: a traceback after the training
    ("checkpoint.py", ["--workdir", "/etc/passwd"], "--workdir: /etc/passwd is not a directory"),
    ("checkpoint_tables.py", ["--tables", "0"], "--tables must be at least 1, got 0"),
    ("checkpoint_tables.py", ["--workdir", "/etc"], "--workdir=/etc exists: give a new path"),
    ("offload.py", ["--rows", "1000", "--cache_fraction", "0.9", "--batch", "64",
                    "--stream_steps", "20", "--runs", "offload"],
     "distinct rows, fewer than the cache's 900"),
]


@pytest.mark.parametrize("script, flags, message, in_process",
                         _in_and_out_of_process(USAGE_ERRORS))
def test_bad_flag_is_a_usage_error(script, flags, message, in_process):
  out = _run(script, flags, in_process)
  assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
  assert out.stdout == ""


def test_embedding_scaling_ratio_is_largest_over_smallest_in_any_order():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "embedding_scaling.py"),
                        "--rows", "1000,100", "--tables", "1", "--batch", "16", "--rounds", "1",
                        "--steps", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  last = out.stdout.splitlines()[-1]
  assert '"rows": "1000/100"' in last and '"goal": 1.2' in last


def test_table_init_finds_its_configs_from_any_directory(tmp_path):
  # Imported in a subprocess: the script sets XLA_FLAGS at import.
  code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import table_init; "
          "assert all(os.path.isfile(gin) for gin, _, _ in table_init.CASES), table_init.CASES")
  out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "benchmarks")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]


ONE_LINE_ERRORS = [
    # absl scripts: `error: ...`, exit 1, before the job / the measurements
    ("elastic.py", ["--num_steps=0"], "error: --num_steps must be at least 1, got 0"),
    ("elastic.py", ["--kill_at=100"], "error: --kill_at=100 and --checkpoint_every=10 must be"),
    ("elastic.py", ["--train_script=/nonexistent/t.py"], "error: --train_script: no file"),
    ("input_pipeline.py", ["--trainer_metrics=/nonexistent/m.jsonl"],
     "error: --trainer_metrics: no file '/nonexistent/m.jsonl'"),
    ("input_pipeline.py", ["--batch_size=0"], "error: --batch_size must be at least 1, got 0"),
    ("input_pipeline.py", [f"--trainer_metrics={ROOT}/README.md"],   # after the measurements
     f"error: --trainer_metrics: {ROOT}/README.md: no examples_per_sec values"),
    ("input_pipeline.py", ["--trainer_examples_per_sec=-5"],   # a negative ratio
     "error: --trainer_examples_per_sec must be positive, got -5.0"),
    # only 'the launcher exited (1) before step 5', the reason in a removed workdir's log
    ("elastic.py", ["--plan=xx"], "error: --plan: unknown plan 'xx'"),
    ("elastic.py", ["--workdir=/etc/passwd"], "error: --workdir: /etc/passwd is not a directory"),
    ("input_pipeline.py", ["--workdir=/etc/passwd"],   # a traceback after measuring
     "error: --workdir: /etc/passwd is not a directory"),
    ("elastic.py", ["--mesh=data=3"], "error: --mesh: data=3,table=1,row=1,col=1 has 3 devices"),
    ("vocab.py", ["--examples=0"], "error: --examples must be at least 1, got 0"),
    ("vocab.py", ["--zipf=1"], "error: --zipf must be above 1, got 1.0"),
]


@pytest.mark.parametrize("script, flags, message, in_process",
                         _in_and_out_of_process(ONE_LINE_ERRORS))
def test_absl_benchmark_bad_flag_is_one_line_error(script, flags, message, in_process):
  out = _run(script, flags, in_process)
  assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr and out.stdout == ""


def test_input_pipeline_runs_the_trainer_in_an_absolute_workdir(tmp_path):
  """The trainer runs in the repository root: a relative `--workdir` put its run in ROOT and
  then failed to find `trainer/metrics.jsonl` (a traceback, after every measurement). In a
  process of its own: the module defines absl flags, which the in-process runs define too."""
  code = f"""import subprocess, sys, types
sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
import input_pipeline
ran = []
input_pipeline.subprocess = types.SimpleNamespace(
    run=lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
input_pipeline.FLAGS = types.SimpleNamespace(trainer_steps=8)
print(input_pipeline.measure_trainer("rel"))
print(next(a for a in ran[0] if a.startswith("--workdir=")))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, check=True)
  assert out.stdout.splitlines() == [str(tmp_path / "rel" / "trainer" / "metrics.jsonl"),
                                     f"--workdir={tmp_path / 'rel' / 'trainer'}"]


def test_naive_dlrm_refuses_ids_past_its_rows(tmp_path):
  """A gather clamps: `--rows 10` trained on ids up to 99,999 and reported an AUC."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import vs_torchrec  # pylint: disable=import-outside-toplevel
  data = str(tmp_path / "d.npz")
  vs_torchrec.write_data(data, 64, 32, seed=0)
  out = _run("naive_dlrm.py", ["--data", data, "--steps", "2", "--warmup", "1", "--batch_size",
                               "32", "--rows", "10"], in_process=False)
  assert out.returncode == 1 and out.stdout == "", out.stderr[-2000:]
  assert f"naive_dlrm: {data}: sparse holds ids in [" in out.stderr
  assert "outside the 10 rows of --rows" in out.stderr


def test_make_bench_runs_the_named_scripts_only(tmp_path):
  """`make bench BENCH="..."` runs those scripts; a name that is none is refused with the
  names (`make bench` ran every script at its defaults, with no way to shorten it)."""
  stamp = tmp_path / "stamp"   # up to date: make installs nothing
  stamp.touch()
  make = ["make", "-s", "--no-print-directory", "-C", ROOT, f"STAMP={stamp}",
          f"PY={sys.executable}"]
  out = subprocess.run(make + ["-n", "bench", "BENCH=planner_search mesh_overhead"],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert "benchmarks/planner_search.py benchmarks/mesh_overhead.py;" in out.stdout
  out = subprocess.run(make + ["bench", "BENCH=mesh_ovrhead"], capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 2 and "BENCH: no benchmarks/mesh_ovrhead.py (names: " in out.stderr
  assert "mesh_overhead" in out.stderr and " common " not in out.stderr
  out = subprocess.run(make + ["bench", "BENCH=common"], capture_output=True, text=True,
                       timeout=60)   # it ran nothing and exited 0
  assert out.returncode == 2 and "BENCH: common is not a benchmark" in out.stderr


def test_help_states_a_default_once():
  """`(default: a temp dir, removed) (default: None)`: argparse's defaults formatter added
  its own after a help that said it, and `(default: None)` to a required flag."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import argparse  # pylint: disable=import-outside-toplevel
  import common  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(formatter_class=common.HelpFormatter)
  p.add_argument("--workdir", default=None, help="where (default: a temp dir, removed)")
  p.add_argument("--data", required=True, help="the .npz")
  p.add_argument("--rows", type=int, default=5, help="rows")
  text = " ".join(p.format_help().split())
  assert "(default: a temp dir, removed) --data" in text and "the .npz --rows" in text
  assert "rows (default: 5)" in text
