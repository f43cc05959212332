"""A stack's shape: what the planner's cost model reads of a stack, without its tables'
slots.

`layout.StackLayout` describes a stack down to each table's rows and each feature's slot,
which the collection needs; pricing it (`planner.cost_model.stack_cost`) needs only a few
numbers of it: its mesh split, padded rows per slice, feature count, widest slice, longest
bag and ids per example. The planner's search prices thousands of plans, each one table's
kind away from the last, over stacks of up to thousands of tables: building every touched
stack's layout for that (`build_layouts`, linear in the stack's tables, in Python) was most
of `--mesh=auto`'s time at 3,000 tables. `StackShape` holds those numbers, which
`planner.pricing` sums over a stack's tables with numpy, and `of_layout` reads them off a
built layout, so that a plan priced either way goes through the same arithmetic.

`Sharded` holds what follows from a stack's split alone (its `sizes`, `axes`, `dim` and
`slice_rows`), for both classes. No jax here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxrec.sharding.plan import MESH_AXES


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def stack_name(kind: str, dim: int, dtype: str, bag: int, group: int) -> str:
  """The collection's stack name, e.g. `rw_d16_float32_L1` (`_o<group>` for the stacks of
  an optimizer family other than the default's)."""
  return f"{kind}_d{dim}_{dtype}_L{bag}" + (f"_o{group}" if group else "")


class Sharded:
  """How a stack is split over the mesh, from its `sizes` (all four axes), `axes` (the
  model axes splitting it), `dim` and `slice_rows` (padded rows per `table` slice)."""

  def size(self, axis: str) -> int:
    """Mesh size of `axis` if this stack is split over it, else 1."""
    return dict(self.sizes)[axis] if axis in self.axes else 1

  @property
  def replica_axes(self) -> tuple[str, ...]:
    return tuple(a for a in MESH_AXES if a not in self.axes)

  @property
  def split_replica_axes(self) -> tuple[str, ...]:
    """Replica axes of size > 1: the ones stage 3 combines gradients over."""
    sizes = dict(self.sizes)
    return tuple(a for a in self.replica_axes if sizes[a] > 1)

  @property
  def group_shape(self) -> tuple[int, ...]:
    """Per mesh axis (`MESH_AXES` order), its size if the stack is split over it, else 1."""
    return tuple(self.size(a) for a in MESH_AXES)

  @property
  def slot_gather_key(self) -> tuple:
    """Stacks without dedup that share this key all-gather their slot deltas over their
    replicas in one collective per axis (`EmbeddingCollection._gather_slots`; the
    planner's cost model counts those launches by it)."""
    return (self.split_replica_axes, self.group_shape, self.local_dim)

  def lookup_axes(self, dedup: bool) -> tuple[str, ...]:
    """Mesh axes whose devices' ids stage 1 needs on each device: the model axes that split
    the stack (the group's examples it looks up) and, with dedup, the replica axes too
    (replicas read the same unique rows). Without dedup the replicas' ids travel in stage
    3, with the slot deltas (`local_ops.gather_replicas`)."""
    sizes = dict(self.sizes)
    return tuple(a for a in MESH_AXES if sizes[a] > 1 and (a in self.axes or dedup))

  @property
  def num_slices(self) -> int:
    return self.size("table")

  @property
  def local_rows(self) -> int:
    return self.slice_rows // self.size("row")

  @property
  def padded_dim(self) -> int:
    """Columns of the stored array: `dim` rounded up to a multiple of the `col` split."""
    return round_up(self.dim, self.size("col"))

  @property
  def local_dim(self) -> int:
    return self.padded_dim // self.size("col")


@dataclasses.dataclass(frozen=True)
class StackShape(Sharded):
  """A stack as the cost model prices it.

  Attributes:
    name, kind, axes, sizes, dim, dtype, slice_rows: as `StackLayout`'s.
    tables: its tables' names, in stack order.
    features: how many features read it (F).
    width: the most features on one `table` slice, at least 1 (W).
    max_len: the longest bag of its features, at least 1 (L).
    id_columns: ids per example its features send in the ids all-gather (the sum of their
      `max_len`, twice if weighted).
  """

  name: str
  kind: str
  axes: tuple[str, ...]
  sizes: tuple[tuple[str, int], ...]
  dim: int
  dtype: str
  tables: tuple[str, ...]
  slice_rows: int
  features: int
  width: int
  max_len: int
  id_columns: int


def of_layout(l, features: Sequence) -> StackShape:
  """The shape of `StackLayout` `l` whose feature indices point into `features`."""
  return StackShape(
      l.name, l.kind, tuple(l.axes), l.sizes, l.dim, l.dtype, tuple(s.name for s in l.slots),
      l.slice_rows, len(l.features), len(l.slot_features[0]), int(l.max_len),
      sum(features[i].max_len * (1 + features[i].weighted) for i in l.features))
