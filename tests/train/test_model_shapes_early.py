"""Model bindings that need the input shapes are checked by `loop.setup` before planning."""

import pytest

from jaxrec import launch, offload
from jaxrec.errors import ConfigError
from jaxrec.train import config as config_lib, loop


@pytest.fixture
def no_planner(monkeypatch):
  """The planner (and its report) must not be reached."""
  def refuse(*a, **k):
    raise AssertionError("planned before the model's bindings were checked")
  monkeypatch.setattr(offload, "choose_plan", refuse)


def test_no_dense_features_for_dlrm_is_named_at_its_line(tmp_path, no_planner):
  """It named the binding but not where it was written."""
  config = tmp_path / "c.gin"
  config.write_text("include 'configs/dlrm_synthetic.gin'\nExperimentConfig.num_dense = 0\n")
  launch.parse_gin([str(config)], [])
  cfg = launch.build(config_lib.ExperimentConfig)
  with pytest.raises(ConfigError) as e:
    loop.setup(cfg, config_lib.RunOptions(mesh="data=8", plan="dp"))
  assert launch.user_message(e.value).startswith(
      f"--gin_file: {config}:2: ExperimentConfig.num_dense = 0: DLRM needs dense features")


@pytest.mark.parametrize("config, binding, message", [
    ("dlrm_synthetic.gin", "DLRM.bottom_mlp=(32, 8)", r"DLRM.bottom_mlp = \(32, 8\) ends in "
     "width 8, but the embedding dim is 16"),
    ("dlrm_synthetic.gin", "ExperimentConfig.num_dense=0", "DLRM needs dense features"),
    ("two_tower_synthetic.gin", "TwoTower.item_features=(4, 99)", r"TwoTower.item_features = "
     r"\(4, 99\) must be a sequence of distinct indices in \[0, 8\)"),
])
def test_a_model_binding_that_does_not_fit_the_tables_stops_setup_before_planning(
    config, binding, message, no_planner):
  """They failed at the first apply, after the plan report was printed and the data
  opened."""
  launch.parse_gin([f"configs/{config}"], [binding])
  cfg = launch.build(config_lib.ExperimentConfig)
  with pytest.raises(ConfigError, match=message):
    loop.setup(cfg, config_lib.RunOptions(mesh="data=8", plan="dp"))
