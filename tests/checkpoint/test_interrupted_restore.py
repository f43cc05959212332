"""Ctrl-C (deferred by scripts/train.py) during a checkpoint restore or an offloaded
table's store initialisation: raised between blocks, not once the whole read is done."""

import contextlib
import os
import signal

import jax
import pytest

from jaxrec import offload, signals
from jaxrec.checkpoint import CheckpointManager
from jaxrec.checkpoint import tables as tables_lib
from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import TableSpec
from jaxrec.offload import store as store_lib
from tests.checkpoint import ckpt_helpers as h


def _signal_on_call(monkeypatch, module, name, on_call: int) -> list:
  """Patches `module.name` to send this process SIGINT in call `on_call` (1-based);
  returns the list of calls made (one entry each)."""
  fn, calls = getattr(module, name), []

  def wrapped(*args, **kwargs):
    calls.append(1)
    if len(calls) == on_call:
      os.kill(os.getpid(), signal.SIGINT)
    return fn(*args, **kwargs)
  monkeypatch.setattr(module, name, wrapped)
  return calls


@contextlib.contextmanager
def _deferred():
  """`signals.deferred()`, with a signal still recorded at the end dropped: a failure here
  must not end the pytest run with it."""
  with signals.deferred():
    try:
      yield
    finally:
      with contextlib.suppress(KeyboardInterrupt):
        signals.check()


def test_ctrl_c_during_a_restore_stops_after_the_block_being_read(tmp_path, monkeypatch):
  """It waited for every block of every table (and the first compile after), and the
  checkpoint must not count as damaged for it (KeyboardInterrupt is no read error)."""
  coll = h.collection("rw", 8)
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(3, h.train_state(coll, seed=1, step=3), coll, force=True)
  calls = _signal_on_call(monkeypatch, tables_lib, "_read_block", on_call=1)
  with _deferred(), CheckpointManager(tmp_path) as mgr:
    with pytest.raises(KeyboardInterrupt):
      mgr.restore(h.dense(coll.mesh), coll)
    assert mgr.all_steps() == [3]
  assert len(calls) == 1   # the first block of the first array
  assert not (tmp_path / "rejected").exists()


def test_ctrl_c_while_a_store_is_initialised_stops_between_blocks(tmp_path, monkeypatch):
  monkeypatch.setattr(store_lib, "_INIT_BLOCK_ROWS", 100)
  spec = TableSpec("big", 1000, 8)
  store = store_lib.TableStore(spec, offload.OffloadTable("big", cache_rows=100, chunk_rows=64),
                               optimizers.Adagrad(), str(tmp_path / "big"))
  calls = _signal_on_call(monkeypatch, store_lib, "init_rows", on_call=2)
  with _deferred():
    with pytest.raises(KeyboardInterrupt):
      store.create(jax.random.key(0))
  assert len(calls) == 2   # of 10 blocks
