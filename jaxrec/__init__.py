"""jaxrec: recommendation-model training on JAX with sharded embedding tables."""

import os as _os

__version__ = "0.1.0"

# XLA:CPU in jaxlib 0.10 hands some reductions to YNNPACK fusions; one of them (a
# transposed reduce in the `grid` plan's sparse update, `[n, dim/col]` rows with
# n >= 512) segfaults inside YNNPACK's transpose. Keeping reductions on XLA's own emitters
# avoids it; dots still use YNNPACK. XLA reads XLA_FLAGS when the first backend starts,
# so this must run before that (importing jaxrec early is enough). A user's own setting of
# the flag wins.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}=-reduce".strip()
