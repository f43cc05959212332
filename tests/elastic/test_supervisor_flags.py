"""Supervisor flag checks made before any worker starts."""

import os

import pytest

from jaxrec.elastic import supervisor as sup
from jaxrec.errors import ConfigError


def test_a_mesh_that_does_not_fill_the_job_is_an_error(tmp_path):
  """`--mesh=data=3` on 2 x 4 devices was silently replaced by data=8."""
  w = tmp_path / "w"
  options = sup.Options(num_processes=2, devices_per_process=4)
  with pytest.raises(ConfigError, match=r"--mesh: data=3,table=1,row=1,col=1 has 3 devices "
                     r"but 8 are available \(--num_processes=2 x --devices_per_process=4\)"):
    sup.Supervisor(options, [f"--workdir={w}", "--gin_file=configs/x.gin", "--mesh=data=3"])
  assert not os.path.exists(w)
  for mesh in ("auto", "data=2,table=2,row=2"):
    sup.Supervisor(options, [f"--workdir={w}", "--gin_file=configs/x.gin", f"--mesh={mesh}"])
