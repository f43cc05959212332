"""Kernel selection and block-size helpers shared by the lookup and update kernels.

`kernel='auto'` picks Pallas (Triton lowering) on GPU and the XLA reference elsewhere.
Pallas on a non-GPU backend runs in interpret mode (slow; for tests only).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import gin
import jax
from jax.experimental.pallas import triton as plgpu

from jaxrec.errors import ConfigError

KERNELS = ("auto", "xla", "pallas")
GPU_BACKENDS = ("gpu", "cuda", "rocm")   # jax.default_backend() and device platforms

# Largest column chunk a kernel loads at once; Triton needs power-of-2 tensor sizes.
MAX_COL_BLOCK = 128


_PLANNING_FOR: list[str] = []    # `planning_for` backends, innermost last


@contextlib.contextmanager
def _pushed(stack: list, value) -> Iterator[None]:
  """`value` is the innermost entry of `stack` inside the block."""
  stack.append(value)
  try:
    yield
  finally:
    stack.pop()


def planning_for(backend: str) -> contextlib.AbstractContextManager:
  """Plans made inside price the kernels of `backend` (`cpu`, `gpu`) instead of this
  process's: the elastic supervisor plans for workers on another platform than its own."""
  return _pushed(_PLANNING_FOR, backend)


def planning_backend() -> str:
  """The backend plans are made for: `planning_for`'s, else jax's default backend."""
  return _PLANNING_FOR[-1] if _PLANNING_FOR else jax.default_backend()


def is_gpu(backend: str | None = None) -> bool:
  """Whether `backend` (default `jax.default_backend()`) is a GPU: `gpu`, `cuda` or `rocm`."""
  return (backend or jax.default_backend()) in GPU_BACKENDS


def resolve_kernel(kernel: str, backend: str | None = None) -> str:
  """Returns `'xla'` or `'pallas'` for `kernel` in `auto|xla|pallas` on `backend` (default
  `planning_backend()`)."""
  if kernel not in KERNELS:
    raise ConfigError(f"kernel must be one of {KERNELS}, got '{kernel}'")
  if kernel != "auto":
    return kernel
  return "pallas" if is_gpu(backend or planning_backend()) else "xla"


def resolve_interpret(interpret: bool | None) -> bool:
  """`None` means: interpret unless the default backend is a GPU."""
  if interpret is None:
    return not is_gpu()
  return bool(interpret)


def col_block(dim: int) -> int:
  """Largest power of two dividing `dim`, capped at `MAX_COL_BLOCK`.

  Kernels walk a row in `dim // col_block(dim)` chunks of this width, so any `dim` works
  and the common powers of two (16..128) load a whole row per chunk.
  """
  return min(dim & -dim, MAX_COL_BLOCK)


def row_block(n: int, cols: int, target: int = 4096) -> int:
  """Power-of-two number of rows (bags or segments) per program, about `target / cols`."""
  b = max(1, min(target // max(cols, 1), 64))
  b = 1 << (b.bit_length() - 1)
  while b > 1 and b // 2 >= n:
    b //= 2
  return b


# XLA:CPU has no bfloat16 scatter: its float normalization pass rewrites one into a convert
# of the whole operand to f32, an f32 scatter and a convert back (a 2.6M x 16 table: ~150
# ms per update against 0.2 ms for f32). Without the pass the scatter runs on the bf16
# buffer in place and writes the same bits (rows are written as computed, in f32, then
# rounded to bf16, before the scatter).
_CPU_BF16_OPTIONS = {"xla_disable_hlo_passes": "float-normalization-bf16"}


def table_compiler_options(platform: str, dtypes) -> dict[str, str]:
  """XLA compiler options for programs that update tables of `dtypes` on `platform`: on
  CPU with bfloat16 tables, the bf16 float normalization pass is off (see above)."""
  if platform == "cpu" and "bfloat16" in set(dtypes):
    return dict(_CPU_BF16_OPTIONS)
  return {}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GpuTuning:
  """Triton launch parameters of the kernels: warps and pipeline stages per program, the
  elements (bags or segments x columns) a lookup / update program owns, and whether the
  padded lookup walks its slots in straight-line code (all row gathers can be in flight at
  once) rather than a loop (one gather after the other).

  Defaults from `benchmarks/kernels.py --sweep` on an H200 (2026-12-04; 1M x 128 table,
  65,536 bags of 8): 1024-element unrolled lookups ran float32 in 84 us against 104 us for
  the earlier 4096-element loop, int8 in 56 against 64 us; the update kept its 2048 elements.
  """
  num_warps: int = 4
  num_stages: int = 2
  lookup_block: int = 1024
  update_block: int = 2048
  unroll_slots: bool = True

  def __post_init__(self):
    from jaxrec.embedding.specs import is_whole  # pylint: disable=import-outside-toplevel
    for name in ("num_warps", "num_stages", "lookup_block", "update_block"):
      value = getattr(self, name)   # a whole float (gin writes 2e3 as one) or numpy integer
      if not is_whole(value):       # counts, as other counts
        raise ConfigError(f"GpuTuning.{name} must be a positive integer, got {value!r}")
      object.__setattr__(self, name, int(value))
    if self.num_warps & (self.num_warps - 1):
      raise ConfigError(f"GpuTuning.num_warps must be a power of two (Triton), got "
                        f"{self.num_warps}")
    if not isinstance(self.unroll_slots, bool):
      raise ConfigError(f"GpuTuning.unroll_slots must be True or False, got "
                        f"{self.unroll_slots!r}")


_TUNING: list[GpuTuning] = []


def tuned(launch: GpuTuning) -> contextlib.AbstractContextManager:
  """Kernels traced inside use `launch` (`benchmarks/kernels.py --sweep` compares them)."""
  return _pushed(_TUNING, launch)


def tuning() -> GpuTuning:
  """The launch parameters in effect: `tuned`'s innermost, else `GpuTuning()`, the defaults
  with the gin bindings (e.g. `GpuTuning.num_warps = 8` for another GPU; read when a
  kernel is traced)."""
  return _TUNING[-1] if _TUNING else GpuTuning()


def tuning_warning(kernel: str, backend: str, interpret: bool) -> str | None:
  """A warning for `GpuTuning` bindings that change nothing: they set the Triton launches
  of the Pallas kernels on a GPU, and were taken without a word with `kernel='xla'`, on
  CPU or in interpret mode. None when nothing is bound off its default, or it applies."""
  t = tuning()
  changed = [f"{f.name}={getattr(t, f.name)}" for f in dataclasses.fields(GpuTuning)
             if getattr(t, f.name) != f.default]
  if not changed or (kernel == "pallas" and is_gpu(backend) and not interpret):
    return None
  how = " in interpret mode" if kernel == "pallas" and interpret else ""
  return (f"GpuTuning ({', '.join(changed)}) has no effect: it sets the Pallas kernels' "
          f"Triton launches on a GPU; here the kernel is {kernel} on {backend}{how}")


def compiler_params() -> plgpu.CompilerParams:
  """Triton parameters of `tuning()` (ignored in interpret mode)."""
  t = tuning()
  return plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
