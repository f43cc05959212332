"""One process of a 2-process save (jax.distributed, 4 CPU devices each) of a `rw`
collection of many small tables: `python two_process_save.py PROCESS PORT DIRECTORY
TABLES [DTYPE [restore]]`. The state is `ckpt_helpers.train_state(seed=3, step=1)` (values
of numpy's generator: the same on any mesh). Prints `layout=database|files` on process 0.
With `restore`: restores that save on `table=2,row=4` (`twrw`: each table on one half of
the devices, its rows over 4 of them, so each process reads a part of the stored chunks)
and checks every table and its optimizer state bit for bit on both processes; prints
`restored=N` (tables checked)."""

import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(process, port, directory, tables, dtype="float32", mode="save"):
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, process)
  sys.path.insert(0, ROOT)
  if mode == "restore":
    restore_and_check(directory, tables, dtype)
    return
  # pylint: disable=import-outside-toplevel
  from jaxrec.checkpoint import CheckpointManager
  from jaxrec.checkpoint import tables as tables_lib
  from tests.checkpoint import ckpt_helpers as h
  coll = two_process_collection(h, tables, dtype)
  state = h.train_state(coll, seed=3, step=1) if jax.process_count() == 1 else \
      two_process_state(h, coll)
  with CheckpointManager(directory) as mgr:
    mgr.save(1, state, coll, force=True)
    mgr.wait()
  if process == 0:
    database = tables_lib.uses_database(os.path.join(directory, "1", "embeddings"))
    print(f"layout={'database' if database else 'files'}", flush=True)


def restore_and_check(directory, tables, dtype):
  """The save restored on `table=2,row=4` (`twrw`) across the two processes: every table
  and its Adagrad state gathered whole on every device and compared bit for bit."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxrec.checkpoint import CheckpointManager
  from jaxrec.embedding import optimizers
  from jaxrec.embedding.collection import EmbeddingCollection
  from jaxrec.sharding.mesh import make_mesh
  from jaxrec.sharding.plan import uniform_plan
  from tests.checkpoint import ckpt_helpers as h
  specs, features = h.specs(tuple((13, 20, 7, 32)[i % 4] + i % 3 for i in range(tables)),
                            dtype=dtype)
  mesh = make_mesh({"table": 2, "row": 4}, devices=jax.devices())
  coll = EmbeddingCollection.create(specs, features, uniform_plan("twrw", specs, 2), mesh,
                                    optimizers.Adagrad())
  rep = NamedSharding(mesh, P())
  target = jax.jit(lambda: h.dense(mesh, 3), out_shardings=rep)()
  with CheckpointManager(directory) as mgr:
    restored = mgr.restore(target, coll)
  assert restored is not None and int(jax.device_get(restored.state["step"])) == 1
  got, got_opt = jax.device_get(jax.jit(coll.unstack_tables, out_shardings=rep)(
      restored.state["emb"]))
  want, want_opt = h.per_table_values(coll, 3)
  for t in coll.tables:
    expect = np.asarray(h._as_dtype(want[t.name], t.dtype))  # pylint: disable=protected-access
    np.testing.assert_array_equal(h.bytes_of(got[t.name]), h.bytes_of(expect), t.name)
    for k, v in want_opt[t.name].items():
      np.testing.assert_array_equal(h.bytes_of(got_opt[t.name][k]), h.bytes_of(v), t.name)
  print(f"restored={len(coll.tables)}", flush=True)


def two_process_collection(h, tables, dtype="float32", devices=8):
  """`tables` tables of 7-34 rows on `row=devices` (`rw`), the processes' devices taking
  turns along the rows (in a job of several): every device boundary a process boundary,
  most inside a table, whose one stored chunk both processes write."""
  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding import optimizers
  from jaxrec.embedding.collection import EmbeddingCollection
  from jaxrec.sharding.mesh import make_mesh
  from jaxrec.sharding.plan import uniform_plan
  specs, features = h.specs(tuple((13, 20, 7, 32)[i % 4] + i % 3 for i in range(tables)),
                            dtype=dtype)
  by_process = [[d for d in jax.devices()[:devices] if d.process_index == p]
                for p in range(jax.process_count())]
  mesh = make_mesh({"row": devices}, devices=[d for turn in zip(*by_process) for d in turn])
  return EmbeddingCollection.create(specs, features, uniform_plan("rw", specs, 1), mesh,
                                    optimizers.Adagrad())


def two_process_state(h, coll):
  """`h.train_state(coll, seed=3, step=1)` where `jax.device_put` cannot place host values
  on other processes' devices: the dense part made in a program (its values are the same)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=C0415
  rep = NamedSharding(coll.mesh, P())
  state = jax.jit(lambda: h.dense(coll.mesh, 3), out_shardings=rep)()
  state["step"] = jax.jit(lambda: jnp.int32(1), out_shardings=rep)()
  tables, opt = h.per_table_values(coll, 3)
  typed = {t.name: h._as_dtype(tables[t.name], t.dtype)  # pylint: disable=protected-access
           for t in coll.tables}
  state["emb"] = jax.jit(coll.stack_tables, out_shardings=coll.shardings())(typed, opt)
  return state


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
