#!/usr/bin/env python3
"""Measured step time of the planner's plans vs a naive round-robin table-wise plan.

On skewed tables (`configs/skewed_synthetic.gin`: a few tables of millions of rows, many tiny
ones, mixed bag sizes) and one 8-device mesh (host CPU devices by default), with the real
jitted train step (`jaxrec.train.step.make_train_step`) on synthetic batches:

  naive    table i on `table` slice i % nt (`tw`), in config order
  static   `planner.propose_plan` with the prior coefficients (what `--plan=auto` runs)
  refined  what profile refinement proposes (DLRover-RM's loop): the job first ran naive,
           the `--probe` plans (every table `dp`, every table `tw`) and static, writing
           profile lines as the trainer does (`planner.profile_record`); then up to
           `--iterations` times `planner.refine_from_profile` fits the coefficients to the
           profile and proposes a plan, which runs beside naive and static and is profiled
           in turn; refined is the last proposal (the loop stops early when the fit
           proposes a plan it has already measured)
  bags_apart  optional hand-made reference (`--reference_min_len`): naive, but tables read
           by long bags replicated

A config's `ExperimentConfig.table_optimizers` (e.g. through `--gin_bindings`) is planned,
estimated and run per table, as the trainer does.

Step times are medians over steps, measured interleaved (round r runs every plan for a
few steps, then round r+1) so that load drift on a shared machine hits all plans alike;
the final comparison is a fresh interleaved run of naive, static and refined. Goal:
refined / naive <= 0.9.

Prints one line per plan and phase (`profile`, `refine_measured`, `final`):
`{"benchmark": "planner", "plan": NAME, "step_ms": T, "estimated_ms": E, ...}`
(`estimated_ms` under the prior coefficients, `fitted_ms` under the last profile fit;
`padded_ids_per_device`: id slots per device per step, see `StepRunner.padded_ids`); one
per fit of the refinement loop (`"phase": "refine"`: `fit`, the fit's error, `samples`,
`predicted_ms` of its proposal and `proposed_same_as`, no measured time); and a
last line with `"ratio"` (refined / naive), `"static_ratio"`, `"goal"`, the estimate errors
(estimate / measured, prior and fitted) and the load average at start and end.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from common import (  # noqa: E402
    HelpFormatter, check_at_least, emit, interleaved_times, interruptible, median, own_dir)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxrec import launch, planner  # noqa: E402
from jaxrec.data.pipeline import make_train_iterator  # noqa: E402
from jaxrec.embedding.collection import EmbeddingCollection  # noqa: E402
from jaxrec.embedding.layout import ids_gather_devices  # noqa: E402
from jaxrec.sharding import mesh as mesh_lib  # noqa: E402
from jaxrec.errors import JaxrecError  # noqa: E402
from jaxrec.sharding.plan import KINDS, Plan, TablePlacement, uniform_plan  # noqa: E402
from jaxrec.train import loop  # noqa: E402
from jaxrec.train import state as state_lib  # noqa: E402
from jaxrec.train import step as step_lib  # noqa: E402
from jaxrec.train.config import ExperimentConfig  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BENCH = "planner"


# ------------------------------------------------------------------- shared step timing
def host_batches(config, count: int, seed: int = 0) -> list:
  """`count` global synthetic train batches (host numpy), reused round-robin by runners."""
  it = make_train_iterator("synthetic", config.features, config.tables, config.batch_size,
                           seed)
  return [next(it) for _ in range(count)]


class StepRunner:
  """The real train step of `config` under `plan` on a mesh over `devices`.

  `run()` does one step on the next pre-placed batch and blocks until the new state is
  ready; the constructor compiles (one step) so later calls time steady state.
  """

  def __init__(self, config, plan: Plan, mesh_shape, devices, batches, seed: int = 0):
    self.mesh = mesh_lib.make_mesh(mesh_shape, devices)
    self.collection = EmbeddingCollection.create(config.tables, config.features, plan,
                                                 self.mesh, config.sparse_tx())
    self.state = state_lib.create(config, self.collection, seed)
    self.step_fn = step_lib.make_train_step(config, self.collection,
                                            state_lib.shardings(self.state, self.collection))
    bs = mesh_lib.batch_sharding(self.mesh)
    self.batches = [loop.device_batch(self.collection, b, bs) for b in batches]
    self.i = 0
    t0 = time.perf_counter()
    self.run()
    self.compile_s = time.perf_counter() - t0

  def run(self) -> None:
    self.state, metrics = self.step_fn(self.state, self.batches[self.i % len(self.batches)])
    self.i += 1
    jax.block_until_ready((self.state, metrics))

  def padded_ids(self, batch_size: int) -> dict:
    """Id slots each device handles per step, summed over stacks: `gathered` = B * M / N *
    sum of the features' max_len (the all-gathered ids, each feature at its own bag size,
    from the M = `layout.ids_gather_devices` of N devices) and `lookup` = B * W * L (W =
    most features on one `table` slice, L the stack's longest bag: what the dedup sort
    runs over, and the pooling gather and its scatter-add transpose for kinds split over
    `table`)."""
    coll = self.collection
    share = (ids_gather_devices(coll.layouts, [coll.dedup(l) for l in coll.layouts])
             / math.prod(dict(coll.layouts[0].sizes).values()))
    gathered = int(sum(batch_size * share * coll.features[i].max_len for l in coll.layouts
                       for i in l.features))
    lookup = sum(batch_size * len(l.slot_features[0]) * l.max_len
                 for l in self.collection.layouts)
    return {"gathered": gathered, "lookup": lookup}

  def close(self) -> None:
    self.state = self.batches = None


# ------------------------------------------------------------------------------ plans
def naive_plan(tables, nt: int) -> Plan:
  """Round-robin table-wise: table i (config order) on slice i % nt."""
  return Plan({t.name: TablePlacement("tw", i % nt) for i, t in enumerate(tables)})


def bags_apart_plan(tables, features, nt: int, min_len: int) -> Plan:
  """Reference, not from the planner: round-robin `tw` as `naive_plan`, except that tables
  read by a bag of `min_len` or more ids are replicated (`dp`): a separate stack, so the
  table-wise stack's ids are no longer padded to the longest bag."""
  long = {f.table for f in features if f.max_len >= min_len}
  rest = [t for t in tables if t.name not in long]
  placements = {t.name: TablePlacement("tw", i % nt) for i, t in enumerate(rest)}
  placements.update({name: TablePlacement("dp") for name in long})
  return Plan(placements)


def describe(plan: Plan, nt: int) -> dict:
  """Kinds used, and per `table` slice the (tw/twrw/...) tables it holds."""
  kinds, per_slice = {}, [0] * nt
  for p in plan.placements.values():
    kinds[p.kind] = kinds.get(p.kind, 0) + 1
    if "table" in p.axes:
      per_slice[p.table_slice] += 1
  return {"kinds": kinds, "tables_per_slice": per_slice}


def estimate_ms(plan, config, mesh_shape, cal) -> float:
  res = planner.estimate_plan(plan, config.tables, config.features, mesh_shape, None,
                              config.sparse_tx(), config.batch_size, cal, check=False)
  return res.step_time_s * 1e3


def record_rounds(workdir, step: int, plans: dict, times: dict, mesh_shape, steps: int,
                  batch: int) -> int:
  """Appends one profile line per plan and round (the round's median step time), as the
  trainer does every log interval; returns the last step number used."""
  rounds = len(next(iter(times.values())))
  for r in range(rounds):
    for name, ts in times.items():
      step += steps
      planner.append_profile(workdir, planner.profile_record(
          step, float(np.median(ts[r])), plans[name], mesh_shape, steps=steps,
          batch_size=batch))
  return step


def check_profile_dir(error, path) -> None:
  """`error(message)` for a `--profile_dir` that is a file or holds files not of an earlier
  run of this benchmark, whose profile is removed: the fit read its records too (another
  --mesh: an IndexError in `describe`)."""
  if path is not None:
    own_dir(error, "profile_dir", path, ".planner_benchmark", (planner.PROFILE_FILE,))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--gin_file", action="append", default=None,
                 help="config(s), repeatable (default: configs/skewed_synthetic.gin)")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help='extra gin binding (repeatable)')
  p.add_argument("--mesh", default="table=8", help="mesh over the 8 devices")
  p.add_argument("--calibration", default="default", choices=("default", "measure"),
                 help="prior coefficients: the planner's defaults (what --plan=auto uses) or "
                 "`planner.calibrate()` on these devices")
  p.add_argument("--probe", default="dp,tw",
                 help="uniform kinds the profiled job also ran before refining (more distinct "
                 "plans give the coefficient fit more to go on); '' = none")
  p.add_argument("--iterations", type=int, default=4,
                 help="plans run by the refinement loop (fit, propose or explore, run, refit)")
  p.add_argument("--reference_min_len", type=int, default=0,
                 help="also time `bags_apart_plan` (tables with bags >= this many ids "
                 "replicated, the rest as naive); 0 = skip")
  p.add_argument("--rounds", type=int, default=16, help="interleaved rounds while profiling")
  p.add_argument("--final_rounds", type=int, default=24, help="interleaved rounds at the end")
  p.add_argument("--steps", type=int, default=2, help="timed steps per plan per round")
  p.add_argument("--batches", type=int, default=4, help="distinct batches cycled")
  p.add_argument("--profile_dir", default=None,
                 help="keep the profile records here: a new or empty directory, or one of an "
                 "earlier run of this benchmark, whose records are removed (they would be "
                 "fitted too) (default: a temporary directory)")
  args = p.parse_args()
  # 0 batches divided by zero, 0 rounds or steps profiled nothing: tracebacks after compiling
  check_at_least(p.error, vars(args), ("rounds", "final_rounds", "steps", "batches"))
  check_at_least(p.error, vars(args), ("iterations", "reference_min_len"), low=0)
  unknown = [k for k in filter(None, args.probe.split(",")) if k not in KINDS]
  if unknown:   # was a ConfigError traceback naming --plan
    p.error(f"--probe: unknown {unknown}; choose from {', '.join(KINDS)}")
  check_profile_dir(p.error, args.profile_dir)

  try:   # a missing --gin_file, a bad --mesh or config: the error names its flag
    launch.parse_gin(args.gin_file or [os.path.join(ROOT, "configs", "skewed_synthetic.gin")],
                     args.gin_bindings)
    config = ExperimentConfig()
    devices = jax.devices()
    mesh_shape = mesh_lib.parse_mesh_spec(args.mesh, len(devices))
    config.validate(len(devices))
  except JaxrecError as e:
    p.error(str(e))
  nt = mesh_shape["table"]
  b = config.batch_size
  prior = planner.calibrate(len(devices)) if args.calibration == "measure" else planner.DEFAULT
  batches = host_batches(config, args.batches)
  load = {"start": os.getloadavg()[0]}

  # Phase 1: the job runs naive, the probes and static (static last, the job's current plan).
  plans = {"naive": naive_plan(config.tables, nt)}
  for kind in filter(None, args.probe.split(",")):
    plans[f"uniform_{kind}"] = uniform_plan(kind, config.tables, nt)
  static = planner.propose_plan(config.tables, config.features, mesh_shape, None,
                                config.sparse_tx(), b, prior)
  plans["static"] = static.plan
  tmp = tempfile.TemporaryDirectory(prefix="jaxrec_planner_bench_")
  workdir = args.profile_dir or tmp.name
  os.makedirs(workdir, exist_ok=True)
  names = list(plans)
  runners = {n: StepRunner(config, plans[n], mesh_shape, devices, batches) for n in names}
  compile_s = {n: r.compile_s for n, r in runners.items()}
  times, cpu = interleaved_times(runners, args.rounds, args.steps)
  step = record_rounds(workdir, 0, plans, times, mesh_shape, args.steps, b)
  for name in names:
    emit(BENCH, phase="profile", plan=name, mesh=args.mesh, batch_size=b,
         step_ms=round(median(times[name]) * 1e3, 2), cpu_ms=round(median(cpu[name]) * 1e3, 2),
         estimated_ms=round(estimate_ms(plans[name], config, mesh_shape, prior), 4),
         compile_s=round(compile_s[name], 1), padded_ids_per_device=runners[name].padded_ids(b),
         **describe(plans[name], nt))
  for name in names:
    if name not in ("naive", "static"):
      runners.pop(name).close()

  # Phase 2 (DLRover-RM's loop): fit the profile and propose; run the proposal beside naive
  # and static and profile it, or, when the fit proposes a plan already run, the best plan
  # of other kinds (`Refinement.explore`); refit. The last fit's proposal is `refined`.
  it = 0
  while True:
    refinement = planner.refine_from_profile(workdir, config.tables, config.features, None,
                                             config.sparse_tx(), b, prior, skip_first=0,
                                             mesh_shape=mesh_shape)
    proposal = refinement.proposed.plan
    same = next((n for n in plans if plans[n] == proposal), None)
    explore = refinement.explore.plan if refinement.explore is not None else None
    emit(BENCH, phase="refine", fit=it, proposed_same_as=same,
         fitted_rms_relative_error=round(refinement.fitted.meta["rms_relative_error"], 3),
         samples=refinement.samples, predicted_speedup=round(refinement.speedup, 3),
         predicted_ms=round(refinement.proposed.step_time_s * 1e3, 2),
         fit_multipliers={k: float(f"{v:.3g}") for k, v in
                          refinement.fitted.meta["multipliers"].items()},
         fit_scale=float(f"{refinement.fitted.meta.get('scale', 1.0):.3g}"),
         fit_const_ms=round(refinement.fitted.coefficients["const"] * 1e3, 2),
         **describe(proposal, nt))
    if it == args.iterations:
      break
    if same is None:
      candidate, why = proposal, "proposed"
    elif explore is not None:
      candidate, why = explore, "explore"
    else:
      break
    it += 1
    name = f"{why}_{it}"
    plans[name] = candidate
    for old in [n for n in runners if n not in ("naive", "static")]:
      runners.pop(old).close()
    runners[name] = StepRunner(config, candidate, mesh_shape, devices, batches)
    times, _ = interleaved_times(runners, args.rounds, args.steps)
    step = record_rounds(workdir, step, plans, times, mesh_shape, args.steps, b)
    emit(BENCH, phase="refine_measured", iteration=it, plan=name,
         step_ms={n: round(median(ts) * 1e3, 2) for n, ts in times.items()},
         **describe(candidate, nt))
  fitted = refinement.fitted
  refined_name = same or "refined"
  plans.setdefault(refined_name, proposal)

  # Phase 3: the refined plan (the last proposal) against naive and static, interleaved.
  final = {"naive": runners["naive"], "static": runners["static"]}
  if refined_name not in final:
    final["refined"] = runners.get(refined_name) or StepRunner(
        config, plans[refined_name], mesh_shape, devices, batches)
  for old in [n for n in runners if runners[n] not in final.values()]:
    runners.pop(old).close()
  reference = None
  if args.reference_min_len:
    reference = bags_apart_plan(config.tables, config.features, nt, args.reference_min_len)
    final["bags_apart"] = StepRunner(config, reference, mesh_shape, devices, batches)
  times2, cpu2 = interleaved_times(final, args.final_rounds, args.steps)
  if "refined" not in times2:
    times2["refined"], cpu2["refined"] = times2[refined_name], cpu2[refined_name]
  load["end"] = os.getloadavg()[0]
  measured = {name: median(ts) for name, ts in times2.items()}
  measured_cpu = {name: median(ts) for name, ts in cpu2.items()}
  estimates = {}
  for name, plan in (("naive", plans["naive"]), ("static", plans["static"]),
                     ("refined", plans[refined_name]), ("bags_apart", reference)):
    if plan is None:
      continue
    est, fit = estimate_ms(plan, config, mesh_shape, prior), estimate_ms(
        plan, config, mesh_shape, fitted)
    estimates[name] = (est, fit)
    runner = final.get(name) or final[refined_name]
    emit(BENCH, phase="final", plan=name, mesh=args.mesh, batch_size=b,
         step_ms=round(measured[name] * 1e3, 2), cpu_ms=round(measured_cpu[name] * 1e3, 2),
         step_ms_p10_p90=[round(float(np.percentile(
             [t for r in times2[name] for t in r], q)) * 1e3, 1) for q in (10, 90)],
         estimated_ms=round(est, 4), fitted_ms=round(fit, 2),
         same_as=refined_name if name == "refined" and refined_name != "refined" else None,
         padded_ids_per_device=runner.padded_ids(b), **describe(plan, nt))
  emit(BENCH, config=os.path.basename((args.gin_file or ["skewed_synthetic.gin"])[-1]),
       mesh=args.mesh, batch_size=b, calibration=prior.source,
       ratio=round(measured["refined"] / measured["naive"], 3),
       static_ratio=round(measured["static"] / measured["naive"], 3),
       bags_apart_ratio=(round(measured["bags_apart"] / measured["naive"], 3)
                         if reference is not None else None),
       cpu_ratios={n: round(measured_cpu[n] / measured_cpu["naive"], 3)
                   for n in measured_cpu if n != "naive"},
       goal=0.9, goal_op="<=", iterations=it,   # refined_same_as: null for a new plan
       refined_same_as=refined_name if refined_name != "refined" else None,
       estimate_over_measured={n: round(e[0] / (measured[n] * 1e3), 4)
                               for n, e in estimates.items()},
       fitted_over_measured={n: round(e[1] / (measured[n] * 1e3), 3)
                             for n, e in estimates.items()},
       fit_rms_relative_error=round(fitted.meta["rms_relative_error"], 3),
       fit_samples=refinement.samples,
       refined_predicted_speedup=round(refinement.speedup, 3),
       load_average={k: round(v, 2) for k, v in load.items()})
  tmp.cleanup()


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
