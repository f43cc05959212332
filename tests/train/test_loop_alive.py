"""Under scripts/launch.py, the trainer's work between steps counts as progress: a long eval
or save must not look like a hang (`elastic.report_alive`; the supervisor's side is in
tests/elastic/test_supervisor.py)."""

from jaxrec import launch
from jaxrec.train import config as config_lib, loop
from tests.train.test_deprecations import BINDINGS   # eval: 256 examples in batches of 64


def test_eval_batches_and_saves_report_alive(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(loop.elastic, "report_alive",
                      lambda phase, **fields: calls.append((phase, fields)))
  launch.parse_gin(["configs/dlrm_synthetic.gin"],
                   [*BINDINGS, "ExperimentConfig.eval_batch_size=64"])
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", log_every=1,
                                  progress=False)
  loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  # the final step saves its checkpoint, then evaluates the 4 batches
  assert calls == [("save", {"checkpoint": 2})] + [("eval", {"batches": k}) for k in (1, 2, 3, 4)]
