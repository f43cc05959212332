"""Eval batches get the same host-side id checks as train batches: an out-of-range id in
the eval data is a DataError naming the feature, not a silently clamped lookup."""

import numpy as np
import pytest

from jaxrec import launch
from jaxrec.checkpoint.manager import CheckpointManager
from jaxrec.errors import DataError
from jaxrec.train import config as config_lib, data_adapter, loop

BINDINGS = ["ExperimentConfig.batch_size=64", "ExperimentConfig.eval_batch_size=512",
            "ExperimentConfig.num_eval_examples=512", "DLRM.bottom_mlp=(16,)",
            "DLRM.top_mlp=(16,1)"]


class _BadEval:
  """The real eval data, with feature `feature`'s first id set to `value`."""

  def __init__(self, inner, feature, value):
    self.inner, self.feature, self.value = inner, feature, value

  def __iter__(self):
    for batch, mask in self.inner:
      ids = np.array(batch.ids[self.feature])
      ids[0, 0] = self.value
      yield batch.replace(ids=dict(batch.ids, **{self.feature: ids})), mask

  def __getattr__(self, name):
    return getattr(self.inner, name)


def test_out_of_range_eval_id_is_a_data_error(monkeypatch, tmp_path):
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  config = config_lib.ExperimentConfig()
  feature = config.embedding[1][0]
  rows = next(t.rows for t in config.embedding[0] if t.name == feature.table)
  real = data_adapter.eval_data
  monkeypatch.setattr(data_adapter, "eval_data",
                      lambda c, o: _BadEval(real(c, o), feature.name, rows))
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", log_every=2,
                                  checkpoint_every=2, progress=False)
  with pytest.raises(DataError, match=rf"feature '{feature.name}' \(table '{feature.table}', "
                     rf"{rows} rows\): id {rows} is out of range"):
    loop.train_and_evaluate(config, options, str(tmp_path))


def test_a_missing_train_data_leaves_no_checkpointer_open(monkeypatch, tmp_path):
  """A data error found after `W/checkpoints`' manager was created closed neither it nor
  the tier, and orbax's cleanup thread printed a traceback after the `error:` line. The
  training data now opens before the manager: none is created, or it is closed."""
  opened, closed = [], []
  real_init, real_close = CheckpointManager.__init__, CheckpointManager.close
  monkeypatch.setattr(CheckpointManager, "__init__",
                      lambda self, *a, **k: (opened.append(1), real_init(self, *a, **k))[1])
  monkeypatch.setattr(CheckpointManager, "close",
                      lambda self: (closed.append(1), real_close(self)))
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", progress=False,
                                  train_data=str(tmp_path / "missing.tsv"))
  with pytest.raises(DataError, match="missing.tsv: no such file or directory"):
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path / "w"))
  assert len(closed) == len(opened)
