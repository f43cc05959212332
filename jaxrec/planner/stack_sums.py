"""The stacks of one (kind, dim, dtype, optimizer group) as the cost model prices them,
summed over their tables with numpy (`planner.pricing`'s groups).

`embedding.layout.build_layouts` builds a stack slot by slot in Python; the cost model
reads a few sums of it (`embedding.stack_shape.StackShape`). The search prices every move
of one table by its whole group's stacks, and at 3,000 tables of three dims a group holds
~1,000: `build_layouts` took ~28 ms a group there, ~2,700 times in `--mesh=auto`'s pricing
of 8 devices' meshes. Here each table's rows, feature count, longest bag and ids per
example are arrays made once, and a group's stacks are a few `bincount`s over its tables'
indices (~0.3 ms). What `build_layouts` decides is decided alike:

- a table no feature reads joins its group's shortest bag bucket of read tables (1 if none);
- for a kind split over `table`, buckets merge from the longest bag down while the union's
  W x L (widest slice's features x longest bag) is at most the sum (`layout._merge_buckets`);
- per stack, in bag order: its tables in table order, rows per slice padded to the `row`
  split, W, L, F and the ids per example.

tests/planner/test_pricing.py checks the shapes against `of_layout` of `build_layouts`, and
every price against `plan_cost`'s, along random walks of the search's moves.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxrec.embedding.stack_shape import StackShape, round_up, stack_name
from jaxrec.sharding.plan import KIND_AXES, MESH_AXES


class StackSums:
  """Per-table arrays of one search's tables (in `loads` order) and the mesh, from which
  `group_shapes` sums a group's stacks. `reading[i]`: the indices of table i's features."""

  def __init__(self, tables, features, reading: Sequence[Sequence[int]], mesh):
    from jaxrec.embedding import layout  # pylint: disable=import-outside-toplevel
    self.mesh = dict(mesh)
    self.sizes = tuple((a, int(self.mesh.get(a, 1))) for a in MESH_AXES)
    self.max_rows = layout.MAX_SLICE_ROWS
    self.names = np.array([t.name for t in tables], dtype=object)
    self.rows = np.array([int(t.rows) for t in tables], np.int64)
    self.feats = np.array([len(r) for r in reading], np.int64)
    longest = [max((int(features[j].max_len) for j in r), default=0) for r in reading]
    self.longest = np.array(longest, np.int64)   # 0: no feature reads it
    # its bag bucket, 0 for a table no feature reads (it joins another, `group_shapes`)
    self.bucket = np.array([layout.bag_bucket(m) if m else 0 for m in longest], np.int64)
    self.ids = np.array([sum(int(features[j].max_len) * (1 + bool(features[j].weighted))
                             for j in r) for r in reading], np.int64)

  def group_shapes(self, group: tuple, members: Sequence[int], slices: Sequence[int]
                   ) -> list[StackShape]:
    """The shapes of the stacks `build_layouts` makes of the tables `members` (indices)
    placed as `group[0]` on `table` slices `slices`, where `group` is (kind, dim, dtype,
    optimizer group), in `build_layouts` order (by bag)."""
    kind, dim, dtype, opt = group
    axes = KIND_AXES[kind]
    nt = self.mesh["table"] if "table" in axes else 1
    nr = self.mesh["row"] if "row" in axes else 1
    members = np.asarray(members, np.int64)
    order = np.argsort(members, kind="stable")   # stacks hold their tables in table order
    members = members[order]
    slices = np.asarray(slices, np.int64)[order] if nt > 1 else np.zeros_like(members)
    bag = self.bucket[members]
    read = bag > 0
    bag = np.where(read, bag, bag[read].min() if read.any() else 1)
    shapes = []
    for key, mask in sorted(self._stacks(members, slices, bag, nt), key=lambda s: s[0]):
      idx, sl = members[mask], slices[mask]
      fill = int(np.bincount(sl, self.rows[idx], nt).max())
      shapes.append(StackShape(
          stack_name(kind, dim, dtype, key, opt), kind, tuple(axes), self.sizes, dim, dtype,
          tuple(self.names[idx].tolist()), round_up(max(fill, 1), nr),
          int(self.feats[idx].sum()), self._width(idx, sl, nt),
          max(1, int(self.longest[idx].max())), int(self.ids[idx].sum())))
    return shapes

  def flagged(self, shape: StackShape) -> bool:
    """Whether `layout.stack_problems` may find a problem in `shape`'s stack: no feature
    reads it, or a slice of it may hold over `MAX_SLICE_ROWS` rows (its padded rows do;
    the words need the stack's layout: `pricing` builds it then)."""
    return shape.features == 0 or shape.slice_rows > self.max_rows

  def _width(self, idx: np.ndarray, sl: np.ndarray, nt: int) -> int:
    """W: the most features of tables `idx` on one of `nt` slices (`sl`), at least 1."""
    return max(1, int(np.bincount(sl, self.feats[idx], nt).max()))

  def _slots(self, idx: np.ndarray, sl: np.ndarray, nt: int) -> int:
    """W x L of tables `idx` on slices `sl` (`layout._slots_per_example`)."""
    return self._width(idx, sl, nt) * max(1, int(self.longest[idx].max()))

  def _stacks(self, members: np.ndarray, slices: np.ndarray, bag: np.ndarray, nt: int
              ) -> list[tuple[int, np.ndarray]]:
    """(stack key: its largest bag bucket, mask of `members` in it) per stack: one per
    bucket, or for `nt` > 1 the buckets merged as `layout._merge_buckets` merges them."""
    out, cost = [], 0
    for b in sorted(set(bag.tolist()), reverse=True):
      mask = bag == b
      if nt == 1:
        out.append((b, mask))
        continue
      own = self._slots(members[mask], slices[mask], nt)
      if out:
        union = out[-1][1] | mask
        joint = self._slots(members[union], slices[union], nt)
        if joint <= cost + own:
          out[-1], cost = (out[-1][0], union), joint
          continue
      out.append((b, mask))
      cost = own
    return out
