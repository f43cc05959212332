"""The loop lets at most `MAX_STEPS_IN_FLIGHT` steps run ahead on a multi-device CPU mesh:
with `--log_every` steps queued, 8 host devices on a busy machine deadlocked in a
collective (reproduced by hand under load 8: an abort before step 100 of dlrm_criteo)."""

import jax

from jaxrec.sharding.mesh import make_mesh
from jaxrec.train import loop


def _mesh(n):
  return make_mesh({"data": n}, jax.devices()[:n])


def test_multi_device_cpu_meshes_cap_the_steps_in_flight():
  assert loop.steps_in_flight(_mesh(8)) == loop.MAX_STEPS_IN_FLIGHT == 2
  assert loop.steps_in_flight(_mesh(2)) == 2
  assert loop.steps_in_flight(_mesh(1)) is None   # no collectives: no cap
