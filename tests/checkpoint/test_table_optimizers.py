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
