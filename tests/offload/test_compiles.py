"""The tier's device programs compile once per batch shape, however many rows batches miss
(training installs and eval passes alike)."""

import numpy as np

from jaxrec import offload
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.sharding.plan import uniform_plan
from tests.offload.offload_helpers import CountedStream, experiment, mesh_of, offload_config


class _Growing(CountedStream):
  """The training stream with the big table's ids folded onto rows `[40 i, 40 i + 16 * 2**i)`
  in batch `i` (at most 256 rows): the first batches miss more distinct rows each time, the
  later ones evict."""

  def __next__(self):
    span, start = 16 << min(self.i, 4), 40 * self.i
    batch = super().__next__()
    ids = {f: np.where(x >= 0, start + x % span, x) if f.startswith("f_big") else x
           for f, x in batch.ids.items()}
    return batch.replace(ids=ids)


def test_install_and_gather_compile_once_as_misses_grow(tmp_path):
  cfg, off = experiment("adagrad"), offload_config(tmp_path, cache_rows=300, prefetch_depth=2)
  tables = offload.device_tables(cfg.tables, off, cfg.sparse_tx())
  collection = EmbeddingCollection.create(tables, cfg.features, uniform_plan("dp", tables, 1),
                                          mesh_of(), cfg.sparse_tx())
  key = offload.emb_init_key(0)
  tier = offload.OffloadTier(collection, cfg.tables, off, key=key)
  source = _Growing()
  it, state = tier.wrap(source), {"emb": collection.init(key)}
  try:
    for i in range(10):   # installs only: no train step needed to count compilations
      state = tier.before_step(state, next(it))
      if i in (1, 9):     # flushes of a cache 48 and 300 rows full
        tier.flush(state)
    for start in (10**6, 10**6 + 128):   # evals of batches shaped as training's: same program
      batch = source.it.batch_at(start)
      state, _ = tier.eval_logits(state, batch, lambda st, b: np.zeros(b.size, np.float32))
    assert tier.stats()["written_rows"] > 0     # evicted rows went back to the store
    assert tier.ops.install._cache_size() == 1
    assert tier.ops.gather._cache_size() <= 2   # evictions, flushes
  finally:
    tier.close()


def test_bounces_are_one_gather_and_one_scatter_per_array():
  """An install copied each bounce source's rows with a gather and a scatter of their own:
  `bounce_sources` (9 by default) x tables x arrays of them (100 offloaded tables: a 69 s
  run, 40 s after). Same values as one source after the other (their `dst` are disjoint)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxrec.offload.device import with_bounces  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  n = 12
  values = {"table": rng.standard_normal((n, 4)).astype(np.float32),
            "opt.acc": rng.standard_normal(n).astype(np.float32)}
  dst_of = np.array_split(rng.permutation(n)[:9], 3)   # disjoint, 3 sources, 3 rows unset
  bounces = []
  for i, dst in enumerate(dst_of):
    m = 5 + 3 * i   # sources of their own sizes
    evicted = {"table": rng.standard_normal((m, 4)).astype(np.float32),
               "opt.acc": rng.standard_normal(m).astype(np.float32)}
    src = rng.choice(m, len(dst), replace=False)
    bounces.append((evicted, np.pad(src, (0, n - len(src))).astype(np.int32),
                    np.pad(dst, (0, n - len(dst)), constant_values=n).astype(np.int32)))
  want = {k: v.copy() for k, v in values.items()}
  for evicted, src, dst in bounces:
    real = dst < n
    for k in want:
      want[k][dst[real]] = evicted[k][src[real]]
  values = jax.tree.map(jax.numpy.asarray, values)   # as in the install: device arrays
  got = with_bounces(values, bounces)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k])
  jaxpr = str(jax.make_jaxpr(with_bounces)(values, bounces))
  assert jaxpr.count(" scatter[") == 2 and jaxpr.count(" gather[") == 2, jaxpr
