"""Helpers for the data tests: tiny Criteo TSV files and feature configs."""

import gzip

from jaxrec.data.source import make_layout
from jaxrec.embedding.specs import FeatureSpec

NUM_SPARSE = 26


def features(max_lens=None, weighted=()):
  """26 features f0..f25 on tables t0..t25; `max_lens` {k: len}, `weighted` {k}."""
  max_lens = max_lens or {}
  return [FeatureSpec(f"f{k}", f"t{k}", max_lens.get(k, 1), weighted=k in weighted)
          for k in range(NUM_SPARSE)]


def rows(n=1000):
  return {f"t{k}": n for k in range(NUM_SPARSE)}


def layout(max_lens=None, weighted=(), n=1000):
  return make_layout(features(max_lens, weighted), rows(n))


def line(label="1", dense=None, cats=None):
  """A TSV line; `dense` 13 strings (default '1'..'13'), `cats` 26 strings (default hex k)."""
  dense = dense if dense is not None else [str(i + 1) for i in range(13)]
  cats = cats if cats is not None else [f"{k:x}" for k in range(NUM_SPARSE)]
  return "\t".join([label] + list(dense) + list(cats))


def write(path, lines, compress=False, newline="\n", final_newline=True):
  text = newline.join(lines) + (newline if final_newline else "")
  data = text.encode()
  if compress:
    data = gzip.compress(data)
  path.write_bytes(data)
  return str(path)
