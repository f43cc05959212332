"""Calibration: a quick timing run on the 8 host CPU devices, and its cache."""

import json
import os
import re
import subprocess
import sys

import pytest

from jaxrec.errors import ConfigError
from jaxrec.planner import COST_TERMS, DEFAULT, Calibration, calibration
from tests.scripts.in_process import run_script


def test_quick_calibration_and_cache(tmp_path):
  cal = calibration.calibrate(quick=True, reps=2)
  assert cal.meta["num_devices"] == 8 and "8 cpu" in cal.source
  assert cal.meta["version"] == calibration.VERSION
  vec = cal.vector()
  assert (vec >= 0).all() and len(vec) == len(COST_TERMS)
  coef = cal.coefficients
  assert all(coef[k] > 0 for k in COST_TERMS if k not in ("const", "collectives", "stacks"))
  assert coef["const"] == 0  # dense layers: only a profile fit prices them
  assert set(cal.meta["raw_times_s"]) >= set(COST_TERMS) - {"const", "collectives"}
  path = calibration.save_calibration(cal, tmp_path / "c" / "calibration.json")
  again = calibration.load_calibration(path)
  assert again.vector().tolist() == vec.tolist() and again.source == cal.source
  assert calibration.load_or_calibrate(path) == again   # current: not measured again


def test_the_device_count_asked_for_is_the_one_timed():
  """With XLA_FLAGS setting a count (8 here) `--calibration_devices=2` timed on 8; more than
  the process has is an error naming both."""
  cal = calibration.calibrate(2, quick=True, reps=1)
  assert cal.meta["num_devices"] == 2 and "2 cpu" in cal.source
  with pytest.raises(ConfigError, match=r"^--calibration_devices=9: this process has 8 CPU "
                     r"devices \(XLA_FLAGS="):
    calibration.calibrate(9, quick=True, reps=1)


def test_cache_path_and_bad_files(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXREC_CACHE_DIR", str(tmp_path))
  assert calibration.default_cache_path() == tmp_path / "calibration.json"
  assert calibration.load_calibration() is None
  (tmp_path / "calibration.json").write_text("{not json")
  with pytest.raises(ConfigError, match="malformed"):
    calibration.load_calibration()
  with pytest.raises(ConfigError, match="unknown cost terms"):
    Calibration({"flops": 1.0})
  with pytest.raises(ConfigError, match=">= 0"):
    Calibration({"collectives": -1.0})
  assert json.loads(json.dumps(DEFAULT.to_json()))["coefficients"]["collectives"] == 20e-6
  # A cache written before the cost terms changed names its unknown term.
  (tmp_path / "calibration.json").write_text(json.dumps({"coefficients": {"launches": 1e-5}}))
  with pytest.raises(ConfigError, match=r"malformed .*unknown cost terms \['launches'\]"):
    calibration.load_calibration()


def test_cpu_devices_are_requested_after_jax_is_imported():
  """`scripts/plan.py --calibrate` imports jax (through jaxrec.planner) before it asks for
  devices: the request must still count, since XLA reads the flag when a backend starts."""
  code = ("import jax, jaxrec.planner; from jaxrec.planner import calibration as c; "
          "c.request_cpu_devices(3); print(len(jax.devices()))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout
  assert out.split()[-1] == "3"


@pytest.mark.parametrize("name", ["calibration.json", "cal.tmp"])
def test_failed_save_keeps_the_old_cache_and_leaves_nothing(tmp_path, monkeypatch, name):
  """The cache was written through `<path minus suffix>.tmp`: a failed write left it behind
  (clobbering any file of that name), and for `cal.tmp` it was the cache itself, truncated."""
  path = tmp_path / name
  calibration.save_calibration(DEFAULT, path)
  old = path.read_text()

  def full_disk(src, dst):   # the temporary file is written; the rename fails
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(os, "replace", full_disk)
  with pytest.raises(OSError, match="No space"):
    calibration.save_calibration(Calibration({"collectives": 1.0}, "new"), path)
  assert path.read_text() == old and os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("text,why", [
    ('{"coefficients": {"collectives": Infinity}}', "coefficient 'collectives' must be a "
     "finite number >= 0 \\(seconds per unit\\), got inf"),
    ('{"coefficients": {"stacks": NaN}}', "coefficient 'stacks' must be a finite number >= 0"),
    ('{"coefficients": {"sort_bytes": -1e-12}}', "coefficient 'sort_bytes' must be a finite "
     "number >= 0 \\(seconds per unit\\), got -1e-12"),
    ('{"coefficients": {"stacks": true}}', "coefficient 'stacks' must be .*, got True"),
    ('{"coefficients": {"stacks": "abc"}}', "coefficient 'stacks' must be .*, got 'abc'"),
    ('{"coefficients": {"stacks": null}}', "coefficient 'stacks' must be .*, got None"),
    ('{"coefficients": [1]}', r'"coefficients" must be an object, got \[1\]'),
    ("{}", '"coefficients" must be an object, got None'),
    ('{"coefficients": {}, "meta": 3}', '"meta" must be an object, got 3'),
    ("[1]", "expected a JSON object, got list")])
def test_a_bad_coefficient_names_the_file_and_the_key(tmp_path, text, why):
  """inf (and true, read as 1 second) was accepted and priced every plan; a string or null
  said only float()'s message; a list said 'list indices must be integers or slices'."""
  path = tmp_path / "cal.json"
  path.write_text(text)
  with pytest.raises(ConfigError) as e:
    calibration.load_calibration(path)
  msg = str(e.value)
  assert msg.startswith(f"calibration file {path} is malformed (") and re.search(why, msg), msg


def test_a_calibration_path_that_is_a_directory_says_so(tmp_path, monkeypatch):
  """`--calibration_file=DIR` said 'no such file'; a directory at the default cache path
  was an IsADirectoryError traceback."""
  monkeypatch.setenv("JAXREC_CACHE_DIR", str(tmp_path))
  (tmp_path / "calibration.json").mkdir()
  with pytest.raises(ConfigError, match=f"^calibration file {tmp_path / 'calibration.json'} "
                     "is a directory, not a calibration file$"):
    calibration.load_calibration()
  for extra in ([], ["--calibrate"]):
    proc = run_script("plan.py", "--tables=t:100:16", "--mesh=row=2",
                      f"--calibration_file={tmp_path}", *extra)
    assert proc.returncode == 1 and proc.stderr == (
        f"error: --calibration_file: '{tmp_path}' is a directory, not a calibration file\n"
    ), proc.stderr[-2000:]
