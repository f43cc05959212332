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
