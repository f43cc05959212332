"""A run already at --num_steps only evaluates: its `resume` line is the whole record of
that evaluation, so it carries what a training run's lines do (`bad_rows` included)."""

import json

import pytest

from jaxrec import launch
from jaxrec.train import config as config_lib, data_adapter, loop
from tests.train.test_loop_eval_ids import BINDINGS   # a small DLRM on 8 devices
from tests.train.test_writers import tb_scalars


class _Skipped:
  """The real eval data, reporting `counts` malformed rows dropped (`--bad_rows=skip`)."""

  def __init__(self, inner, counts):
    self.inner, self.counts = inner, counts

  def __iter__(self):
    return iter(self.inner)

  def bad_row_counts(self):
    return dict(self.counts)

  def __getattr__(self, name):
    return getattr(self.inner, name)


@pytest.mark.slow   # ~20 s: a training run to checkpoint, then the evaluate-only run
def test_an_evaluate_only_run_records_the_eval_rows_it_skipped(monkeypatch, tmp_path):
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  options = config_lib.RunOptions(num_steps=1, mesh="data=8", plan="dp", progress=False,
                                  bad_rows="skip")
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  real = data_adapter.eval_data
  monkeypatch.setattr(data_adapter, "eval_data",
                      lambda c, o: _Skipped(real(c, o), {"eval.tsv": 3}))
  result = loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  last = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][-1]
  assert last["event"] == "resume" and "eval_auc" in last
  assert last["bad_rows"] == {"eval.tsv": 3}
  assert result["bad_rows"] == {"eval.tsv": 3}   # the `done:` line
  assert tb_scalars(str(tmp_path))[("bad_rows/eval", 1)] == 3   # TB showed none
