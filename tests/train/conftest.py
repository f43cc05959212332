"""Fixtures shared by the signal and termination tests."""

import pytest

from jaxrec import signals


class Exited(BaseException):
  """What the patched `signals._exit` raises: the code the process would have exited with."""


@pytest.fixture(name="exits")
def _exits(monkeypatch):
  """`signals._exit` raises `Exited(code)` instead of ending the test process."""
  def fake_exit(code):
    raise Exited(code)
  monkeypatch.setattr(signals, "_exit", fake_exit)
