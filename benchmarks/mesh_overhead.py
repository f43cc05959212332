#!/usr/bin/env python3
"""Step time of the same work on 8 host CPU devices vs 1: the cost of the mesh.

Same config and global batch, the real jitted train step, on a 1-device mesh
(`jax.devices()[:1]`) and on 8-device meshes for a few plans:

  dp    data=8                      tw    table=8
  rw    row=8                       twrw  data=2,table=2,row=2
  auto  the mesh and plan `scripts/train.py --mesh=auto --plan=auto` picks for 8 devices
        (`train.mesh_choice.choose`; the line's `mesh` and `kinds` say which)

The 8 CPU "devices" share the machine's cores, so the extra time is collectives, launch
and the work the sharded layout repeats per device. Goal: t8 / t1 <= 1.5 per plan.
Timings are medians over steps, the 1-device and 8-device runs interleaved (A B A B);
`cpu*_ms` are the process's CPU seconds per step (all threads), which other processes on a
shared machine disturb much less than wall time.

Prints `{"benchmark": "mesh_overhead", "config", "plan", "t1_ms", "t8_ms", "ratio",
"goal"}` per (config, plan) and, with `--stages`, one line per (config, plan, devices)
with cumulative stage times (each its own jit, all interleaved, so XLA may drop work a
stage's outputs do not need: not strictly increasing): `lookup` (stage 1),
`pool` (+ stage 2 forward), `grad` (+ dense model, loss and backward through both),
`step` (+ optimizers: the full train step), and `dense` (the dense model's forward +
backward alone on ready `[B, F, D]`).
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import collections  # noqa: E402

from common import (  # noqa: E402
    HelpFormatter, check_at_least, emit, interleaved_times, interruptible, median)
from planner import StepRunner, host_batches  # noqa: E402

import jax  # noqa: E402

from jaxrec import launch  # noqa: E402
from jaxrec.sharding import mesh as mesh_lib  # noqa: E402
from jaxrec.sharding.plan import format_mesh, uniform_plan  # noqa: E402
from jaxrec.train import mesh_choice  # noqa: E402
from jaxrec.train.config import ExperimentConfig, RunOptions  # noqa: E402
from jaxrec.train.dense_loss import dense_value_and_grad  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BENCH = "mesh_overhead"
MESHES = {"dp": "data=8", "tw": "table=8", "rw": "row=8", "twrw": "data=2,table=2,row=2"}
PLANS = (*MESHES, "auto")


def eight_device_plan(config, kind: str):
  """(mesh shape, plan) for `kind` on 8 devices: a uniform plan on its mesh in `MESHES`,
  or for `auto` what the trainer's `--mesh=auto --plan=auto` chooses."""
  if kind == "auto":
    choice = mesh_choice.choose(config, RunOptions(), 8)
    return choice.mesh, choice.planned[0]
  shape = mesh_lib.parse_mesh_spec(MESHES[kind], 8)
  return shape, uniform_plan(kind, config.tables, shape["table"])


class Call:
  """`run()` calls `fn(*args)` and blocks (the interface `interleaved_times` takes)."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args
    self.run()

  def run(self):
    jax.block_until_ready(self.fn(*self.args))


def stage_calls(config, runner: StepRunner) -> dict:
  """Jitted stages of the train step on `runner`'s mesh and state (each compiled once):
  `lookup`, `pool` (lookup + pool), `grad` (+ model, loss, backward), `dense` (model
  forward + backward alone on ready pooled embeddings), `step` (the real train step)."""
  coll, batch = runner.collection, runner.batches[0]
  state = jax.tree.map(lambda x: x.copy(), runner.state)   # the step donates its own
  dense_vg = dense_value_and_grad(config.model, runner.mesh)   # as the train step does

  def lookup(emb, batch):
    return coll.lookup(emb, batch.ids, batch.weights)

  def pool(emb, batch):
    ctx = coll.lookup(emb, batch.ids, batch.weights)
    return coll.pool(ctx.rows, ctx)

  def grad(state, batch):
    ctx = coll.lookup(state["emb"], batch.ids, batch.weights)
    emb, pool_vjp = jax.vjp(lambda rows: coll.pool(rows, ctx), ctx.rows)
    loss, g_params, g_emb = dense_vg(state["params"], batch.dense, emb, batch.labels)
    return loss, g_params, pool_vjp(g_emb)

  def dense(params, batch, emb):
    return dense_vg(params, batch.dense, emb, batch.labels)

  emb = jax.jit(pool)(state["emb"], batch)
  return {"lookup": Call(jax.jit(lookup), state["emb"], batch),
          "pool": Call(jax.jit(pool), state["emb"], batch),
          "grad": Call(jax.jit(grad), state, batch),
          "dense": Call(jax.jit(dense), state["params"], batch, emb),
          "step": runner}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--configs", default="dlrm_synthetic,dlrm_criteo",
                 help="names in configs/ (without .gin)")
  p.add_argument("--plans", default=",".join(PLANS),
                 help="comma list of plans, each on its 8-device mesh (dp data=8, tw table=8, "
                 "rw row=8, twrw data=2,table=2,row=2; auto: the trainer's --mesh=auto "
                 "--plan=auto choice)")
  p.add_argument("--rounds", type=int, default=6,
                 help='interleaved rounds (1 vs 8 devices)')
  p.add_argument("--steps", type=int, default=2, help="timed steps per mesh per round")
  p.add_argument("--stages", action="store_true", help="also time the step stage by stage")
  p.add_argument("--stage_steps", type=int, default=2,
                 help="calls per stage per round (stages interleaved like the steps)")
  args = p.parse_args()
  unknown = [k for k in args.plans.split(",") if k not in PLANS]
  if unknown:
    p.error(f"--plans: unknown {unknown}; choose from {', '.join(PLANS)}")
  missing = [c for c in args.configs.split(",")
             if not os.path.isfile(os.path.join(ROOT, "configs", f"{c}.gin"))]
  if missing:
    p.error(f"--configs: no configs/<name>.gin for {missing}")
  check_at_least(p.error, vars(args), ("rounds", "steps", "stage_steps"))
  devices = jax.devices()
  if len(devices) < 8:
    raise SystemExit(f"needs 8 devices, have {len(devices)} (XLA_FLAGS={os.environ['XLA_FLAGS']})")
  devices = devices[:8]
  one = mesh_lib.parse_mesh_spec("data=1", 1)
  for name in args.configs.split(","):
    launch.parse_gin([os.path.join(ROOT, "configs", f"{name}.gin")], [])
    config = ExperimentConfig()
    batches = host_batches(config, 4)
    single = StepRunner(config, uniform_plan("dp", config.tables, 1), one, devices[:1],
                        batches)
    single_stages = None
    for kind in args.plans.split(","):
      mesh_shape, plan = eight_device_plan(config, kind)
      mesh = format_mesh(mesh_shape)
      runners = {"t1": single, "t8": StepRunner(config, plan, mesh_shape, devices, batches)}
      times, cpu = interleaved_times(runners, args.rounds, args.steps)
      t1, t8 = median(times["t1"]), median(times["t8"])
      c1, c8 = median(cpu["t1"]), median(cpu["t8"])
      kinds = collections.Counter(p.kind for p in plan.placements.values())
      emit(BENCH, config=name, plan=kind, mesh=mesh, kinds=dict(sorted(kinds.items())),
           batch_size=config.batch_size,
           t1_ms=round(t1 * 1e3, 2), t8_ms=round(t8 * 1e3, 2), ratio=round(t8 / t1, 3),
           goal=1.5, goal_op="<=", cpu1_ms=round(c1 * 1e3, 2), cpu8_ms=round(c8 * 1e3, 2),
           cpu_ratio=round(c8 / c1, 3))
      if args.stages:
        single_stages = single_stages or stage_calls(config, single)
        calls = {("1", k): c for k, c in single_stages.items()}
        calls.update({("8", k): c for k, c in stage_calls(config, runners["t8"]).items()})
        st, st_cpu = interleaved_times(calls, args.rounds, args.stage_steps)
        for devs in ("1", "8"):
          emit(BENCH, config=name, plan=kind, devices=int(devs),
               mesh=mesh if devs == "8" else "1",
               stages_ms={k: round(median(st[(devs, k)]) * 1e3, 2) for k in single_stages},
               stages_cpu_ms={k: round(median(st_cpu[(devs, k)]) * 1e3, 2)
                              for k in single_stages})
      runners["t8"].close()
    single.close()


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
