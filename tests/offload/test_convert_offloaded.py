"""`convert_checkpoint.py` of a checkpoint with an offloaded table: a `--format=checkpoint`
copy lays the table out whole (not as the saved device cache) and resumes, with the table in
another cache, on the device or in the same cache, to the values of the run it copies."""

import numpy as np
import pytest

from jaxrec.checkpoint import convert
from tests.offload.offload_helpers import SMALL_DLRM, logged_lines, train_synthetic
from tests.scripts.test_train import export


def _offloaded(cache_rows):
  return [f"OffloadConfig.tables={{'t0': {{'cache_rows': {cache_rows}}}}}",
          "OffloadConfig.host_buffer_rows=600"]


# The copy's run: t0 in another cache, back on the device, in the saved cache.
RESUMED = {"other_cache": _offloaded(6000), "device": [], "same_cache": _offloaded(4000)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """`(root, layouts, export)`: run `root/w` trained 10 steps with t0 (100,000 rows)
  offloaded into a 4,000-row cache, copied for `data=8` / `dp` (as it ran) into
  `root/<case>/checkpoints` for each case of `RESUMED` (`layouts`: what the copy prints),
  then trained on to step 20 (`export`: its final values)."""
  root = tmp_path_factory.mktemp("copy")
  w = root / "w"
  train_synthetic(w, 10, SMALL_DLRM + _offloaded(4000))
  for case in RESUMED:
    step, layouts = convert.export_checkpoint(w / "checkpoints", root / case / "checkpoints",
                                              None, convert.parse_mesh("data=8"), "dp")
    assert step == 10
  train_synthetic(w, 20, SMALL_DLRM + _offloaded(4000))
  return root, layouts, export(w)


def test_a_copy_lays_out_an_offloaded_table_whole(source):
  """The stacks were those of the saved device cache (the manifest's rows), right only for
  a run that offloads the table with the same cache: t0's one-hot stack printed 80,500 rows
  (t0 as 4,000), not 176,500."""
  _, layouts, _ = source
  stack = next(l for l in layouts.splitlines() if l.startswith("dp_d16_float32_L1:"))
  assert "6 tables, 6 features, array (176500, 16)" in stack, layouts
  assert ("table 't0' was offloaded when saved (100,000 rows, a 4,000-row device cache): "
          "laid out whole above") in layouts


@pytest.mark.parametrize("case", [pytest.param("other_cache", marks=pytest.mark.slow),
                                  "device", pytest.param("same_cache", marks=pytest.mark.slow)])
def test_a_copy_resumes_to_the_values_of_its_source(source, case):
  """The copy's run takes the mesh and plan the copy records and resumes step 10 with t0
  in another cache, on the device or in the same cache, to the source run's step 20 (on
  `dp` an offloaded table trains as on the device: to float32 rounding)."""
  root, _, want = source
  w2 = root / case
  train_synthetic(w2, 20, SMALL_DLRM + RESUMED[case], mesh="auto", plan="auto")
  lines = logged_lines(w2)
  assert [l["checkpoint_step"] for l in lines if l.get("event") == "resume"] == [10]
  got = export(w2)
  assert sorted(got) == sorted(want)
  for key in want:
    if key != "metadata":
      np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)
