"""Whether a bfloat16 dense network (`DLRM.dtype='bfloat16'`, ...) is fast on this CPU.

Mixed precision pays on CPUs with bfloat16 dot instructions (x86 AVX512-BF16 or AMX-BF16,
Arm BF16): on such a host the `dlrm_criteo` step ran 1.3x faster than float32 (2026-12-02).
Without them XLA emulates the bfloat16 products and the step got slower, not faster
(2026-12-04, an AMD EPYC host without AVX512: 0.68x the float32 speed; TorchRec's
bfloat16 autocast 20x slower). `slow_bf16_warning` says so once per run (`loop.setup`)
instead of leaving the user to find it in the step times.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxrec.models.mlp import compute_dtype

CPUINFO = "/proc/cpuinfo"
# /proc/cpuinfo words that mean bfloat16 dot products in hardware: x86 `flags`, Arm `Features`
X86_BF16 = ("avx512_bf16", "amx_bf16")
ARM_BF16 = ("bf16",)


def _read_cpuinfo(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return f.read()
  except OSError:
    return None


def cpu_has_bf16(cpuinfo: str | None = None, path: str = CPUINFO) -> bool | None:
  """True / False from the first `flags` (x86) or `Features` (Arm) line of `cpuinfo`
  (default: the text of `path`); None when it cannot tell (no such file or line: another
  OS)."""
  text = _read_cpuinfo(path) if cpuinfo is None else cpuinfo
  for line in (text or "").splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key in ("flags", "Features"):
      words = set(value.split())
      return bool(words & set(X86_BF16 if key == "flags" else ARM_BF16))
  return None


def slow_bf16_warning(model, backend: str, cpuinfo: str | None = None) -> str | None:
  """A warning when `model` computes in bfloat16 on a CPU known to lack bfloat16
  instructions (`cpu_has_bf16` False; unknown or another backend: None)."""
  dtype = getattr(model, "dtype", None)   # a user's own flax module may have none
  if backend != "cpu" or dtype is None or compute_dtype(f"{type(model).__name__}.dtype",
                                                        dtype) != jnp.bfloat16:
    return None
  if cpu_has_bf16(cpuinfo) is not False:
    return None
  return (f"{type(model).__name__}.dtype={model.dtype!r}: this CPU has no bfloat16 "
          f"instructions ({', '.join(X86_BF16)} or Arm {ARM_BF16[0]} in {CPUINFO}), so XLA "
          "emulates the bfloat16 matmuls and the dense network runs slower than in float32 "
          "(dlrm_criteo: 0.68x); use float32 on this machine")
