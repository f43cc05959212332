"""A table offloaded before and after a resume whose config changed what its store holds:
another sparse optimizer (state started fresh) or a wider dtype. The run continues as
when the table moves to the device instead (the path tests/offload/test_move_tier.py checks
against never offloading)."""

import shutil

import numpy as np

from tests.offload.offload_helpers import SMALL_DLRM, train_synthetic

OFFLOAD = ["OffloadConfig.tables={'t0': {'cache_rows': 4000}}",
           "OffloadConfig.host_buffer_rows=600"]


def _resumed_both_ways(tmp_path, first, then):
  """10 steps offloaded with bindings `first`, then to 20 with `then`: offloaded again, and
  (a copy) with the table on the device. Returns both runs' last metrics."""
  w = tmp_path / "off"
  train_synthetic(w, 10, SMALL_DLRM + OFFLOAD + first)
  dev = shutil.copytree(w, tmp_path / "dev")
  got = train_synthetic(w, 20, SMALL_DLRM + OFFLOAD + then)
  want = train_synthetic(dev, 20, SMALL_DLRM + then)
  return got, want


def _assert_same(got, want):
  for k in ("loss", "eval_logloss"):
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)


def test_an_optimizer_with_state_starts_it_fresh_offloaded(tmp_path):
  """SGD (no state in the snapshot), then Adagrad: its accumulator starts fresh, as on the
  device; the resume failed opening the snapshot's missing 'opt.accum' array."""
  got, want = _resumed_both_ways(tmp_path, ["ExperimentConfig.sparse_optimizer=@SGD()"], [])
  _assert_same(got, want)


def test_a_wider_dtype_is_widened_offloaded(tmp_path):
  """bfloat16, then float32: the snapshot's table is written widened into the new store;
  the resume failed with 'has dtype bfloat16, expected float32'."""
  got, want = _resumed_both_ways(tmp_path, ["uniform_tables.dtype='bfloat16'"], [])
  _assert_same(got, want)
