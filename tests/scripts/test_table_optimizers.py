"""Per-table sparse optimizers through scripts/train.py: a run with its own optimizer for an
offloaded table and an on-device one saves, resumes bitwise equal to the run never
stopped, and resumes again with another table's optimizer changed (its state fresh)."""

import os

from tests.scripts.test_resume import FLAGS, assert_bitwise_equal
from tests.scripts.test_train import export, read_metrics, train

BINDINGS = ["uniform_tables.rows=[20000,5000,2000,1000,500,200,100,50]",
            "ExperimentConfig.table_optimizers={'t0': @RowWiseAdagrad(), 't3': @Adam()}",
            "RowWiseAdagrad.lr=0.1", "Adam.lr=0.01",
            "OffloadConfig.tables={'t0': {'cache_rows': 2000}}"]   # t0 offloaded, with state
COMMON = FLAGS + [f"--gin_bindings={b}" for b in BINDINGS] + [
    "--checkpoint_every=10", "--plan=rw", "--mesh=row=2"]


def test_save_resume_and_change_one_tables_optimizer(tmp_path):
  ref, w = str(tmp_path / "ref"), str(tmp_path / "w")
  train(ref, *COMMON, "--num_steps=20", devices=2)
  train(w, *COMMON, "--num_steps=10", devices=2)
  train(w, *COMMON, "--num_steps=20", devices=2)
  assert [l["checkpoint_step"] for l in read_metrics(w) if l.get("event") == "resume"] == [10]
  final = export(w)
  assert_bitwise_equal(final, export(ref))
  # each table's own state, the offloaded t0's whole (from its snapshot); SGD tables none
  assert {k: final[k].shape for k in final if k.startswith("table_opt/")} == {
      "table_opt/t0/accum": (20000,), "table_opt/t3/m": (1000, 16),
      "table_opt/t3/v": (1000, 16)}
  _check_copy_layout(w, str(tmp_path / "copy"))
  # t1 (SGD when saved) now Adagrad: its state starts fresh, the others' restore
  changed = [b.replace("'t3': @Adam()", "'t3': @Adam(), 't1': @Adagrad()") for b in COMMON]
  proc = train(w, *changed, "--num_steps=25", devices=2)
  assert "table(s) 't1' (Adagrad)" in proc.stderr, proc.stderr[-3000:]
  again = export(w, "again")
  assert again["table_opt/t1/accum"].shape == (5000, 16)
  assert not (final["table_opt/t3/v"] == again["table_opt/t3/v"]).all()   # it trained on


def _check_copy_layout(workdir, output):
  """A copy for another plan printed its stacks without the optimizers: none of the `_o1`,
  `_o2` stacks that a run resuming it builds. They come from the config the checkpoint
  records (the run's operative gin); here compared with the stacks of W/config.gin's."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.checkpoint import convert  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding import layout  # pylint: disable=import-outside-toplevel
  from jaxrec.sharding.plan import uniform_plan  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  _, text = convert.export_checkpoint(os.path.join(workdir, "checkpoints"), output, None,
                                      {"row": 4}, "rw")
  launch.parse_gin([os.path.join(workdir, "config.gin")], [])
  config = launch.build(ExperimentConfig)
  run = layout.build_layouts(config.tables, config.features,
                             uniform_plan("rw", config.tables, 1), {"row": 4},
                             config.sparse_tx())
  assert [l.split(":")[0] for l in text.splitlines() if l.startswith("rw_")] == [
      l.name for l in run], text
  assert {l.name[-3:] for l in run} >= {"_o1", "_o2"}
  assert "sparse optimizer from the config the checkpoint's run recorded" in text, text
