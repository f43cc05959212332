"""Which examples a batch holds: pure functions of `(seed, position)`.

The data order is defined once, globally, independent of the number of processes:

* *position* `g = 0, 1, 2, ...` counts examples consumed by the whole job. Global batch
  `k` after position `g0` holds positions `[g0 + k*B, g0 + (k+1)*B)`; process `p` of `P`
  takes the contiguous slice `[p*B/P, (p+1)*B/P)` of it. So the concatenation of all
  processes' local batches is the same global batch for every `P`, and a job restarted
  with a different `P` continues from `g` with nothing lost or repeated.
* for a finite source of `N` examples, position `g` is example `perm_e(g mod N)` of epoch
  `e = g // N`, where `perm_e` is a keyed pseudo-random bijection of `[0, N)` (a
  Feistel-like network with cycle walking keyed by `(seed, e)`, see `permute`): a full
  global shuffle per epoch that needs no memory and is computed for any position directly.

Hashes are splitmix64 on `uint64` numpy arrays (wrapping arithmetic).
"""

from __future__ import annotations

import math

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_FEISTEL_ROUNDS = 4


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


def _round(v: np.ndarray, rk: np.uint64, modulus: np.uint64) -> np.ndarray:
  h = (v + rk) * _M1
  h ^= h >> np.uint64(32)
  h *= _M2
  return (h >> np.uint64(32)) % modulus


def _shuffle_pass(x: np.ndarray, a: np.uint64, b: np.uint64, round_keys) -> np.ndarray:
  left, right = x // b, x % b  # x = left * b + right, left < a, right < b
  with np.errstate(over="ignore"):
    for i in range(0, len(round_keys), 2):
      left = (left + _round(right, round_keys[i], a)) % a
      right = (right + _round(left, round_keys[i + 1], b)) % b
  return left * b + right


def permute(k: np.ndarray, n: int, seed_key: np.uint64) -> np.ndarray:
  """The keyed bijection of `[0, n)` applied to `k` (`uint64`/int array, values `< n`).

  A Feistel-like network on `[0, a) x [0, b)` (`a*b >= n`, both ~sqrt(n)): each half-round
  adds a keyed hash of one half to the other, modulo its size, so every pass is a bijection
  of `[0, a*b)`; values that land in `[n, a*b)` are passed again (cycle walking; they are
  fewer than 1/sqrt(n) of all).
  """
  k = np.asarray(k, np.uint64)
  if n <= 1:
    return k.copy()
  a = math.isqrt(n - 1) + 1
  b = -(-n // a)
  round_keys = mix64(np.uint64(seed_key) + np.arange(1, 2 * _FEISTEL_ROUNDS + 1,
                                                     dtype=np.uint64) * _GOLDEN)
  a, b, nn = np.uint64(a), np.uint64(b), np.uint64(n)
  x = _shuffle_pass(k, a, b, round_keys)
  out = x >= nn
  while out.any():
    x[out] = _shuffle_pass(x[out], a, b, round_keys)
    out = x >= nn
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
