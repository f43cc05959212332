"""The numpy side of `test_reshard_fuzz`: stacked arrays cut into per-table values and laid
out again by hand (the oracle does not use `unstack_tables` / `stack_tables`), the exact
comparison of a restored state, and a run's offloaded tables as the trainer keeps them (an
`OffloadTier` whose store holds the whole table and whose device cache holds some rows).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec import offload
from jaxrec.embedding import optimizers
from jaxrec.kernels import quant
from tests.checkpoint import ckpt_helpers as h


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


def fresh_opt(optimizer, spec) -> dict:
  """The initial state of table `spec` under `optimizer` (one, or per table), `{name:
  [rows, dim] | [rows]}`."""
  layout = optimizers.of(optimizer, spec.name).state_layout()
  return {k: np.full((spec.rows, spec.dim) if per == "element" else (spec.rows,), initial,
                     np.float32) for k, (per, initial) in layout.items()}


def carried(saved: tuple[dict, dict], specs, optimizer, fresh=()) -> tuple[dict, dict]:
  """The whole tables a run holds after restoring `saved` (`per_table` values): each in
  its dtype of `specs` (`as_stored`), with its saved optimizer state, or its optimizer's
  initial one for the tables in `fresh` (no state saved: SGD before)."""
  tables, opt = saved
  specs = {t.name: t for t in specs}
  return ({n: as_stored(specs[n].dtype, x) for n, x in tables.items()},
          {n: fresh_opt(optimizer, specs[n]) if n in fresh else dict(opt[n]) for n in tables})


def expected_stacks(coll, tables: dict, opt: dict, zero=()) -> dict:
  """The stacked arrays of `coll`, in numpy: zeros, with every table's `[rows, dim]` (and
  optimizer state) at its slot; the tables in `zero` (device caches) left zero."""
  out = {"tables": {}, "opt": {}}
  for l in coll.layouts:   # shapes from the layout (`eval_shape(coll.init)` traces ~1 s)
    rows = l.shape[:1]
    out["tables"][l.name] = (quant.QuantizedTable(np.zeros(l.shape, np.int8),
                                                  np.zeros(rows, np.float32),
                                                  np.zeros(rows, np.float32))
                             if l.dtype == "int8" else np.zeros(l.shape, jnp.dtype(l.dtype)))
    out["opt"][l.name] = {k: np.zeros(l.shape if per == "element" else rows, np.float32)
                          for k, (per, _) in l.optimizer.state_layout().items()}
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


def fill_fresh(coll, stacks: dict, fresh) -> dict:
  """`stacks` (`expected_stacks`) with the optimizer state of the tables in `fresh` at its
  initial value as a restore starts it: a stack of fresh tables only whole (padding too),
  else their slots' rows and real columns (an offloaded table's device cache too)."""
  fresh = set(fresh)
  for l in coll.layouts:
    for k, (_, initial) in l.optimizer.state_layout().items():
      x = stacks["opt"][l.name][k]
      if {s.name for s in l.slots} <= fresh:
        x[:] = initial
        continue
      for s in l.slots:
        if s.name not in fresh:
          continue
        start, rows = l.slot_start(s), coll.table_spec(s.name).rows
        if x.ndim == 2:
          x[start:start + rows, :l.dim] = initial
        else:
          x[start:start + rows] = initial
  return stacks


def placed(coll, tables: dict, opt: dict):
  """`expected_stacks` on `coll`'s shardings."""
  return jax.device_put(expected_stacks(coll, tables, opt), coll.shardings())


def assert_stacks_equal(coll, got, want) -> None:
  """Every array of `got` (device) has `coll`'s sharding and the bytes of `want` (numpy);
  an AssertionError names the first that does not, and the table row it belongs to."""
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  shardings = jax.tree.leaves(coll.shardings())
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
                           f"{bad[0][0]} (saved layout {_owner(coll, what, bad[0][0])})")


def _owner(coll, what: str, row: int) -> str:
  """Which slot of the stack in `what` stacked row `row` belongs to (or padding)."""
  for l in coll.layouts:
    if l.name in what:
      for s in l.slots:
        if l.slot_start(s) <= row < l.slot_start(s) + s.rows:
          return f"{s.name} row {row - l.slot_start(s)}"
      return "padding"
  return "?"


def random_tables(seed: int, specs, optimizer) -> tuple[dict, dict]:
  """A first state per table, drawn in numpy (no program to compile, as `coll.init` has:
  ~1-2 s a seed): values of every sign (int8: random codes, scales and biases), the
  optimizer's initial state."""
  rng = np.random.default_rng([seed, 1 << 20])
  tables = {}
  for t in specs:
    if t.dtype == "int8":
      tables[t.name] = quant.QuantizedTable(
          rng.integers(-128, 128, (t.rows, t.dim)).astype(np.int8),
          rng.uniform(1e-3, 2e-2, t.rows).astype(np.float32),
          rng.normal(0, 0.3, t.rows).astype(np.float32))
    else:
      tables[t.name] = rng.normal(0, 0.5, (t.rows, t.dim)).astype(jnp.dtype(t.dtype))
  return tables, {t.name: fresh_opt(optimizer, t) for t in specs}


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


# ------------------------------------------------------------------------ offloaded tables
def make_tier(coll, specs, offloaded, workdir: str, store: tuple[str, str, int]):
  """The `OffloadTier` of a run that offloads `offloaded` (`((table, cache rows), ...)`;
  `coll` holds their caches, `specs` the whole tables), stores under `workdir/offload` of
  `store`'s driver, kvstore and chunk rows."""
  driver, kvstore, chunk_rows = store
  config = offload.OffloadConfig(tables=tuple(
      offload.OffloadTable(n, cache_rows=c, path=os.path.join(workdir, "offload", n),
                           driver=driver, kvstore=kvstore, chunk_rows=chunk_rows)
      for n, c in offloaded), prefetch_depth=0)
  return offload.OffloadTier(coll, specs, config)


def cached_state(rng, tier, coll, whole: tuple[dict, dict]):
  """What a run offloading the tier's tables holds when it saves: their stores the whole
  tables `whole` (`per_table` values) except the rows cached now, which the store holds
  stale (as they were at the last restore, or initial) and which the device cache holds
  as trained, at random slots marked dirty (the tier's `save` flushes them); some slots
  empty. Returns the device state on `coll` (whose tables of the tier are its caches)."""
  tables, opt = dict(whole[0]), dict(whole[1])
  for name, t in tier.tables.items():
    rows, cache = t.spec.rows, t.cache.cache_rows
    n = int(rng.integers(1, cache + 1))
    resident, slots = rng.choice(rows, n, replace=False), rng.choice(cache, n, replace=False)
    rest = np.setdiff1d(np.arange(rows), resident)
    values = {"table": whole[0][name], **{f"opt.{k}": v for k, v in whole[1][name].items()}}
    t.store.write(rest, {k: v[rest] for k, v in values.items()})
    t.resident[:] = -1
    t.resident[slots] = resident
    t.dirty[:] = False
    t.dirty[slots] = True

    def cached(x):
      out = np.zeros((cache,) + x.shape[1:], x.dtype)
      out[slots] = x[resident]
      return out
    tables[name] = cached(whole[0][name])
    opt[name] = {k: cached(v) for k, v in whole[1][name].items()}
  return placed(coll, tables, opt)


def offload_meta(tier, snapshots: str) -> dict:
  """The checkpoint meta's `offload` entry, as `train/loop.py` writes it."""
  return {"snapshots": snapshots, "tables": {
      n: {"rows": t.spec.rows, "cache_rows": t.cache.cache_rows, "auto": False,
          "path": t.store.path} for n, t in tier.tables.items()}}


def store_values(tier) -> tuple[dict, dict]:
  """The whole arrays in the tier's stores, as `per_table` gives them."""
  tables, opt = {}, {}
  for name, t in tier.tables.items():
    tables[name] = t.store.read_all("table", 0, t.spec.rows)
    opt[name] = {k[len("opt."):]: t.store.read_all(k, 0, t.spec.rows)
                 for k in t.store.names if k != "table"}
  return tables, opt


def assert_stores_equal(tier, want: tuple[dict, dict]) -> None:
  """Each store of `tier` holds, bit for bit, the whole table and optimizer state `want`
  (`carried` values) gives it."""
  tables, opt = store_values(tier)
  for name in tier.tables:
    pairs = [("table", tables[name], want[0][name])]
    pairs += [(f"opt.{k}", opt[name].get(k), v) for k, v in want[1][name].items()]
    assert sorted(opt[name]) == sorted(want[1][name]), f"store {name}: {sorted(opt[name])}"
    for what, got, w in pairs:
      assert got.dtype == w.dtype and np.array_equal(h.bytes_of(got), h.bytes_of(w)), (
          f"store of offloaded table {name}: {what} differs from the saved one in "
          f"{int((got != w).any(axis=tuple(range(1, got.ndim))).sum())} rows")
