"""Profile refinement (DLRover-RM's idea): fit the cost coefficients to step times a job
measured, then re-plan with the fitted model.

Profile file `W/profile.jsonl`, one JSON object per line, written by the trainer:

  {"step": 200, "step_time_s": 0.0123, "plan": <Plan.to_json()>, "mesh": {"data": 2, ...},
   "steps": 100, "batch_size": 512, "shard_times_s": {...}}

`step`, `step_time_s` (mean over the window that ends at `step`), `plan` and `mesh` are
required, except that a line may say `"same_plan": true` instead of holding `plan`: the
plan of the line before it (the trainer writes the plan in its first line and refers to
it after that: at 1,000 tables it is ~31 KB, which every log line repeated); `steps`
(steps averaged, the sample weight; default 1), `batch_size` (old profiles lack it: the
caller's, noted in the report) and `warmup: true` (skip the line) are optional;
`shard_times_s` is reserved for per-stack timings and not used yet.

The fit: each distinct (plan, mesh, batch) gives one sample (x, t): x = the cost terms of a
device (`PlanResult.critical_terms`; every device alike), t = the median measured step
time over its lines, weighted by `steps` (robust to load spikes on a shared machine).
`fit_coefficients` finds seconds per unit c_j >= 0 of each term minimising relative errors
(plans differ by factors, so each counts alike):

  sum_i w_i ((x_i . c - t_i) / t_i)^2
      + r^2 * sum_{j: prior_j > 0} (log c_j - log prior_j - sigma)^2

A few distinct plans cannot pin down every term, and a prior (the defaults, or a
calibration) may be off by orders of magnitude overall, so the anchor keeps the prior's
*ratios* between terms, not its values: sigma (the log of a common scale) is free, and the
anchor grows with the log of a term's departure from that scale, so data can move one
term by a large factor when the samples demand it. Terms the samples never exercise follow
the common scale; a term the prior prices at 0 (e.g. `const`) is fitted from data alone.
The coefficients are parametrised as c_j = exp(theta_j), i.e. the fit is a non-negative
least squares in log space (`scipy.optimize.least_squares`). Without a prior,
`fit_coefficients` solves the plain problem by NNLS (`scipy.optimize.nnls`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from jaxrec import jsonl
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError, DataError
from jaxrec.planner import cost_model as cm
from jaxrec.planner.calibration import DEFAULT, Calibration
from jaxrec.planner.result import PlanResult, format_over, format_time
from jaxrec.planner.search import estimate_plan, propose_plan
from jaxrec.sharding.plan import Plan

_LOG = logging.getLogger(__name__)
PROFILE_FILE = "profile.jsonl"
DEFAULT_RIDGE = 0.02  # r: weight of the anchor to the prior's ratios (see module docstring)


def profile_record(step: int, step_time_s: float, plan: Plan | None,
                   mesh_shape: Mapping[str, int], steps: int = 1,
                   batch_size: int | None = None, **extra) -> dict:
  """One profile line (see module docstring); `plan` None: the previous line's
  (`same_plan`)."""
  rec = {"step": int(step), "step_time_s": float(step_time_s), "mesh": dict(mesh_shape),
         "steps": int(steps)}
  if plan is None:
    rec["same_plan"] = True
  else:
    rec["plan"] = plan.to_json()
  if batch_size is not None:
    rec["batch_size"] = int(batch_size)
  rec.update(extra)
  return rec


def append_profile(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
  path = pathlib.Path(workdir) / PROFILE_FILE
  jsonl.repair_tail(path)   # a killed run's torn last line (a stat when there is none)
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def read_profile(path: str | os.PathLike) -> list[dict]:
  """Records of `path` (a profile file, or a workdir holding `profile.jsonl`)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / PROFILE_FILE
  if not path.exists():
    raise ConfigError(f"--profile: no profile at {path} (the trainer writes W/{PROFILE_FILE})")
  records, last_plan, orphans = [], None, []
  for i, line in jsonl.complete_lines(path):
    try:
      rec = json.loads(line)
      if not isinstance(rec, dict):   # an array said "missing 'step'", a number a TypeError
        raise ValueError(f"must be a JSON object, got {_json_kind(rec)}")
      if "plan" not in rec and rec.get("same_plan") is True:
        if last_plan is None:   # the line with the plan was cut off (e.g. `tail -n`)
          orphans.append(i)
          continue
        rec["plan"] = last_plan
      for key in ("step", "step_time_s", "plan", "mesh"):
        if key not in rec:
          raise ValueError(f"missing '{key}'")
      t = rec["step_time_s"]   # null, "abc" or true named no field (float(...)'s message)
      if (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
          or not t > 0):
        raise ValueError(f"step_time_s must be a positive number, got {t!r}")
      for key in ("step", "steps", "batch_size"):
        v = rec.get(key)
        if key in rec and v is not None and (
            isinstance(v, bool) or not isinstance(v, int) or v < (key != "step")):
          raise ValueError(f"{key} must be a {'non-negative' if key == 'step' else 'positive'}"
                           f" integer, got {v!r}")
      if not isinstance(rec["mesh"], dict):
        raise ValueError(f"mesh must be an object of axis sizes, got {rec['mesh']!r}")
      try:
        rec["mesh"] = cm.normalize_mesh(rec["mesh"])
      except ConfigError:
        raise
      except (ValueError, TypeError):
        raise ValueError(f"mesh: axis sizes must be positive integers, got {rec['mesh']}"
                         ) from None
      if not isinstance(rec["plan"], (dict, Plan)):
        raise ValueError(f"plan must be an object of table placements, got {rec['plan']!r}")
      if isinstance(rec["plan"], dict):
        rec["plan"] = Plan.from_json(rec["plan"])
      last_plan = rec["plan"]
    except (ValueError, TypeError, AttributeError) as e:
      raise DataError(f"{path}:{i}: bad profile line ({e})") from None
    records.append(rec)
  if orphans:
    _LOG.warning("%s: left out %d line(s) from line %d on that say 'same_plan' with no line "
                 "holding a plan before them (cut off?)", path, len(orphans), orphans[0])
  if not records:
    raise DataError(f"{path}: profile is empty")
  return records


def _json_kind(value) -> str:
  """`an array`, `a string`, ... : what a JSON value is, for messages."""
  if value is None or isinstance(value, bool):
    return json.dumps(value)
  kinds = {list: "an array", str: "a string", int: "a number", float: "a number"}
  return kinds.get(type(value), type(value).__name__)


def fit_coefficients(samples: Sequence[tuple[Mapping[str, float], float]],
                     prior: Calibration | None = None, ridge: float = DEFAULT_RIDGE,
                     weights: Sequence[float] | None = None) -> Calibration:
  """Seconds per unit of each cost term from (terms, measured seconds) samples.

  Args:
    samples: (cost terms by name (missing = 0), measured step seconds) pairs.
    prior: None = plain NNLS on the terms the samples exercise (others 0); else the
      log-space fit of the module docstring, anchored to the prior's ratios.
    ridge: weight of that anchor (`r` in the module docstring; 0 = none).
    weights: per-sample weights (e.g. steps measured); default 1.
  """
  if not samples:
    raise ConfigError("fit_coefficients: no samples")
  x = np.array([[float(s[0].get(k, 0.0)) for k in cm.COST_TERMS] for s in samples])
  t = np.array([float(s[1]) for s in samples])
  if not (t > 0).all():
    raise ConfigError(f"fit_coefficients: measured times must be positive, got {t.tolist()}")
  w = np.asarray(weights if weights is not None else np.ones(len(t)), float)
  w = w * len(w) / w.sum()  # the anchor's weight does not depend on how long steps ran
  if prior is None:
    coef, info = _plain_nnls(x, t, w), {}
  else:
    coef, info = _anchored_fit(x, t, w, prior.vector(), ridge)
  rel = float(np.sqrt(np.mean(((x @ coef - t) / t) ** 2)))
  base = prior.vector() if prior is not None else np.zeros(len(coef))
  mult = np.where(base > 0, coef / np.where(base > 0, base, 1.0), 0.0)
  return Calibration(dict(zip(cm.COST_TERMS, coef.tolist())),
                     f"profile fit ({len(samples)} samples, rms error {100 * rel:.1f}%)",
                     dict(info, samples=len(samples), rms_relative_error=rel, ridge=ridge,
                          prior=prior.source if prior is not None else None,
                          multipliers=dict(zip(cm.COST_TERMS, mult.tolist()))))


def _plain_nnls(x: np.ndarray, t: np.ndarray, w: np.ndarray) -> np.ndarray:
  """NNLS of `w * (x c - t) / t` over the columns the samples use (others 0)."""
  used = np.abs(x).max(axis=0) > 0
  scale = 1.0 / np.where(used, np.abs(x).max(axis=0), 1.0)  # columns O(1)
  a = x[:, used] * scale[used] * (np.sqrt(w) / t)[:, None]
  # scipy where it is used: imported with the module it took 0.2-0.35 s of every train.py
  # start, for `scripts/plan.py --profile` only
  from scipy import optimize  # pylint: disable=import-outside-toplevel
  m, _ = optimize.nnls(a, np.sqrt(w), maxiter=50 * len(cm.COST_TERMS))
  coef = np.zeros(x.shape[1])
  coef[used] = m * scale[used]
  return coef


def _anchored_fit(x, t, w, prior_c, ridge):
  """The log-space fit (module docstring); returns (coefficients, {"scale": e^sigma})."""
  k = x.shape[1]
  anchored = prior_c > 0
  used = np.abs(x).max(axis=0) > 0
  free = ~anchored & used  # e.g. const: no prior, only data
  log_p = np.log(np.where(anchored, prior_c, 1.0))
  prior_t = x @ prior_c
  sigma0 = float(np.log(np.sum(t) / np.sum(prior_t))) if np.sum(prior_t) > 0 else 0.0
  # Unknowns: theta (log seconds per unit) of anchored and free terms, then sigma.
  idx = np.flatnonzero(anchored | free)
  sw = np.sqrt(w)

  def unpack(p):
    theta = np.full(k, -np.inf)
    theta[idx] = np.minimum(p[:-1], 700.0)  # exp stays finite while the solver explores
    return np.exp(theta), theta, p[-1]

  def residuals(p):
    coef, theta, sigma = unpack(p)
    fit = sw * (x @ coef - t) / t
    anchor = ridge * (theta[anchored] - log_p[anchored] - sigma)
    return np.concatenate([fit, anchor])

  def jac(p):
    coef, _, _ = unpack(p)
    j = np.zeros((len(t) + int(anchored.sum()), len(idx) + 1))
    j[:len(t), :-1] = (sw / t)[:, None] * x[:, idx] * coef[idx]
    rows = np.arange(int(anchored.sum()))
    j[len(t) + rows, np.searchsorted(idx, np.flatnonzero(anchored))] = ridge
    j[len(t):, -1] = -ridge
    return j

  best = None
  # Starts: the prior scaled to the mean time with free terms small, and with free terms
  # taking half of it (the fit is smooth but not convex in theta).
  for share in (1e-3, 0.5):
    p0 = np.empty(len(idx) + 1)
    for n, j in enumerate(idx):
      if anchored[j]:
        p0[n] = log_p[j] + sigma0 + np.log(1 - share)
      else:
        p0[n] = float(np.log(share * np.mean(t) / np.mean(np.abs(x[:, j]))))
    p0[-1] = sigma0
    method = "lm" if len(t) + int(anchored.sum()) >= len(p0) else "trf"  # lm: m >= n
    from scipy import optimize  # pylint: disable=import-outside-toplevel
    sol = optimize.least_squares(residuals, p0, jac=jac, method=method, max_nfev=2000)
    if best is None or sol.cost < best.cost:
      best = sol
  coef, _, sigma = unpack(best.x)
  return coef, {"scale": float(np.exp(sigma))}


def _weighted_median(values, weights) -> float:
  """The value at half the total weight (values sorted; the lower one on a tie)."""
  order = np.argsort(values)
  v, w = np.asarray(values, float)[order], np.asarray(weights, float)[order]
  return float(v[np.searchsorted(np.cumsum(w), 0.5 * w.sum())])


@dataclasses.dataclass(frozen=True)
class Refinement:
  """Outcome of `refine_from_profile`.

  Attributes:
    fitted: the fitted coefficients.
    measured_step_time_s: weighted median measured step time of the current plan.
    current: the current plan estimated with `fitted`.
    proposed: the best plan found with `fitted` (the current one if nothing beats it and
      it fits the budget).
    speedup: current.step_time_s / proposed.step_time_s (>= 1 on the same mesh, unless the
      current plan is over the budget).
    explore: the best plan with `fitted` whose kinds differ from every profiled plan's
      (None if there is none): what to run next to learn more when `proposed` has been
      profiled already.
    model_step_time_s: the current plan estimated with `fitted` at the batch it was
      measured at (None: `current.step_time_s`).
    measured_batch_size: that batch (None: `current.batch_size`); `current`, `proposed`
      and `explore` are for `current.batch_size`, the batch planned for.
    notes: lines the report prints first (e.g. profile lines that recorded no batch).
  """

  fitted: Calibration
  prior: Calibration
  measured_step_time_s: float
  samples: int
  current: PlanResult
  proposed: PlanResult
  speedup: float
  explore: PlanResult | None = None
  model_step_time_s: float | None = None
  measured_batch_size: int | None = None
  notes: tuple[str, ...] = ()

  def report(self) -> str:
    coef = self.fitted.vector()
    prior = self.prior.vector()
    model = self.model_step_time_s
    model = self.current.step_time_s if model is None else model
    measured_b = self.measured_batch_size or self.current.batch_size
    other = (f"; planning for global batch {self.current.batch_size}, not the profiled "
             f"{measured_b}" if measured_b != self.current.batch_size else "")
    lines = [*self.notes,
             f"profile: {self.samples} distinct plan(s); current plan measured "
             f"{format_time(self.measured_step_time_s)}/step at global batch {measured_b}, "
             f"fitted model says {format_time(model)}{other}",
             f"coefficients ({self.fitted.source}; prior: {self.prior.source}):"]
    for k, c, p in zip(cm.COST_TERMS, coef, prior):
      ratio = f"x{c / p:.2f}" if p > 0 else "(free)"
      lines.append(f"  {k:<22} {c:.3e} s/unit {ratio}")
    lines += ["", self.proposed.report(), ""]
    if (self.proposed.plan == self.current.plan and
        dict(self.proposed.mesh_shape) == dict(self.current.mesh_shape)):
      lines.append(f"the current plan is already the best found on mesh "
                   f"{cm.mesh_str(self.current.mesh_shape)}; keep it (only that mesh was "
                   "priced: give --mesh to price another, e.g. table=N or col=N, which "
                   "train.py's --mesh=auto also prices)")
    else:
      changed = sorted(n for n, p in self.proposed.plan.placements.items()
                       if self.current.plan.placements.get(n) != p)
      lines.append(f"proposed plan changes {len(changed)} table(s) ({', '.join(changed[:8])}"
                   f"{', ...' if len(changed) > 8 else ''}): expected "
                   f"{format_time(self.current.step_time_s)} -> "
                   f"{format_time(self.proposed.step_time_s)} per step, "
                   + (f"{self.speedup:.2f}x faster" if self.speedup >= 1 else
                      f"{1 / self.speedup:.2f}x slower: " + self._slower_why()))
    if self.explore is not None:
      kinds: dict[str, int] = {}
      for p in self.explore.plan.placements.values():
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
      lines.append("best plan of kinds not profiled yet (profile it to refine the fit): "
                   + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ", expected "
                   f"{format_time(self.explore.step_time_s)} per step")
    return "\n".join(lines)

  def _slower_why(self) -> str:
    mesh, was = (cm.mesh_str(r.mesh_shape) for r in (self.proposed, self.current))
    if cm.normalize_mesh(self.proposed.mesh_shape) != cm.normalize_mesh(self.current.mesh_shape):
      return f"planned for mesh {mesh}, the profiled plan ran on {was}"
    need = sum(self.current.memory.values())
    return (f"the current plan needs "
            f"{format_over(need, self.proposed.memory_per_device_bytes)} per device")

  def to_json(self) -> dict:
    return {"fitted": self.fitted.to_json(), "prior": self.prior.to_json(),
            "measured_step_time_s": self.measured_step_time_s, "samples": self.samples,
            "current": self.current.to_json(), "proposed": self.proposed.to_json(),
            "speedup": self.speedup, "model_step_time_s": self.model_step_time_s,
            "measured_batch_size": self.measured_batch_size, "notes": list(self.notes),
            "explore": self.explore.to_json() if self.explore is not None else None}


def refine_from_profile(path: str | os.PathLike, tables: Sequence[TableSpec],
                        features: Sequence[FeatureSpec], memory_per_device_bytes: int | None,
                        optimizer_state_factor=0.0, batch_size: int | None = None,
                        calibration: Calibration | None = None, *,
                        table_stats: Mapping[str, cm.TableStats] | None = None,
                        mesh_shape: Mapping[str, int] | None = None, ridge: float = DEFAULT_RIDGE,
                        skip_first: int = 1, kernel: str | None = None,
                        plan_batch_size: int | None = None,
                        batch_size_from: str = "the batch_size given") -> Refinement:
  """Fits coefficients to a job's profile and proposes a better plan for its last mesh.

  Args:
    path: profile file or workdir.
    batch_size: the global batch of profile lines that record none (old profiles; the
      report notes how many, and `batch_size_from`, where that batch came from); None with
      such lines is a `ConfigError`.
    calibration: prior coefficients (default `calibration.DEFAULT`).
    mesh_shape: plan for this mesh instead of the last one recorded (the current plan is
      still estimated on its own mesh).
    skip_first: lines dropped per distinct (plan, mesh, batch) (compilation, warm-up).
    kernel: the collection's kernel (see `search.propose_plan`).
    plan_batch_size: plan for this global batch (`--batch_size`) instead of the last line's;
      the fit still uses each line's own, and the current plan is estimated at both.
  """
  prior = calibration or DEFAULT
  records = [r for r in read_profile(path) if not r.get("warmup")]
  if not records:
    raise DataError(f"--profile {path}: every line is marked warmup: no step times to fit")
  unrecorded = sum(r.get("batch_size") is None for r in records)
  if unrecorded and not batch_size:
    raise ConfigError(f"--profile {path}: {unrecorded} line(s) record no batch_size (a "
                      "profile written before lines recorded it): pass --batch_size=<the "
                      "global batch they ran at>")
  notes = (f"note: {unrecorded} of {len(records)} profile line(s) record no batch_size "
           f"(an old profile): counted as global batch {batch_size} ({batch_size_from})",
           ) if unrecorded else ()
  groups: dict[str, list[dict]] = {}
  for r in records:
    b = int(r.get("batch_size") or batch_size)
    key = json.dumps([r["plan"].to_json(), cm.normalize_mesh(r["mesh"]), b], sort_keys=True)
    groups.setdefault(key, []).append(dict(r, batch_size=b))
  samples, weights, last_key = [], [], None
  for key, recs in groups.items():
    kept = sorted(recs, key=lambda r: r["step"])[skip_first:] or recs[-1:]
    steps = np.array([float(r.get("steps", 1)) for r in kept])
    t = _weighted_median([r["step_time_s"] for r in kept], steps)
    r0 = kept[0]
    try:
      est = estimate_plan(r0["plan"], tables, features, r0["mesh"], memory_per_device_bytes,
                          optimizer_state_factor, r0["batch_size"], prior,
                          table_stats=table_stats, check=False, mode="profiled",
                          kernel=kernel)
    except ConfigError as e:   # e.g. a profile of another config's tables
      raise ConfigError(f"--profile {path}: the plan profiled at step {r0['step']} does not "
                        f"fit the tables given: {e}") from None
    samples.append((est.critical_terms, t))
    weights.append(float(steps.sum()))
  # the newest step; of two runs' lines at one step (profiles of two fresh runs in one file),
  # the later line's (the first one's was taken as the current plan)
  last = max(enumerate(records), key=lambda ir: (ir[1]["step"], ir[0]))[1]
  last_key = json.dumps([last["plan"].to_json(), cm.normalize_mesh(last["mesh"]),
                         int(last.get("batch_size") or batch_size)], sort_keys=True)
  measured = samples[list(groups).index(last_key)][1]
  fitted = fit_coefficients(samples, prior, ridge, weights)

  measured_b = int(last.get("batch_size") or batch_size)
  b = int(plan_batch_size or measured_b)

  def current_at(batch):
    return estimate_plan(last["plan"], tables, features, last["mesh"], memory_per_device_bytes,
                         optimizer_state_factor, batch, fitted, table_stats=table_stats,
                         check=False, mode="current", kernel=kernel)
  as_measured = current_at(measured_b)   # the model against the measured time
  current = as_measured if b == measured_b else current_at(b)   # against the proposal
  proposed = propose_plan(tables, features, dict(mesh_shape or last["mesh"]),
                          memory_per_device_bytes, optimizer_state_factor, b, fitted,
                          table_stats=table_stats, kernel=kernel)
  same_mesh = cm.normalize_mesh(proposed.mesh_shape) == cm.normalize_mesh(last["mesh"])
  # Keep the current plan when nothing beats it, unless it is over this budget.
  fits = sum(current.memory.values()) <= proposed.memory_per_device_bytes
  if same_mesh and fits and proposed.step_time_s >= current.step_time_s:
    proposed = current
  try:
    explore = propose_plan(tables, features, dict(mesh_shape or last["mesh"]),
                           memory_per_device_bytes, optimizer_state_factor, b, fitted,
                           table_stats=table_stats, kernel=kernel,
                           exclude=[r["plan"] for r in records])
  except ConfigError:
    explore = None
  return Refinement(fitted, prior, measured, len(samples), current, proposed,
                    current.step_time_s / proposed.step_time_s, explore,
                    as_measured.step_time_s, measured_b, notes)
