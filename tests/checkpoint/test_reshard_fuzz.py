"""Randomized cross-check of elastic restarts: one seed draws a source run (a mesh of 8, 4,
2 or 1 devices, any 4-axis shape) and a destination of another device count or shape,
tables of mixed rows, dims and dtypes, each with a placement kind and `table` slice of its
own in either run, a sparse optimizer and its options, and a few train steps before the
save; one table may be widened in a later run (bfloat16/float16 to float32, int8 to
float32 dequantised), offloaded by the source or the destination (host tier: a tensorstore
store and a device cache of fewer rows; offloaded in both with another cache size, or
brought back onto the device), and after SGD (no state saved) another optimizer may start
fresh. Some runs give 1-3 tables sparse optimizers of their own, hyperparameters sampled
(`reshard_optimizers`: an offloaded table's too), and a later run may retune a table's,
put it back on the default, or give a table that saved no state one that has some: its
state starts fresh, the other tables' is restored; rarely a run changes a table's
optimizer as a restore refuses to (state lost or of another shape), and its restore must
raise the ConfigError naming the table (the chain ends there). A third of the seeds go on
as a chain (A -> B -> C, now and then a fourth run): each run restores the last one's
checkpoint, trains a step or two and saves again, any run may widen, offload or bring
back a table; now and then a run restores a copy made by
`convert_checkpoint.py --format=checkpoint` for its mesh and plan, after an npz export of
the checkpoint is compared with the saved values. Saves and restores go through the
library's own `CheckpointManager` and, for offloaded tables, `OffloadTier.save` (flush and
snapshot) and `.restore`, as `train.py`'s loop calls them; a run that offloads a table
keeps it whole in its store except the rows cached at the save, which the store holds
stale and the cache holds trained (the flush writes them).

Checked after each restore, exactly: every stacked array equals, bit for bit, the saved
per-table values (widened: as float32; dequantised: `q * scale + bias`) placed by the
run's layout (padding rows and columns zero, an offloaded table's device cache zero, fresh
optimizer state its initial value: a stack of fresh tables only whole, else their rows'
real columns) on its shardings; each offloaded table's store holds the whole saved
arrays; the dense state, step and data state come back. Then, after each run's
steps, its tables and optimizer state agree with the run that never went through a
checkpoint (the first run's mesh and plan, each run's dtypes and optimizer taken on in
memory) with `test_collection_fuzz`'s tolerances (another mesh sums gradients and pooled
rows in another order, and a reduced-dtype value at a rounding boundary may round either
way), and the first step's pooled outputs after the first restore too.

`test_reshard.py` restores every table of a collection the same way; this samples the
combinations it leaves out. By hand, more seeds:

  python -m tests.checkpoint.test_reshard_fuzz --seeds 0:200

prints one line per seed (failing ones with their configuration and the first mismatch).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import tempfile

if __name__ == "__main__":   # run by hand: 8 host devices, as tests/conftest.py sets them
  from tests import xla_env
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_env.xla_flags(8)}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxrec.checkpoint import CheckpointManager  # noqa: E402
from jaxrec.checkpoint import convert as convert_lib  # noqa: E402
from jaxrec.checkpoint import offloaded as offloaded_lib  # noqa: E402
from jaxrec.checkpoint import tables as tables_lib  # noqa: E402
from jaxrec.embedding import optimizers  # noqa: E402
from jaxrec.embedding.collection import EmbeddingCollection  # noqa: E402
from jaxrec.embedding.specs import FeatureSpec, TableSpec  # noqa: E402
from jaxrec.errors import ConfigError  # noqa: E402
from jaxrec.kernels import quant  # noqa: E402
from jaxrec.sharding.mesh import format_mesh, make_mesh  # noqa: E402
from jaxrec.sharding.plan import KINDS, MESH_AXES, Plan, TablePlacement  # noqa: E402
from tests.checkpoint import ckpt_helpers as h  # noqa: E402
from tests.checkpoint import reshard_optimizers as ro  # noqa: E402
from tests.checkpoint import reshard_oracle as o  # noqa: E402
from tests.embedding.test_collection_fuzz import (assert_close_stored,  # noqa: E402
                                                  assert_f32_close, random_features,
                                                  random_optimizer, run_seeds)
from tests.embedding.test_collection_inputs import lookup_update_step  # noqa: E402

# Every 4-axis shape of 1, 2, 4 and 8 devices (1 + 4 + 10 + 20 of them).
MESHES = {n: tuple(dict(zip(MESH_AXES, s)) for s in itertools.product((1, 2, 4, 8), repeat=4)
                   if math.prod(s) == n) for n in (1, 2, 4, 8)}
ROWS = (1, 2, 3, 5, 7, 8, 13, 16, 37, 50)       # fewer than `row`, uneven, even
DIMS = (4, 5, 8, 12, 16)                        # 5 and 12: padded on col=8 (and 5 on col=2)
BAGS = (1, 1, 2, 3, 5)
REDUCED = ("bfloat16", "float16", "int8")


@dataclasses.dataclass(frozen=True)
class Leg:
  """One run of a chain: it restores the previous run's checkpoint (the first starts from
  random tables), trains `steps` steps, then saves (the last run: is compared instead)."""
  mesh: tuple[tuple[str, int], ...]
  tables: tuple[TableSpec, ...]                # whole tables, in this run's dtypes
  placements: tuple[tuple[str, int], ...]      # (kind, table_slice) per table
  optimizer: object                            # one, or per table (`TableOptimizers`)
  steps: int
  offloaded: tuple[tuple[str, int], ...] = ()  # (table, cache rows)
  converted: bool = False   # restores a `--format=checkpoint` copy made for its mesh and plan

  def specs(self, cached: bool = True) -> tuple[TableSpec, ...]:
    """The collection's tables: offloaded ones as their caches (`cached`) or whole."""
    caches = dict(self.offloaded) if cached else {}
    return tuple(dataclasses.replace(t, rows=caches[t.name]) if t.name in caches else t
                 for t in self.tables)

  def plan(self) -> Plan:
    return Plan({t.name: TablePlacement(k, s) for t, (k, s) in zip(self.tables,
                                                                   self.placements)})

  def describe(self, prev: Leg | None = None) -> str:
    """Mesh, tables (`offloaded/N`: an N-row cache), optimizer (when new), steps."""
    caches = dict(self.offloaded)
    opt = ("" if prev is not None and prev.optimizer == self.optimizer
           else f" {ro.describe(self.optimizer)}")
    return ("copy: " if self.converted else "") + format_mesh(dict(self.mesh)) + " " + " ".join(
        f"{t.name}[{t.rows}x{t.dim} {t.dtype} {k}@{s}"
        f"{f' offloaded/{caches[t.name]}' if t.name in caches else ''}]"
        for t, (k, s) in zip(self.tables, self.placements)) + f"{opt} x{self.steps}"


@dataclasses.dataclass(frozen=True)
class Config:
  """One sampled case: runs (`legs`) on one set of features and inputs."""
  seed: int
  features: tuple[FeatureSpec, ...]
  options: tuple[tuple[str, object], ...]
  batch: int
  legs: tuple[Leg, ...]
  store: tuple[str, str, int] = ("zarr3", "file", 4)   # offloaded: driver, kvstore, chunk
  database: bool = False   # the checkpoints' tables in one OCDBT database (`tables.py`)

  def collection(self, leg: Leg, cached: bool = True, where: Leg | None = None
                 ) -> EmbeddingCollection:
    """`leg`'s collection (caches or whole tables), on the mesh and plan of `where`."""
    where = where or leg
    shape = dict(where.mesh)
    mesh = make_mesh(shape, devices=jax.devices()[:math.prod(shape.values())])
    options = {k: v for k, v in self.options   # dedup=False: SGD's alone
               if k != "dedup" or isinstance(leg.optimizer, optimizers.SGD)}
    return EmbeddingCollection.create(leg.specs(cached), self.features, where.plan(), mesh,
                                      leg.optimizer, **options)

  def describe(self) -> str:
    """One line: everything needed to rebuild the case by hand."""
    feats = " ".join(f"{f.name}({f.table} L{f.max_len} {f.pooling}{' w' if f.weighted else ''})"
                     for f in self.features)
    opts = ",".join(f"{k}={v}" for k, v in self.options) or "-"
    legs = " -> ".join(leg.describe(prev) for prev, leg in zip((None,) + self.legs,
                                                               self.legs))
    return (f"seed={self.seed} {legs} | features: {feats} | options {opts} | batch "
            f"{self.batch} | stores {'/'.join(map(str, self.store))}"
            f"{' | tables in a database' if self.database else ''}")


def _placements(rng, tables, mesh):
  return tuple((str(rng.choice(KINDS)), int(rng.integers(mesh["table"]))) for _ in tables)


def _widened(rng, t: TableSpec) -> TableSpec:
  """`t` on the destination: now and then a reduced dtype restored as float32 (a
  bfloat16/float16 table widened exactly, an int8 one dequantised)."""
  if t.dtype != "float32" and rng.random() < 0.2:
    return dataclasses.replace(t, dtype="float32")
  return t


def _mesh(rng, other=None) -> dict:
  """A mesh of 8, 4, 2 or 1 devices, not `other`."""
  while True:
    n = int(rng.choice([8, 4, 2, 1], p=[0.4, 0.3, 0.2, 0.1]))
    mesh = MESHES[n][rng.integers(len(MESHES[n]))]
    if mesh != other:
      return mesh


def _offload(rng, leg: Leg, choices=None) -> Leg:
  """`leg` with one more table offloaded (of `choices`, else any that can be: not int8,
  more than a row), with a cache of fewer rows; `leg` when none can."""
  taken = dict(leg.offloaded)
  movable = [t for t in leg.tables if t.dtype != "int8" and t.rows > 1 and t.name not in taken
             and (choices is None or t.name in choices)]
  if not movable:
    return leg
  t = movable[int(rng.integers(len(movable)))]
  return dataclasses.replace(leg, offloaded=leg.offloaded + ((t.name, int(rng.integers(
      1, t.rows))),))


def _next_leg(rng, prev: Leg) -> Leg:
  """A run after `prev`: another mesh, kinds and slices of its own (or `prev`'s kinds), a
  table widened now and then, another optimizer now and then after SGD, a table
  offloaded now and then (with a new cache size)."""
  mesh = _mesh(rng, dict(prev.mesh))
  tables = tuple(_widened(rng, t) for t in prev.tables)
  placements = _placements(rng, tables, mesh)
  if rng.random() < 0.25:
    placements = tuple((k, s) for (k, _), (_, s) in zip(prev.placements, placements))
  opt = prev.optimizer
  if isinstance(opt, optimizers.SGD) and rng.random() < 0.3:
    while isinstance(opt, optimizers.SGD):
      opt = random_optimizer(rng, transition_steps=4)
  leg = Leg(tuple(mesh.items()), tables, placements, opt, 1)
  return _offload(rng, leg) if rng.random() < 0.35 else leg


def sample(seed: int, max_tables: int = 4) -> Config:
  """A random valid configuration. The draws of a source and destination run come first,
  as before chains and offloaded sources were drawn (a seed's two runs are the same)."""
  rng = np.random.default_rng(seed)
  n_src = int(rng.choice([8, 4, 2, 1], p=[0.4, 0.3, 0.2, 0.1]))
  src = MESHES[n_src][rng.integers(len(MESHES[n_src]))]
  dst = _mesh(rng, src)
  dims = rng.choice(DIMS, size=rng.integers(1, 3), replace=False)
  reduced = rng.random() < 0.4
  tables = []
  for i in range(rng.integers(1, max_tables + 1)):
    dtype = str(rng.choice(REDUCED)) if reduced and rng.random() < 0.7 else "float32"
    tables.append(TableSpec(f"t{i}", int(rng.choice(ROWS)), int(rng.choice(dims)), dtype))
  dst_tables = [_widened(rng, t) for t in tables]
  offloaded = ()
  movable = [i for i, t in enumerate(dst_tables) if t.dtype != "int8" and t.rows > 1]
  if movable and rng.random() < 0.2:   # offloaded on the destination: a smaller cache
    i = int(rng.choice(movable))
    offloaded = ((dst_tables[i].name, int(rng.integers(1, dst_tables[i].rows))),)
  features = random_features(rng, tables, BAGS, extra_readers=3)
  opt = random_optimizer(rng, transition_steps=4)
  options = {}
  if isinstance(opt, optimizers.SGD) and not reduced and rng.random() < 0.3:
    options["dedup"] = False   # only where documented: SGD, f32 tables, XLA
  if reduced and rng.random() < 0.5 and any(t.dtype != "float32" for t in tables):
    options["stochastic_rounding"] = True
  src_placements = _placements(rng, tables, src)
  dst_placements = _placements(rng, tables, dst)
  if rng.random() < 0.25:   # the same kinds on the new mesh (slices drawn for its `table`)
    dst_placements = tuple((k, s) for (k, _), (_, s) in zip(src_placements, dst_placements))
  dst_opt, other = opt, np.random.default_rng([seed, 2])   # own stream: the draws above
  if isinstance(opt, optimizers.SGD) and other.random() < 0.5:   # stay those of older runs
    while isinstance(dst_opt, optimizers.SGD):
      dst_opt = random_optimizer(other, transition_steps=4)
  batch, steps = 8 * int(rng.integers(1, 3)), int(rng.integers(1, 4))
  legs = [Leg(tuple(src.items()), tuple(tables), src_placements, opt, steps),
          Leg(tuple(dst.items()), tuple(dst_tables), dst_placements, dst_opt, 1, offloaded)]
  legs, store = _more_legs(np.random.default_rng([seed, 3]), legs)
  legs = ro.draw(np.random.default_rng([seed, 5]), legs)   # per-table optimizers
  database = bool(np.random.default_rng([seed, 6]).random() < 0.5)
  return Config(seed, features, tuple(sorted(options.items())), batch, tuple(legs),
                store, database)


def _more_legs(rng, legs: list[Leg]) -> tuple[list[Leg], tuple[str, str, int]]:
  """Draws (a stream of their own) what older runs never sampled: a table offloaded by
  the source (then on the device, or offloaded again with another cache), a chain of a
  third (fourth) run, a `--format=checkpoint` copy on the way, the stores' format."""
  src, dst = legs
  if rng.random() < 0.35:
    src = _offload(rng, src)
    if src.offloaded and rng.random() < 0.4:
      dst = _offload(rng, dst, [src.offloaded[0][0]])
  legs = [src, dst]
  if rng.random() < 0.35:   # a chain: the middle run trains and saves too
    if not dst.offloaded and dst.tables == src.tables and rng.random() < 0.5:
      dst = _offload(rng, dst)   # widened or offloaded in the middle more often
    legs = [src, dataclasses.replace(dst, steps=int(rng.integers(1, 3)))]
    legs.append(_next_leg(rng, dst))
    if rng.random() < 0.15:
      legs[-1] = dataclasses.replace(legs[-1], steps=int(rng.integers(1, 3)))
      legs.append(_next_leg(rng, legs[-1]))
  legs = [dataclasses.replace(leg, converted=n > 0 and rng.random() < 0.2)
          for n, leg in enumerate(legs)]
  chunk_rows = int(rng.choice([2, 4, 16]))
  return legs, (str(rng.choice(["zarr3", "zarr"])), str(rng.choice(["file", "file", "memory"])),
                chunk_rows)


def make_inputs(cfg: Config, step: int):
  """`(ids, weights, gout)` of one step: ids `[batch, max_len]` per feature with random -1
  slots and a fifth of the bags empty, weights with zeros, gout `[batch, features, dim]`."""
  rng = np.random.default_rng([cfg.seed, step])
  rows = {t.name: t.rows for t in cfg.legs[0].tables}
  ids, weights = {}, {}
  for f in cfg.features:
    x = rng.integers(-1, rows[f.table], (cfg.batch, f.max_len))
    x[rng.random(cfg.batch) < 0.2] = -1
    ids[f.name] = x.astype(np.int32)
    if f.weighted:
      w = rng.standard_normal(x.shape).astype(np.float32)
      weights[f.name] = np.where(rng.random(x.shape) < 0.2, 0, w).astype(np.float32)
  dim = max(t.dim for t in cfg.legs[0].tables)
  gout = rng.standard_normal((cfg.batch, len(cfg.features), dim)).astype(np.float32)
  return ids, weights, gout


class Chain:
  """The runs of `cfg` through their checkpoints, beside the run that never went through
  one (`ref`: on the first run's mesh and plan, each run's dtypes and optimizer taken on
  in memory where the chain restores them)."""

  def __init__(self, cfg: Config, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    self.directory = os.path.join(workdir, "w0", "checkpoints")
    self.step, self.tier = 0, None
    self.full = cfg.collection(cfg.legs[0], cached=False)
    self.state = o.placed(self.full, *o.random_tables(cfg.seed, cfg.legs[0].tables,
                                                      cfg.legs[0].optimizer))
    self.train = lookup_update_step(self.full)
    self.ref, self.ref_train, self.scales = self.full, self.train, {}
    self.ref_state = self.state

  def run(self) -> None:
    legs = self.cfg.legs
    self.advance(legs[0].steps, ref=False)
    self.ref_state = self.state   # the first run is the reference's too
    saved = self.save(0)
    for n in range(1, len(legs)):
      if legs[n].converted:
        self.directory = self.convert(n, saved)
      refused = [t for t, r in ro.rules(legs[n - 1].optimizer, legs[n].optimizer,
                                        [t.name for t in legs[n].tables]).items()
                 if r == "refused"]
      if refused:   # the chain's last run (`reshard_optimizers.draw`)
        self.refuse(n, refused[0])
        return
      self.restore(n, saved)
      self.advance(legs[n].steps, pooled=n == 1)
      self.compare(n)
      if n + 1 < len(legs):
        saved = self.save(n)

  def advance(self, steps: int, ref: bool = True, pooled: bool = False) -> None:
    """`steps` train steps of the chain (and of the reference); the pooled outputs of the
    first compared when `pooled` (both start from the same values)."""
    for s in range(steps):
      ids, weights, gout = make_inputs(self.cfg, self.step)
      i = jnp.int32(self.step)
      got, self.state = self.train(self.state, ids, weights, gout, i)
      if ref:
        want, self.ref_state = self.ref_train(self.ref_state, ids, weights, gout, i)
        if pooled and s == 0:
          assert_f32_close(np.asarray(got), np.asarray(want), f"pooled, step {self.step}")
      self.step += 1

  def save(self, n: int) -> tuple[dict, dict]:
    """Saves run `n`'s state as the trainer does (an offloaded table: flushed, its store
    snapshotted, its cache in the checkpoint); returns its whole tables (`per_table`)."""
    leg, coll, emb = self.cfg.legs[n], self.full, self.state
    whole = o.per_table(self.full, self.state)
    meta = {"features": [dataclasses.asdict(f) for f in self.cfg.features]}
    if leg.offloaded:
      coll = self.cfg.collection(leg)
      if self.tier is None:   # the first run: fresh stores
        self.tier = o.make_tier(coll, leg.tables, leg.offloaded, self._workdir(),
                                self.cfg.store)
        self.tier.open_stores()
      emb = o.cached_state(np.random.default_rng([self.cfg.seed, 4, n]), self.tier, coll,
                           whole)
      snapshots = os.path.join(self._workdir(), "offload_snapshots")
      self.tier.save({"emb": emb}, self.step, snapshots)
      meta["offload"] = o.offload_meta(self.tier, snapshots)
    self.close()
    dense = o.dense_state(coll.mesh, self.cfg.seed + n, self.step)
    with CheckpointManager(self.directory) as mgr:
      mgr.save(self.step, dict(dense, emb=emb), coll, force=True, meta=meta,
               data_state={"examples_consumed": self.step * self.cfg.batch})
    return whole

  def restore(self, n: int, saved: tuple[dict, dict]) -> None:
    """Restores run `n` and checks it exactly: every stacked array the saved values laid
    out by its plan (caches of offloaded tables zero), each store the whole table."""
    leg, prev = self.cfg.legs[n], self.cfg.legs[n - 1]
    coll, self.full = self.cfg.collection(leg), self.cfg.collection(leg, cached=False)
    specs = {t.name: t for t in leg.tables}
    whole_specs = {name: specs[name] for name, _ in leg.offloaded}
    with CheckpointManager(self.directory) as mgr:
      restored = mgr.restore(o.dense_state(coll.mesh, self.cfg.seed + 99, 0), coll,
                             offloaded=whole_specs or None)
    assert int(restored.state["step"]) == self.step, (
        f"restored step {int(restored.state['step'])}, not the last one saved, {self.step}")
    fresh = tuple(t for t, r in ro.rules(prev.optimizer, leg.optimizer, specs).items()
                  if r == "fresh")   # nothing saved (SGD): their state starts fresh
    want = o.carried(saved, leg.tables, leg.optimizer, fresh)
    stacks = o.fill_fresh(coll, o.expected_stacks(coll, *want, zero=tuple(whole_specs)), fresh)
    o.assert_stacks_equal(coll, restored.state["emb"], stacks)
    h.assert_dense_equal(o.dense_state(coll.mesh, self.cfg.seed + n - 1, self.step),
                         restored.state)
    assert restored.data_state == {"examples_consumed": self.step * self.cfg.batch}
    tables, opt = o.per_table(coll, restored.state["emb"])
    if leg.offloaded:   # the trainer's `resume_from`: the stores from snapshot or checkpoint
      self.tier = o.make_tier(coll, leg.tables, leg.offloaded, self._workdir(),
                              self.cfg.store)
      found = offloaded_lib.snapshot_of(os.path.join(self.directory, str(self.step)),
                                        own_only=True)
      snapshots = os.path.join(self._workdir(), "offload_snapshots")
      self.tier.restore(self.step, os.path.dirname(found[0]) if found else snapshots,
                        restored.host_tables)
      o.assert_stores_equal(self.tier, ({k: want[0][k] for k in whole_specs},
                                        {k: want[1][k] for k in whole_specs}))
      stored = o.store_values(self.tier)
      tables.update(stored[0])
      opt.update(stored[1])
    self.state = o.placed(self.full, tables, opt)
    self.train = lookup_update_step(self.full)
    if (leg.optimizer != prev.optimizer
        or any(a.dtype != b.dtype for a, b in zip(leg.tables, prev.tables))):
      self.scales.update({k: v.scale for k, v in o.per_table(self.ref, self.ref_state)[0].items()
                          if isinstance(v, quant.QuantizedTable)})
      ref = self.cfg.collection(leg, cached=False, where=self.cfg.legs[0])
      self.ref_state = o.placed(ref, *o.carried(o.per_table(self.ref, self.ref_state),
                                                leg.tables, leg.optimizer, fresh))
      self.ref, self.ref_train = ref, lookup_update_step(ref)
    if n + 1 == len(self.cfg.legs):
      self.close()

  def refuse(self, n: int, table: str) -> None:
    """Run `n`'s restore, which gives `table` an optimizer that cannot take its saved state
    (nor start fresh: it saved some): a ConfigError naming the table."""
    leg, before = self.cfg.legs[n], optimizers.of(self.cfg.legs[n - 1].optimizer, table)
    coll = self.cfg.collection(leg)
    whole_specs = {t.name: t for t in leg.tables if t.name in dict(leg.offloaded)}
    try:
      with CheckpointManager(self.directory) as mgr:
        mgr.restore(o.dense_state(coll.mesh, self.cfg.seed + 99, 0), coll,
                    offloaded=whole_specs or None)
    except ConfigError as e:
      assert f"table '{table}'" in str(e), f"the refusal does not name table {table}: {e}"
      return
    raise AssertionError(f"run {n} restored table {table}'s state of {before} into "
                         f"{optimizers.of(leg.optimizer, table)}")

  def compare(self, n: int) -> None:
    """Run `n`'s tables and optimizer state after its steps against the reference's, with
    `test_collection_fuzz`'s tolerances: another mesh sums gradients and pooled rows in
    another order, and a reduced-dtype value at a rounding boundary may round either way
    (a widened table keeps its first dtype's tolerance)."""
    a_tables, a_opt = o.per_table(self.full, self.state)
    b_tables, b_opt = o.per_table(self.ref, self.ref_state)
    scales = dict(self.scales, **{k: v.scale for k, v in b_tables.items()
                                  if isinstance(v, quant.QuantizedTable)})
    for first in self.cfg.legs[0].tables:
      name = first.name
      a, b = o.as_stored("float32", a_tables[name]), o.as_stored("float32", b_tables[name])
      if first.dtype == "float32":
        assert_f32_close(a, b, f"table {name} after run {n}")
      else:
        assert_close_stored(name, first, a, b, scales.get(name))
      for k, v in b_opt[name].items():
        assert_f32_close(a_opt[name][k], v, f"optimizer state {k} of {name} after run {n}",
                         1e-2 if first.dtype != "float32" and k == "z" else 0.0)

  def convert(self, n: int, saved: tuple[dict, dict]) -> str:
    """The checkpoint copied by `convert_checkpoint.py --format=checkpoint` for run `n`'s
    mesh and plan (its directory, to restore from), after an npz export of it is checked
    against the saved values (an offloaded table whole, from its snapshot)."""
    leg, workdir = self.cfg.legs[n], os.path.join(self.workdir, f"w{n}")
    os.makedirs(workdir)
    npz = os.path.join(workdir, "export.npz")
    assert convert_lib.export_npz(self.directory, npz) == self.step
    with np.load(npz) as z:
      for name, x in saved[0].items():
        parts = ({f"/{p}": getattr(x, p) for p in ("q", "scale", "bias")}
                 if isinstance(x, quant.QuantizedTable) else {"": x})
        parts = {f"tables/{name}{k}": v for k, v in parts.items()}
        parts.update({f"table_opt/{name}/{k}": v for k, v in saved[1][name].items()})
        for key, v in parts.items():
          v = v.astype(np.float32) if v.dtype == jnp.bfloat16 else v
          assert key in z and np.array_equal(h.bytes_of(z[key]), h.bytes_of(v)), (
              f"npz export: {key} differs from the saved values")
    plan = os.path.join(workdir, "plan.json")
    with open(plan, "w", encoding="utf-8") as f:
      json.dump(leg.plan().to_json(), f)
    out = os.path.join(workdir, "checkpoints")
    step, _ = convert_lib.export_checkpoint(self.directory, out, mesh_shape=dict(leg.mesh),
                                            plan=plan)
    assert step == self.step
    return out

  def _workdir(self) -> str:
    return os.path.dirname(self.directory)

  def close(self) -> None:
    """Stops the offload tier of the run in progress, if any."""
    if self.tier is not None:
      self.tier.close()
      self.tier = None


def check(seed: int) -> Config:
  """Runs seed `seed`; an AssertionError with the configuration in its first line for a
  mismatch or any error raised (a refusal included, but the optimizer change sampled to
  be refused: `Chain.refuse`)."""
  cfg = sample(seed)
  chain = None
  try:
    with tempfile.TemporaryDirectory(prefix="reshard_fuzz_") as directory, \
        pytest.MonkeyPatch.context() as patch:
      if cfg.database:   # a few tables: a database only below the usual 64 arrays
        patch.setattr(tables_lib, "DATABASE_ARRAYS", 1)
      chain = Chain(cfg, directory)
      chain.run()
  except Exception as e:  # pylint: disable=broad-except
    raise AssertionError(f"{cfg.describe()}\n{type(e).__name__}: {e}") from e
  finally:
    if chain is not None:
      chain.close()
  return cfg


# The slow target's seeds: of those run by hand, the quickest that together reach every
# device count pair drawn for the first restart, kind on either side, dtype (widened,
# dequantised), optimizer (SGD then another), stochastic rounding, dedup=False, a table
# offloaded by either run (brought back, or into the same or another cache), chains of 3
# and 4 runs (back to the first device count; a middle run widening or offloading), copies
# and each store format; by hand, `--seeds` runs every seed whatever its size. Per-table
# optimizers (`reshard_optimizers`' draws since): 63, 97 retune a table's and keep its state,
# 22, 56, 110 offload a table with its own (56: one starting fresh), 84, 116 start a table
# fresh in a stack whose other table keeps its state, 40 is refused (t0's RowWiseAdagrad
# to Adam, restoring a copy, t2 offloaded with its own Adagrad: the ConfigError names t0).
SLOW_SEEDS = (22, 38, 40, 47, 56, 59, 63, 81, 84, 97, 98, 102, 104, 106, 108, 109, 110, 112,
              113, 116, 170, 172, 173, 244, 304)
# The default suite's (~3.5 s): 4 devices (data=2,row=2) to 8 (table=2,row=2,col=2), a
# 7x5 table rw to cw (dim 5 padded on col=2), FTRL, a mean bag of 5 and a sum bag.
FAST_SEED = 2051
# ... and its chain (~5 s): 1 device, to 8, to 2; a 16x5 table offloaded by the first run
# (a 5-row cache), offloaded again by the second with a 15-row cache, then on the device.
CHAIN_SEED = 3174


def test_a_random_restart_restores_the_saved_state():
  check(FAST_SEED)


def test_a_random_chain_of_restarts_keeps_the_training_state():
  check(CHAIN_SEED)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_random_restarts_restore_the_saved_state(seed):
  check(seed)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", default="0:50", help="START:STOP (or one seed)")
  return run_seeds(parser.parse_args(argv).seeds, lambda seed: check(seed).describe())


if __name__ == "__main__":
  sys.exit(main())
