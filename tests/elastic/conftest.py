"""Fixtures shared by the elastic tests."""

import errno
import socket

import pytest


@pytest.fixture(name="refused_binds")
def _refused_binds(monkeypatch):
  """Every socket bind fails as a privileged port or a sandbox refuses it (EACCES; the
  tests run as root, which may bind any port)."""
  def bind(self, address):
    raise PermissionError(errno.EACCES, "Permission denied")
  monkeypatch.setattr(socket.socket, "bind", bind)
