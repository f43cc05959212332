"""Profile refinement (DLRover-RM's idea): fit the cost coefficients to step times a job
measured, then re-plan with the fitted model.

Profile file `W/profile.jsonl`, one JSON object per line, written by the trainer:

  {"step": 200, "step_time_s": 0.0123, "plan": <Plan.to_json()>, "mesh": {"data": 2, ...},
   "steps": 100, "batch_size": 512, "shard_times_s": {...}}

`step`, `step_time_s` (mean over the window that ends at `step`), `plan` and `mesh` are
required; `steps` (steps averaged, the sample weight; default 1), `batch_size` (default: the
caller's) and `warmup: true` (skip the line) are optional; `shard_times_s` is reserved for
per-stack timings and not used yet.

The fit: each distinct (plan, mesh, batch) gives one sample (x, t): x = the cost terms of
its busiest device under the prior coefficients (`PlanResult.critical_terms`), t = the
weighted mean measured step time. `fit_coefficients` solves non-negative least squares
(`scipy.optimize.nnls`) for seconds per unit of each term. With few distinct plans the
system is under-determined, so the fit is pulled toward the prior: it solves for
multipliers m >= 0 of the prior coefficients, minimising
`sum_i (t_i - sum_j x_ij c_j m_j)^2 + (ridge * mean t)^2 * sum_j (m_j - 1)^2`; a term the
prior prices at 0 (e.g. `const`) gets a free coefficient.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import optimize

from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError, DataError
from jaxrec.planner import cost_model as cm
from jaxrec.planner.calibration import DEFAULT, Calibration
from jaxrec.planner.result import PlanResult, format_time
from jaxrec.planner.search import estimate_plan, propose_plan
from jaxrec.sharding.plan import Plan

PROFILE_FILE = "profile.jsonl"


def profile_record(step: int, step_time_s: float, plan: Plan, mesh_shape: Mapping[str, int],
                   steps: int = 1, batch_size: int | None = None, **extra) -> dict:
  """One profile line (see module docstring)."""
  rec = {"step": int(step), "step_time_s": float(step_time_s), "plan": plan.to_json(),
         "mesh": dict(mesh_shape), "steps": int(steps)}
  if batch_size is not None:
    rec["batch_size"] = int(batch_size)
  rec.update(extra)
  return rec


def append_profile(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
  with open(pathlib.Path(workdir) / PROFILE_FILE, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def read_profile(path: str | os.PathLike) -> list[dict]:
  """Records of `path` (a profile file, or a workdir holding `profile.jsonl`)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / PROFILE_FILE
  if not path.exists():
    raise ConfigError(f"--profile: no profile at {path} (the trainer writes W/{PROFILE_FILE})")
  records = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      for key in ("step", "step_time_s", "plan", "mesh"):
        if key not in rec:
          raise ValueError(f"missing '{key}'")
      if not float(rec["step_time_s"]) > 0:
        raise ValueError(f"step_time_s must be positive, got {rec['step_time_s']}")
      rec["plan"] = Plan.from_json(rec["plan"])
    except (ValueError, TypeError, AttributeError) as e:
      raise DataError(f"{path}:{i}: bad profile line ({e})") from None
    records.append(rec)
  if not records:
    raise DataError(f"{path}: profile is empty")
  return records


def fit_coefficients(samples: Sequence[tuple[Mapping[str, float], float]],
                     prior: Calibration | None = None, ridge: float = 0.0,
                     weights: Sequence[float] | None = None) -> Calibration:
  """Seconds per unit of each cost term from (terms, measured seconds) samples, by NNLS.

  Args:
    samples: (cost terms by name (missing = 0), measured step seconds) pairs.
    prior: coefficients to scale (multipliers m_j, see module docstring); None = plain NNLS
      on the terms the samples exercise, others 0.
    ridge: pull toward the prior, relative to the mean measured time (0 = none).
    weights: per-sample weights (e.g. steps measured); default 1.
  """
  if not samples:
    raise ConfigError("fit_coefficients: no samples")
  x = np.array([[float(s[0].get(k, 0.0)) for k in cm.COST_TERMS] for s in samples])
  t = np.array([float(s[1]) for s in samples])
  w = np.sqrt(np.asarray(weights if weights is not None else np.ones(len(t)), float))
  prior_c = prior.vector() if prior is not None else np.zeros(len(cm.COST_TERMS))
  used = np.abs(x).max(axis=0) > 0
  # Column scale: prior seconds per unit, or 1/max so free columns are O(1).
  scale = np.where(prior_c > 0, prior_c, 1.0 / np.where(used, np.abs(x).max(axis=0), 1.0))
  a = (x * scale) * w[:, None]
  b = t * w
  lam = ridge * float(np.mean(t))
  anchored = (prior_c > 0) & (lam > 0)
  if anchored.any():
    rows = np.eye(len(cm.COST_TERMS))[anchored] * lam
    a = np.vstack([a, rows])
    b = np.concatenate([b, np.full(int(anchored.sum()), lam)])
  m = np.zeros(len(cm.COST_TERMS))
  cols = used | anchored
  m[cols], _ = optimize.nnls(a[:, cols], b, maxiter=50 * len(cm.COST_TERMS))
  coef = np.where(cols, m * scale, prior_c)  # terms the data never exercises keep the prior
  m = np.where(cols, m, prior_c > 0)
  fit = x @ coef
  rel = float(np.sqrt(np.mean(((fit - t) / t) ** 2)))
  return Calibration(dict(zip(cm.COST_TERMS, coef.tolist())),
                     f"profile fit ({len(samples)} samples, rms error {100 * rel:.1f}%)",
                     {"samples": len(samples), "rms_relative_error": rel, "ridge": ridge,
                      "prior": prior.source if prior is not None else None,
                      "multipliers": dict(zip(cm.COST_TERMS, m.tolist()))})


@dataclasses.dataclass(frozen=True)
class Refinement:
  """Outcome of `refine_from_profile`.

  Attributes:
    fitted: the fitted coefficients.
    measured_step_time_s: weighted mean measured step time of the current plan.
    current: the current plan estimated with `fitted`.
    proposed: the best plan found with `fitted` (the current one if nothing beats it).
    speedup: current.step_time_s / proposed.step_time_s (>= 1 on the same mesh).
  """

  fitted: Calibration
  prior: Calibration
  measured_step_time_s: float
  samples: int
  current: PlanResult
  proposed: PlanResult
  speedup: float

  def report(self) -> str:
    coef = self.fitted.vector()
    prior = self.prior.vector()
    lines = [f"profile: {self.samples} distinct plan(s); current plan measured "
             f"{format_time(self.measured_step_time_s)}/step, fitted model says "
             f"{format_time(self.current.step_time_s)}",
             f"coefficients ({self.fitted.source}; prior: {self.prior.source}):"]
    for k, c, p in zip(cm.COST_TERMS, coef, prior):
      ratio = f"x{c / p:.2f}" if p > 0 else "(free)"
      lines.append(f"  {k:<22} {c:.3e} s/unit {ratio}")
    lines += ["", self.proposed.report(), ""]
    if (self.proposed.plan == self.current.plan and
        dict(self.proposed.mesh_shape) == dict(self.current.mesh_shape)):
      lines.append("the current plan is already the best found; keep it")
    else:
      changed = sorted(n for n, p in self.proposed.plan.placements.items()
                       if self.current.plan.placements.get(n) != p)
      lines.append(f"proposed plan changes {len(changed)} table(s) ({', '.join(changed[:8])}"
                   f"{', ...' if len(changed) > 8 else ''}): expected "
                   f"{format_time(self.current.step_time_s)} -> "
                   f"{format_time(self.proposed.step_time_s)} per step, "
                   f"{self.speedup:.2f}x faster")
    return "\n".join(lines)

  def to_json(self) -> dict:
    return {"fitted": self.fitted.to_json(), "prior": self.prior.to_json(),
            "measured_step_time_s": self.measured_step_time_s, "samples": self.samples,
            "current": self.current.to_json(), "proposed": self.proposed.to_json(),
            "speedup": self.speedup}


def refine_from_profile(path: str | os.PathLike, tables: Sequence[TableSpec],
                        features: Sequence[FeatureSpec], memory_per_device_bytes: int | None,
                        optimizer_state_factor=0.0, batch_size: int | None = None,
                        calibration: Calibration | None = None, *,
                        table_stats: Mapping[str, cm.TableStats] | None = None,
                        mesh_shape: Mapping[str, int] | None = None, ridge: float = 0.1,
                        skip_first: int = 1) -> Refinement:
  """Fits coefficients to a job's profile and proposes a better plan for its last mesh.

  Args:
    path: profile file or workdir.
    calibration: prior coefficients (default `calibration.DEFAULT`).
    mesh_shape: plan for this mesh instead of the last one recorded (the current plan is
      still estimated on its own mesh).
    skip_first: lines dropped per distinct (plan, mesh, batch) (compilation, warm-up).
  """
  prior = calibration or DEFAULT
  records = [r for r in read_profile(path) if not r.get("warmup")]
  groups: dict[str, list[dict]] = {}
  for r in records:
    b = int(r.get("batch_size") or batch_size or 0)
    if b <= 0:
      raise ConfigError("profile lines carry no batch_size; pass --batch_size")
    key = json.dumps([r["plan"].to_json(), cm.normalize_mesh(r["mesh"]), b], sort_keys=True)
    groups.setdefault(key, []).append(dict(r, batch_size=b))
  samples, weights, last_key = [], [], None
  for key, recs in groups.items():
    kept = sorted(recs, key=lambda r: r["step"])[skip_first:] or recs[-1:]
    steps = np.array([float(r.get("steps", 1)) for r in kept])
    t = float(np.sum(steps * [r["step_time_s"] for r in kept]) / np.sum(steps))
    r0 = kept[0]
    est = estimate_plan(r0["plan"], tables, features, r0["mesh"], memory_per_device_bytes,
                        optimizer_state_factor, r0["batch_size"], prior,
                        table_stats=table_stats, check=False, mode="profiled")
    samples.append((est.critical_terms, t))
    weights.append(float(steps.sum()))
  last = max(records, key=lambda r: r["step"])
  last_key = json.dumps([last["plan"].to_json(), cm.normalize_mesh(last["mesh"]),
                         int(last.get("batch_size") or batch_size)], sort_keys=True)
  measured = samples[list(groups).index(last_key)][1]
  fitted = fit_coefficients(samples, prior, ridge, weights)

  b = int(last.get("batch_size") or batch_size)
  current = estimate_plan(last["plan"], tables, features, last["mesh"], memory_per_device_bytes,
                          optimizer_state_factor, b, fitted, table_stats=table_stats,
                          check=False, mode="current")
  proposed = propose_plan(tables, features, dict(mesh_shape or last["mesh"]),
                          memory_per_device_bytes, optimizer_state_factor, b, fitted,
                          table_stats=table_stats)
  same_mesh = cm.normalize_mesh(proposed.mesh_shape) == cm.normalize_mesh(last["mesh"])
  if same_mesh and proposed.step_time_s >= current.step_time_s:
    proposed = current
  return Refinement(fitted, prior, measured, len(samples), current, proposed,
                    current.step_time_s / proposed.step_time_s)
