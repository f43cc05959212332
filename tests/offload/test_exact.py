"""S=0: training with an offloaded table equals training with it on the device."""

import numpy as np
import pytest

from jaxrec.train import state as state_lib
from jaxrec.train import step as step_lib
from tests.offload.offload_helpers import Run, experiment, mesh_of, offload_config


def _compare(ref, off, atol=1e-6):
  np.testing.assert_allclose(off.losses, ref.losses, rtol=0, atol=atol)
  (ta, oa), (tb, ob) = ref.full_tables(), off.full_tables()
  for name in ta:
    np.testing.assert_allclose(tb[name], ta[name], rtol=0, atol=atol, err_msg=name)
    for k in oa.get(name, {}):
      np.testing.assert_allclose(ob[name][k], oa[name][k], rtol=0, atol=atol,
                                 err_msg=f"{name}/{k}")


@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
def test_exact_over_50_steps_with_prefetch(tmp_path, opt):
  cfg = experiment(opt)
  ref = Run(cfg, mesh_of()).train(50)
  off = Run(cfg, mesh_of(), offload_config(tmp_path, prefetch_depth=3)).train(50)
  try:
    stats = off.tier.stats()
    assert stats["written_rows"] > 0 and stats["store_reads"] > 1000   # rows did move
    assert 0 < stats["hit_rate"] < 1
    _compare(ref, off)
  finally:
    off.close()


def test_exact_prefetch_off_rowwise_state_on_sharded_cache(tmp_path):
  """Synchronous planning (K=0), per-row optimizer state, cache split over `row`."""
  cfg = experiment("rowwise_adagrad")
  ref = Run(cfg, mesh_of("row=2"), plan="rw").train(15)
  off = Run(cfg, mesh_of("row=2"), offload_config(tmp_path, prefetch_depth=0),
            plan="rw").train(15)
  try:
    _compare(ref, off)
  finally:
    off.close()


def test_eval_view_reads_newest_rows(tmp_path):
  cfg = experiment("sgd")
  ref = Run(cfg, mesh_of()).train(12)
  off = Run(cfg, mesh_of(), offload_config(tmp_path, prefetch_depth=2)).train(12)
  try:
    eval_ref = step_lib.make_eval_step(
        cfg, ref.collection, state_lib.shardings(ref.state, ref.collection))
    eval_off = step_lib.make_eval_step(
        cfg, off.collection, state_lib.shardings(off.state, off.collection))
    batch = ref.it.batch_at(10**6)                  # unseen examples, many uncached rows
    want = np.asarray(eval_ref(ref.state, ref.put(batch)))
    state, remapped = off.tier.eval_view(off.state, batch)
    got = np.asarray(eval_off(state, off.put(remapped)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    off.train(3)                                    # the view left training untouched
    ref.train(3)
    np.testing.assert_allclose(off.losses, ref.losses, rtol=0, atol=1e-6)
  finally:
    off.close()
