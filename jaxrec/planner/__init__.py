"""jaxrec.planner: cost + memory model, plan search, explained plans, profile refinement.

  cost_model   per stack the collection builds: memory and cost terms, readable arithmetic
  calibration  seconds per unit of each term: defaults, measured on this machine, cached
  search       enumerate -> partition -> estimate -> propose; forced-plan checks
  result       PlanResult: the plan, its stats table (`report()`) and JSON
  profile      fit the coefficients to measured step times (NNLS) and re-plan
  inputs       mesh / `--tables` flags and tables bound in gin
"""

from jaxrec.planner.calibration import (DEFAULT, Calibration, calibrate, default_cache_path,
                                        is_current, load_calibration, load_or_calibrate,
                                        save_calibration)
from jaxrec.planner.cost_model import (COST_TERMS, OPTIMIZER_STATES, OptimizerState, PlanCost,
                                       TableStats, optimizer_state, plan_cost, state_of)
from jaxrec.planner.profile import (PROFILE_FILE, Refinement, append_profile, fit_coefficients,
                                    profile_record, read_profile, refine_from_profile)
from jaxrec.planner.result import PlanResult, SliceReport, StackReport, TableReport
from jaxrec.planner.search import (DEFAULT_MEMORY_PER_DEVICE, check_plan_fits, estimate_plan,
                                   propose_plan)
