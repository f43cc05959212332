"""The configurations of the randomized offload check (`test_offload_fuzz`): one seed draws
a mesh, tables (one or more offloaded, int8 ones beside them on the device), features, an
optimizer, the tier's settings, a variant (plain, an eval pass, a checkpoint restore on the
same or another mesh, a NaN rollback as the trainer's `--on_nan=rollback` does it), a slow
eviction fetcher, and the batches themselves (heavy duplicates, empty bags, ids on a few
rows or spread); in some cases tables with sparse optimizers of their own
(`ExperimentConfig.table_optimizers`, an offloaded one more often)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from jaxrec import offload
from jaxrec.data.batch import Batch
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.models import DLRM
from jaxrec.models.dcnv2 import DCNv2
from jaxrec.sharding.mesh import format_mesh
from jaxrec.sharding.plan import KINDS, MESH_AXES, Plan, TablePlacement
from jaxrec.train.config import ExperimentConfig, dense_optimizer
from tests.checkpoint import reshard_optimizers
from tests.embedding.test_collection_fuzz import random_features, random_optimizer

# 4-axis shapes of 8, 4, 2 and 1 devices (one process: what the tier runs on).
MESHES = {n: tuple(dict(zip(MESH_AXES, s)) for s in itertools.product((1, 2, 4, 8), repeat=4)
                   if math.prod(s) == n) for n in (8, 4, 2, 1)}
DIMS = (4, 6, 8)                     # 6: column-padded on col=4
BIG_ROWS = (300, 1000, 2500)         # offloaded tables
SMALL_ROWS = (5, 17, 50, 120)        # tables kept on the device
BAGS = (1, 1, 2, 3, 5)
DISTS = ("spread", "few", "zipf", "window")
VARIANTS = ("plain", "eval", "ckpt", "ckpt_mesh")   # and "rollback" (`_extend`)
NUM_DENSE = 4


@dataclasses.dataclass(frozen=True)
class Case:
  """One sampled configuration (see the module docstring)."""
  seed: int
  mesh: dict
  placements: tuple[tuple[str, str, int], ...]     # (table, kind, table slice)
  tables: tuple[TableSpec, ...]
  features: tuple[FeatureSpec, ...]
  dists: tuple[str, ...]                           # per feature
  optimizer: object
  stochastic_rounding: bool
  off: offload.OffloadConfig
  cache_modes: tuple[str, ...]                     # per offloaded table: tight/small/large
  batch: int
  steps: int
  variant: str
  at: int                                          # the eval's or the save's step
  after_save: int                                  # steps trained after the save, lost
  mesh2: dict | None                               # ckpt_mesh: the restored run's mesh
  placements2: tuple[tuple[str, str, int], ...] | None
  eval_batch: int
  batches: tuple[Batch, ...] = dataclasses.field(repr=False, compare=False)
  # drawn by `_extend`:
  poisoned: tuple[int, ...] = ()                   # rollback: batches with a NaN input
  ckpt_every: int = 0                              # rollback: 0 = no checkpoint
  log_every: int = 1                               # rollback: losses checked every ...
  fetch_delay: float = 0.0                         # s added to each eviction's fetch,
  fetch_stall: int = 0                             # and this fetch stalls (`slow_fetches`)
  # drawn by `_own_optimizers`:
  table_optimizers: tuple[tuple[str, object], ...] = ()   # (table, its own optimizer)

  @property
  def train_batches(self) -> tuple[Batch, ...]:
    """What the all-on-device run trains: the poisoned batches skipped (a rollback)."""
    return tuple(b for i, b in enumerate(self.batches[:self.steps]) if i not in self.poisoned)

  @property
  def plan(self) -> Plan:
    return Plan({t: TablePlacement(k, s) for t, k, s in self.placements})

  @property
  def plan2(self) -> Plan:
    return Plan({t: TablePlacement(k, s) for t, k, s in self.placements2})

  def config(self) -> ExperimentConfig:
    dims = {t.dim for t in self.tables}
    model = (DLRM((8, dims.pop()), (8, 1)) if len(dims) == 1 else
             DCNv2(num_cross_layers=1, deep_mlp=(8,)))
    return ExperimentConfig(embedding=(self.tables, self.features), model=model,
                            batch_size=self.batch, dense_optimizer=dense_optimizer("sgd", 0.05),
                            sparse_optimizer=self.optimizer, num_dense=NUM_DENSE,
                            table_optimizers=dict(self.table_optimizers) or None)

  def exact(self) -> bool:
    """Whether the docs promise bit-equal results: every table replicated (or one device),
    and no change of mesh (docs/offload.md)."""
    one = math.prod(self.mesh.values()) == 1
    return (one or all(k == "dp" for _, k, _ in self.placements)) and self.variant != "ckpt_mesh"

  def describe(self) -> str:
    off = {t.name: t for t in self.off.tables}
    tables = " ".join(
        f"{t.name}[{t.rows}x{t.dim} {t.dtype} {k}@{s}"
        + (f" OFF cache {off[t.name].cache_rows} ({m}) chunk {off[t.name].chunk_rows} "
           f"{off[t.name].driver}/{off[t.name].kvstore}" if t.name in off else "") + "]"
        for t, (_, k, s), m in zip(self.tables, self.placements, self._modes()))
    feats = " ".join(f"{f.name}({f.table} L{f.max_len} {f.pooling}{' w' if f.weighted else ''}"
                     f" {d})" for f, d in zip(self.features, self.dists))
    variant = self.variant + (f"@{self.at}" if self.variant != "plain" else "")
    if self.variant.startswith("ckpt"):
      variant += f" +{self.after_save} lost"
    if self.mesh2 is not None:
      variant += (f" -> mesh={format_mesh(self.mesh2)} "
                  + ",".join(f"{t}:{k}@{s}" for t, k, s in self.placements2))
    if self.variant == "eval":
      variant += f" eval batch {self.eval_batch}"
    if self.variant == "rollback":
      variant = (f"rollback: NaN in batches {list(self.poisoned)}, checkpoint every "
                 f"{self.ckpt_every or '-'}, losses checked every {self.log_every}")
    if self.fetch_delay:
      variant += f" | fetch +{self.fetch_delay * 1e3:.0f} ms, fetch {self.fetch_stall} stalls"
    return (f"seed={self.seed} mesh={format_mesh(self.mesh)} tables: {tables} | features: "
            f"{feats} | {self.optimizer}"
            + "".join(f" {t}:{o}" for t, o in self.table_optimizers)
            + f"{' SR' if self.stochastic_rounding else ''} | "
            f"K={self.off.prefetch_depth} H={self.off.protect_ahead} "
            f"S={self.off.max_staleness} "
            f"buffer={self.off.host_buffer_rows} | batch {self.batch} x {self.steps} steps | "
            f"{variant}")

  def _modes(self):
    modes = iter(self.cache_modes)
    names = {t.name for t in self.off.tables}
    return [next(modes) if t.name in names else "" for t in self.tables]


def _placements(rng, mesh, tables):
  return tuple((t.name, str(rng.choice(KINDS)), int(rng.integers(mesh["table"])))
               for t in tables)


def _mesh(rng):
  shapes = MESHES[int(rng.choice([8, 4, 2, 1]))]
  return dict(shapes[rng.integers(len(shapes))])


def ids_of(rng, dist: str, rows: int, shape) -> np.ndarray:
  """Ids `[B, L]` of one feature: a fifth of the bags empty, random -1 slots; `few`: three
  rows repeated, `zipf`: concentrated on the first rows, `window`: a run of ~20 rows,
  `spread`: uniform over the table."""
  if dist == "few":
    x = rng.choice(rng.integers(0, rows, 3), shape)
  elif dist == "zipf":
    x = np.minimum(rng.zipf(1.3, shape) - 1, rows - 1)
  elif dist == "window":
    start = int(rng.integers(0, rows))
    x = (start + rng.integers(0, 20, shape)) % rows
  else:
    x = rng.integers(0, rows, shape)
  x = np.where(rng.random(shape) < 0.15, -1, x)
  x[rng.random(shape[0]) < 0.2] = -1
  return x.astype(np.int32)


def make_batch(rng, tables, features, dists, size: int) -> Batch:
  rows = {t.name: t.rows for t in tables}
  ids = {f.name: ids_of(rng, d, rows[f.table], (size, f.max_len))
         for f, d in zip(features, dists)}
  weights = {f.name: rng.uniform(-1, 2, (size, f.max_len)).astype(np.float32)
             for f in features if f.weighted}
  return Batch(dense=rng.standard_normal((size, NUM_DENSE)).astype(np.float32),
               labels=(rng.random(size) < 0.3).astype(np.float32), ids=ids, weights=weights)


def distinct_rows(batch: Batch, features, table: str) -> int:
  parts = [np.asarray(batch.ids[f.name]).reshape(-1) for f in features if f.table == table]
  x = np.concatenate(parts)
  return len(np.unique(x[x >= 0]))


def sample(seed: int, store_dir: str) -> Case:
  """The configuration of `seed`; offloaded stores go under `store_dir`."""
  rng = np.random.default_rng(seed)
  mesh = _mesh(rng)
  dims = rng.choice(DIMS, size=rng.integers(1, 3), replace=False)
  reduced = rng.random() < 0.3
  n = int(rng.integers(2, 4))
  offloaded = set(rng.choice(n, size=rng.integers(1, n + 1), replace=False).tolist())
  tables = []
  for i in range(n):
    dtype = str(rng.choice(["bfloat16", "float16"])) if reduced and rng.random() < 0.7 \
        else "float32"
    rows = int(rng.choice(BIG_ROWS if i in offloaded else SMALL_ROWS))
    scale = float(rng.uniform(0.05, 1.0)) if rng.random() < 0.2 else None
    tables.append(TableSpec(f"t{i}", rows, int(rng.choice(dims)), dtype, scale))
  features = random_features(rng, tables, BAGS, extra_readers=2, weighted=0.25)
  dists = tuple(str(rng.choice(DISTS)) for _ in features)
  optimizer = random_optimizer(rng)
  sr = reduced and any(t.dtype != "float32" for t in tables) and rng.random() < 0.5
  batch, steps = int(rng.choice([16, 32, 64])), int(rng.integers(4, 10))
  variant = str(rng.choice(VARIANTS))
  at = int(rng.integers(1, steps))
  eval_batch = batch * int(rng.choice([1, 2, 4]))
  batches = tuple(make_batch(rng, tables, features, dists, batch) for _ in range(steps))
  if variant == "eval":
    batches += (make_batch(rng, tables, features, dists, eval_batch),)
  off_tables, modes = [], []
  buffer_need = 1
  for t in tables:
    if t.name not in {tables[i].name for i in offloaded}:
      continue
    need = max(distinct_rows(b, features, t.name) for b in batches[:steps])
    need = max(need, 1)
    mode = str(rng.choice(["tight", "small", "large"]))
    cache = {"tight": need, "small": need + int(rng.integers(0, need + 1)),
             "large": max(need, int(t.rows * rng.choice([0.3, 0.6, 1.0])))}[mode]
    chunk = int(rng.choice([16, 64, 256]))
    driver = str(rng.choice(["zarr3", "zarr3", "zarr"]))
    shard = chunk * 2 if driver == "zarr3" and rng.random() < 0.3 else None
    kv = "memory" if rng.random() < 0.15 else "file"
    off_tables.append(offload.OffloadTable(
        t.name, cache_rows=min(cache, t.rows), path=f"{store_dir}/{t.name}", chunk_rows=chunk,
        driver=driver, shard_rows=shard, kvstore=kv))
    modes.append(mode)
    buffer_need = max(buffer_need, need)
  off = offload.OffloadConfig(
      tables=tuple(off_tables), prefetch_depth=int(rng.choice([0, 1, 2, 4])),
      protect_ahead=None if rng.random() < 0.6 else int(rng.choice([0, 1, 3])),
      host_buffer_rows=int(rng.choice([buffer_need, 2 * buffer_need, 1 << 20])),
      max_staleness=int(rng.choice([0, 0, 0, 2, 8])))
  mesh2 = placements2 = None
  if variant == "ckpt_mesh":
    mesh2 = _mesh(rng)
    placements2 = _placements(rng, mesh2, tables)
  case = Case(seed, mesh, _placements(rng, mesh, tables), tuple(tables), features, dists,
              optimizer, bool(sr), off, tuple(modes), batch, steps, variant, at,
              int(rng.integers(0, 3)), mesh2, placements2, eval_batch, batches)
  case = _extend(case, np.random.default_rng([seed, 1]))
  return _own_optimizers(case, np.random.default_rng([seed, 2]))


def _own_optimizers(case: Case, rng) -> Case:
  """A third of the cases (a stream of their own, so the draws above are as before): 1-3
  tables with a sparse optimizer of their own, hyperparameters sampled, an offloaded one
  first more often (its cache and store then hold its own state)."""
  if rng.random() >= 1 / 3:
    return case
  names = [t.name for t in case.tables]
  off = [t.name for t in case.off.tables]
  first = [str(rng.choice(off if rng.random() < 0.7 else names))]
  rest = [str(n) for n in rng.permutation(names) if n not in first]
  own = first + rest[:int(rng.integers(0, min(2, len(rest)) + 1))]
  return dataclasses.replace(case, table_optimizers=tuple(
      (n, reshard_optimizers.random_optimizer(rng)) for n in sorted(own)))


def _extend(case: Case, rng) -> Case:
  """The draws added later, from their own stream (so the draws above, and a case without
  these, are as before): int8 tables on the device beside the offloaded ones (int8 cannot
  be offloaded), an eval of the last batch trained (a pass with every row cached), a slow
  eviction fetcher (S=0, K<=1) with more steps made of earlier batches' examples (the
  planner then finds rows in more evictions in flight than an install copies from, and
  waits: `fetch_waits`), and a NaN rollback instead of most plain runs and some checkpoint
  ones."""
  off = {t.name for t in case.off.tables}
  tables = tuple(dataclasses.replace(t, dtype="int8")
                 if t.name not in off and rng.random() < 0.4 else t for t in case.tables)
  sr = case.stochastic_rounding or (any(t.dtype == "int8" for t in tables)
                                    and rng.random() < 0.5)
  kw, batches, steps = {}, list(case.batches), case.steps
  delay = float(rng.choice([0.02, 0.05, 0.1])) if rng.random() < 0.4 else 0.0
  caches = {t.name: min(t.cache_rows, case.off.host_buffer_rows) for t in case.off.tables}
  if case.variant == "eval" and rng.random() < 0.4:   # the last batch trained: all cached
    batches[steps] = batches[case.at - 1]
    kw["eval_batch"] = case.batch
  if delay:   # S=0, K<=1: rows in flight are late (none stale), fewer sources (K+5)
    kw["off"] = dataclasses.replace(case.off, max_staleness=0,
                                    prefetch_depth=int(rng.integers(0, 2)))
    # and more steps, of examples of earlier batches: their rows return
    again = [_mixed(rng, batches[:steps], case.features, caches)
             for _ in range(int(rng.integers(steps, 2 * steps)))]
    batches[steps:steps] = again
    steps += len(again)
  if {"plain": 0.85, "ckpt": 0.3}.get(case.variant, 0.0) > rng.random():
    poisoned = np.sort(rng.choice(steps - 1, int(rng.integers(1, 3)), replace=False))
    for p in poisoned:
      dense = batches[p].dense.copy()
      dense[rng.integers(case.batch), rng.integers(NUM_DENSE)] = np.nan
      batches[p] = batches[p].replace(dense=dense)
    kw.update(variant="rollback", poisoned=tuple(int(p) for p in poisoned),
              ckpt_every=int(rng.choice([0, 1, 1, 2, 3])), log_every=int(rng.choice([1, 2, 3])),
              mesh2=None, placements2=None)
  return dataclasses.replace(case, tables=tables, stochastic_rounding=bool(sr),
                             fetch_delay=delay, fetch_stall=int(rng.integers(1, 6)),
                             batches=tuple(batches), steps=steps, **kw)


def _mixed(rng, batches, features, caches) -> Batch:
  """A batch whose every example is one of a random earlier batch (so its rows were last
  used, and evicted, at many different steps); an example that would take an offloaded
  table past `caches[table]` distinct rows (what its cache and the host buffer take) gets
  empty bags of that table instead."""
  pick = [(batches[i], k) for k, i in enumerate(rng.integers(0, len(batches),
                                                             batches[0].size))]
  take = lambda get: np.stack([get(b)[k] for b, k in pick])
  ids = {f: take(lambda b, f=f: b.ids[f]) for f in batches[0].ids}
  for table, cap in caches.items():
    mine, seen = [f.name for f in features if f.table == table], set()
    for k in range(len(pick)):
      new = set().union(*(ids[f][k][ids[f][k] >= 0].tolist() for f in mine)) - seen
      if len(seen) + len(new) > cap:
        for f in mine:
          ids[f][k] = -1
      else:
        seen |= new
  return Batch(dense=take(lambda b: b.dense), labels=take(lambda b: b.labels), ids=ids,
               weights={f: take(lambda b, f=f: b.weights[f]) for f in batches[0].weights})


class Stream:
  """The case's training batches as a finite iterator with a data state."""

  def __init__(self, batches):
    self.batches, self.i = batches, 0

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self.i >= len(self.batches):
      raise StopIteration
    self.i += 1
    return self.batches[self.i - 1]

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = int(state["i"])
