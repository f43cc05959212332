"""The host copy a save makes: the rows that hold tables, not a stack's padding."""

import jax
import numpy as np

from jaxrec.checkpoint import tables as tables_lib
from tests.checkpoint import ckpt_helpers as h


def test_a_save_copies_the_tables_rows_not_the_stacks_padding(monkeypatch):
  """A `tw` plan pads every table slice to its largest: a skewed `table=8` plan held 4.8
  GiB of stacks for 0.66 GiB of tables, and the save copied all of it to host (5.4 s with
  the loop blocked). Here a stack of 2,000 rows (a slice of 1,000) holds 1,030."""
  coll = h.collection("tw", 4, rows=(1000, 10, 10, 10))
  state = h.train_state(coll, seed=1)
  copied = []
  real_copyto = np.copyto
  monkeypatch.setattr(np, "copyto", lambda dst, src: copied.append(dst.nbytes) or
                      real_copyto(dst, src))
  pieces = tables_lib.host_pieces(coll, state["emb"])
  real = sum(t.rows for t in coll.tables) * h.DIM * 4 * 2   # the table and its accumulator
  stacked = sum(x.nbytes for x in jax.tree.leaves(state["emb"]))   # the global arrays
  assert sum(copied) == real < stacked / 1.9, (sum(copied), real, stacked)
  tables, opt = jax.device_get(coll.unstack_tables(state["emb"]))
  got = {}
  for p in pieces:
    got.setdefault(p.array, []).append((p.start[0], p.data))
  for t in coll.tables:
    for name, want in ((tables_lib.table_name(t.name), tables[t.name]),
                       (tables_lib.opt_name(t.name, "accum"), opt[t.name]["accum"])):
      whole = np.concatenate([d for _, d in sorted(got[name], key=lambda x: x[0])])
      np.testing.assert_array_equal(whole, want)


def test_a_save_commits_each_array_in_blocks_of_rows(tmp_path, monkeypatch):
  """One transaction per array held a second copy of it until its commit (a 3e7 x 16 table
  on 4 CPU devices: 6.8 GB peak RSS for a 1.8 GB table). Arrays are committed in blocks of
  `BLOCK_CHUNKS` chunks of rows; column pieces (a `cw` plan's) and pieces that straddle a
  block land where they belong, and the fingerprint is the whole array's."""
  import asyncio   # pylint: disable=import-outside-toplevel
  from etils import epath   # pylint: disable=import-outside-toplevel
  from jaxrec.checkpoint.canonical import fingerprint_np   # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  full = rng.normal(size=(1000, 8)).astype(np.float32)   # 100-row chunks (3,200 bytes)
  pieces = [tables_lib.Piece("tables/t", (0, 0), full[:, :4]),
            tables_lib.Piece("tables/t", (0, 4), full[:650, 4:]),
            tables_lib.Piece("tables/t", (650, 4), lambda: full[650:, 4:])]
  commits = []
  real = tables_lib.ts.Transaction
  monkeypatch.setattr(tables_lib, "BLOCK_CHUNKS", 3)
  monkeypatch.setattr(tables_lib.ts, "Transaction", lambda: commits.append(1) or real())
  asyncio.run(tables_lib.write_pieces(epath.Path(tmp_path), {"tables/t": ((1000, 8), "float32")},
                                      pieces, chunk_bytes=3200))
  assert len(commits) == 4   # rows 0-299, 300-599, 600-899, 900-999
  got = tables_lib.open_stored(tmp_path, "tables/t").read().result()
  np.testing.assert_array_equal(got, full)
  assert tables_lib.saved_fingerprints(tmp_path) == {
      "tables/t": fingerprint_np(full, (1000, 8), (0, 0))}
