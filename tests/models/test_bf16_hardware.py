"""A bfloat16 dense network on a CPU without bfloat16 instructions is a warning, not a
silent slow-down (2026-12-04 on an AMD EPYC host without AVX512: jaxrec's dlrm_criteo step
0.68x the float32 speed, TorchRec's autocast 20x slower)."""

import logging

import pytest

from jaxrec.models import DLRM, TwoTower
from jaxrec.models import bf16_hardware

X86_WITH = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "flags\t\t: fpu avx2 amx_bf16 amx_tile\n"
X86_WITHOUT = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
ARM_WITH = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_WITHOUT = "processor\t: 0\nFeatures\t: fp asimd crc32\n"


@pytest.mark.parametrize("text, has", [(X86_WITH, True), (X86_AMX, True),
                                       (X86_WITHOUT, False), (ARM_WITH, True),
                                       (ARM_WITHOUT, False), ("", None),
                                       ("model name\t: something\n", None)])
def test_cpu_bf16_is_read_from_cpuinfo(text, has):
  assert bf16_hardware.cpu_has_bf16(text) is has


def test_an_unreadable_cpuinfo_is_unknown(tmp_path):
  assert bf16_hardware.cpu_has_bf16(path=str(tmp_path / "missing")) is None


def test_a_bfloat16_model_on_a_cpu_without_it_is_warned_naming_the_binding():
  model = DLRM(bottom_mlp=(8, 4), top_mlp=(8, 1), dtype="bf16")
  text = bf16_hardware.slow_bf16_warning(model, "cpu", X86_WITHOUT)
  assert text.startswith("DLRM.dtype='bf16': this CPU has no bfloat16 instructions")
  assert "float32" in text
  tower = TwoTower(user_features=(0,), item_features=(1,), dtype="bfloat16")
  assert bf16_hardware.slow_bf16_warning(tower, "cpu", X86_WITHOUT).startswith("TwoTower.dtype")


@pytest.mark.parametrize("dtype, backend, cpuinfo", [
    ("float32", "cpu", X86_WITHOUT),   # nothing to emulate
    (None, "cpu", X86_WITHOUT),
    ("bfloat16", "cpu", X86_WITH),     # the hardware has it
    ("bfloat16", "gpu", X86_WITHOUT),  # the matmuls run on the accelerator
    ("bfloat16", "cpu", ""),           # unknown: no guess
])
def test_no_warning_where_bfloat16_is_not_emulated_or_it_is_unknown(dtype, backend, cpuinfo):
  model = DLRM(bottom_mlp=(8, 4), top_mlp=(8, 1), dtype=dtype)
  assert bf16_hardware.slow_bf16_warning(model, backend, cpuinfo) is None


def test_setup_logs_the_warning(monkeypatch, caplog):
  """`loop.setup` (every run, benchmark and tool that builds a collection) says it once."""
  import gin
  from jaxrec import launch
  from jaxrec.train import loop
  from jaxrec.train.config import ExperimentConfig, RunOptions
  import jax
  monkeypatch.setattr(bf16_hardware, "_read_cpuinfo", lambda path: X86_WITHOUT)
  launch.parse_gin(["configs/dlrm_synthetic.gin"], ["DLRM.dtype = 'bfloat16'"])
  try:
    config = ExperimentConfig()
  finally:
    gin.clear_config()
  with caplog.at_level(logging.WARNING, logger="jaxrec"):
    loop.setup(config, RunOptions(num_steps=1, plan="dp", mesh="auto", progress=False),
               devices=jax.devices()[:1])
  lines = [r.getMessage() for r in caplog.records if "bfloat16 instructions" in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith("DLRM.dtype='bfloat16'")
