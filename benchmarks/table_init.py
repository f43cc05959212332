#!/usr/bin/env python3
"""Startup cost of the initial tables: compile and run time of `EmbeddingCollection.init`.

Tables are built in their stacked layout by one kernel per stack (`embedding.table_init`),
so the compile time does not grow with the number of distinct table shapes.
Prints `{"benchmark": "table_init", "config": C, "mesh": M, "plan": P, "tables": N,
"stacks": S, "compile_s": X, "run_s": Y}` per case (8 host CPU devices; `data=1` cases
run on the first device only).
"""

import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from common import emit, interruptible  # noqa: E402  (adds the repository to sys.path)

import jax  # noqa: E402
import time  # noqa: E402

from jaxrec import launch  # noqa: E402
from jaxrec.train import config as config_lib, loop  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CASES = [(os.path.join(CONFIGS, gin), mesh, plan) for gin, mesh, plan in (
    ("dlrm_criteo.gin", "data=1", "dp"), ("dlrm_criteo.gin", "data=8", "dp"),
    ("skewed_synthetic.gin", "table=8", "tw"),
    ("dlrm_synthetic.gin", "data=2,table=2,col=2", "twcw"))]


def measure(gin_file: str, mesh: str, plan: str) -> dict:
  launch.parse_gin([gin_file], [])
  config = config_lib.ExperimentConfig()
  devices = 1 if mesh == "data=1" else 8
  options = config_lib.RunOptions(num_steps=1, mesh=mesh, plan=plan, progress=False)
  coll, _, _ = loop.setup(config, options, devices=jax.devices()[:devices])
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = jax.jit(coll._init, out_shardings=coll.shardings()).lower(key).compile()
  t1 = time.perf_counter()
  jax.block_until_ready(compiled(key))
  t2 = time.perf_counter()
  return emit("table_init", config=os.path.basename(gin_file), mesh=mesh, plan=plan,
              tables=len(coll.tables), stacks=len(coll.layouts),
              compile_s=round(t1 - t0, 3), run_s=round(t2 - t1, 3))


def main():
  argparse.ArgumentParser(description=__doc__).parse_args()
  for case in CASES:
    measure(*case)


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
