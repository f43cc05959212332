"""The processes of a multi-process save writing one tables database together.

One OCDBT database takes one writer unless its writers share a coordinator: tensorstore's
`ts.ocdbt.DistributedCoordinatorServer` leases the database's B+tree nodes to the
processes in turn, and every write that meets another process's keys goes through that
process, so two processes writing rows of the same stored chunk (a table split between
them at a row that is not a chunk boundary: an uneven `rw` split, `twrw`, `grid`) each
read-modify-write it in turn; neither loses the other's rows.

`writers` sets that up for one `embeddings` item, through jax's distributed key-value
store (the coordination service `jax.distributed.initialize` started):

  1. process 0 starts a coordinator server (port chosen by the system) and publishes
     `<host>:<port>`, `<host>` that of jax's coordinator address (the host the other
     processes already reach process 0 at);
  2. every process tries a TCP connection to it and publishes whether it got one; all
     read all answers, so all choose the same layout: one database when every process
     reached the server, else the directory of files per array (a warning says why);
  3. process 0 creates the arrays (their metadata, one commit) and publishes that it did
     (or that it failed: the others then raise rather than wait);
  4. all write their rows through the shared coordinator context;
  5. all meet at a barrier before process 0 stops the server (a process still writing
     needs it) and deletes the item's keys (one still to read them needs them).

Process 0 failing to start the server is a files save too (every process reads that).
Only process 0's port is tried: every process also serves the database's writes on a port
of its own (tensorstore's cooperator), which the others reach when they write keys whose
B+tree node it leases.

A process that dies mid-save leaves the others waiting at most `TIMEOUT_MS` at a key or
the barrier, then the save fails; what it wrote is in orbax's temporary step directory,
which is never committed (as for the files layout).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import socket
from typing import Callable, Iterator

import jax
import tensorstore as ts
from etils import epath
from jax._src import distributed

TIMEOUT_MS = 10 * 60 * 1000   # a process this much later than the others fails the save
PROBE_S = 10.0                # a TCP connection to the coordinator not made by then: files
_attempts: collections.Counter = collections.Counter()   # saves into one directory name


@dataclasses.dataclass
class Writers:
  """How this process writes one item: `database` (else the files per array), through
  `context`; `creates`: this process creates the arrays, then calls `created(ok)`; the
  others call `wait_created()` before opening them (a database's arrays only)."""
  database: bool
  context: ts.Context
  creates: bool
  created: Callable[[bool], None] = lambda ok: None
  wait_created: Callable[[], None] = lambda: None


def _client():
  return distributed.global_state.client


def _reaches(address: str) -> bool:
  host, port = address.rsplit(":", 1)
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S):
      return True
  except OSError:
    return False


@contextlib.contextmanager
def writers(directory: epath.Path, database: bool) -> Iterator[Writers]:
  """`Writers` of the item at `directory`: `database` asks for one database (a multi-process
  save gets one when its processes share a coordinator, see the module docstring)."""
  count, client = jax.process_count(), _client()
  if not database or count == 1 or client is None:
    yield Writers(database and count == 1, ts.Context(), True)
    return
  me = jax.process_index()
  name = f"{directory.parent.name}/{directory.name}"   # the same on every process
  _attempts[name] += 1   # a retried save of one step: other keys (its old ones deleted)
  key = f"jaxrec_tables/{name}/{_attempts[name]}"
  server = None
  try:
    if me == 0:
      address = "none"
      try:
        server = ts.ocdbt.DistributedCoordinatorServer({"bind_addresses": ["[::]:0"]})
        host = str(distributed.global_state.coordinator_address or "localhost")
        address = f"{host.rsplit(':', 1)[0]}:{server.port}"
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("could not start the tables database's coordinator: %s", e)
      client.key_value_set(f"{key}/address", address, allow_overwrite=True)
    address = client.blocking_key_value_get(f"{key}/address", TIMEOUT_MS)
    client.key_value_set(f"{key}/reached/{me}",
                         "1" if address != "none" and _reaches(address) else "0",
                         allow_overwrite=True)
    missed = [p for p in range(count)
              if client.blocking_key_value_get(f"{key}/reached/{p}", TIMEOUT_MS) != "1"]
    if missed:
      if me == 0:
        logging.warning("processes %s could not reach the tables database's coordinator at "
                        "%s: this save writes a directory of files per array", missed, address)
      yield Writers(False, ts.Context(), True)
      return

    def created(ok: bool):
      client.key_value_set(f"{key}/created", "1" if ok else "0", allow_overwrite=True)

    def wait_created():
      if client.blocking_key_value_get(f"{key}/created", TIMEOUT_MS) != "1":
        raise RuntimeError(f"process 0 failed to create the tables database in {directory} "
                           "(its log says why)")

    yield Writers(True, ts.Context({"ocdbt_coordinator": {"address": address}}), me == 0,
                  created, wait_created)
  finally:   # every process past its last read of a key and its last commit, then the
    try:     # server stops and the keys go
      client.wait_at_barrier(f"{key}/done", TIMEOUT_MS)
    finally:
      server = None
      if me == 0:
        try:
          client.key_value_delete(key)
        except Exception:  # pylint: disable=broad-except
          logging.warning("could not delete the key-value store's keys under %s", key)
