"""jaxrec.data: sources (synthetic, Criteo TSV, preprocessed binary) -> `Batch` iterators.

The pipeline yields ids and dense values; it never looks anything up. The trainer calls
`make_train_iterator` and `make_eval_batches` (see `pipeline`).
"""

from jaxrec.data.batch import Batch
from jaxrec.data.pipeline import (EvalBatch, EvalData, TrainIterator, make_eval_batches,
                                  make_train_iterator, open_source)
from jaxrec.data.synthetic import SyntheticConfig, SyntheticSource
