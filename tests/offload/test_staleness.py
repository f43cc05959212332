"""Rows whose newest value is still on its way back from the device: S=0 copies them on the
device (exact, no waiting); S>0 takes the older host value when it lacks <= S updates."""

import queue
import time

import numpy as np

from tests.offload.offload_helpers import Run, experiment, mesh_of, offload_config


class _SlowQueue(queue.Queue):
  """Eviction queue whose items reach the fetcher late (a slow device-to-host copy)."""

  def get(self, *a, **kw):
    item = super().get(*a, **kw)
    if item is not None:
      time.sleep(0.03)
    return item


def _run(tmp_path, staleness, steps=30):
  off = Run(experiment("sgd"), mesh_of(),
            offload_config(tmp_path, prefetch_depth=4, protect_ahead=0,
                           max_staleness=staleness))
  off.tier._fetch_q = _SlowQueue()
  try:
    off.train(steps)
    return off.losses, off.tier.stats()
  finally:
    off.close()


def test_in_flight_rows_exact_at_s0_and_bounded_at_s8(tmp_path):
  ref = Run(experiment("sgd"), mesh_of()).train(30)
  exact, s0 = _run(tmp_path / "s0", 0)
  np.testing.assert_allclose(exact, ref.losses, rtol=0, atol=1e-6)
  assert s0["device_bounces"] > 0 and s0.get("stale_rows", 0) == 0

  stale, s8 = _run(tmp_path / "s8", 8)
  assert s8.get("device_bounces", 0) < s0["device_bounces"]
  assert s8["stale_rows"] > 0 and 1 <= s8["max_stale_updates"] <= 8
  # Each stale install drops at most S updates of one cold row: the loss barely moves.
  assert np.max(np.abs(np.array(stale) - np.array(ref.losses))) < 0.01
