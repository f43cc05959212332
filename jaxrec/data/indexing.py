"""Which examples a batch holds: pure functions of `(seed, position)`.

The data order is defined once, globally, independent of the number of processes:

* *position* `g = 0, 1, 2, ...` counts examples consumed by the whole job. Global batch
  `k` after position `g0` holds positions `[g0 + k*B, g0 + (k+1)*B)`; process `p` of `P`
  takes the contiguous slice `[p*B/P, (p+1)*B/P)` of it. So the concatenation of all
  processes' local batches is the same global batch for every `P`, and a job restarted
  with a different `P` continues from `g` with nothing lost or repeated.
* for a finite source of `N` examples, position `g` is example `perm_e(g mod N)` of epoch
  `e = g // N`, where `perm_e` is a keyed pseudo-random bijection of `[0, N)` (a Feistel
  network with cycle walking, keyed by `(seed, e)`): a full global shuffle per epoch that
  needs no memory and is computed for any position directly.

Hashes are splitmix64 on `uint64` numpy arrays (wrapping arithmetic).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_FEISTEL_ROUNDS = 6


def mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser: a bijective, well-mixing hash of `uint64` values (any shape)."""
  x = np.asarray(x, np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def key(*parts: int) -> np.uint64:
  """Combines integers (seeds, stream ids) into one 64-bit key."""
  h = np.uint64(0x6A09E667F3BCC909)
  with np.errstate(over="ignore"):
    for p in parts:
      h = mix64(np.uint64(h) ^ mix64(np.uint64(int(p) & 0xFFFFFFFFFFFFFFFF) + _GOLDEN))
  return np.uint64(h)


def to_unit(bits: np.ndarray) -> np.ndarray:
  """`uint64` hashes -> float64 uniform in `[0, 1)` (53 random bits)."""
  return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _feistel(x: np.ndarray, half: int, round_keys: np.ndarray) -> np.ndarray:
  mask = np.uint64((1 << half) - 1)
  shift = np.uint64(half)
  left, right = x >> shift, x & mask
  for rk in round_keys:
    left, right = right, left ^ (mix64(right ^ rk) & mask)
  return (left << shift) | right


def permute(k: np.ndarray, n: int, seed_key: np.uint64) -> np.ndarray:
  """The keyed bijection of `[0, n)` applied to `k` (`uint64`/int array, values `< n`)."""
  k = np.asarray(k, np.uint64)
  if n <= 1:
    return k.copy()
  bits = max(2, (n - 1).bit_length())
  bits += bits % 2
  round_keys = mix64(np.uint64(seed_key) + np.arange(1, _FEISTEL_ROUNDS + 1, dtype=np.uint64)
                     * _GOLDEN)
  x = _feistel(k, bits // 2, round_keys)
  out = x >= np.uint64(n)
  while out.any():  # cycle walking; the domain is < 4n, so few rounds.
    x[out] = _feistel(x[out], bits // 2, round_keys)
    out = x >= np.uint64(n)
  return x


def example_indices(positions: np.ndarray, num_examples: int | None, seed: int,
                    shuffle: bool) -> np.ndarray:
  """Global positions -> example indices, int64 (same shape).

  Endless sources (`num_examples=None`) map position `g` to example `g`. Finite ones wrap
  around per epoch and, with `shuffle`, are permuted per epoch by `(seed, epoch)`.
  """
  positions = np.asarray(positions, np.int64)
  if num_examples is None:
    return positions
  epoch, k = np.divmod(positions, num_examples)
  if not shuffle:
    return k
  out = np.empty_like(k)
  for e in np.unique(epoch):
    sel = epoch == e
    out[sel] = permute(k[sel].astype(np.uint64), num_examples,
                       key(seed, int(e))).astype(np.int64)
  return out


def local_positions(start: int, global_batch: int, process_index: int,
                    process_count: int) -> np.ndarray:
  """Positions of process `p`'s slice of the global batch starting at `start`, int64."""
  local = global_batch // process_count
  begin = start + process_index * local
  return np.arange(begin, begin + local, dtype=np.int64)
