"""The 4-axis device mesh `('data', 'table', 'row', 'col')`.

`--mesh=data=2,table=2,row=2,col=1` names axis sizes (missing axes are 1); their product
must equal the device count. `auto` puts every device on `data` unless the plan asks for
model parallelism or a plan file records its mesh (see `auto_mesh_candidates`; which of
the candidates a run takes is `jaxrec.train.mesh_choice`'s).
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec.errors import ConfigError
# format_mesh: re-exported
from jaxrec.sharding.plan import (KIND_AXES, MESH_AXES, Plan,  # noqa: F401
                                  collapsed_placements, format_mesh, is_plan_file, kind_mesh,
                                  recorded_mesh)

# Batch-major arrays are split over every axis: device k holds examples [k*b, (k+1)*b).
BATCH_AXES = MESH_AXES


def parse_mesh_spec(spec: str, num_devices: int | None, flag: str = "--mesh",
                    auto: bool = True) -> dict[str, int]:
  """Parses `data=2,table=2,row=2,col=1` into axis sizes; checks their product is
  `num_devices` (None: any, a shape to plan for). `auto`: the flag also takes `auto` (its
  errors say so)."""
  shape = {a: 1 for a in MESH_AXES}
  seen = set()
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in MESH_AXES:
      raise ConfigError(f"{flag}: '{part}' is not AXIS=SIZE with AXIS in {', '.join(MESH_AXES)}")
    if name in seen:
      raise ConfigError(f"{flag}: axis '{name}' given twice")
    seen.add(name)
    try:
      size = int(value)
    except ValueError:
      raise ConfigError(f"{flag}: size of '{name}' must be an integer, got '{value}'") from None
    if size <= 0:
      raise ConfigError(f"{flag}: size of '{name}' must be positive, got {size}")
    shape[name] = size
  if not seen:   # `--mesh=` read as all axes 1: it ran on one device, failed oddly on more
    raise ConfigError(f"{flag}: empty; give AXIS=SIZE,... (e.g. data=2,table=2,row=2,col=1)"
                      + (" or auto" if auto else ""))
  product = math.prod(shape.values())
  if num_devices is not None and product != num_devices:
    raise ConfigError(f"{flag}: {format_mesh(shape)} has {product} devices but "
                      f"{num_devices} are available")
  return shape


def auto_mesh_shape(kind: str, num_devices: int) -> dict[str, int]:
  """Mesh for `--mesh=auto` with a plan kind (or a plan file recording no mesh): one that
  places the kind as itself (`plan.kind_mesh`: `twrw` on 8 is `table=2,row=4`, `grid` on
  4 `row=2,col=2`), else all devices on the first axis the kind uses (`twrw` on 2:
  `table=2`), else on data. All on the first axis placed `twrw`, `twcw` and `grid` as `tw`
  (`plan.warn_collapsed_kind`)."""
  shape = {a: 1 for a in MESH_AXES}
  axes = KIND_AXES.get(kind, ())
  split = kind_mesh(kind, num_devices) if axes else None
  if split:
    shape.update(split)
  else:
    shape[axes[0] if axes else "data"] = num_devices
  return shape


def auto_mesh_candidates(plan: str, num_devices: int) -> list[dict[str, int]]:
  """Meshes `--mesh=auto` tries, in order, for `--plan=plan` on `num_devices`: with a plan
  file recording a mesh, that mesh when it has the devices and then the shapes closest to
  it (`candidate_meshes`, so a file made for another device count keeps its model axes
  where they divide); a plan file recording no mesh, every mesh from all on `data` on
  (it got only that one: a file placing tables on 4 `table` slices failed, 'table_slice 1
  is outside mesh axis table=1'), those placing fewest of its tables as another kind
  first; otherwise the one `auto_mesh_shape`."""
  made_for = recorded_mesh(plan)
  if made_for:
    return candidate_meshes(made_for, num_devices)
  if is_plan_file(plan):   # first the meshes that place its tables as the file says (its
    # `rw` tables were taken on data=N, every table whole on every device)
    placements = Plan.load(plan)
    return sorted(candidate_meshes(None, num_devices),
                  key=lambda s: sum(map(len, collapsed_placements(placements, s).values())))
  return [auto_mesh_shape(plan if plan != "auto" else "dp", num_devices)]


def candidate_meshes(reference: Mapping[str, int] | None, num_devices: int
                     ) -> list[dict[str, int]]:
  """Every mesh shape of `num_devices`, most similar to `reference` first: fewest doublings
  or halvings per axis, model axes (`table`, `row`, `col`) weighing twice `data`, so the
  model axes are kept when they still divide the count and `data` changes."""
  prev = {a: int((reference or {}).get(a, 1)) for a in MESH_AXES}
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  shapes = []
  for t, r, c in itertools.product(divisors, repeat=3):
    if num_devices % (t * r * c) == 0:
      shapes.append({"data": num_devices // (t * r * c), "table": t, "row": r, "col": c})

  def distance(s):
    return sum((1 if a == "data" else 2) * abs(math.log2(s[a] / prev[a])) for a in MESH_AXES)

  return sorted(shapes, key=lambda s: (distance(s), -s["data"], [s[a] for a in MESH_AXES]))


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all) with the four named axes."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:   # e.g. {"rows": 8} read as row=1: a 1-device mesh, or "needs 1 devices"
    raise ConfigError(f"mesh shape {dict(shape)}: unknown axes {unknown} (axes: "
                      f"{', '.join(MESH_AXES)})")
  sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"mesh {format_mesh(shape)} needs {math.prod(sizes)} devices, "
                      f"have {len(devices)}")
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
  """Axis sizes of a mesh with the four named axes (`make_mesh`)."""
  if tuple(mesh.axis_names) != MESH_AXES:
    raise ConfigError(f"mesh axes {tuple(mesh.axis_names)}: expected {MESH_AXES} (make_mesh)")
  return {a: int(mesh.shape[a]) for a in MESH_AXES}


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shares_cores(mesh: Mesh) -> bool:
  """Whether the mesh is several CPU devices of this one process: they share the host's
  cores, so a replicated result that each device computes costs the host `mesh.size` times
  the work (on GPUs each device computes its copy in parallel; across processes a copy
  would cross the network)."""
  return (mesh.size > 1 and jax.process_count() == 1
          and all(d.platform == "cpu" for d in mesh.devices.flat))
