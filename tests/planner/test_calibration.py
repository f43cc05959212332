"""Calibration: a quick timing run on the 8 host CPU devices, and its cache."""

import json

import pytest

from jaxrec.errors import ConfigError
from jaxrec.planner import COST_TERMS, DEFAULT, Calibration, calibration


def test_quick_calibration_and_cache(tmp_path):
  cal = calibration.calibrate(quick=True, reps=2)
  assert cal.meta["num_devices"] == 8 and "8 cpu" in cal.source
  vec = cal.vector()
  assert (vec >= 0).all() and len(vec) == len(COST_TERMS)
  coef = cal.coefficients
  assert all(coef[k] > 0 for k in COST_TERMS if k not in ("const", "launches"))
  assert coef["pool_bytes"] == coef["update_bytes"]  # both priced as memcpy
  path = calibration.save_calibration(cal, tmp_path / "c" / "calibration.json")
  again = calibration.load_calibration(path)
  assert again.vector().tolist() == vec.tolist() and again.source == cal.source


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
    Calibration({"launches": -1.0})
  assert json.loads(json.dumps(DEFAULT.to_json()))["coefficients"]["launches"] == 20e-6
