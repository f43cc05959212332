"""Randomized cross-check of an elastic restart: one seed draws a source mesh (8, 4, 2 or 1
devices, any 4-axis shape) and a destination of another device count or shape, tables of
mixed rows, dims and dtypes, each with a placement kind and `table` slice of its own on
either side, a sparse optimizer and its options, and a few train steps before the save;
one table may be widened on the destination (bfloat16/float16 to float32, int8 to float32
dequantised) or offloaded there, and after SGD (no state saved) another optimizer may
start fresh. The state goes through the library's own `CheckpointManager.save` and
`.restore`, as `train.py`'s loop calls them.

Checked after the restore, exactly: every stacked array of the destination equals, bit for
bit, the saved per-table values (widened: as float32; dequantised: `q * scale + bias`)
placed by the destination's layout (padding rows and columns zero, an offloaded table's
device cache zero, fresh optimizer state its initial value) on the destination's
shardings; an offloaded table's whole arrays (`Restored.host_tables`) equal the saved ones;
the dense state, step and data state come back. Then one more train step on the restored
state and on the source run continued without a checkpoint agree, with
`test_collection_fuzz`'s tolerances: another mesh sums gradients and pooled rows in
another order (and a reduced-dtype value at a rounding boundary may round either way).

`test_reshard.py` restores every table of a collection the same way; this samples the
combinations it leaves out. By hand, more seeds:

  python -m tests.checkpoint.test_reshard_fuzz --seeds 0:200

prints one line per seed (failing ones with their configuration and the first mismatch).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxrec.checkpoint import CheckpointManager  # noqa: E402
from jaxrec.embedding import optimizers  # noqa: E402
from jaxrec.embedding.collection import EmbeddingCollection  # noqa: E402
from jaxrec.embedding.specs import FeatureSpec, TableSpec  # noqa: E402
from jaxrec.kernels import quant  # noqa: E402
from jaxrec.sharding.mesh import format_mesh, make_mesh  # noqa: E402
from jaxrec.sharding.plan import KINDS, MESH_AXES, Plan, TablePlacement  # noqa: E402
from tests.checkpoint import ckpt_helpers as h  # noqa: E402
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
class Config:
  """One sampled case. `dst_tables`: the destination's specs (a widened dtype; an
  offloaded table's device cache rows); `offloaded`: that table's whole spec, if any."""
  seed: int
  src_mesh: tuple[tuple[str, int], ...]
  dst_mesh: tuple[tuple[str, int], ...]
  tables: tuple[TableSpec, ...]
  dst_tables: tuple[TableSpec, ...]
  features: tuple[FeatureSpec, ...]
  src_placements: tuple[tuple[str, int], ...]   # (kind, table_slice) per table
  dst_placements: tuple[tuple[str, int], ...]
  optimizer: object
  options: tuple[tuple[str, object], ...]
  batch: int
  steps: int
  offloaded: TableSpec | None
  dst_optimizer: object   # another one only after SGD: no state saved, it starts fresh

  def plan(self, dst: bool) -> Plan:
    placements = self.dst_placements if dst else self.src_placements
    return Plan({t.name: TablePlacement(k, s) for t, (k, s) in zip(self.tables, placements)})

  def mesh(self, dst: bool):
    shape = dict(self.dst_mesh if dst else self.src_mesh)
    return make_mesh(shape, devices=jax.devices()[:math.prod(shape.values())])

  def collection(self, dst: bool) -> EmbeddingCollection:
    opt = self.dst_optimizer if dst else self.optimizer
    options = {k: v for k, v in self.options   # dedup=False: SGD's alone
               if k != "dedup" or isinstance(opt, optimizers.SGD)}
    return EmbeddingCollection.create(self.dst_tables if dst else self.tables, self.features,
                                      self.plan(dst), self.mesh(dst), opt, **options)

  @property
  def continues(self) -> bool:
    """Whether the one-step comparison after the restore applies: same dtypes and
    optimizer, nothing offloaded (an offloaded table's rows come from its tier, which this
    does not build)."""
    return self.offloaded is None and self.dst_optimizer == self.optimizer and all(
        a.dtype == b.dtype for a, b in zip(self.tables, self.dst_tables))

  def describe(self) -> str:
    """One line: everything needed to rebuild the case by hand."""
    def side(mesh, specs, placements):
      return format_mesh(dict(mesh)) + " " + " ".join(
          f"{t.name}[{t.rows}x{t.dim} {t.dtype} {k}@{s}]" for t, (k, s) in zip(specs,
                                                                                placements))
    feats = " ".join(f"{f.name}({f.table} L{f.max_len} {f.pooling}{' w' if f.weighted else ''})"
                     for f in self.features)
    opts = ",".join(f"{k}={v}" for k, v in self.options) or "-"
    off = f" | offloaded {self.offloaded.name}" if self.offloaded else ""
    new_opt = "" if self.dst_optimizer == self.optimizer else f" -> {self.dst_optimizer}"
    return (f"seed={self.seed} src {side(self.src_mesh, self.tables, self.src_placements)}"
            f" -> dst {side(self.dst_mesh, self.dst_tables, self.dst_placements)}{off} | "
            f"features: {feats} | {self.optimizer}{new_opt} | options {opts} | batch "
            f"{self.batch} x {self.steps} steps")


def _placements(rng, tables, mesh):
  return tuple((str(rng.choice(KINDS)), int(rng.integers(mesh["table"]))) for _ in tables)


def _widened(rng, t: TableSpec) -> TableSpec:
  """`t` on the destination: now and then a reduced dtype restored as float32 (a
  bfloat16/float16 table widened exactly, an int8 one dequantised)."""
  if t.dtype != "float32" and rng.random() < 0.2:
    return dataclasses.replace(t, dtype="float32")
  return t


def sample(seed: int, max_tables: int = 4) -> Config:
  """A random valid configuration."""
  rng = np.random.default_rng(seed)
  n_src = int(rng.choice([8, 4, 2, 1], p=[0.4, 0.3, 0.2, 0.1]))
  src = MESHES[n_src][rng.integers(len(MESHES[n_src]))]
  while True:   # another device count or another shape
    n_dst = int(rng.choice([8, 4, 2, 1], p=[0.4, 0.3, 0.2, 0.1]))
    dst = MESHES[n_dst][rng.integers(len(MESHES[n_dst]))]
    if dst != src:
      break
  dims = rng.choice(DIMS, size=rng.integers(1, 3), replace=False)
  reduced = rng.random() < 0.4
  tables = []
  for i in range(rng.integers(1, max_tables + 1)):
    dtype = str(rng.choice(REDUCED)) if reduced and rng.random() < 0.7 else "float32"
    tables.append(TableSpec(f"t{i}", int(rng.choice(ROWS)), int(rng.choice(dims)), dtype))
  dst_tables = [_widened(rng, t) for t in tables]
  offloaded = None
  movable = [i for i, t in enumerate(dst_tables) if t.dtype != "int8" and t.rows > 1]
  if movable and rng.random() < 0.2:   # offloaded on the destination: a smaller cache
    i = int(rng.choice(movable))
    offloaded = dst_tables[i]
    dst_tables[i] = dataclasses.replace(offloaded, rows=int(rng.integers(1, offloaded.rows)))
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
  return Config(seed, tuple(src.items()), tuple(dst.items()), tuple(tables),
                tuple(dst_tables), features, src_placements, dst_placements, opt,
                tuple(sorted(options.items())),
                8 * int(rng.integers(1, 3)), int(rng.integers(1, 4)), offloaded, dst_opt)


def make_inputs(cfg: Config, step: int):
  """`(ids, weights, gout)` of one step: ids `[batch, max_len]` per feature with random -1
  slots and a fifth of the bags empty, weights with zeros, gout `[batch, features, dim]`."""
  rng = np.random.default_rng([cfg.seed, step])
  rows = {t.name: t.rows for t in cfg.tables}
  ids, weights = {}, {}
  for f in cfg.features:
    x = rng.integers(-1, rows[f.table], (cfg.batch, f.max_len))
    x[rng.random(cfg.batch) < 0.2] = -1
    ids[f.name] = x.astype(np.int32)
    if f.weighted:
      w = rng.standard_normal(x.shape).astype(np.float32)
      weights[f.name] = np.where(rng.random(x.shape) < 0.2, 0, w).astype(np.float32)
  dim = max(t.dim for t in cfg.tables)
  gout = rng.standard_normal((cfg.batch, len(cfg.features), dim)).astype(np.float32)
  return ids, weights, gout


def _slots(coll):
  """`{table: (stack layout, first stacked row)}`."""
  return {s.name: (l, l.slot_start(s)) for l in coll.layouts for s in l.slots}


def per_table(coll, emb) -> tuple[dict, dict]:
  """The stacked `emb` cut into per-table numpy arrays (`[rows, dim]` / `[rows]`; an int8
  table as a `QuantizedTable`), by hand: the oracle does not use `unstack_tables`."""
  emb = jax.tree.map(np.asarray, emb)
  tables, opt = {}, {}
  for name, (l, start) in _slots(coll).items():
    rows = coll.table_spec(name).rows
    cut = lambda x: x[start:start + rows, :l.dim] if x.ndim == 2 else x[start:start + rows]
    tables[name] = jax.tree.map(cut, emb["tables"][l.name])
    opt[name] = {k: cut(v) for k, v in emb["opt"][l.name].items()}
  return tables, opt


def as_stored(dtype: str, table) -> object:
  """A saved table (numpy, per `per_table`) as the destination holds it: the same bits, or
  widened to float32 (exact), or an int8 table's `q * scale + bias` in float32 (the values
  its lookup saw; the host's order of operations, `checkpoint.dequantized`)."""
  if isinstance(table, quant.QuantizedTable):
    if dtype == "int8":
      return table
    out = table.q.astype(np.float32)
    out *= table.scale[:, None]
    out += table.bias[:, None]
    return out
  return table.astype(jnp.dtype(dtype))


def expected_stacks(coll, tables: dict, opt: dict, zero: tuple[str, ...]) -> dict:
  """The destination's stacked arrays, in numpy: zeros, with every table's `[rows, dim]`
  (and optimizer state) at its slot; the tables in `zero` (device caches) left zero."""
  out = {"tables": {}, "opt": {}}
  for l in coll.layouts:   # shapes from the layout (`eval_shape(coll.init)` traces ~1 s)
    rows = l.shape[:1]
    out["tables"][l.name] = (quant.QuantizedTable(np.zeros(l.shape, np.int8),
                                                  np.zeros(rows, np.float32),
                                                  np.zeros(rows, np.float32))
                             if l.dtype == "int8" else np.zeros(l.shape, jnp.dtype(l.dtype)))
    out["opt"][l.name] = {k: np.zeros(l.shape if per == "element" else rows, np.float32)
                          for k, (per, _) in coll.optimizer.state_layout().items()}
  for name, (l, start) in _slots(coll).items():
    if name in zero:
      continue
    rows = coll.table_spec(name).rows

    def put(stack, x):
      if stack.ndim == 2:
        stack[start:start + rows, :l.dim] = x
      else:
        stack[start:start + rows] = x
    jax.tree.map(put, out["tables"][l.name], tables[name])
    for k, x in opt[name].items():
      put(out["opt"][l.name][k], x)
  return out


def check_restored(cfg: Config, src_coll, dst_coll, saved, restored) -> None:
  """AssertionError naming the first array of `restored` that is not the saved values."""
  tables, opt = per_table(src_coll, saved["emb"])
  dst_specs = {t.name: t for t in cfg.dst_tables}
  want_tables = {n: as_stored(dst_specs[n].dtype, x) for n, x in tables.items()}
  zero = (cfg.offloaded.name,) if cfg.offloaded else ()
  want = expected_stacks(dst_coll, want_tables, opt, zero)
  if cfg.dst_optimizer != cfg.optimizer:   # nothing saved (SGD): the whole state fresh
    for l in dst_coll.layouts:
      for k, (_, initial) in cfg.dst_optimizer.state_layout().items():
        want["opt"][l.name][k][:] = initial
  got = restored.state["emb"]
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  shardings = jax.tree.leaves(dst_coll.shardings())
  assert jax.tree.structure(got) == jax.tree.structure(want), "state structure"
  for (path, w), g, s in zip(paths, jax.tree.leaves(got), shardings):
    what = jax.tree_util.keystr(path)
    assert g.sharding == s, f"{what}: sharding {g.sharding} is not {s}"
    g = np.asarray(g)
    assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {g.dtype}{g.shape}"
    if not np.array_equal(h.bytes_of(g), h.bytes_of(w)):
      bad = np.argwhere(g.view(np.uint8).reshape(g.shape[0], -1)
                        != w.view(np.uint8).reshape(w.shape[0], -1))
      raise AssertionError(f"{what}: {len(bad)} bytes differ, first at stacked row "
                           f"{bad[0][0]} (saved layout {_owner(dst_coll, what, bad[0][0])})")
  h.assert_dense_equal(saved, restored.state)
  assert restored.data_state == {"examples_consumed": cfg.steps * cfg.batch}
  if cfg.offloaded:
    check_host_table(cfg, restored, tables, opt)


def _owner(coll, what: str, row: int) -> str:
  """Which slot of the stack in `what` stacked row `row` belongs to (or padding)."""
  for l in coll.layouts:
    if l.name in what:
      for s in l.slots:
        if l.slot_start(s) <= row < l.slot_start(s) + s.rows:
          return f"{s.name} row {row - l.slot_start(s)}"
      return "padding"
  return "?"


def check_host_table(cfg: Config, restored, tables, opt) -> None:
  """The offloaded table's whole arrays, as the tier would copy them into its store."""
  name = cfg.offloaded.name
  host = restored.host_tables[name]
  assert sorted(host.arrays) == sorted(["table"] + [f"opt.{k}" for k in opt[name]]), (
      f"host table {name}: arrays {sorted(host.arrays)}")
  for k, array in host.arrays.items():
    want = tables[name] if k == "table" else opt[name][k[len("opt."):]]
    if isinstance(want, quant.QuantizedTable):   # an int8 table: read as `q * scale + bias`
      want = as_stored("float32", want)
    got = np.asarray(array[:].read().result())
    assert got.dtype == want.dtype and np.array_equal(h.bytes_of(got), h.bytes_of(want)), (
        f"host table {name}: {k} differs from the saved one")


def _f32(tables: dict) -> tuple[dict, dict]:
  """Per-table float32 values (int8 dequantised as its lookup sees it) and int8 scales."""
  scales = {k: v.scale for k, v in tables.items() if isinstance(v, quant.QuantizedTable)}
  return ({k: as_stored("float32", v) for k, v in tables.items()},
          scales)


def check_next_step(cfg: Config, pooled, src_coll, src_next, dst_coll, dst_next) -> None:
  """One more step on the source (never checkpointed) and on the restored destination."""
  assert_f32_close(pooled[1], pooled[0], f"pooled, step {cfg.steps}")
  a_tables, a_opt = per_table(dst_coll, dst_next)
  b_tables, b_opt = per_table(src_coll, src_next)
  (a_tables, _), (b_tables, scales) = _f32(a_tables), _f32(b_tables)
  for t in cfg.tables:
    if t.dtype == "float32":
      assert_f32_close(a_tables[t.name], b_tables[t.name], f"table {t.name} after a step")
    else:
      assert_close_stored(t.name, t, a_tables[t.name], b_tables[t.name], scales.get(t.name))
    for k, v in b_opt[t.name].items():
      assert_f32_close(a_opt[t.name][k], v, f"optimizer state {k} of {t.name} after a step",
                       1e-2 if t.dtype != "float32" and k == "z" else 0.0)


def initial_state(cfg: Config, coll):
  """The source's first `EmbeddingState`, drawn per table in numpy and placed by
  `expected_stacks` (no program to compile, as `coll.init` has: ~1-2 s a seed): values of
  every sign (int8: random codes, scales and biases), the optimizer's initial state."""
  rng = np.random.default_rng([cfg.seed, 1 << 20])
  tables, opt = {}, {}
  for t in cfg.tables:
    if t.dtype == "int8":
      tables[t.name] = quant.QuantizedTable(
          rng.integers(-128, 128, (t.rows, t.dim)).astype(np.int8),
          rng.uniform(1e-3, 2e-2, t.rows).astype(np.float32),
          rng.normal(0, 0.3, t.rows).astype(np.float32))
    else:
      tables[t.name] = rng.normal(0, 0.5, (t.rows, t.dim)).astype(jnp.dtype(t.dtype))
    opt[t.name] = {k: np.full((t.rows, t.dim) if per == "element" else (t.rows,), initial,
                              np.float32)
                   for k, (per, initial) in cfg.optimizer.state_layout().items()}
  return jax.device_put(expected_stacks(coll, tables, opt, ()), coll.shardings())


def dense_state(mesh, seed: int, step: int) -> dict:
  """A small dense part (params, an Adam-like state, a typed rng key), drawn in numpy and
  replicated with one `device_put`: `ckpt_helpers.dense`'s eager jax ops cost ~2-10 s a
  mesh on a loaded 2-core host."""
  rng = np.random.default_rng([seed, 7])
  params = {"bottom": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=3)},
            "top": {"kernel": rng.normal(size=(3, 1))}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  opt_state = {"mu": jax.tree.map(lambda x: x * 0.5, params),
               "nu": jax.tree.map(np.square, params), "count": np.int32(step)}
  key = jax.random.wrap_key_data(rng.integers(0, 2**32, 2, dtype=np.uint32))
  state = {"step": np.int32(step), "params": params, "opt_state": opt_state, "rng": key}
  return jax.device_put(state, NamedSharding(mesh, P()))


def run(cfg: Config, directory: str) -> None:
  """Trains on the source mesh, saves, restores onto the destination and checks it."""
  src_coll, dst_coll = cfg.collection(False), cfg.collection(True)
  emb = initial_state(cfg, src_coll)
  step = lookup_update_step(src_coll)
  for i in range(cfg.steps):
    ids, weights, gout = make_inputs(cfg, i)
    _, emb = step(emb, ids, weights, gout, jnp.int32(i))
  saved = dict(dense_state(src_coll.mesh, cfg.seed, cfg.steps), emb=emb)
  offloaded = {cfg.offloaded.name: cfg.offloaded} if cfg.offloaded else None
  with CheckpointManager(directory) as mgr:
    mgr.save(cfg.steps, saved, src_coll, force=True,
             data_state={"examples_consumed": cfg.steps * cfg.batch})
    restored = mgr.restore(dense_state(dst_coll.mesh, cfg.seed + 1, 0), dst_coll,
                           offloaded=offloaded)
  assert int(restored.state["step"]) == cfg.steps
  check_restored(cfg, src_coll, dst_coll, saved, restored)
  if cfg.continues:
    ids, weights, gout = make_inputs(cfg, cfg.steps)
    i = jnp.int32(cfg.steps)
    want, src_next = step(emb, ids, weights, gout, i)
    got, dst_next = lookup_update_step(dst_coll)(restored.state["emb"], ids, weights, gout, i)
    check_next_step(cfg, (np.asarray(got), np.asarray(want)), src_coll, src_next, dst_coll,
                    dst_next)


def check(seed: int) -> Config:
  """Runs seed `seed`; an AssertionError with the configuration in its first line for a
  mismatch or any error raised (a refusal included: every sampled case is valid)."""
  cfg = sample(seed)
  try:
    with tempfile.TemporaryDirectory(prefix="reshard_fuzz_") as directory:
      run(cfg, directory)
  except Exception as e:  # pylint: disable=broad-except
    raise AssertionError(f"{cfg.describe()}\n{type(e).__name__}: {e}") from e
  return cfg


# The slow target's seeds: of the first 130, the quickest that together reach every device
# count pair drawn, kind on either side, dtype (widened, dequantised), optimizer (SGD then
# another), stochastic rounding, dedup=False and an offloaded table; by hand, `--seeds`
# runs every seed whatever its size.
SLOW_SEEDS = (21, 33, 51, 64, 73, 98, 102, 106, 107, 110, 111, 112, 113, 115, 116, 119, 121,
              122, 124, 125, 126, 127, 128, 129)
# The default suite's (~3.5 s): 4 devices (data=2,row=2) to 8 (table=2,row=2,col=2), a
# 7x5 table rw to cw (dim 5 padded on col=2), FTRL, a mean bag of 5 and a sum bag.
FAST_SEED = 2051


def test_a_random_restart_restores_the_saved_state():
  check(FAST_SEED)


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
