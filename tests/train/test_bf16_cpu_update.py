"""bfloat16 tables on CPU: the train step scatters rows into the bf16 table in place (XLA's
bf16 normalization pass, which converted the whole table to f32 per update, is off for
programs that update tables) and writes the same bits as with the pass."""

import re

import jax
import numpy as np
import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.kernels import platform as platform_lib
from jaxrec.models import DLRM
from jaxrec.train.config import ExperimentConfig, dense_optimizer
from tests.offload import offload_helpers as oh

ROWS = 20_000
TABLES = (TableSpec("big", ROWS, 8, dtype="bfloat16"), TableSpec("small", 50, 8, dtype="bfloat16"))
FEATURES = (FeatureSpec("f_big", "big"), FeatureSpec("f_small", "small"),
            FeatureSpec("f_big2", "big", max_len=3, pooling="mean"))


def _config(opt):
  return ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16, 8), (16, 1)),
                          batch_size=oh.BATCH, dense_optimizer=dense_optimizer("sgd", 0.05),
                          sparse_optimizer=optimizers.sparse_optimizer(opt, lr=0.05))


def _run(monkeypatch, opt, mesh, plan, with_pass):
  if with_pass:
    monkeypatch.setattr(platform_lib, "table_compiler_options", lambda *a: {})
  else:
    monkeypatch.undo()
  run = oh.Run(_config(opt), oh.mesh_of(mesh), plan=plan, iterator=oh.train_iterator())
  batch = run.put(next(oh.train_iterator()))
  hlo = run.step_fn.lower(run.state, batch).compile().as_text()
  run.train(6)
  tables, opt_state = run.full_tables()
  return hlo, run.losses, tables, opt_state


@pytest.mark.parametrize("opt,mesh,plan", [("adagrad", "single", "dp"),
                                           ("sgd", "data=2,table=2,row=2", "twrw")])
def test_bf16_update_in_place_writes_the_same_bits(monkeypatch, opt, mesh, plan):
  hlo, losses, tables, opt_state = _run(monkeypatch, opt, mesh, plan, with_pass=False)
  ref_hlo, ref_losses, ref_tables, ref_opt = _run(monkeypatch, opt, mesh, plan, with_pass=True)
  # with the pass, the stack of the big table is converted whole to f32 (the test's
  # witness that it matters); without, nothing of that size is f32
  shards = set(re.findall(r"bf16\[(\d+),(\d+)\]", hlo))   # [local rows, local dim]
  whole = [s for s in shards if int(s[0]) >= ROWS // 8]
  assert whole, shards
  converted = lambda text: [s for s in whole if re.search(
      rf"= f32\[{s[0]},{s[1]}\]{{[^}}]*}} convert\(", text)]
  assert converted(ref_hlo) and not converted(hlo)
  np.testing.assert_array_equal(losses, ref_losses)
  for name in ref_tables:
    assert tables[name].dtype == ref_tables[name].dtype
    np.testing.assert_array_equal(tables[name].view(np.uint16),
                                  ref_tables[name].view(np.uint16), err_msg=name)
    for k in ref_opt.get(name, {}):
      np.testing.assert_array_equal(opt_state[name][k], ref_opt[name][k])


def test_other_tables_and_platforms_keep_the_defaults():
  assert platform_lib.table_compiler_options("cpu", ["float32", "float16", "int8"]) == {}
  assert platform_lib.table_compiler_options("gpu", ["bfloat16"]) == {}
  assert platform_lib.table_compiler_options("cpu", ["float32", "bfloat16"]) == {
      "xla_disable_hlo_passes": "float-normalization-bf16"}
