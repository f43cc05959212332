"""Cache map (slot assignment, sampled-LFU eviction) and the host write-back buffer."""

import numpy as np
import pytest

from jaxrec.offload.buffer import HostBuffer
from jaxrec.offload.cache import CacheMap
from jaxrec.offload.config import OffloadError


def _assign(cache, rows, step, ahead=()):
  u, c = np.unique(np.asarray(rows, np.int64), return_counts=True)
  return cache.assign(u, c, step, [np.unique(np.asarray(a, np.int64)) for a in ahead])


def test_rows_become_resident_and_remap():
  cache = CacheMap("t", 100, 10)
  a = _assign(cache, [5, 7, 5, 9], 0)
  assert sorted(a.rows) == [5, 7, 9] and (a.victims == -1).all() and a.hits == 0
  ids = np.array([[5, -1], [9, 7]])
  slots = cache.remap(ids)
  assert slots[0, 1] == -1
  assert (cache.id_of[slots[ids >= 0]] == ids[ids >= 0]).all()
  b = _assign(cache, [5, 50], 1)
  assert b.hits == 1 and list(b.rows) == [50]


def test_lfu_keeps_frequent_rows_and_never_evicts_the_current_batch():
  cache = CacheMap("t", 10_000, 60, seed=1)
  rng = np.random.default_rng(0)
  hot = np.arange(20)
  for step in range(200):   # hot rows in every other batch: kept by their counts, not pins
    cold = rng.integers(100, 10_000, 10 if step % 2 == 0 else 25)
    batch = np.concatenate([hot, cold]) if step % 2 == 0 else cold
    a = _assign(cache, batch, step)
    assert not np.isin(a.victims, batch).any()
    assert (cache.slot_of[np.unique(batch)] >= 0).all()
    if step > 10:
      assert not np.isin(a.victims, hot).any()
  assert (cache.slot_of[hot] >= 0).all()


def test_rows_needed_ahead_are_evicted_last():
  cache = CacheMap("t", 1000, 4)
  _assign(cache, [1, 2, 3, 4], 0)
  _assign(cache, [1, 2, 3, 4], 1)                 # all have count 2
  a = _assign(cache, [10], 2, ahead=[[1, 2, 4]])  # only 3 is not needed next
  assert list(a.victims) == [3] and list(a.victim_uses) == [2]


def test_batch_larger_than_cache_is_a_clear_error():
  cache = CacheMap("big", 1000, 4)
  with pytest.raises(OffloadError, match="reads 5 distinct rows but the cache holds 4"):
    _assign(cache, [1, 2, 3, 4, 5], 0)


def test_buffer_versions_survive_a_concurrent_update():
  buf = HostBuffer("t", 100, 4, {"table": (2,)}, {"table": "float32"})
  buf.put(np.array([3, 7]), {"table": np.ones((2, 2), np.float32)})
  idx, rows, versions, vals = buf.take_all()
  buf.put(np.array([7]), {"table": np.full((1, 2), 5, np.float32)})   # newer, during flush
  buf.release(idx, versions)
  found, got = buf.get(np.array([3, 7]))
  assert list(found) == [False, True] and (got["table"] == 5).all()
  assert buf.size == 1


def test_buffer_too_small_for_an_eviction():
  buf = HostBuffer("big", 100, 2, {"table": (2,)}, {"table": "float32"})
  with pytest.raises(OffloadError, match="host_buffer_rows"):
    buf.put(np.array([1, 2, 3]), {"table": np.zeros((3, 2), np.float32)})


def test_newest_value_in_flight_and_the_staleness_bound():
  from jaxrec.offload.evictions import Eviction, newest_in_flight
  old = Eviction("t", 1, np.array([3, 8]), np.array([1, 5]), np.array([0, 4]))
  new = Eviction("t", 2, np.array([8, 9]), np.array([2, 1]), np.array([7, 1]))
  rows = np.array([3, 8, 9, 10])
  exact = newest_in_flight([old, new], rows, 0)
  assert list(exact.late) == [True, True, True, False]
  assert list(exact.missing) == [1, 7, 1, 0]
  groups = exact.groups([old, new])
  assert [(k, list(src), list(dst)) for k, src, dst in groups] == [(0, [0], [0]),
                                                                   (1, [7, 1], [1, 2])]
  bounded = newest_in_flight([old, new], rows, 2)   # row 8 lacks 7 updates: still late
  assert list(bounded.late) == [False, True, False, False]
  assert list(bounded.stale) == [True, False, True, False]


def test_offload_config_from_gin():
  import gin
  from jaxrec import offload
  gin.clear_config()
  try:
    gin.parse_config("""
      OffloadConfig.tables = {'big': {'cache_rows': 1000, 'path': '/ssd/big'}}
      OffloadConfig.prefetch_depth = 2
      OffloadConfig.max_staleness = 4
    """)
    cfg = offload.OffloadConfig()
  finally:
    gin.clear_config()
  assert cfg.tables == (offload.OffloadTable("big", cache_rows=1000, path="/ssd/big"),)
  assert (cfg.prefetch_depth, cfg.max_staleness, cfg.horizon) == (2, 4, 2)
