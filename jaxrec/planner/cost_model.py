"""Memory and step-cost model of one table under one placement kind: arithmetic you can read.

Notation (one training step). Mesh sizes `nd, nt, nr, nc` for axes (data, table, row, col);
`N = nd*nt*nr*nc` devices; global batch `B`, `b = B/N` examples per device. For a table under
kind `k` (see `jaxrec.sharding.plan.KIND_AXES`):

  T, R, C   nt, nr, nc if `k` splits over that axis, else 1
  G = T*R*C size of the model-parallel group; one holder pools for `b*G` examples
  H         holders (devices with a shard): N/nt if `k` uses `table`, else N
  rep       replicas of each shard: H/(R*C)
  L         ids per example, padded: sum of `max_len` over the features reading the table
            (a stack pads its features to its longest `max_len`; not modeled)
  P         present ids per example (pooling factor, <= L); F features; d dim; e dtype bytes
  n         rows of a holder's unique buffer, min(B*L, ceil(rows/R)): the lookup
            (`embedding.collection`) dedups the global batch's ids into a static buffer
            with room for every id, and never more than the rows the shard owns
  u = U/R   distinct rows a holder owns per step, U = `expected_unique_rows(B*P, rows)`
            (id distribution from `TableStats`; ids assumed spread evenly over row shards)

Cost terms (`COST_TERMS`), per device per step; `hold` terms are paid by the devices
holding the table, `all` terms by every device:

  const                 1 per step (dense layers, dispatch); set only by profile fits
  launches              collectives per step; per stack `stack_launches` (latency term)
  sort_bytes      hold  B*L*4: the global batch's ids deduplicated (`unique` sorts)
  gather_bytes    hold  n*(d/C)*e: unique buffer filled from the local shard
  pool_bytes      hold  2*b*G*L*(d/C)*e: rows pooled forward + scatter-added backward
  update_bytes    hold  2*u*((d/C)*(e+4*s) + 4*s_row): the sparse optimizer reads and
                        writes the distinct rows and their float32 state (s, s_row:
                        `OptimizerState`)
  all_gather_bytes all  B*L*4*(N-1)/N ids of the global batch + b*L*4*(G-1) bag weights
                        over the group
                  hold  + A*(R-1)/R: backward of the psum_scatter, where A = b*T*R*F*d*4 is
                        the size of the pooled activations [b*G, F, d/C] float32
  reduce_scatter_bytes hold  A*(R-1)/R: partial sums psum_scatter-ed over `row`
  all_to_all_bytes hold 2*b*(T-1)*F*d*4: over `table`, forward + backward
                  all   2*b*F*d*4*(C-1)/C: over `col`, forward + backward
  all_reduce_bytes hold  2*(rep-1)/rep*n*(d/C)*4: buffer gradients psum-ed over replicas

Collective bytes are bytes moved per device by a ring algorithm (what `calibration` times).
Memory per holder: table `ceil(rows/R)*(d/C)*e`; optimizer state (float32)
`ceil(rows/R)*((d/C)*4*s + 4*s_row)`; buffers `n*(4 + (d/C)*(e+4)) + 4*B*L` (unique ids,
rows + their float32 gradients, inverse index) + `b*G*(4*L + 8*F*(d/C))` (bag weights,
pooled activations + gradients). Every device also holds the gathered ids, `B*L*4`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError
from jaxrec.sharding.plan import KIND_AXES, KINDS, MESH_AXES

COST_TERMS = ("const", "launches", "sort_bytes", "gather_bytes", "pool_bytes", "update_bytes",
              "all_gather_bytes", "reduce_scatter_bytes", "all_to_all_bytes",
              "all_reduce_bytes")
_I = {name: i for i, name in enumerate(COST_TERMS)}
_MESH_SPLIT = {"table": 1, "row": 2, "col": 3}  # index into (nd, nt, nr, nc)


@dataclasses.dataclass(frozen=True)
class OptimizerState:
  """Optimizer state size.

  Attributes:
    per_element: float32 state values per table element (Adagrad 1, Adam 2).
    per_row: float32 state values per row (row-wise Adagrad 1).
  """

  per_element: float = 0.0
  per_row: float = 0.0


OPTIMIZER_STATES = {
    "sgd": OptimizerState(0.0, 0.0),
    "adagrad": OptimizerState(1.0, 0.0),
    "rowwise_adagrad": OptimizerState(0.0, 1.0),
    "adam": OptimizerState(2.0, 0.0),
    "ftrl": OptimizerState(2.0, 0.0),
}


def optimizer_state(spec) -> OptimizerState:
  """`spec`: a factor of the table size (0 = SGD, 1 = Adagrad, 2 = Adam), an optimizer name
  from `OPTIMIZER_STATES`, an `OptimizerState`, or a sparse optimizer of
  `jaxrec.embedding.optimizers` (its `state_layout()` is counted)."""
  if isinstance(spec, OptimizerState):
    return spec
  if hasattr(spec, "state_layout"):
    per = [p for p, _ in spec.state_layout().values()]
    return OptimizerState(float(per.count("element")), float(per.count("row")))
  if isinstance(spec, str):
    key = spec.strip().lower().replace("-", "_")
    if key in OPTIMIZER_STATES:
      return OPTIMIZER_STATES[key]
    try:
      spec = float(key)
    except ValueError:
      raise ConfigError(f"unknown optimizer '{spec}' (known: {', '.join(OPTIMIZER_STATES)}, "
                        "or a factor of the table size)") from None
  if not spec >= 0:
    raise ConfigError(f"optimizer state factor must be >= 0, got {spec}")
  return OptimizerState(float(spec), 0.0)


@dataclasses.dataclass(frozen=True)
class TableStats:
  """What is known about a table's traffic beyond its specs.

  Attributes:
    pooling_factor: mean present ids per example, summed over the features reading the
      table; `None` = sum of their `max_len` (every bag full).
    zipf_alpha: ids follow a Zipf law with this exponent over the rows; `None` = uniform.
  """

  pooling_factor: float | None = None
  zipf_alpha: float | None = None


@dataclasses.dataclass(frozen=True)
class TableLoad:
  """One table as the cost model sees it (see module notation)."""

  name: str
  rows: int
  dim: int
  dtype: str
  dtype_bytes: int
  num_features: int  # F
  ids_per_example: int  # L
  pooling_factor: float  # P
  zipf_alpha: float | None = None

  @property
  def table_bytes(self) -> int:
    return self.rows * self.dim * self.dtype_bytes


def table_loads(tables: Sequence[TableSpec], features: Sequence[FeatureSpec],
                stats: Mapping[str, TableStats] | None = None) -> list[TableLoad]:
  """Joins tables, the features reading them and optional `stats` by table name."""
  stats = dict(stats or {})
  known = {t.name for t in tables}
  unknown = sorted(set(stats) - known)
  if unknown:
    raise ConfigError(f"table stats name unknown tables {unknown} (tables: {sorted(known)})")
  loads = []
  for t in tables:
    feats = [f for f in features if f.table == t.name]
    length = sum(int(f.max_len) for f in feats)
    s = stats.get(t.name, TableStats())
    pf = float(length if s.pooling_factor is None else s.pooling_factor)
    if not 0 <= pf <= length + 1e-9:
      raise ConfigError(f"table '{t.name}': pooling factor {pf} must be in [0, {length}] "
                        "(sum of max_len of its features)")
    loads.append(TableLoad(t.name, int(t.rows), int(t.dim), t.dtype, np.dtype(t.dtype).itemsize,
                           len(feats), length, pf, s.zipf_alpha))
  return loads


def normalize_mesh(mesh_shape: Mapping[str, int]) -> dict[str, int]:
  """All four axes of `MESH_AXES` (absent ones = 1), checked positive integers."""
  unknown = sorted(set(mesh_shape) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"mesh: unknown axes {unknown} (axes: {', '.join(MESH_AXES)})")
  mesh = {}
  for a in MESH_AXES:
    v = mesh_shape.get(a, 1)
    if int(v) != v or int(v) < 1:
      raise ConfigError(f"mesh: axis '{a}' must be a positive integer, got {v}")
    mesh[a] = int(v)
  return mesh


def mesh_str(mesh: Mapping[str, int]) -> str:
  return ",".join(f"{a}={mesh.get(a, 1)}" for a in MESH_AXES)


def expected_unique_rows(draws: float, rows: int, zipf_alpha: float | None = None) -> float:
  """Expected distinct rows among `draws` ids drawn from `rows` rows: uniform ids give
  rows*(1-(1-1/rows)^draws); Zipf(alpha) sums 1-(1-p_i)^draws over ranks (exact for the
  first 4096 ranks, then geometric buckets of ratio 1.02)."""
  if draws <= 0 or rows <= 0:
    return 0.0
  if zipf_alpha is None or zipf_alpha <= 0:
    return float(-math.expm1(draws * math.log1p(-1.0 / rows)) * rows) if rows > 1 else 1.0
  head = np.arange(1, min(rows, 4096) + 1, dtype=np.float64)
  counts = np.ones_like(head)
  if rows > 4096:
    edges = np.unique(np.round(np.geomspace(4097, rows + 1, num=int(
        math.log((rows + 1) / 4097) / math.log(1.02)) + 2)))
    mids = np.sqrt(edges[:-1] * (edges[1:] - 1))
    head = np.concatenate([head, mids])
    counts = np.concatenate([counts, np.diff(edges)])
  weights = head ** -float(zipf_alpha)
  p = weights / np.sum(weights * counts)
  return float(np.sum(counts * -np.expm1(draws * np.log1p(-np.minimum(p, 1.0 - 1e-12)))))


def split_sizes(kind: str, mesh: Mapping[str, int]) -> tuple[int, int, int]:
  """(T, R, C): the sizes of `table`, `row`, `col` if `kind` splits over them, else 1."""
  axes = KIND_AXES[kind]
  return tuple(mesh.get(a, 1) if a in axes else 1 for a in ("table", "row", "col"))


def kind_problem(load: TableLoad, kind: str, mesh: Mapping[str, int]) -> str | None:
  """Why `kind` cannot hold the table on `mesh` (None if it can)."""
  _, _, c = split_sizes(kind, mesh)
  if load.dim % c:
    return (f"table '{load.name}': kind {kind} splits dim {load.dim} over col={c}, "
            "which does not divide it")
  return None


def allowed_kinds(load: TableLoad, mesh: Mapping[str, int]) -> list[str]:
  """Kinds worth enumerating: each split axis has size > 1 (a size-1 split is the same
  placement as a smaller kind), columns divide evenly and every row shard is non-empty."""
  out = []
  for kind in KINDS:
    t, r, c = split_sizes(kind, mesh)
    axes = KIND_AXES[kind]
    if any(mesh.get(a, 1) == 1 for a in axes) or kind_problem(load, kind, mesh) or load.rows < r:
      continue
    out.append(kind)
  return out


def stack_launches(kind: str, mesh: Mapping[str, int]) -> int:
  """Collectives one stack of `kind` launches per step: the ids all_gather, forward and
  backward of each split axis (psum_scatter / all_gather over row, all_to_all over table and
  col) of size > 1, and the gradient psum when shards have replicas."""
  t, r, c = split_sizes(kind, mesh)
  n = math.prod(mesh.get(a, 1) for a in MESH_AXES)
  rep = n // t // (r * c)
  return 1 + 2 * sum(s > 1 for s in (t, r, c)) + (1 if rep > 1 else 0)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """One table under one kind (see module docstring for every term).

  Attributes:
    kind: placement kind.
    holders: devices holding a shard or replica (H).
    shard_rows, shard_cols: shape of the shard each holder stores.
    memory: bytes on each holder: `table`, `optimizer`, `buffers`.
    ids_memory: id buffer bytes on every device.
    holder_terms: float64 `[len(COST_TERMS)]`, paid by each holder.
    all_terms: float64 `[len(COST_TERMS)]`, paid by every device.
  """

  kind: str
  holders: int
  shard_rows: int
  shard_cols: int
  memory: Mapping[str, int]
  ids_memory: int
  holder_terms: np.ndarray
  all_terms: np.ndarray

  @property
  def holder_memory(self) -> int:
    return int(sum(self.memory.values()))


def estimate(load: TableLoad, kind: str, mesh: Mapping[str, int], batch_size: int,
             opt: OptimizerState) -> Estimate:
  """Memory and cost terms of `load` placed as `kind` on `mesh` for a global `batch_size`."""
  t, r, c = split_sizes(kind, mesh)
  n = math.prod(mesh.get(a, 1) for a in MESH_AXES)
  holders = n // t
  rep = holders // (r * c)
  big_b = float(batch_size)
  b = big_b / n
  g = t * r * c
  big_l, f, d, e = load.ids_per_example, load.num_features, load.dim, load.dtype_bytes
  rows_local = -(-load.rows // r)
  cols = -(-d // c)
  n_buf = min(big_b * big_l, rows_local)
  u = expected_unique_rows(big_b * load.pooling_factor, load.rows, load.zipf_alpha) / r
  act = b * t * r * f * d * 4.0

  hold = np.zeros(len(COST_TERMS))
  every = np.zeros(len(COST_TERMS))
  hold[_I["sort_bytes"]] = big_b * big_l * 4
  hold[_I["gather_bytes"]] = n_buf * cols * e
  hold[_I["pool_bytes"]] = 2 * b * g * big_l * cols * e
  hold[_I["update_bytes"]] = 2 * u * (cols * (e + 4 * opt.per_element) + 4 * opt.per_row)
  every[_I["all_gather_bytes"]] = big_b * big_l * 4 * (n - 1) / n + b * big_l * 4 * (g - 1)
  hold[_I["all_gather_bytes"]] = act * (r - 1) / r
  hold[_I["reduce_scatter_bytes"]] = act * (r - 1) / r
  hold[_I["all_to_all_bytes"]] = 2 * b * (t - 1) * f * d * 4
  every[_I["all_to_all_bytes"]] = 2 * b * f * d * 4 * (c - 1) / c
  hold[_I["all_reduce_bytes"]] = 2 * (rep - 1) / rep * n_buf * cols * 4

  memory = {
      "table": rows_local * cols * e,
      "optimizer": int(math.ceil(rows_local * 4 * (cols * opt.per_element + opt.per_row))),
      "buffers": int(math.ceil(n_buf * (4 + cols * (e + 4)) + 4 * big_b * big_l +
                           b * g * (4 * big_l + 8 * f * cols))),
  }
  return Estimate(kind, holders, rows_local, cols, memory, int(big_b * big_l * 4), hold, every)
