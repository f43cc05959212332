"""Smoke test of `benchmarks/vs_torchrec.py`: a few steps, JSON lines as documented.

The TorchRec side runs only where its venv exists (`make -C third_party/torchrec_reference
venv`); otherwise the script must say it skipped it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "vs_torchrec.py")
TORCHREC_PYTHON = os.path.join(ROOT, "third_party", "torchrec_reference", ".venv", "bin", "python")


def _run(*flags):
  out = subprocess.run([sys.executable, SCRIPT, "--steps", "4", "--warmup", "1",
                        "--eval_examples", "1024", *flags],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
  assert all(l["benchmark"] == "vs_torchrec" for l in lines)
  return lines


@pytest.mark.slow   # ~25 s: two frameworks compile and evaluate
def test_jaxrec_side_and_skip_line():
  lines = _run("--skip_torchrec")
  jx = lines[0]
  assert jx["framework"] == "jaxrec", jx
  assert jx["examples_per_sec"] > 0 and 0.0 <= jx["auc"] <= 1.0
  assert jx["eval_examples"] == 1024 and jx["steps"] == 4
  naive = lines[1]
  assert naive["framework"] == "naive_jax", naive
  assert naive["examples_per_sec"] > 0 and 0.0 <= naive["auc"] <= 1.0
  assert naive["eval_examples"] == 1024 and naive["steps"] == 4
  assert lines[2] == {"benchmark": "vs_torchrec", "framework": "torchrec",
                      "skipped": "--skip_torchrec"}
  summary = lines[3]
  assert "skipped" in summary and summary["goal"] == 2.0
  assert summary["ratio_vs_naive"] == round(jx["examples_per_sec"] / naive["examples_per_sec"], 3)


@pytest.mark.slow
def test_skip_naive_leaves_the_baseline_out_and_breakdown_times_the_dots():
  lines = _run("--skip_torchrec", "--skip_naive", "--breakdown")
  assert [l.get("framework") for l in lines[:2]] == ["jaxrec", "torchrec"]
  assert "ratio_vs_naive" not in lines[-1]
  jx = lines[0]
  assert set(jx["breakdown_ms"]) == {"dense", "embedding", "host_put", "full", "dots"}
  assert jx["breakdown_ms"]["dots"] > 0 and jx["dots"] == 22   # criteo's DLRM: 22 matmuls
  assert jx["dense_gflop"] == pytest.approx(1.474, abs=1e-3) and jx["dots_gflops"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHREC_PYTHON), reason="torchrec venv missing")
def test_both_sides_give_ratio():
  lines = _run("--breakdown")
  assert [l.get("framework") for l in lines[:3]] == ["jaxrec", "naive_jax", "torchrec"]
  summary = lines[-1]
  assert summary["goal"] == 2.0 and summary["ratio"] > 0
  assert summary["examples"] == 4 * 512
  assert summary["ratio_vs_naive"] > 0
  tr_step_ms = 1e3 * 512 / summary["torchrec_examples_per_sec"]
  assert summary["ratio_bound_dots"] == pytest.approx(
      tr_step_ms / lines[0]["breakdown_ms"]["dots"], rel=2e-3)
  for k in ("jaxrec_auc", "torchrec_auc", "naive_auc"):
    assert 0.0 <= summary[k] <= 1.0


@pytest.mark.slow   # ~20 s: three processes import jax
def test_a_failed_framework_fails_the_script_without_torchrec_too(tmp_path):
  # A data file too small for the steps: both JAX workers exit with an error. `make bench`
  # (no TorchRec venv) sees only the exit status, so it must not be 0.
  data = tmp_path / "tiny.npz"
  z = lambda *shape: np.zeros(shape, np.float32)
  np.savez(data, dense=z(1, 13), sparse=np.zeros((1, 26), np.int64), labels=z(1),
           eval_dense=z(1, 13), eval_sparse=np.zeros((1, 26), np.int64), eval_labels=z(1))
  out = subprocess.run([sys.executable, SCRIPT, "--steps", "4", "--warmup", "1", "--data",
                        str(data), "--skip_torchrec"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 1, out.stdout
  last = json.loads(out.stdout.splitlines()[-1])
  assert last["error"] == "jaxrec, naive_jax failed; see its line above"
