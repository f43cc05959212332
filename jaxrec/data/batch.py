"""The batch every source yields and the trainer consumes.

Arrays (numpy on the host, jax on device), `B` = global batch size:
  dense:   float32 `[B, num_dense]`  (Criteo: 13 values, already `log(1 + max(x, 0))`)
  labels:  float32 `[B]`             (0 or 1)
  ids:     dict feature -> int32 `[B, max_len]`; absent bag slots are -1
  weights: dict feature -> float32 `[B, max_len]` for weighted features only
"""

from __future__ import annotations

from typing import Any

import flax.struct
import numpy as np


@flax.struct.dataclass
class Batch:
  dense: Any
  labels: Any
  ids: dict[str, Any]
  weights: dict[str, Any] = flax.struct.field(default_factory=dict)

  @property
  def size(self) -> int:
    return int(self.labels.shape[0])


def concatenate(batches: list[Batch]) -> Batch:
  """Joins batches along the batch axis (host numpy)."""
  return Batch(
      dense=np.concatenate([b.dense for b in batches]),
      labels=np.concatenate([b.labels for b in batches]),
      ids={k: np.concatenate([b.ids[k] for b in batches]) for k in batches[0].ids},
      weights={k: np.concatenate([b.weights[k] for b in batches]) for k in batches[0].weights},
  )
