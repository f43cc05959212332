"""A failed read of a restore (or of an int8 table read as float32) is raised only once
the reads started with it are done: none still fills a buffer after the error."""

import types

import numpy as np
import pytest

from jaxrec.checkpoint import dequantized
from jaxrec.checkpoint import tables as tables_lib
from tests import fake_futures

GONE = ValueError("NOT_FOUND: Error reading local file")


class _Table:
  """A stored per-row array whose `[index].read()` is a fake future (fails with `error`)."""

  def __init__(self, rows, error, log):
    self.shape, self.error, self.log = (rows,), error, log

  def __getitem__(self, index):
    return types.SimpleNamespace(read=lambda: fake_futures.Future(self.log, self.error))


def test_a_failed_table_read_of_a_restore_waits_for_the_other_tables():
  slots = [types.SimpleNamespace(name=f"t{i}", rows=2) for i in range(3)]
  layout = types.SimpleNamespace(slots=slots, slot_start=lambda s: 2 * slots.index(s))
  log = []
  handles = {s.name: _Table(2, GONE if s.name == "t0" else None, log) for s in slots}
  with pytest.raises(ValueError, match="Error reading"):
    tables_lib._read_block(layout, lambda n: n, (6,), np.float32,   # pylint: disable=protected-access
                           ((0, 6),), handles, {})
  assert len(log) == 3 and all(f.waited for f in log)


def test_a_failed_read_of_an_int8_table_waits_for_its_scale_and_bias():
  log = []
  block = dequantized._Block(*(fake_futures.Future(log, GONE if i == 0 else None)  # pylint: disable=protected-access
                              for i in range(3)))
  assert block.exception() is GONE and all(f.waited for f in log)
  for f in log:
    f.waited = False
  with pytest.raises(ValueError, match="Error reading"):
    block.read().result()
  assert len(log) == 3 and all(f.waited for f in log)
