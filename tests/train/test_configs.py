"""configs/*.gin: every config builds; dlrm_criteo.gin keeps the TorchRec comparison shape."""

import glob
import os

import gin
import pytest

from jaxrec import launch
from jaxrec.embedding import optimizers
from jaxrec.errors import ConfigError
from jaxrec.models import DCNv2, DeepFM, DLRM, TwoTower
from jaxrec.train.config import ExperimentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.gin")))


def load(name):
  launch.parse_gin([os.path.join(ROOT, "configs", name)], [])
  config = ExperimentConfig()
  config.validate(num_devices=1)
  return config


def test_the_documented_configs_exist():
  names = {os.path.basename(c) for c in CONFIGS}
  assert {"dlrm_synthetic.gin", "dcnv2_synthetic.gin", "deepfm_synthetic.gin",
          "two_tower_synthetic.gin", "dlrm_criteo.gin"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_builds(path):
  config = load(os.path.basename(path))
  assert config.tables and config.features and config.batch_size > 0
  assert config.dense_tx() is not None and config.sparse_tx() is not None


@pytest.mark.parametrize("name, cls", [
    ("dlrm_synthetic.gin", DLRM), ("dcnv2_synthetic.gin", DCNv2),
    ("deepfm_synthetic.gin", DeepFM), ("two_tower_synthetic.gin", TwoTower)])
def test_synthetic_configs_pick_their_model(name, cls):
  config = load(name)
  assert type(config.model) is cls
  assert config.train_data == "synthetic" and config.eval_data == "synthetic"


def test_dlrm_criteo_is_the_torchrec_shape():
  config = load("dlrm_criteo.gin")
  assert [(t.rows, t.dim) for t in config.tables] == [(100_000, 16)] * 26
  assert [(f.table, f.max_len) for f in config.features] == [(t.name, 1) for t in config.tables]
  assert type(config.model) is DLRM
  assert tuple(config.model.bottom_mlp) == (512, 256, 64, 16)
  assert tuple(config.model.top_mlp) == (512, 256, 1)
  assert config.batch_size == 512
  assert gin.query_parameter("dense_optimizer.name") == "sgd"
  assert gin.query_parameter("dense_optimizer.learning_rate") == 0.1
  assert config.sparse_tx() == optimizers.SGD(lr=0.1)


@pytest.mark.parametrize("binding, message", [
    ("ExperimentConfig.batch_size='abc'", "ExperimentConfig.batch_size must be an integer, got 'abc'"),
    ("ExperimentConfig.eval_batch_size=512.5", "ExperimentConfig.eval_batch_size must be an integer"),
    ("ExperimentConfig.num_eval_examples=None", "ExperimentConfig.num_eval_examples must be an integer"),
])
def test_non_integer_sizes_name_the_binding(binding, message):
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], [binding])
  with pytest.raises(ConfigError, match=message):
    ExperimentConfig().validate(num_devices=1)
