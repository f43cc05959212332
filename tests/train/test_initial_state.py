"""A fresh run's initial state is pinned: `state.create`'s tables (unstacked), dense
optimizer state and step key hash to the values recorded with the code of commit b9819c2
(jax 0.10.2), on one device and replicated on 8, and its dense params on 8 CPU devices
(drawn on the first device and copied: `sharding.mesh.shares_cores`) equal the plain
replicated init's on one. (The dense params are not pinned by a digest: their values
depend on XLA's optimisation level and its erf_inv code for the host, not on jaxrec.)"""

import hashlib
import os

import jax
import numpy as np
import pytest

from jaxrec import launch
from jaxrec.train import config as config_lib, loop, state

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
RNG = "e869a6963b469db6"


def digest(tree) -> str:
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_initial_state_is_the_recorded_one(name):
  gin, bindings = SMALL[name]
  launch.parse_gin([os.path.join(ROOT, "configs", gin)], bindings)
  config = launch.build(config_lib.ExperimentConfig)
  params = []
  for mesh, devices in (("data=1", 1), ("data=8", 8)):   # dp: replicated, the path changed
    options = config_lib.RunOptions(num_steps=1, mesh=mesh, plan="dp", progress=False)
    collection, _, _ = loop.setup(config, options, devices=jax.devices()[:devices])
    fresh = state.create(config, collection, 7)
    tables, _ = collection.unstack_tables(fresh["emb"])
    assert {"opt_state": digest(fresh["opt_state"]), "tables": digest(tables)} == RECORDED[name]
    assert digest(fresh["rng"]) == RNG
    params.append(fresh["params"])
    _check_placement(fresh, collection)
  jax.tree.map(np.testing.assert_array_equal, *params)


def _check_placement(fresh, collection):
  # the dense part replicated on every device of the mesh (on CPU devices drawn on the first
  # one and copied), the tables as the plan places them
  placed = state.shardings(fresh, collection)
  for x, sharding in zip(jax.tree.leaves(fresh), jax.tree.leaves(placed)):
    assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding, sharding)
