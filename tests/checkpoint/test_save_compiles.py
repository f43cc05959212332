"""A checkpoint save compiles nothing per replica of the dense state."""

import logging

import jax

from jaxrec import launch
from jaxrec.train import config as config_lib, loop
from tests.train.test_loop_eval_ids import BINDINGS   # a small DLRM on 8 devices


def test_a_save_on_8_devices_compiles_no_slice_per_replica(tmp_path, caplog):
  """orbax split the write of each replicated dense array over its 8 replicas, a slice
  program compiled per shape and device: 88 `jit(slice)` compiles (~3 s) at the first
  save of dlrm_criteo on 8 devices. Small arrays are now written whole, from one replica."""
  options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", progress=False,
                                  checkpoint_every=1)
  launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING, logger="jax"):
      loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  finally:
    jax.config.update("jax_log_compiles", False)
  compiles = [r.getMessage() for r in caplog.records if "Compiling jit(" in r.getMessage()]
  assert compiles, "no compile was logged: the check would pass whatever the save did"
  assert not [m for m in compiles if m.startswith("Compiling jit(slice)")], compiles
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  # orbax's own handler, but for its replica-parallel slices: its array metadata is kept
  assert (tmp_path / "checkpoints" / "2" / "state" / "array_metadatas").is_dir()
