"""Bool bindings take True/False only (`specs.flag`): `1 in (True, False, 'auto')` holds in
Python and gin's `'False'` is truthy, so 0/1 and strings must name the binding, not pass."""

import gin
import numpy as np
import pytest

from jaxrec import offload
from jaxrec.checkpoint.manager import CheckpointManager
from jaxrec.embedding.specs import EmbeddingOptions, flag
from jaxrec.errors import ConfigError


def test_flag_returns_bools_and_listed_words_only():
  assert flag(np.True_, "x") is True and flag(False, "x") is False
  assert flag("auto", "x", "auto") == "auto"
  for bad in (1, 0, "true", "AUTO", None, 1.0):
    with pytest.raises(ConfigError, match=r"^x must be True, False or 'auto', got "):
      flag(bad, "x", "auto")
  with pytest.raises(ConfigError, match=r"^y must be True or False, got 'auto'$"):
    flag("auto", "y")


@pytest.mark.parametrize("value", [1, 0, "True", "false"])
def test_dedup_refuses_ints_and_strings(value):
  with pytest.raises(ConfigError, match=f"^EmbeddingOptions.dedup must be True, False or "
                                        f"'auto', got {value!r}(\n|$)"):
    EmbeddingOptions(dedup=value)
  assert [EmbeddingOptions(dedup=v).dedup for v in (True, False, "auto")] == [True, False,
                                                                               "auto"]


def test_dedup_gin_binding_of_one_names_it():
  gin.clear_config()
  try:
    gin.parse_config("EmbeddingOptions.dedup = 1")
    with pytest.raises(ConfigError, match="EmbeddingOptions.dedup must be True, False or "
                                          "'auto', got 1"):
      EmbeddingOptions()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("value", [1, "False"])
def test_checkpoint_async_save_refuses_non_bools(tmp_path, value):
  """`CheckpointManager.async_save = 'False'` (a gin binding) saved in the background."""
  with pytest.raises(ConfigError, match=f"^CheckpointManager.async_save must be True or "
                                        f"False, got {value!r}(\n|$)"):
    CheckpointManager(tmp_path / "ckpt", async_save=value)


@pytest.mark.parametrize("make, binding", [
    (lambda v: EmbeddingOptions(stochastic_rounding=v), "EmbeddingOptions.stochastic_rounding"),
    (lambda v: EmbeddingOptions(interpret=v), "EmbeddingOptions.interpret"),
    (lambda v: offload.OffloadConfig(auto=v), "OffloadConfig.auto"),
])
def test_other_bool_options_refuse_one(make, binding):
  with pytest.raises(ConfigError, match=f"^{binding} must be True or False, got 1(\n|$)"):
    make(1)
