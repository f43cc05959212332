"""A fresh run's initial state is pinned: `state.create`'s dense params, their optimizer
state, the step key and every table (unstacked) hash to the values recorded with the code
of commit b9819c2 (jax 0.10.2), on one device and on a split mesh. A faster init must draw
the same values; a jax upgrade that changes jax's initialisers changes them too (record
the new digests then, and say so). The dense params' values also depend on XLA's
optimisation level (its erf_inv polynomial in the truncated-normal kernels): the tests
compile at level 0 (`tests.xla_env.FAST_COMPILE`); both levels' digests are recorded."""

import hashlib
import os

import jax
import numpy as np
import pytest

from jaxrec import gin_usage, launch
from jaxrec.train import config as config_lib, loop, state
from tests import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = {
    "dcnv2": ("dcnv2_synthetic.gin", ["uniform_tables.num_tables=6",
                                      "uniform_tables.rows=[50, 40, 30, 20, 10, 5]",
                                      "uniform_tables.max_len=[1, 2, 1, 4, 1, 1]"]),
    "dlrm": ("dlrm_synthetic.gin", ["uniform_tables.rows=[60, 50, 40, 30, 20, 10, 8, 5]"]),
    "two_tower": ("two_tower_synthetic.gin", []),
}
# sha256[:16] of (leaf path, bytes) per part, seed 7; params per optimisation level (0, default)
RECORDED = {
    "dcnv2": {"opt_state": "b7929d90148bcd74", "tables": "039d383f6a875670"},
    "dlrm": {"opt_state": "e3b0c44298fc1c14", "tables": "9b8575a93a246ee6"},
    "two_tower": {"opt_state": "2ab2f330acf688d3", "tables": "61d4ff73f70fb235"},
}
PARAMS = {"dcnv2": ("c11a13f4001ee4a6", "c00ba80c83e04aeb"),
          "dlrm": ("3f22dd52b668f53e", "a0b34d80c6af8d7f"),
          "two_tower": ("4e35e9b543b5b757", "0872562d4e05a6d2")}
RNG = "e869a6963b469db6"


@pytest.fixture(autouse=True)
def _forget_binding_origins():
  """`launch.parse_gin` records where each binding was made (`gin_usage`), a record that the
  suite's `gin.clear_config` keeps: a later test's error message in this worker named these
  config files (`test_two_tower`'s expected message failed so)."""
  yield
  gin_usage.clear()


def digest(tree) -> str:
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()[:16]


@pytest.mark.parametrize("mesh, devices", [("data=1", 1), ("table=2,row=2,col=2", 8)])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_initial_state_is_the_recorded_one(name, mesh, devices):
  gin, bindings = SMALL[name]
  launch.parse_gin([os.path.join(ROOT, "configs", gin)], bindings)
  config = launch.build(config_lib.ExperimentConfig)
  options = config_lib.RunOptions(num_steps=1, mesh=mesh, plan="dp" if devices == 1 else "auto",
                                  progress=False)
  collection, _, _ = loop.setup(config, options, devices=jax.devices()[:devices])
  fresh = state.create(config, collection, 7)
  tables, _ = collection.unstack_tables(fresh["emb"])
  assert {"opt_state": digest(fresh["opt_state"]), "tables": digest(tables)} == RECORDED[name]
  level0 = xla_env.FAST_COMPILE in os.environ.get("XLA_FLAGS", "").split()
  assert digest(fresh["params"]) == PARAMS[name][0 if level0 else 1]
  assert digest(fresh["rng"]) == RNG
  # the dense part replicated on every device of the mesh (on CPU devices drawn on the first
  # one and copied), the tables as the plan places them
  placed = state.shardings(fresh, collection)
  for x, sharding in zip(jax.tree.leaves(fresh), jax.tree.leaves(placed)):
    assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding, sharding)
