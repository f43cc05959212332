"""The planner offloads tables that do not fit the device memory budget."""

import dataclasses

import numpy as np
import pytest

from jaxrec import offload
from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError
from tests.planning_calls import record_shapes

TABLES = (TableSpec("huge", 8_000_000, 16), TableSpec("mid", 1_000_000, 16),
          TableSpec("small", 10_000, 16))
FEATURES = tuple(FeatureSpec(f"f_{t.name}", t.name) for t in TABLES)
MESH = {"data": 1}
BUDGET = 200 * 2**20          # the huge table alone is 512 MB with its Adagrad state
ADAGRAD = optimizers.RowWiseAdagrad()


def _plan(config):
  return offload.plan_with_offload(TABLES, FEATURES, MESH, config, ADAGRAD, BUDGET, 512)


def test_auto_offloads_the_biggest_table_until_the_plan_fits():
  result, config, specs = _plan(offload.OffloadConfig(auto=True))
  assert [t.name for t in config.tables] == ["huge"]
  assert config.tables[0].cache_rows == 800_000
  assert {t.name: t.rows for t in specs} == {"huge": 800_000, "mid": 1_000_000, "small": 10_000}
  assert set(result.plan.placements) == {"huge", "mid", "small"}
  assert any("offloaded 'huge'" in n and "auto" in n for n in result.notes)


def test_auto_skips_tables_that_cannot_be_offloaded():
  """An int8 table (not offloadable) is passed over: auto offloads the next biggest."""
  tables = (dataclasses.replace(TABLES[0], dtype="int8"),) + TABLES[1:]
  _, config, specs = offload.plan_with_offload(tables, FEATURES, MESH,
                                               offload.OffloadConfig(auto=True), ADAGRAD,
                                               260 * 2**20, 512)
  assert [t.name for t in config.tables] == ["mid"]
  assert dict((t.name, t.rows) for t in specs)["huge"] == 8_000_000


def test_auto_that_can_offload_nothing_more_says_why():
  """Every table int8 (or too small to cache): the error said only `OffloadConfig.auto=True`,
  where the same tables in bfloat16 were offloaded and trained."""
  tables = tuple(dataclasses.replace(t, dtype="int8") for t in TABLES)
  with pytest.raises(ConfigError, match=r"OffloadConfig.auto=True \(it passes over the rest: "
                     r"'huge', 'mid', 'small' are int8, which cannot be offloaded \(store "
                     r"them as bfloat16/float16\)\)"):
    offload.plan_with_offload(tables, FEATURES, MESH, offload.OffloadConfig(auto=True),
                              ADAGRAD, 20 * 2**20, 512)


def test_auto_cache_is_sized_for_training_not_for_an_eval_batch():
  """`auto` sizes a cache for the ids of H+1 training batches (here 512 x 5), not for an
  eval batch (it made a 16,384-row cache here): an eval batch with more rows is evaluated
  in pieces (`eval_split`, tests/offload/test_eval.py), and start-up warns."""
  from jaxrec.train.config import ExperimentConfig, RunOptions
  from jaxrec.models import DLRM
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512, eval_batch_size=16384)
  cfg = offload.OffloadConfig(auto=True, auto_cache_fraction=0.0001)
  options = RunOptions(plan="auto", memory_per_device=BUDGET)
  _, _, tables, off = offload.choose_plan(config, options, MESH, cfg)
  assert [(t.name, t.cache_rows) for t in off.tables] == [("huge", 512 * (cfg.horizon + 1))]
  assert dict((t.name, t.rows) for t in tables)["huge"] == 512 * 5


def test_configured_offload_is_planned_with_its_cache():
  cfg = offload.OffloadConfig({"huge": {"cache_bytes": 32 * 2**20}})
  result, config, specs = _plan(cfg)
  assert config.tables == cfg.tables
  assert dict((t.name, t.rows) for t in specs)["huge"] == 32 * 2**20 // (16 * 4 + 4)
  assert any("offloaded 'huge'" in n for n in result.notes)


def test_auto_caches_that_do_not_fit_name_auto_cache_fraction():
  """Every table offloaded and the caches auto gave still too big: the error says which
  setting sizes them (it named the caches only; h102's audit, a 6e7-row table at 128 MiB)."""
  with pytest.raises(ConfigError, match=r"the caches auto gave 'huge', 'mid', 'small' hold "
                     r"OffloadConfig.auto_cache_fraction=0.4 of their rows: lower it"):
    offload.plan_with_offload(TABLES, FEATURES, MESH,
                              offload.OffloadConfig(auto=True, auto_cache_fraction=0.4),
                              ADAGRAD, 64 * 2**20, 512)


def test_without_auto_a_plan_that_does_not_fit_is_an_error():
  with pytest.raises(ConfigError, match="auto=False"):
    _plan(offload.OffloadConfig())


def test_auto_with_a_forced_kind_says_it_offloads_only_with_plan_auto():
  """`OffloadConfig.auto=True --plan=dp` over budget said only 'plan (forced) does not
  fit': auto did nothing, without a word."""
  from jaxrec.errors import BudgetError  # pylint: disable=import-outside-toplevel
  from jaxrec.models import DLRM  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions  # pylint: disable=C0415
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((8,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512)
  with pytest.raises(BudgetError, match=r"^--plan=dp: plan \(forced\) does not fit: .*; "
                     r"OffloadConfig.auto offloads tables only with --plan=auto \(a forced "
                     r"kind keeps every table on the devices\)$"):
    offload.choose_plan(config, RunOptions(plan="dp", memory_per_device=BUDGET), MESH,
                        offload.OffloadConfig(auto=True))


def test_settings_of_a_run_that_offloads_nothing_are_warned_about(caplog):
  """`OffloadConfig.auto_cache_fraction` / `max_staleness` bound in a run offloading no table
  had no effect, and the run said nothing (gin counts them used)."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.offload import hooks  # pylint: disable=import-outside-toplevel
  try:
    launch.parse_gin([], ["OffloadConfig.max_staleness = 4",   # prefetch_depth: the default,
                          "OffloadConfig.prefetch_depth = 4",   # as W/config.gin binds it
                          "OffloadConfig.snapshot_check = 'sizes'"])
    with caplog.at_level("WARNING"):
      hooks.warn_idle_settings(launch.build(offload.OffloadConfig))
    assert caplog.messages == [
        "OffloadConfig.max_staleness (--gin_bindings) has no effect: no table is offloaded "
        "(OffloadConfig.tables is empty and OffloadConfig.auto is off)"]   # (snapshot_check
  finally:   # reads an earlier run's snapshots)
    gin.clear_config()


def test_trainer_hooks_forced_plan_and_no_offload():
  from jaxrec.train.config import ExperimentConfig, RunOptions
  from jaxrec.models import DLRM
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD)
  options = RunOptions(plan="rw", mesh="row=2", memory_per_device=BUDGET)
  cfg = offload.OffloadConfig({"huge": {"cache_rows": 100_000}})
  plan, result, tables, off = offload.choose_plan(config, options, {"row": 2}, cfg)
  assert plan["huge"].kind == "rw" and dict((t.name, t.rows) for t in tables)["huge"] == 100_000
  assert off is cfg and result.plan == plan
  # a forced kind notes the offloaded table as `auto` does (printed, and kept in plan.json)
  # with the store's size and the tier's host memory (plan.py said nothing of either)
  huge = dict((t.name, t) for t in TABLES)["huge"]
  host = offload.host_bytes([huge], cfg, ADAGRAD) / 2**20
  assert [n for n in result.notes if "offloaded" in n] == [
      f"offloaded 'huge': 100,000-row device cache, full table in tensorstore "
      f"({huge.rows * (huge.dim * 4 + 4) / 2**20:.1f} MiB with its optimizer state, on disk; "
      f"the tier keeps ~{host:.1f} MiB in host memory, "
      f"{cfg.host_buffer_rows * (huge.dim * 4 + 4 + 24) / 2**20:.1f} MiB of it the write-back "
      f"buffer's {cfg.host_buffer_rows:,} rows)"]
  # its row in the stats table shows the cache's rows: said on the row
  row = dict((t.name, t) for t in result.tables)["huge"]
  assert row.rows == 100_000 and row.reason.startswith(
      f"offloaded cache of its {huge.rows:,} rows; ")
  assert not dict((t.name, t) for t in result.tables)["small"].reason.startswith("offloaded")
  _, result, tables, off = offload.choose_plan(config, RunOptions(plan="dp"), {"data": 1},
                                          offload.OffloadConfig())
  assert tables == TABLES and not off.tables
  assert not [n for n in result.notes if "offloaded" in n]
  assert offload.make_tier(None, config, off, 0, "/tmp") is None


def test_table_over_the_budget_trains_offloaded(tmp_path):
  """End to end: the planner offloads the table that does not fit; training matches."""
  from tests.offload.offload_helpers import BATCH, Run, experiment, mesh_of
  cfg = experiment("sgd")
  budget = 200_000        # bytes: the 10,000 x 8 table alone is 320,000
  with pytest.raises(ConfigError, match="fits no placement"):
    offload.plan_with_offload(cfg.tables, cfg.features, MESH, offload.OffloadConfig(),
                              cfg.sparse_tx(), budget, BATCH)
  auto = offload.OffloadConfig(auto=True, prefetch_depth=2,
                               host_buffer_rows=600)
  _, off, tables = offload.plan_with_offload(cfg.tables, cfg.features, MESH, auto,
                                             cfg.sparse_tx(), budget, BATCH)
  # cache: 10% of the rows, but at least the ids of 3 batches (128 x 4 ids each)
  assert [(t.name, t.rows) for t in tables] == [("big", 1536), ("small", 50)]
  off = off.with_tables([dataclasses.replace(t, path=str(tmp_path / t.name))
                         for t in off.tables])
  ref = Run(cfg, mesh_of()).train(8)
  run = Run(cfg, mesh_of(), off).train(8)
  try:
    np.testing.assert_allclose(run.losses, ref.losses, rtol=0, atol=1e-6)
  finally:
    run.close()


def test_offloading_in_a_multi_process_job_is_refused_naming_the_tables():
  """The tier refused several processes only once built, after the data was opened, and
  without naming the tables (or that `OffloadConfig.auto` chose them)."""
  from jaxrec.train.config import ExperimentConfig, RunOptions
  from jaxrec.models import DLRM
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512, eval_batch_size=512)
  with pytest.raises(ConfigError, match=r"^offloaded tables 'huge' need one process, this "
                     r"job has 2$"):
    offload.choose_plan(config, RunOptions(plan="dp"), MESH,
                        offload.OffloadConfig({"huge": {"cache_rows": 100_000}}), processes=2)
  with pytest.raises(ConfigError, match=r"OffloadConfig.auto offloaded 'huge': the tables do "
                     r"not fit --memory_per_device"):
    offload.choose_plan(config, RunOptions(plan="auto", memory_per_device=BUDGET), MESH,
                        offload.OffloadConfig(auto=True), processes=2)
  offload.choose_plan(config, RunOptions(plan="dp"), MESH, offload.OffloadConfig(),
                      processes=2)


def test_eval_cache_warning_bounds_distinct_rows_by_the_table_size():
  """An eval batch cannot read more distinct rows than the table has: a cache holding the
  whole table (cache_rows == rows, allowed) was warned about as too small."""
  import types  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import FeatureSpec, TableSpec
  from jaxrec.offload import hooks
  spec = TableSpec("t", rows=1000, dim=4)
  features = [FeatureSpec("f", "t", max_len=4)]

  def tier(cache_rows, config=offload.OffloadConfig()):
    return types.SimpleNamespace(config=config, tables={"t": types.SimpleNamespace(
        spec=spec, cache=types.SimpleNamespace(cache_rows=cache_rows))})

  assert hooks.warn_small_eval_caches(tier(1000), features, 512) == []   # whole table cached
  (warning,) = hooks.warn_small_eval_caches(tier(999), features, 512)
  assert "may read up to 1,000 distinct rows, more than its 999-row cache" in warning
  assert hooks.warn_small_eval_caches(tier(900), features, 128) == []    # 512 rows fit
  # smaller than one example's ids (4): an eval may stop, not only take more passes
  (warning,) = hooks.warn_small_eval_caches(tier(3), features, 128)
  assert warning == ("offloaded table 't': one example may read up to 4 distinct rows, more "
                     "than its 3-row cache; an eval batch with such an example stops the run "
                     "at that eval (raise its cache_rows/cache_bytes "
                     "(OffloadConfig.tables['t']))")


def test_a_cache_smaller_than_a_training_batch_can_read_is_warned_at_start():
  """Only eval batches were checked: a training cache of 350 rows under batches of 64 x
  bags of 8 ran 130 steps, then stopped on the first batch of 351 distinct rows."""
  import types  # pylint: disable=import-outside-toplevel
  from jaxrec.embedding.specs import FeatureSpec, TableSpec
  from jaxrec.offload import hooks
  spec = TableSpec("t", rows=1000, dim=4)
  features = [FeatureSpec("f", "t", max_len=4), FeatureSpec("g", "t", max_len=1),
              FeatureSpec("h", "other", max_len=9)]

  def tier(cache_rows):
    return types.SimpleNamespace(config=offload.OffloadConfig(), tables={
        "t": types.SimpleNamespace(spec=spec, cache=types.SimpleNamespace(cache_rows=cache_rows))})

  assert hooks.warn_small_train_caches(tier(320), features, 64) == []     # 64 x 5 rows fit
  (warning,) = hooks.warn_small_train_caches(tier(319), features, 64)
  assert warning == ("offloaded table 't': a training batch (64 examples) may read up to 320 "
                     "distinct rows, more than its 319-row cache; a batch that reads more stops "
                     "the run (raise its cache_rows/cache_bytes (OffloadConfig.tables['t']))")
  assert hooks.warn_small_train_caches(tier(1000), features, 512) == []   # whole table


def test_eval_cache_warning_of_an_auto_offloaded_table_names_auto_cache_fraction():
  """`OffloadConfig.auto` sizes its tables' caches by `auto_cache_fraction` (for training
  only): the eval warning told the user to raise a cache_rows/cache_bytes they never set."""
  import types  # pylint: disable=import-outside-toplevel
  from jaxrec.offload import hooks
  _, off, _ = _plan(offload.OffloadConfig(auto=True, auto_cache_fraction=0.01))
  assert off.auto_added == ("huge",)
  spec = next(t for t in TABLES if t.name == "huge")
  cache = off.table("huge").cache_rows
  fake = types.SimpleNamespace(config=off, tables={"huge": types.SimpleNamespace(
      spec=spec, cache=types.SimpleNamespace(cache_rows=cache))})
  (warning,) = hooks.warn_small_eval_caches(fake, FEATURES, 10 * spec.rows)
  assert warning.endswith("(raise OffloadConfig.auto_cache_fraction (now 0.01; "
                          "OffloadConfig.auto offloaded 'huge'), or list 'huge' in "
                          "OffloadConfig.tables with its cache_rows/cache_bytes, or lower "
                          "ExperimentConfig.eval_batch_size for one pass)"), warning


@pytest.mark.parametrize("budget_mib, mesh_data, offloaded",
                         [(200, "<8", ()), (60, 8, ("huge", "mid")), (40, "<8", ("huge",))])
def test_auto_offloads_only_when_no_mesh_holds_the_tables(budget_mib, mesh_data, offloaded):
  """`--mesh=auto --plan=auto` with `OffloadConfig.auto` on 8 devices offloaded 'huge' on
  data=8, where every table is whole on every device, though row=8 held it on the devices
  (64 MiB a device with its state). Offloading is now the last resort: at 60 MiB no mesh
  holds the tables, and data=8 offloads as before; at 40 MiB even its caches need a mesh
  that splits them."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxrec.models import DLRM  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions  # pylint: disable=import-outside-toplevel
  gin.bind_parameter("OffloadConfig.auto", True)
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512, eval_batch_size=512)
  choice = mesh_choice.choose(config, RunOptions(memory_per_device=budget_mib * 2**20), 8)
  _, result, _, off = choice.planned
  assert (choice.mesh["data"] == 8) == (mesh_data == 8)
  assert off.auto_added == offloaded and [t.name for t in off.tables] == list(offloaded)
  assert sum(result.memory.values()) <= budget_mib * 2**20
  assert ("no mesh of 8 devices holds the tables on the devices: OffloadConfig.auto "
          "offloads" in choice.why) == bool(offloaded)
  assert ("over --memory_per_device" in choice.why) == (mesh_data != 8)


def test_no_mesh_is_priced_offloading_when_even_the_caches_cannot_fit(monkeypatch):
  """With `OffloadConfig.auto` and a budget no plan meets even with every table it can
  offload offloaded, the offloading pass priced every other mesh (~10 s for
  `skewed_synthetic` on 8 devices) before failing. The tables with those caches, split
  over every device, are a floor: over it, only `data=N` is planned, once each pass."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import BudgetError  # pylint: disable=import-outside-toplevel
  from jaxrec.models import DLRM  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions  # pylint: disable=import-outside-toplevel
  gin.bind_parameter("OffloadConfig.auto", True)
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512, eval_batch_size=512)
  off = offload.OffloadConfig()
  devices = mesh_choice.min_bytes_per_device(TABLES, off, ADAGRAD, 8)
  floor = mesh_choice.min_bytes_per_device(TABLES, mesh_choice.most_offloaded(config, off),
                                           ADAGRAD, 8)
  assert floor < devices / 5
  with pytest.raises(BudgetError, match=r"\(offloaded tables, planned as their device "
                     r"caches: 'huge' \(cache of 800,000 of its 8,000,000 rows\), 'mid' "
                     r"\(cache of 100,000 of its 1,000,000 rows\), 'small' \(cache of 2,560 "
                     r"of its 10,000 rows\); OffloadConfig.auto=True; the caches auto gave 'huge', "
                     r"'mid', 'small' hold OffloadConfig.auto_cache_fraction=0.1 of their "
                     r"rows: lower it, or raise --memory_per_device\)$"):
    offload.plan_with_offload(TABLES, FEATURES, MESH, off, ADAGRAD, 2**20, 512)
  asked = record_shapes(monkeypatch, offload, "choose_plan")
  with pytest.raises(BudgetError, match=r"; nor can any other mesh of 8 devices: the tables "
                     r"\(every table OffloadConfig.auto can offload as its cache\) and"):
    mesh_choice.choose(config, RunOptions(memory_per_device=int(floor) - 1), 8)
  assert asked == [{"data": 8, "table": 1, "row": 1, "col": 1}] * 2
  asked.clear()   # under the floor the offloading pass prices the other meshes as before
  with pytest.raises(BudgetError, match=r"nor does any other mesh of 8 devices \(20 tried"):
    mesh_choice.choose(config, RunOptions(memory_per_device=int(floor) + 1), 8)
  assert len(asked) == 21


def test_a_recorded_plan_is_checked_with_the_tables_auto_offloaded():
  """Resuming a run `OffloadConfig.auto` offloaded checked its recorded plan against the
  whole tables: 'the plan checkpoint ... records does not fit here', then planned afresh.
  The recorded plan is checked with the caches the auto selection gives on its mesh."""
  from jaxrec.models import DLRM  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions  # pylint: disable=import-outside-toplevel
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512, eval_batch_size=512)
  options = RunOptions(plan="auto", memory_per_device=BUDGET)
  auto = offload.OffloadConfig(auto=True)
  plan, _, _, off = offload.choose_plan(config, options, MESH, auto)
  assert off.auto_added == ("huge",)
  again, result, tables, off2 = offload.choose_plan(config, options, MESH, auto, recorded=plan)
  assert again == plan and result.mode == "checkpoint" and off2.auto_added == ("huge",)
  assert dict((t.name, t.rows) for t in tables)["huge"] == 800_000
  with pytest.raises(ConfigError, match="does not fit"):   # without auto: whole tables
    offload.choose_plan(config, options, MESH, offload.OffloadConfig(), recorded=plan)


def test_a_plan_files_auto_offloaded_is_checked_and_named(tmp_path):
  """A plan file's `auto_offloaded` naming an unknown table, or not a list, was ignored;
  a run's own plan.json passed back without `OffloadConfig.auto` said only 'does not fit'."""
  import json  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import BudgetError  # pylint: disable=import-outside-toplevel
  from jaxrec.models import DLRM  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions  # pylint: disable=import-outside-toplevel
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512, eval_batch_size=512)
  auto = offload.OffloadConfig(auto=True)
  _, result, _, off = offload.choose_plan(
      config, RunOptions(plan="auto", memory_per_device=BUDGET), MESH, auto)
  path = tmp_path / "plan.json"
  options = RunOptions(plan=str(path), memory_per_device=BUDGET)
  for names, error, want in (
      (["huge"], BudgetError, r"does not fit: .*; the plan's run offloaded \['huge'\] by "
       r"OffloadConfig.auto, which is off here: bind OffloadConfig.auto = True to offload "
       r"them again$"),
      (["huge", "t9"], ConfigError, rf'^--plan: {path}: "auto_offloaded" names tables this '
       r"config does not have: \['t9'\] \(tables: huge, mid, small\)$"),
      ("huge", ConfigError, rf'^--plan: {path}: "auto_offloaded" "huge": expected a list of '
       r"table names \(those OffloadConfig.auto offloaded\)$")):
    path.write_text(json.dumps({"plan": result.plan.to_json(), "auto_offloaded": names}))
    with pytest.raises(error, match=want):
      offload.choose_plan(config, options, MESH, offload.OffloadConfig())
  path.write_text(json.dumps({"plan": result.plan.to_json(), "auto_offloaded": ["huge"]}))
  assert offload.choose_plan(config, options, MESH, auto)[3].auto_added == ("huge",)


def test_a_recorded_plan_takes_the_tables_its_checkpoint_offloaded(monkeypatch):
  """A resume learnt which tables `OffloadConfig.auto` had offloaded by planning again (a
  whole search, which a changed calibration or budget could answer otherwise). The
  checkpoint's meta names them: they are offloaded again as auto offloads them, with no
  search; a checkpoint that offloaded none has its plan checked over whole tables."""
  from jaxrec.models import DLRM  # pylint: disable=import-outside-toplevel
  from jaxrec.offload import hooks  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions  # pylint: disable=import-outside-toplevel
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512, eval_batch_size=512)
  options = RunOptions(plan="auto", memory_per_device=BUDGET)
  auto = offload.OffloadConfig(auto=True)
  plan, _, _, _ = offload.choose_plan(config, options, MESH, auto)
  monkeypatch.setattr(hooks, "plan_with_offload", lambda *a, **k: pytest.fail("searched"))
  for names in [("huge",), ("huge", "mid", "gone")]:
    again, result, tables, off = offload.choose_plan(config, options, MESH, auto,
                                                     recorded=plan, recorded_offload=names)
    offloaded = tuple(n for n in names if n != "gone")   # not a table gone since
    assert again == plan and result.mode == "checkpoint" and off.auto_added == offloaded
    assert {t.name: t.rows for t in tables} == {
        "huge": 800_000, "mid": 100_000 if "mid" in names else 1_000_000, "small": 10_000}
  with pytest.raises(ConfigError, match="does not fit"):   # none offloaded: whole tables
    offload.choose_plan(config, options, MESH, auto, recorded=plan, recorded_offload=())
  # nor one auto would not offload now: at this fraction huge's cache would hold its rows
  half = dataclasses.replace(auto, auto_cache_fraction=0.5)
  with pytest.raises(ConfigError, match="does not fit"):
    offload.choose_plan(config, options, MESH, half, recorded=plan, recorded_offload=("huge",))


def test_a_plan_json_passed_back_offloads_the_tables_auto_offloaded(tmp_path):
  """`--plan=W/plan.json` of a run `OffloadConfig.auto` offloaded was checked over the whole
  tables: 'does not fit' at the run's own budget (or, without one, the table stayed on the
  device). plan.json names them (`auto_offloaded`); a file that does not is as before."""
  import json  # pylint: disable=import-outside-toplevel
  from jaxrec.models import DLRM  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions  # pylint: disable=import-outside-toplevel
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512, eval_batch_size=512)
  auto = offload.OffloadConfig(auto=True)
  _, result, _, _ = offload.choose_plan(config, RunOptions(plan="auto",
                                                           memory_per_device=BUDGET), MESH, auto)
  written = result.to_json()
  assert written["auto_offloaded"] == ["huge"]
  path = tmp_path / "plan.json"
  path.write_text(json.dumps(written))
  options = RunOptions(plan=str(path), memory_per_device=BUDGET)
  _, again, tables, off = offload.choose_plan(config, options, MESH, auto)
  assert off.auto_added == ("huge",) and again.mode == "file"
  assert dict((t.name, t.rows) for t in tables)["huge"] == 800_000
  assert again.to_json()["auto_offloaded"] == ["huge"]   # and its plan.json says so again
  roomy = RunOptions(plan=str(path), memory_per_device=4 * BUDGET)   # whole tables fit:
  assert offload.choose_plan(config, roomy, MESH, auto)[3].tables == ()   # none offloaded
  with pytest.raises(ConfigError, match="does not fit"):   # several processes: offloading
    offload.choose_plan(config, options, MESH, auto, processes=2)   # cannot run there
  del written["auto_offloaded"]   # an older plan.json: the tables whole, as before
  path.write_text(json.dumps(written))
  with pytest.raises(ConfigError, match="does not fit"):
    offload.choose_plan(config, options, MESH, auto)


def test_a_given_plan_over_int32_rows_offloads_the_table_again(tmp_path):
  """A table over 2**31 rows can only be a cache: priced whole first, a given plan (a
  plan file, or a resumed checkpoint's) failed its build check with a plain ConfigError
  and was not retried offloaded, where it had been offloaded at once."""
  import json  # pylint: disable=import-outside-toplevel
  from jaxrec.models import DLRM  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions  # pylint: disable=import-outside-toplevel
  tables = (TableSpec("giant", 3_000_000_000, 16), TableSpec("small", 10_000, 16))
  features = tuple(FeatureSpec(f"f_{t.name}", t.name) for t in tables)
  config = ExperimentConfig(embedding=(tables, features), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512, eval_batch_size=512)
  auto = offload.OffloadConfig(auto=True, auto_cache_fraction=0.01)
  budget = 64 * 2**30
  plan, result, _, _ = offload.choose_plan(config, RunOptions(plan="auto",
                                                              memory_per_device=budget), MESH, auto)
  path = tmp_path / "plan.json"
  path.write_text(json.dumps(result.to_json()))
  for options, recorded in ((RunOptions(plan=str(path), memory_per_device=budget), {}),
                            (RunOptions(memory_per_device=budget),
                             {"recorded": plan, "recorded_offload": ("giant",)})):
    _, _, _, off = offload.choose_plan(config, options, MESH, auto, **recorded)
    assert off.auto_added == ("giant",)


@pytest.mark.parametrize("auto", [False, True])
def test_a_bad_binding_the_planner_reads_is_raised_as_it_is(auto):
  """`EmbeddingOptions.kernel = 'triton'` (the planner builds EmbeddingOptions) reached the
  offload re-raise as gin's wrapped error, whose class takes no message: a TypeError
  traceback under --plan=auto. It is no budget error: offloading more cannot help."""
  import gin  # pylint: disable=import-outside-toplevel
  gin.parse_config("EmbeddingOptions.kernel = 'triton'")
  with pytest.raises(ConfigError, match=r"EmbeddingOptions.kernel must be one of") as e:
    offload.plan_with_offload(TABLES, FEATURES, MESH, offload.OffloadConfig(auto=auto),
                              ADAGRAD, BUDGET, 512)
  assert "offloaded tables" not in str(e.value)


def test_a_multi_process_job_with_auto_offload_takes_a_mesh_that_holds_the_tables():
  """With several processes (offloading needs one) the search ran offloading on data=8,
  which the one-process check then refused, before any other mesh was priced: 'offloaded
  tables need one process' though row=8 held the tables on the devices."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxrec.models import DLRM  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig, RunOptions  # pylint: disable=import-outside-toplevel
  gin.bind_parameter("OffloadConfig.auto", True)
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16,), (1,)),
                            sparse_optimizer=ADAGRAD, batch_size=512, eval_batch_size=512)
  choice = mesh_choice.choose(config, RunOptions(memory_per_device=200 * 2**20), 8,
                              processes=2)
  assert choice.mesh["data"] < 8 and choice.planned[3].tables == ()
  with pytest.raises(ConfigError, match=r"nor can any other mesh of 8 devices.*; "   # and why
                     r"OffloadConfig.auto offloads nothing in a job of several processes "
                     r"\(this one has 2\): the meshes were planned on the devices only$") as e:
    mesh_choice.choose(config, RunOptions(memory_per_device=60 * 2**20), 8, processes=2)
  # as bound: it said 'OffloadConfig.auto=False' before that, of its device-only planning
  assert "OffloadConfig.auto=False" not in str(e.value), str(e.value)
  assert "OffloadConfig.auto=True (planned on the devices only)" in str(e.value)
