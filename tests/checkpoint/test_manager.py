"""CheckpointManager: bitwise round trip, async safety, retention, corruption fallback."""

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import temporary_paths

from jaxrec.checkpoint import CheckpointError, CheckpointManager, all_finite
from jaxrec.checkpoint import device_copy as device_copy_lib
from jaxrec.checkpoint import tables as tables_lib
from jaxrec.embedding import optimizers
from jaxrec.errors import ConfigError
from tests.checkpoint import ckpt_helpers as h


@pytest.fixture(scope="module")
def coll():
  return h.collection("twrw", 8)


def _data_files(step_dir, item="state"):
  """Data files of the dense `state` item (OCDBT) or of one stored table, smallest first."""
  d = step_dir / "state" / "d" if item == "state" else step_dir / "embeddings" / "tables" / item
  return sorted((str(p) for p in d.iterdir() if not p.name.startswith(".")),
                key=os.path.getsize)


@pytest.mark.parametrize("typed_key", [True, False])
def test_round_trip_is_bitwise(tmp_path, coll, typed_key):
  state = h.train_state(coll, typed_key=typed_key, step=7)
  with CheckpointManager(tmp_path) as mgr:
    assert mgr.save(7, state, coll, data_state={"examples_consumed": np.int64(7 * 64)},
                    meta={"mesh": {"data": 2}, "gin": "x = 1"}, force=True)
    mgr.wait()
    assert mgr.all_steps() == [7]
    assert mgr.latest_valid_step(full=True) == 7
    state2, data_state, meta, host_tables = mgr.restore(state, coll)
  assert host_tables == {}
  h.assert_tables_equal(coll, state, coll, state2)
  h.assert_dense_equal(state, state2)
  assert int(state2["step"]) == 7
  assert data_state == {"examples_consumed": 448}
  assert meta == {"mesh": {"data": 2}, "gin": "x = 1"}
  for a, b in zip(jax.tree.leaves(state2["emb"]), jax.tree.leaves(state["emb"])):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def test_a_state_key_a_checkpoint_does_not_hold_is_refused(tmp_path, coll):
  """`opt` (an optax state under another name) and `ema_params` saved as `save -> True` and
  were gone on disk."""
  state = dict(h.train_state(coll, step=1), ema_params={"w": jnp.ones(3)})
  with CheckpointManager(tmp_path) as mgr:
    with pytest.raises(CheckpointError, match=r"save: the state has keys \['ema_params'\] a "
                       r"checkpoint does not hold \(it holds \['step', 'params', 'opt_state', "
                       r"'rng', 'item_freq'\] and 'emb'\)"):
      mgr.save(1, state, coll, force=True)
    assert mgr.all_steps() == []


@pytest.mark.parametrize("device_copy", ["auto", True, False])
def test_save_copies_state_so_caller_may_donate(tmp_path, coll, device_copy, monkeypatch):
  """Whether the tables go to host on the caller's thread (CPU's `auto`) or, copied on
  their devices first, on the save's background thread, the saved values are those of
  the step, though the caller deletes the state right after `save`."""
  threads = []
  real = tables_lib.host_pieces
  monkeypatch.setattr(tables_lib, "host_pieces", lambda *a: threads.append(
      threading.current_thread().name) or real(*a))
  state = h.train_state(coll, step=3)
  expect = jax.device_get(coll.unstack_tables(state["emb"])[0])
  with CheckpointManager(tmp_path, device_copy=device_copy) as mgr:
    assert mgr.copies_on_device(state["emb"]) == (device_copy is True)   # CPU: auto says no
    mgr.save(3, state, coll, force=True)
    for x in jax.tree.leaves(state):   # what donation to the next step does
      x.delete()
    mgr.wait()
  assert len(threads) == 1
  assert threads[0].startswith("jaxrec_checkpoint") == (device_copy is True), threads
  with CheckpointManager(tmp_path) as mgr:
    fresh = h.train_state(coll, seed=1)
    restored = mgr.restore(fresh, coll).state
  got = jax.device_get(coll.unstack_tables(restored["emb"])[0])
  for name in expect:
    np.testing.assert_array_equal(expect[name], got[name])


def test_device_copy_is_fresh_and_fits_only_with_memory_statistics(coll):
  state = h.train_state(coll, step=1)
  copied = device_copy_lib.copy(state["emb"])
  for a, b in zip(jax.tree.leaves(copied), jax.tree.leaves(state["emb"])):
    assert a.sharding == b.sharding
    for sa, sb in zip(a.addressable_shards, b.addressable_shards):
      assert sa.data.unsafe_buffer_pointer() != sb.data.unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  need = device_copy_lib.bytes_per_device(state["emb"])
  assert len(need) == 8 and sum(need.values()) >= sum(
      x.nbytes for x in jax.tree.leaves(state["emb"]))
  assert not device_copy_lib.fits(state["emb"])       # CPU devices report no statistics

  class _Device:
    def __init__(self, free):
      self.free = free

    def memory_stats(self):
      return {"bytes_limit": 1000 + self.free, "bytes_in_use": 1000}

  class _Shard:
    def __init__(self, device, nbytes):
      self.device, self.data = device, np.zeros(nbytes, np.uint8)

  class _Array:
    def __init__(self, *shards):
      self.addressable_shards = shards

  roomy, tight = _Device(250), _Device(249)
  assert device_copy_lib.fits([_Array(_Shard(roomy, 200))])
  assert not device_copy_lib.fits([_Array(_Shard(roomy, 100), _Shard(tight, 200))])


def test_device_copy_setting_is_checked(tmp_path):
  with pytest.raises(ConfigError, match=r"CheckpointManager.device_copy must be True, False "
                     r"or 'auto', got 'yes'"):
    CheckpointManager(tmp_path, device_copy="yes")


def test_save_every_retention_and_existing_step(tmp_path, coll):
  state = h.train_state(coll)
  with CheckpointManager(tmp_path, max_to_keep=2, save_every=2) as mgr:
    saved = [mgr.save(s, state, coll) for s in range(1, 7)]
    assert saved == [False, True, False, True, False, True]
    assert not mgr.save(6, state, coll, force=True)   # already there
    assert mgr.save(7, state, coll, force=True)
    mgr.wait()
    assert mgr.all_steps() == [6, 7]


@pytest.mark.parametrize("keep", [0, -1])
def test_max_to_keep_below_one_is_refused(tmp_path, keep):
  """`--keep_checkpoints=0` made orbax delete every checkpoint, the final one included."""
  with pytest.raises(ConfigError, match=f"--keep_checkpoints.*{keep}"):
    CheckpointManager(tmp_path, max_to_keep=keep)
  assert not os.listdir(tmp_path)


def test_a_step_directory_that_is_a_link_is_refused_by_a_writer(tmp_path, coll):
  """A step moved to another disk and linked back resumed, then the rotation that reached
  it died in orbax's rmtree ('Cannot call rmtree on a symbolic link', a traceback)."""
  state = h.train_state(coll)
  with CheckpointManager(tmp_path / "ck", max_to_keep=2) as mgr:
    for s in (1, 2):
      mgr.save(s, state, coll, force=True)
    mgr.wait()
  os.rename(tmp_path / "ck" / "1", tmp_path / "elsewhere")
  os.symlink(tmp_path / "elsewhere", tmp_path / "ck" / "1")
  with pytest.raises(ConfigError, match=r"checkpoint .*/ck/1 is a symbolic link \(to "
                     r".*/elsewhere\): rotation \(--keep_checkpoints\) .* cannot delete a link"):
    CheckpointManager(tmp_path / "ck", max_to_keep=2)
  with CheckpointManager(tmp_path / "ck", read_only=True) as mgr:   # readers take it
    assert mgr.all_steps() == [1, 2]
  assert os.path.isdir(tmp_path / "elsewhere")


def test_close_waits_for_orbax_tmp_cleanup(tmp_path, monkeypatch):
  """orbax removes old tmp directories in a thread it starts at creation and its close()
  does not wait for: a run stopping right after (a missing --train_data) printed that
  thread's traceback at interpreter exit, below its `error:` line."""
  done = []
  real = temporary_paths.cleanup_temporary_paths

  async def slow(*args, **kwargs):
    await asyncio.sleep(0.5)
    await real(*args, **kwargs)
    done.append(True)

  monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow)
  CheckpointManager(tmp_path).close()
  assert done


def test_tables_only_checkpoint_takes_dense_values_from_init(tmp_path, coll):
  """A tables-only checkpoint (an import) restored with `init`: the dense part is init's
  even when `target` holds arrays (a NaN rollback passes the diverged state as target),
  the tables are the saved ones; without `init` the dense part is target's."""
  tables, opt = h.per_table_values(coll, seed=3)
  diverged = h.train_state(coll, seed=1, step=9)
  fresh = h.train_state(coll, seed=2)
  with CheckpointManager(tmp_path) as mgr:
    mgr.save_arrays(5, tables, opt)
    got = mgr.restore(diverged, coll, init=lambda: {k: v for k, v in fresh.items()
                                                    if k != "emb"})
    plain = mgr.restore(diverged, coll)
  expect = {**fresh, "step": jnp.int32(5)}
  h.assert_dense_equal(got.state, expect)
  h.assert_dense_equal(plain.state, {**diverged, "step": jnp.int32(5)})
  saved = jax.device_get(coll.unstack_tables(got.state["emb"]))
  for name, x in tables.items():
    np.testing.assert_array_equal(saved[0][name], x)
    for k, v in opt[name].items():
      np.testing.assert_array_equal(saved[1][name][k], v)


def test_a_whole_checkpoint_never_builds_fresh_dense_values(tmp_path, coll):
  """`init` ran for `item_freq` (a two-tower's logQ state), which other models' checkpoints
  and targets lack: every resume built a fresh dense model (~1 s) and discarded it."""
  state = h.train_state(coll, seed=1, step=4)
  calls = []
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(4, state, coll, force=True)
    mgr.wait()
    got = mgr.restore(state, coll, init=lambda: calls.append(1) or {})
  assert not calls and int(got.state["step"]) == 4


def test_no_checkpoint_returns_none(tmp_path, coll):
  with CheckpointManager(tmp_path / "ckpt") as mgr:
    assert mgr.restore(h.dense(coll.mesh), coll) is None
    assert mgr.latest_valid_step() is None


def _two_steps(tmp_path, coll):
  mgr = CheckpointManager(tmp_path)
  s1, s2 = h.train_state(coll, seed=1, step=1), h.train_state(coll, seed=2, step=2)
  mgr.save(1, s1, coll, data_state={"n": 1}, force=True)
  mgr.save(2, s2, coll, data_state={"n": 2}, force=True)
  mgr.wait()
  return mgr, s1, s2


# A failed dense read leaves orbax's tensorstore callbacks aimed at a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("item,damage", [
    ("state", "delete"), ("state", "truncate"), ("state", "flip"), ("state", "manifest"),
    ("t1", "delete"), ("t1", "truncate"), ("t1", "flip"), ("t1", "index")])
def test_corrupt_latest_falls_back_with_warning(tmp_path, coll, item, damage, caplog):
  mgr, s1, _ = _two_steps(tmp_path, coll)
  step_dir = mgr.step_dir(2)
  biggest = _data_files(step_dir, item)[-1]
  if damage == "delete":
    os.remove(biggest)
  elif damage == "truncate":
    os.truncate(biggest, os.path.getsize(biggest) // 2)
  elif damage == "flip":   # silent corruption: caught by the fingerprints
    h.flip_middle_byte(biggest)
  elif damage == "manifest":
    os.remove(step_dir / "manifest" / "metadata")
  else:
    (step_dir / "embeddings" / "index.json").write_text("{")
  with caplog.at_level(logging.WARNING):
    restored = mgr.restore(h.dense(coll.mesh), coll)
  assert str(step_dir) in caplog.text and "corrupt" in caplog.text
  if (item, damage) == ("state", "truncate"):   # names the array and the file
    assert re.search(rf'Error reading "[^"]+" in OCDBT database at local file "{step_dir}/state/',
                     caplog.text), caplog.text
  assert int(restored.state["step"]) == 1 and restored.data_state == {"n": 1}
  h.assert_tables_equal(coll, s1, coll, restored.state)
  # one line for the elastic supervisor's stderr (under launch.py the log above went only
  # to the worker's log file: the operator never heard of the rejected step)
  assert len(mgr.restore_warnings) == 1 and re.match(
      rf"checkpoint\(s\) 2 of {tmp_path} skipped \(corrupt: .+\) and moved to "
      rf"{tmp_path}/rejected; resumed from step 1$", mgr.restore_warnings[0]), mgr.restore_warnings
  # The bad step was moved aside, not deleted; the run can save step 2 again.
  assert mgr.all_steps() == [1]
  assert [p.name.split(".")[0] for p in (tmp_path / "rejected").iterdir()] == ["2"]
  assert mgr.save(2, s1, coll, force=True)
  mgr.wait()
  assert mgr.all_steps() == [1, 2]
  mgr.close()


def test_step_directory_holding_another_step_is_skipped(tmp_path, coll, caplog):
  """A step directory copied or renamed by hand (`cp -r 1 3`) holds step 1: resuming from
  it would train steps 1.. again under the name 3 and skip saving step 3."""
  mgr, _, s2 = _two_steps(tmp_path, coll)
  shutil.copytree(mgr.step_dir(1), tmp_path / "3")
  with caplog.at_level(logging.WARNING):
    restored = mgr.restore(h.dense(coll.mesh), coll)
  assert str(tmp_path / "3") in caplog.text and "holds step 1" in caplog.text
  assert int(restored.state["step"]) == 2
  h.assert_tables_equal(coll, s2, coll, restored.state)
  assert [p.name.split(".")[0] for p in (tmp_path / "rejected").iterdir()] == ["3"]
  mgr.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_none_valid_is_a_clear_error_and_moves_nothing(tmp_path, coll):
  mgr, _, _ = _two_steps(tmp_path, coll)
  for step in (1, 2):
    os.remove(_data_files(mgr.step_dir(step))[-1])
  with pytest.raises(CheckpointError, match="no valid checkpoint"):
    mgr.restore(h.dense(coll.mesh), coll)
  with pytest.raises(CheckpointError, match="no valid checkpoint"):
    mgr.latest_valid_step()
  assert mgr.all_steps() == [1, 2] and not (tmp_path / "rejected").exists()
  mgr.close()


def test_restore_by_step_and_nan_rollback(tmp_path, coll):
  mgr, s1, s2 = _two_steps(tmp_path, coll)
  with CheckpointManager(tmp_path, read_only=True) as reader:
    assert int(reader.restore(s1, coll, step=1).state["step"]) == 1
    assert reader.all_steps() == [1, 2]
  with pytest.raises(CheckpointError, match="no checkpoint for step 5"):
    mgr.restore(s1, coll, step=5)
  bad = dict(s2, params=jax.tree.map(lambda x: x * jnp.nan, s2["params"]))
  mgr.save(3, bad, coll, force=True)
  restored = mgr.restore(s1, coll, require_finite=True)
  assert int(restored.state["step"]) == 2 and all_finite(restored.state)
  assert mgr.all_steps() == [1, 2]   # step 3 moved to rejected/
  # Continuing from an older step: the newer one is superseded.
  assert int(mgr.restore(s1, coll, step=1).state["step"]) == 1
  assert mgr.all_steps() == [1]
  assert sorted(p.name.split(".")[1] for p in (tmp_path / "rejected").iterdir()) == [
      "nonfinite", "superseded"]
  mgr.close()


def test_a_rollback_whose_every_checkpoint_is_non_finite_starts_over(tmp_path, coll):
  """A state can overflow while its loss stays finite, and be saved: the rollback then
  said 'no valid checkpoint' (and a rerun resumed the same inf state). Now those steps are
  set aside and the restore returns None: the loop starts from the initial state."""
  state = h.train_state(coll, step=1)
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(1, dict(state, params=jax.tree.map(lambda x: x * jnp.inf, state["params"])),
             coll, force=True)
    assert mgr.restore(state, coll, require_finite=True) is None
    assert mgr.all_steps() == []
    assert [p.name.split(".")[:2] for p in (tmp_path / "rejected").iterdir()] == [
        ["1", "nonfinite"]]


def test_config_mismatch_is_config_error(tmp_path, coll):
  state = h.train_state(coll)
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(1, state, coll, force=True)
    other = h.collection("rw", 8, rows=(13, 21, 7, 32))
    with pytest.raises(ConfigError, match="table 't1'"):
      mgr.restore(state, other)
    with pytest.raises(ConfigError, match="optimizer"):
      mgr.restore(state, h.collection("rw", 8, optimizer=optimizers.RowWiseAdagrad()))
    wrong = dict(state, params={"bottom": state["params"]["bottom"]})
    with pytest.raises(ConfigError, match="'params'"):
      mgr.restore(wrong, coll)
    assert mgr.all_steps() == [1]


def test_a_changed_model_is_named_by_its_params(tmp_path, coll):
  """A changed layer changes params and opt_state; the error named 'opt_state/0/mu/...'
  (checked first, in name order) and showed the missing leaves as None."""
  state = h.train_state(coll)
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(1, state, coll, force=True)
    params = dict(state["params"], top={"kernel": jnp.zeros((3, 2))})   # a wider layer
    changed = dict(state, params=params, opt_state=optax.adam(1e-3).init(params))
    with pytest.raises(ConfigError) as e:
      mgr.restore(changed, coll)
  assert str(e.value).startswith("'params' in checkpoint"), e.value
  assert "['params/top/kernel'] (checkpoint: [([3, 1], 'float32')], model: [([3, 2], " \
      "'float32')])" in str(e.value)
  removed = dict(state, params={"bottom": state["params"]["bottom"]})
  with CheckpointManager(tmp_path) as mgr, pytest.raises(ConfigError, match=r"model: \['absent'"):
    mgr.restore(removed, coll)


_KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import tests.conftest
    from jaxrec.checkpoint import CheckpointManager
    from tests.checkpoint import ckpt_helpers as h
    coll = h.collection("rw", 8, rows=(4096, 20, 7, 32), dim=64)
    mgr = CheckpointManager({path!r})
    mgr.save(1, h.train_state(coll, seed=1, step=1), coll, force=True)
    mgr.wait()
    mgr.save(2, h.train_state(coll, seed=2, step=2), coll, force=True)
    os.kill(os.getpid(), signal.SIGKILL)   # mid-save
""")


def test_kill_mid_save_leaves_no_valid_looking_checkpoint(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = str(tmp_path / "ckpt")
  proc = subprocess.run([sys.executable, "-c", _KILLED_CHILD.format(root=root, path=path)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  coll = h.collection("rw", 8, rows=(4096, 20, 7, 32), dim=64)
  mgr = CheckpointManager(path)
  steps = mgr.all_steps()
  assert steps in ([1], [1, 2])
  expect = h.train_state(coll, seed=steps[-1], step=steps[-1])
  restored = mgr.restore(h.dense(coll.mesh), coll)
  h.assert_tables_equal(coll, expect, coll, restored.state)
  mgr.save(3, expect, coll, force=True)   # waits for the tmp-directory cleanup first
  mgr.close()
  assert not [p for p in os.listdir(path) if "tmp" in p]


def test_a_damaged_json_item_is_named_in_the_fallback_warning(tmp_path, coll, caplog):
  """The warning gave orbax's JSONDecodeError alone ('Expecting property name enclosed in
  double quotes: line 1 column 2'), not which of the step's files it was."""
  mgr, _, _ = _two_steps(tmp_path, coll)
  (mgr.step_dir(2) / "meta" / "metadata").write_text("{bad")
  with caplog.at_level(logging.WARNING):
    restored = mgr.restore(h.dense(coll.mesh), coll)
  assert int(restored.state["step"]) == 1 and restored.data_state == {"n": 1}
  assert f"{mgr.step_dir(2)}/meta/metadata:1: not valid JSON" in caplog.text, caplog.text
  mgr.close()
