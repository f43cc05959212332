"""jaxrec's own code raises no deprecation warning (jax, flax, optax, orbax, grain, gin...)
on a representative path: a train run, a checkpoint, a resume from it (the Pallas kernels'
GPU lowering is checked in tests/kernels/test_kernel_quant.py)."""

import json
import warnings

import pytest

from jaxrec import launch
from jaxrec.train import config as config_lib, loop
from tests import deprecations

BINDINGS = ["ExperimentConfig.batch_size=64", "ExperimentConfig.eval_batch_size=256",
            "ExperimentConfig.num_eval_examples=256", "DLRM.bottom_mlp=(16,)",
            "DLRM.top_mlp=(16,1)"]


def test_a_deprecation_counts_only_from_jaxrecs_own_files():
  """The filter the path checks rely on: a warning attributed to a jaxrec file is named
  with its file and line; one attributed to a library file, or not a deprecation, is not."""
  ours = str(deprecations.JAXREC_DIR / "train" / "loop.py")
  with pytest.raises(AssertionError) as e, deprecations.none_from_jaxrec():
    warnings.warn_explicit("old API", DeprecationWarning, ours, 7)
    warnings.warn_explicit("new default", FutureWarning, ours, 8)
    warnings.warn_explicit("internal", DeprecationWarning, json.__file__, 1)
    warnings.warn_explicit("not a deprecation", UserWarning, ours, 9)
  assert str(e.value).splitlines()[1:] == [f"{ours}:7: DeprecationWarning: old API",
                                           f"{ours}:8: FutureWarning: new default"]
  with deprecations.none_from_jaxrec():
    warnings.warn_explicit("internal", DeprecationWarning, json.__file__, 1)


def test_train_checkpoint_and_resume_raise_no_deprecation(tmp_path):
  """2 steps of DLRM on the 8-device mesh with an eval and a checkpoint, then a resume to
  step 3 that restores it."""
  def run(num_steps):
    launch.parse_gin(["configs/dlrm_synthetic.gin"], BINDINGS)
    options = config_lib.RunOptions(num_steps=num_steps, mesh="data=8", plan="dp",
                                    log_every=1, progress=False)
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))

  with deprecations.none_from_jaxrec():
    run(2)
    run(3)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  # the resume restored step 2's checkpoint and trained step 3 only
  assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3], lines
  assert [l["checkpoint_step"] for l in lines if l.get("event") == "resume"] == [2], lines
