"""docs/python_api.md's program (ExperimentConfig in Python → loop.setup → state.create →
make_train_step on the user's own batches) runs as written, and 8 devices give the 1-device
losses."""

import os
import re
import subprocess
import sys

import numpy as np

from tests import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "python_api.md")
MESH_LINE = 'MESH, PLAN = "auto", "auto"'


def _program() -> str:
  text = open(DOC, encoding="utf-8").read()
  program = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  assert MESH_LINE in program, "the doc's program sets MESH, PLAN on one line"
  return program


def _losses(tmp_path, devices: int, mesh: str, plan: str) -> tuple[list[float], str]:
  path = tmp_path / f"api_{devices}.py"
  path.write_text(_program().replace(MESH_LINE, f"MESH, PLAN = {mesh!r}, {plan!r}"))
  out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path,
                       env=xla_env.script_env(devices, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr[-3000:]
  losses = [float(x) for x in re.findall(r"^step \d+ loss (\S+)$", out.stdout, re.M)]
  assert len(losses) == 5, out.stdout
  assert re.search(r"^mean prediction 0\.\d+$", out.stdout, re.M), out.stdout
  return losses, out.stdout


def test_the_documented_program_runs_and_8_devices_match_1(tmp_path):
  one, _ = _losses(tmp_path, 1, "auto", "auto")
  eight, printed = _losses(tmp_path, 8, "data=2,table=2,row=2", "twrw")
  assert "mesh {'data': 2, 'table': 2, 'row': 2, 'col': 1}" in printed, printed
  np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(one)) and one[-1] != one[0]
