"""Where the trainer meets the input pipeline and the checkpoint module (thin wiring)."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from jaxrec.data.batch import Batch
from jaxrec.data import source as source_lib
from jaxrec.data.synthetic import SyntheticSource


class _TmpIter:
  def __init__(self, src, batch_size):
    self.src, self.b, self.pos = src, batch_size, 0

  def __next__(self):
    out = self.src.gather(np.arange(self.pos, self.pos + self.b))
    self.pos += self.b
    return out

  def get_state(self):
    return {"examples_consumed": self.pos}

  def set_state(self, s):
    self.pos = int(s["examples_consumed"])


def _layout(config):
  return source_lib.make_layout(config.features, {t.name: t.rows for t in config.tables},
                                config.num_dense)


def train_iterator(config, options):
  return _TmpIter(SyntheticSource(_layout(config), seed=options.seed, split=0), config.batch_size)


def eval_batches(config, options) -> Callable[[], Iterable[tuple[Batch, int]]]:
  src = SyntheticSource(_layout(config), seed=options.seed, split=1)
  def gen():
    b = config.eval_batch_size
    for start in range(0, config.num_eval_examples, b):
      n = min(b, config.num_eval_examples - start)
      yield src.gather(np.arange(start, start + b)), n
  return gen


def bad_row_metrics(it):
  return {}


def checkpointer(workdir, options):
  return None
