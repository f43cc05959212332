"""Checkpoints of tables with optimizers of their own (`optimizers.TableOptimizers`): each
table's state is stored under its name as its own optimizer shapes it, restores on any
device count and plan, and a table whose optimizer changed between save and restore
starts its state fresh (or is refused) while the others restore theirs."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointManager, storage
from jaxrec.checkpoint import tables as tables_lib
from jaxrec.embedding import optimizers
from jaxrec.errors import ConfigError
from tests.checkpoint import ckpt_helpers as h

ADAGRAD = optimizers.Adagrad(0.1, initial_accumulator=0.1)   # fresh state is not zero
# t1 keeps the default (no state); t0 row-wise, t2 two moments, t3 per element
MIXED = {"t0": optimizers.RowWiseAdagrad(0.1), "t2": optimizers.Adam(0.01), "t3": ADAGRAD}


def _mixed(**changes):
  return optimizers.per_table(optimizers.SGD(0.1), dict(MIXED, **changes))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """`(directory, collection, state)`: step 3 of the mixed optimizers on twrw, 8 devices."""
  coll = h.collection("twrw", 8, optimizer=_mixed())
  state = h.train_state(coll, step=3)
  directory = tmp_path_factory.mktemp("mixed")
  with CheckpointManager(directory) as mgr:
    mgr.save(3, state, coll, force=True)
  return directory, coll, state


def _restore(directory, coll):
  with CheckpointManager(directory, read_only=True) as mgr:
    return mgr.restore(h.dense(coll.mesh), coll).state


def test_each_table_stores_its_own_optimizer_state(saved):
  directory, _, _ = saved
  arrays = tables_lib.read_index(directory / "3" / "embeddings")["arrays"]
  assert {n: a["shape"] for n, a in arrays.items() if n.startswith("table_opt/")} == {
      "table_opt/t0/accum": [13], "table_opt/t2/m": [7, 8], "table_opt/t2/v": [7, 8],
      "table_opt/t3/accum": [32, 8]}


@pytest.mark.parametrize("kind,devices", [("twrw", 8), ("grid", 4), ("rw", 1), ("tw", 6)])
def test_round_trip_on_any_device_count_and_plan(saved, kind, devices):
  directory, coll, state = saved
  new = h.collection(kind, devices, optimizer=_mixed())
  restored = _restore(directory, new)
  h.assert_tables_equal(coll, state, new, restored)   # tables and each one's state, bitwise
  if (kind, devices) == ("twrw", 8):   # the same layout: every stacked array too
    for a, b in zip(jax.tree.leaves(restored["emb"]), jax.tree.leaves(state["emb"])):
      np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


@pytest.mark.parametrize("now", [ADAGRAD, optimizers.FTRL(initial_accumulator=0.2)],
                         ids=["joins_t3_stack", "own_stack"])
def test_a_table_whose_optimizer_gained_state_starts_it_fresh(saved, caplog, now):
  """t1 was SGD (no state): with Adagrad it shares t3's stack, whose state restores; with
  FTRL it is a stack of its own. Either way its state starts at the optimizer's initial
  values, with a warning naming it; its rows and the other tables' state restore."""
  directory, coll, state = saved
  new = h.collection("grid", 4, optimizer=_mixed(t1=now))
  with caplog.at_level(logging.WARNING):
    restored = _restore(directory, new)
  warned = [r.getMessage() for r in caplog.records if "starting theirs fresh" in r.getMessage()]
  assert len(warned) == 1 and f"table(s) 't1' ({type(now).__name__})" in warned[0], warned
  tables, opt = jax.device_get(coll.unstack_tables(state["emb"]))
  got_tables, got_opt = jax.device_get(new.unstack_tables(restored["emb"]))
  for name in tables:
    np.testing.assert_array_equal(got_tables[name], tables[name], err_msg=name)
  for k, (_, initial) in now.state_layout().items():
    np.testing.assert_array_equal(got_opt["t1"][k], np.full((20, 8), initial, np.float32))
  for name in ("t0", "t2", "t3"):
    assert sorted(got_opt[name]) == sorted(opt[name])
    for k in opt[name]:
      np.testing.assert_array_equal(got_opt[name][k], opt[name][k], err_msg=f"{name}/{k}")


@pytest.mark.parametrize("changes,table,saved_with,first", [
    # other state: not converted
    ({"t2": ADAGRAD}, "t2", "Adam", r"'table_opt/t2/accum': the checkpoint has none, the "
                                    r"optimizer keeps \[\d+, \d+\] float32"),
    # state dropped: refused too
    ({"t0": optimizers.SGD(0.5)}, "t0", "RowWiseAdagrad",
     r"'table_opt/t0/accum': the checkpoint has \[\d+\] float32, the optimizer keeps none"),
])
def test_a_table_whose_state_does_not_fit_is_refused_by_name(saved, changes, table, saved_with,
                                                             first):
  directory, _, _ = saved
  with pytest.raises(ConfigError, match=rf"table '{table}': checkpoint .* has sparse optimizer "
                     rf"state that does not fit the configured \w+ \(first difference: {first}\)"
                     r".* configure the optimizer "
                     rf"it was saved with \(ExperimentConfig\.table_optimizers = "
                     rf"\{{'{table}': @{saved_with}\(\)\}}\), or start a fresh --workdir$"):
    _restore(directory, h.collection("rw", 8, optimizer=_mixed(**changes)))


def test_one_optimizer_checkpoint_onto_per_table_optimizers(tmp_path, caplog):
  """A checkpoint of one optimizer (SGD) restores onto per-table optimizers: the tables
  that have state now start it fresh. The plain-optimizer warning (no state at all)."""
  coll = h.collection("rw", 8, optimizer=optimizers.SGD(0.1))
  state = h.train_state(coll, step=2)
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(2, state, coll, force=True)
  new = h.collection("tw", 8, optimizer=_mixed())
  with caplog.at_level(logging.WARNING):
    restored = _restore(tmp_path, new)
  assert any("has no sparse optimizer state; starting it fresh" in r.getMessage()
             for r in caplog.records)
  _, opt = jax.device_get(new.unstack_tables(restored["emb"]))
  np.testing.assert_array_equal(opt["t3"]["accum"], np.float32(0.1))
  np.testing.assert_array_equal(opt["t2"]["m"], 0.0)
  assert "t1" not in opt


def _drop_from_index(step_dir, array):
  for name in ("index.json", "fingerprints.0.json"):
    path = step_dir / "embeddings" / name
    data = json.loads(path.read_text())
    (data["arrays"] if name == "index.json" else data).pop(array)
    path.write_text(json.dumps(data))


def test_the_step_check_takes_each_tables_own_optimizer_arrays(saved, tmp_path):
  """The manifest records each table's optimizer arrays (`opt`): tables that differ are
  a valid step, one that lost an array from the index is not (named)."""
  directory, _, _ = saved
  manifest = storage.read_json(directory / "3", storage.MANIFEST)
  assert {n: t["opt"] for n, t in manifest["tables"].items()} == {
      "t0": ["accum"], "t1": [], "t2": ["m", "v"], "t3": ["accum"]}
  storage.check_step(directory / "3", full=True)
  shutil.copytree(directory / "3", tmp_path / "3")
  _drop_from_index(tmp_path / "3", "table_opt/t2/v")
  with pytest.raises(ValueError, match=r"index.json does not list the sparse optimizer array "
                     r"'v' of table 't2' \(the manifest records \['m', 'v'\]\)"):
    storage.check_step(tmp_path / "3")


def test_a_manifest_without_opt_checks_every_table_alike(tmp_path):
  """A checkpoint saved before tables had optimizers of their own records no `opt`: every
  table must list the same optimizer arrays, as before."""
  coll = h.collection("rw", 8)   # Adagrad for every table
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(1, h.train_state(coll, step=1), coll, force=True)
  path = storage._json_item(tmp_path / "1", storage.MANIFEST)  # pylint: disable=protected-access
  manifest = json.loads(path.read_text())
  for t in manifest["tables"].values():
    del t["opt"]
  path.write_text(json.dumps(manifest))
  storage.check_step(tmp_path / "1", full=True)
  _drop_from_index(tmp_path / "1", "table_opt/t2/accum")
  with pytest.raises(ValueError, match=r"the sparse optimizer array 'accum' is listed for one "
                     r"of tables 't0' and 't2' but not the other"):
    storage.check_step(tmp_path / "1")


# Tables of one family, four rates: saved when every rate had stacks of its own (the rule
# before tables that differ only in `lr` shared stacks, `optimizers.family` keyed by the
# whole optimizer), restored where they share one stack.
RATES = {"t1": optimizers.RowWiseAdagrad(0.05, 0.1), "t2": optimizers.RowWiseAdagrad(0.2, 0.1),
         "t3": optimizers.RowWiseAdagrad(0.3, 0.1)}
B = 16


def _rates():
  return optimizers.per_table(optimizers.RowWiseAdagrad(0.1, 0.1), RATES)


def _train(coll, emb, steps, start):
  """`steps` lookup + pool + update steps of `coll` from step `start` (inputs of that step
  only: the same whatever the stacking); the per-table arrays and state after them."""
  @jax.jit
  def step(emb, ids, gout, i):
    ctx = coll.lookup(emb, ids)
    _, vjp = jax.vjp(lambda r: coll.pool(r, ctx), ctx.rows)
    return coll.apply_gradients(emb, ctx, vjp(gout)[0], i)

  for i in range(start, start + steps):
    rng = np.random.default_rng(i)
    ids = {f.name: rng.integers(-1, t.rows, (B, f.max_len)).astype(np.int32)
           for f, t in zip(coll.features, coll.tables)}
    gout = rng.standard_normal((B, len(coll.features), h.DIM)).astype(np.float32)
    emb = step(emb, ids, gout, jax.numpy.int32(i))
  return jax.device_get(coll.unstack_tables(emb))


def test_a_checkpoint_of_a_stack_per_rate_restores_into_one_stack_and_trains_on(tmp_path,
                                                                                 monkeypatch):
  with monkeypatch.context() as m:   # the stacking before: one stack per optimizer
    m.setattr(optimizers, "family", lambda opt: opt)
    old = h.collection("twrw", 8, optimizer=_rates())
  assert len(old.layouts) == 4 and all(l.rates is None for l in old.layouts)
  state = h.train_state(old, step=3)
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(3, state, old, force=True)
  never_stopped = _train(old, state["emb"], 3, start=3)
  for kind, devices in [("twrw", 8), ("grid", 4)]:
    new = h.collection(kind, devices, optimizer=_rates())
    assert [len(l.slots) for l in new.layouts] == [4] and new.layouts[0].rates == (
        0.1, 0.05, 0.2, 0.3)
    restored = _restore(tmp_path, new)
    h.assert_tables_equal(old, state, new, restored)
    tables, opt = _train(new, restored["emb"], 3, start=3)
    for name, want in never_stopped[0].items():
      np.testing.assert_allclose(tables[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
      np.testing.assert_allclose(opt[name]["accum"], never_stopped[1][name]["accum"],
                                 rtol=1e-6, atol=1e-7, err_msg=name)
