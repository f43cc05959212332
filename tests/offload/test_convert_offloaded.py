"""`convert_checkpoint.py` of a checkpoint with an offloaded table: a `--format=checkpoint`
copy lays the table out whole (not as the saved device cache) and resumes, with the table in
another cache, on the device or in the same cache, to the values of the run it copies; the
long phases of a resume and of a conversion of a large table are logged."""

import re

import numpy as np
import pytest

from jaxrec import phase_log
from jaxrec.checkpoint import convert
from jaxrec.offload import snapshots
from tests.offload.offload_helpers import SMALL_DLRM, logged_lines, train_synthetic
from tests.scripts.in_process import run_script
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


def _timeless(messages):
  return [re.sub(r"\d+(?:\.\d+)? s(\)?)$", r"T s\1", m) for m in messages]


def test_a_resume_logs_the_crc_check_of_a_large_snapshot(source, monkeypatch, caplog):
  """Reading every file of t0's snapshot against its CRC32s took ~10 s at resume on a
  3e7 x 16 table, with nothing logged; a snapshot's table of `LOG_MIN_BYTES` or more is
  logged before (with its size) and after (with its seconds). (The run is at its
  `--num_steps`: it restores, evaluates and stops.)"""
  root, _, _ = source
  w = root / "w"
  monkeypatch.setattr(snapshots, "LOG_MIN_BYTES", 1)
  with caplog.at_level("INFO", logger=snapshots.__name__):
    train_synthetic(w, 20, SMALL_DLRM + _offloaded(4000))
  snap = w / "offload_snapshots" / "20"
  what = f"offload snapshot {snap}: checking table 't0' against its saved CRC32s"
  checks = [m for m in _timeless(caplog.messages) if "CRC32s" in m]
  assert len(checks) == 2 and re.fullmatch(
      re.escape(what) + r" \(\d+\.\d MiB in [\d,]+ files\)", checks[0]), checks
  assert checks[1] == f"{what}: done in T s"
  caplog.clear()
  monkeypatch.setattr(snapshots, "LOG_MIN_BYTES", 1 << 40)
  with caplog.at_level("INFO", logger=snapshots.__name__):
    train_synthetic(w, 20, SMALL_DLRM + _offloaded(4000))
  assert not [m for m in caplog.messages if "CRC32s" in m]


def _convert(tmp_path, w, fmt, name):
  out = tmp_path / name
  proc = run_script("convert_checkpoint.py", f"--checkpoint_dir={w / 'checkpoints'}",
                    f"--output={out}", f"--format={fmt}")
  assert proc.returncode == 0, proc.stderr
  return out, [l.split("] ", 1)[1] for l in proc.stderr.splitlines() if "] " in l]


def test_a_conversion_logs_a_large_tables_phases(source, tmp_path, monkeypatch):
  """`convert_checkpoint.py` of a 3e7 x 16 offloaded table ran 30-37 s with no output.
  Its phases over `phase_log.MIN_BYTES` (the snapshot's CRC check over
  `snapshots.LOG_MIN_BYTES`) are logged, at the script's default verbosity: a line before
  each with its size, one after with its seconds, and progress every `phase_log.EVERY_S`
  (here after every block: 0 s) for the arrays read and written and the files copied."""
  root, _, _ = source
  w = root / "w"
  for module, name in ((phase_log, "MIN_BYTES"), (snapshots, "LOG_MIN_BYTES")):
    monkeypatch.setattr(module, name, 3 << 20)   # t0's and t1's arrays (6.1, 3.1 MiB), not t2's
  monkeypatch.setattr(phase_log, "EVERY_S", 0.0)
  monkeypatch.setattr(convert.storage.row_blocks, "__defaults__", (1 << 20,))   # 7 blocks
  _, lines = _convert(tmp_path, w, "npz", "out.npz")
  lines = _timeless(lines)
  snap = w / "offload_snapshots" / "20"
  crc = f"offload snapshot {snap}: checking table 't0' against its saved CRC32s"
  assert lines[0].startswith(f"{crc} (12.1 MiB in ") and lines[1] == f"{crc}: done in T s"
  t0 = [l for l in lines[2:] if "'tables/t0'" in l]
  assert t0[0] == "exporting 'tables/t0' to npz (6.1 MiB, float32 [100000, 16])", lines
  assert t0[-1] == "exporting 'tables/t0' to npz: done in T s"
  assert [re.sub(r"\d+%", "P%", l) for l in t0[1:-1]] == [
      "exporting 'tables/t0' to npz: P% (T s)"] * 7, lines
  assert t0[-2] == "exporting 'tables/t0' to npz: 100% (T s)"
  assert "exporting 'tables/t1' to npz (3.1 MiB" in "\n".join(lines)
  assert not any("'tables/t2'" in l for l in lines)   # 1.2 MiB
  assert "exporting 'table_opt/t0/accum' to npz (6.1 MiB" in "\n".join(lines)

  out, lines = _convert(tmp_path, w, "checkpoint", "copy/checkpoints")
  text = "\n".join(_timeless(lines))
  assert f"{crc}: done in T s" in text
  checked = f"checkpoint {w / 'checkpoints' / '20'}: checking 'tables/t1'"   # every array read
  assert f"{checked} (3.1 MiB)\n" in text and f"{checked}: done in T s" in text
  assert f"linking offload snapshot {snap} to {out.parent / 'offload_snapshots' / '20'} (" in text
  assert re.search(rf"copying checkpoint {re.escape(str(w / 'checkpoints' / '20'))} to "
                   rf"{re.escape(str(out / '20'))} \([\d.]+ MiB in [\d,]+ files\)", text), text
  monkeypatch.setattr(phase_log, "MIN_BYTES", 256 << 20)
  monkeypatch.setattr(snapshots, "LOG_MIN_BYTES", 256 << 20)
  _, lines = _convert(tmp_path, w, "npz", "quiet.npz")
  assert lines == []   # small: nothing
