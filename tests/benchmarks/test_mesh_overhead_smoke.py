"""benchmarks/mesh_overhead.py end to end on dlrm_synthetic, one round: a line per plan with
its mesh, kinds and ratio, including `auto` (the trainer's choice), and the stage lines
(`--stages` builds its stages from the train step's own dense value_and_grad)."""

import json

from tests.scripts.in_process import run_script


def test_plans_and_stages_report():
  out = run_script("mesh_overhead.py", "--configs=dlrm_synthetic", "--plans=auto,tw",
                   "--rounds=1", "--steps=1", "--stages", "--stage_steps=1",
                   folder="benchmarks")
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
  plans = {d["plan"]: d for d in lines if "ratio" in d}
  assert set(plans) == {"auto", "tw"}
  assert plans["tw"]["mesh"] == "data=1,table=8,row=1,col=1" and plans["tw"]["kinds"] == {"tw": 8}
  assert sum(plans["auto"]["kinds"].values()) == 8
  for d in plans.values():
    assert d["t1_ms"] > 0 and d["t8_ms"] > 0 and d["goal"] == 1.5
  stages = [d for d in lines if "stages_ms" in d]
  assert sorted((d["plan"], d["devices"]) for d in stages) == [("auto", 1), ("auto", 8),
                                                                ("tw", 1), ("tw", 8)]
  for d in stages:
    assert set(d["stages_ms"]) == {"lookup", "pool", "grad", "dense", "step"}
