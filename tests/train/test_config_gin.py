"""W/config.gin of a run whose ExperimentConfig was given in Python (`train.config_gin`):
it held none of the run's tables, features, model, batch size or optimizers, yet its header
said to rerun it with --gin_file=<this file> (which failed: no embedding, no model)."""

import json
from typing import Any

import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from jaxrec import gin_usage, models, schedules, signals
from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.train import config_gin, loop
from jaxrec.train.config import ExperimentConfig, RunOptions, dense_optimizer
from tests.scripts.in_process import run_script

TABLES = (TableSpec("user", 101, 8), TableSpec("it em", 57, 8, "bfloat16", init_scale=0.05))
FEATURES = (FeatureSpec("uid", "user"), FeatureSpec("iid", "it em"),
            FeatureSpec("hist", "it em", 5, "mean", weighted=True))


def python_config(**over) -> ExperimentConfig:
  warm = schedules.lr_schedule("warmup_cosine_decay", init_value=0.0, peak_value=0.1,
                               warmup_steps=2, decay_steps=20)
  return ExperimentConfig(**{
      "embedding": (TABLES, FEATURES),
      "model": models.build_model("dlrm", bottom_mlp=(16, 8), top_mlp=(16, 1),
                                  dtype=jnp.bfloat16),
      "batch_size": 64, "eval_batch_size": 64, "num_eval_examples": 128,
      "dense_optimizer": dense_optimizer("adam", 0.001, clip_norm=1.0),
      "sparse_optimizer": optimizers.RowWiseAdagrad(0.05),
      "table_optimizers": {"it*": optimizers.Adam(warm)}, **over})


def test_fields_given_in_python_are_written_and_build_the_same_config():
  config = python_config()
  text, unwritten = config_gin.recorded(config, gin.operative_config_str())
  assert unwritten == []
  assert config_gin.SECTION in text and "ExperimentConfig.batch_size = 64" in text
  # the defaults gin recorded of the calls made here, which the scoped references stand
  # for, are left out (a rerun warned they went unused); their sections say so as gin does
  assert "\nAdam.b1 = " not in text and "\nTableSpec.dtype = " not in text
  assert "# Parameters for Adam:\n# " + "=" * 78 + "\n# None.\n" in text
  with gin_usage.isolated():   # built again from the text alone, checked field by field
    gin.parse_config(text)
    rebuilt = ExperimentConfig()
  assert rebuilt.tables == TABLES and rebuilt.features == FEATURES
  assert rebuilt.model.bottom_mlp == (16, 8) and jnp.dtype(rebuilt.model.dtype) == jnp.bfloat16
  assert rebuilt.sparse_optimizer == config.sparse_optimizer
  assert rebuilt.table_optimizers == config.table_optimizers
  for field in ("call", "learning_rate", "clip_norm"):
    assert getattr(rebuilt.dense_optimizer, field) == getattr(config.dense_optimizer, field)
  assert (rebuilt.batch_size, rebuilt.eval_batch_size) == (64, 64)


class Unregistered(nn.Module):   # a model of the user's own that gin does not know
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, dense, pooled):
    return nn.Dense(1)(jnp.concatenate([dense, pooled.reshape(pooled.shape[0], -1)], 1))[:, 0]


def test_what_gin_cannot_write_is_named_and_the_header_says_so(tmp_path):
  config = python_config(model=Unregistered())
  text, unwritten = config_gin.recorded(config, gin.operative_config_str())
  assert unwritten == [f"ExperimentConfig.model (a {__name__}.Unregistered, which gin does not "
                       "know: register its class with @gin.configurable)"]
  assert "ExperimentConfig.embedding = " in text   # the rest is written
  loop.train_and_evaluate(config, RunOptions(num_steps=2, progress=False), str(tmp_path / "w"))
  header = (tmp_path / "w" / "config.gin").read_text().split("\n\n")[0]
  assert "Rerun it" not in header
  assert "this file lacks what gin cannot write:\n#   ExperimentConfig.model (a " in header
  assert header.endswith("so a rerun of it alone fails or trains another model.")


def test_a_rerun_of_config_gin_trains_the_python_configs_run(tmp_path):
  """The library run and `train.py --gin_file=W/config.gin` with the header's flags: the
  same losses and eval."""
  run = tmp_path / "run"
  loop.train_and_evaluate(python_config(), RunOptions(num_steps=4, log_every=2,
                                                      progress=False), str(run))
  header = (run / "config.gin").read_text().splitlines()[1]
  flags = header.split("--gin_file=<this file> ")[1].split()
  gin.clear_config()   # as a new process starts
  proc = run_script("train.py", f"--workdir={tmp_path / 'rerun'}",
                    f"--gin_file={run / 'config.gin'}", *flags, "--log_every=2", "--noprogress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "no effect" not in proc.stderr   # the defaults config.gin binds (OffloadConfig.*)
  # complete once 'done:' is printed: a Ctrl-C in the teardown exits 0 (it exited 130 or
  # by the signal, and a wrapper reran the finished run)
  assert signals._done   # pylint: disable=protected-access

  def records(workdir):
    lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    return [{k: v for k, v in l.items() if k in ("step", "loss", "eval_auc", "eval_logloss")}
            for l in lines if "loss" in l or "eval_auc" in l]
  want, got = records(run), records(tmp_path / "rerun")
  assert [r["step"] for r in got] == [r["step"] for r in want] and len(want) >= 2
  for a, b in zip(want, got):
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=key)
