"""XLA flags for the tests and for the scripts they start in subprocesses."""

import os

# The suite compiles many small programs and runs each a few times, so compiling dominates
# its CPU time. LLVM code generation at -O0 cuts the suite's CPU time by about a quarter
# (tests/embedding/test_collection_kernels.py: 75 → 54 s user); XLA's HLO passes still run
# and the float semantics are unchanged (no fast-math either way). Benchmarks and users keep
# XLA's default.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """`XLA_FLAGS` for `devices` host CPU devices and fast compiles."""
  return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"


def script_env(devices: int, **extra: str) -> dict[str, str]:
  """`os.environ` for a script run with `devices` CPU devices (plus `extra` variables)."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", **extra)
