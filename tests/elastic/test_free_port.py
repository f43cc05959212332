"""`procs.free_port` and `procs.port_in_use` test the address the coordination service binds,
`[::]` (dual stack): they tested 127.0.0.1 and `0.0.0.0`, so a port held on an IPv6 address
was handed out and found free, and the workers started again on a new port."""

import errno
import socket

import pytest

from jaxrec.elastic import procs


def _ipv6() -> bool:
  try:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
      s.bind(("::1", 0))
    return True
  except OSError:
    return False


def _v6only(s):
  s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


@pytest.mark.skipif(not _ipv6(), reason="no IPv6 on this host")
@pytest.mark.parametrize("family,host,setup", [
    (socket.AF_INET6, "::1", None),             # IPv6 loopback
    (socket.AF_INET6, "::", _v6only),           # every IPv6 address, no IPv4
    (socket.AF_INET, "127.0.0.1", None)])
def test_a_port_held_on_another_address_is_in_use(family, host, setup):
  with socket.socket(family, socket.SOCK_STREAM) as held:
    if setup:
      setup(held)
    held.bind((host, 0))
    held.listen()
    port = held.getsockname()[1]
    assert procs.port_in_use(port)
  assert not procs.port_in_use(port)


class _Recording(socket.socket):
  """A socket that records the (family, host) of its binds; IPv6 refused with `no_ipv6`."""
  binds: list = []
  no_ipv6 = False

  def __init__(self, family=socket.AF_INET, *args, **kwargs):
    if family == socket.AF_INET6 and self.no_ipv6:
      raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
    super().__init__(family, *args, **kwargs)

  def bind(self, address):
    self.binds.append((self.family, address[0]))
    super().bind(address)


@pytest.mark.parametrize("no_ipv6", [False, True])
def test_free_port_tests_the_address_port_in_use_tests(monkeypatch, no_ipv6):
  """Both bind where the coordinator does; with no IPv6 in the kernel, both on `0.0.0.0`."""
  if not no_ipv6 and not _ipv6():
    pytest.skip("no IPv6 on this host")
  monkeypatch.setattr(_Recording, "binds", [])
  monkeypatch.setattr(_Recording, "no_ipv6", no_ipv6)
  monkeypatch.setattr(socket, "socket", _Recording)
  port = procs.free_port()
  assert not procs.port_in_use(port)
  expected = (socket.AF_INET, "0.0.0.0") if no_ipv6 else (socket.AF_INET6, "::")
  assert _Recording.binds == [expected, expected], _Recording.binds
  with _Recording(socket.AF_INET, socket.SOCK_STREAM) as held:
    held.bind(("127.0.0.1", port))
    held.listen()
    assert procs.port_in_use(port)



def test_a_port_that_cannot_be_bound_is_neither_free_nor_taken(refused_binds):
  """EACCES read as 'free': the coordinator's bind then failed (or crashed) later."""
  with pytest.raises(procs.PortUnusable) as e:
    procs.port_in_use(80)
  assert str(e.value) == ("TCP port 80 cannot be bound on [::] or 0.0.0.0 "
                          "(EACCES: Permission denied)")
  with pytest.raises(procs.PortUnusable, match=r"^no TCP port can be bound .*\(EACCES: "):
    procs.free_port()
