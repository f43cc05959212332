"""Stochastic rounding draws its bits by table, row of the table and column of the table:
every plan and mesh stores the same values as one device (bitwise)."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from jaxrec.embedding import optimizers
from tests.embedding.test_collection import TABLES, run_collection
from tests.embedding.test_collection_kernels import make_collection

SGD = optimizers.SGD(0.05)
slow = pytest.mark.slow   # each case compiles one more 8-device step (10-20 s on 2 cores)
PLANS = [("grid", "table=2,row=2,col=2"), pytest.param("cw", "col=8", marks=slow),
         pytest.param("rw", "row=8", marks=slow), pytest.param("tw", "table=8", marks=slow)]


@functools.lru_cache
def stored(kind, mesh_spec, dtype, kernel="xla"):
  """The tables (f32 values, numpy) after 2 SGD steps with stochastic rounding."""
  tables = tuple(dataclasses.replace(t, dtype=dtype) for t in TABLES)
  coll = make_collection(kind, mesh_spec, SGD, tables, kernel=kernel, interpret=True,
                         stochastic_rounding=True)
  return run_collection(coll, steps=2)[1]


@pytest.mark.parametrize("kind,mesh_spec", PLANS)
@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("int8", marks=slow)])
def test_sharded_stochastic_rounding_equals_one_device(kind, mesh_spec, dtype):
  want = stored("dp", "single", dtype)
  got = stored(kind, mesh_spec, dtype)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("kind,mesh_spec", [pytest.param("twcw", "table=4,col=2", marks=slow),
                                            pytest.param("rw", "row=8", marks=slow)])
def test_fused_kernel_draws_the_one_device_bits(kind, mesh_spec):
  """The Pallas update (interpret mode) on table / column / row shards, against the XLA
  path on one device (the default suite checks the kernel's keys in test_kernel_update)."""
  want = stored("dp", "single", "bfloat16")
  got = stored(kind, mesh_spec, "bfloat16", "pallas")
  jax.tree.map(np.testing.assert_array_equal, got, want)
