"""The cost model against the real train step on the 8 host CPU devices: with coefficients
calibrated on this machine, it ranks two plans in the order their measured step times
have."""

import time

import jax
import numpy as np
import pytest

from jaxrec.data.pipeline import make_train_iterator
from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.models import DLRM
from jaxrec.planner import calibrate, estimate_plan
from jaxrec.sharding import mesh as mesh_lib
from jaxrec.sharding.plan import Plan, TablePlacement
from jaxrec.train import state as state_lib
from jaxrec.train import step as step_lib
from jaxrec.train.config import ExperimentConfig, dense_optimizer

BATCH = 1024
MESH = {"table": 8}
# Estimates within this factor of each other are a tie for the calibrated model: a quick
# calibration on a loaded machine moves each plan's estimate by more than that (docs/planner.md,
# *Measured*: calibrated estimates are 0.6-0.95x of the measured times), so it cannot rank them.
TIE = 1.25


class _Runner:
  """The real jitted train step of `config` under `plan` on the 8 devices."""

  def __init__(self, config, plan, mesh, host_batches):
    col = EmbeddingCollection.create(config.tables, config.features, plan, mesh,
                                     config.sparse_tx())
    self.state = state_lib.create(config, col, 0)
    self.fn = step_lib.make_train_step(config, col, state_lib.shardings(self.state, col))
    bs = mesh_lib.batch_sharding(mesh)
    self.batches = [jax.tree.map(lambda x: jax.make_array_from_process_local_data(bs, x),
                                 col.pack_batch(b)) for b in host_batches]
    self.i = 0
    self.run()  # compile

  def run(self):
    self.state, metrics = self.fn(self.state, self.batches[self.i % len(self.batches)])
    self.i += 1
    jax.block_until_ready((self.state, metrics))


def _measure(runners, rounds=15):
  """Median step seconds per plan, one step of each in turn, the order flipped every round
  (A B, B A, ...): with the default suite's other worker on the second core, coarser
  interleaving (A A B B) let a burst of its load decide the ranking."""
  times = {name: [] for name in runners}
  names = list(runners)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      runners[name].run()
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(ts)) for name, ts in times.items()}


@pytest.mark.slow
def test_calibrated_model_ranks_plans_as_measured():
  """16 one-hot tables on `table=8`: spread table-wise (every device looks up 2 features)
  or replicated (every device reads, all-reduces and updates the rows of the whole
  batch). The accelerator defaults rank replication first (no collective of its own: its
  psum joins the dense gradients'); calibrated on these devices, the model ranks the
  plans as the step measures them (replication ~1.6x slower here on 2026-12-01,
  1.16-1.27x since the lookup got cheaper on 2026-12-02, 1.1-1.8x under load), unless it
  calls them a tie (within `TIE`: a calibration under load once put dp 6% below spread
  while the step had spread 12% faster). The defaults (dp at ~0.58x of spread) are outside
  that band: a calibration that did not move them still fails."""
  tables = [TableSpec(f"t{i}", 1000 * (i + 1) ** 2, 16) for i in range(16)]
  features = [FeatureSpec(f"f{i}", f"t{i}") for i in range(16)]
  plans = {"spread": Plan({t.name: TablePlacement("tw", i % 8) for i, t in enumerate(tables)}),
           "dp": Plan({t.name: TablePlacement("dp") for t in tables})}
  config = ExperimentConfig(embedding=(tuple(tables), tuple(features)),
                            model=DLRM((16, 16), (16, 1)), batch_size=BATCH,
                            dense_optimizer=dense_optimizer("sgd", 0.05),
                            sparse_optimizer=optimizers.SGD(lr=0.05))
  defaults = _ratio({n: estimate_plan(p, tables, features, MESH, None, "sgd", BATCH,
                                      kernel="xla").step_time_s for n, p in plans.items()})
  assert defaults < 1 / TIE, defaults   # the defaults rank dp first, beyond the tie band
  cal = calibrate(quick=True, reps=9)
  estimated = {n: estimate_plan(p, tables, features, MESH, None, "sgd", BATCH, cal,
                                kernel="xla").step_time_s for n, p in plans.items()}
  mesh = mesh_lib.make_mesh(MESH, jax.devices()[:8])
  it = make_train_iterator("synthetic", config.features, config.tables, BATCH, 0)
  host_batches = [next(it) for _ in range(2)]
  runners = {n: _Runner(config, p, mesh, host_batches) for n, p in plans.items()}
  measured = _measure(runners)
  est, meas = _ratio(estimated), _ratio(measured)
  tie = 1 / TIE <= est <= TIE
  assert (est > 1) == (meas > 1) or tie, (
      f"the calibrated model puts dp at {est:.2f}x spread (ties within {TIE}x), the step "
      f"measured {meas:.2f}x: {estimated}, {measured}")


def _ratio(times):
  """dp's step time over spread's (> 1: spread is faster)."""
  return times["dp"] / times["spread"]
