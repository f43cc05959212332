"""Test set-up: 8 host CPU devices for mesh tests, set before jax is imported."""

import os

from tests import xla_env  # (imports no jax)

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_env.xla_flags(8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402


def _session_dir(prefix: str) -> str:
  """A fresh directory, removed when this process exits."""
  path = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


# The planner reads a cached calibration (scripts/plan.py --calibrate) from the user's
# cache; tests get an empty cache of their own so their plans do not depend on the machine.
os.environ["JAXREC_CACHE_DIR"] = _session_dir("jaxrec_test_cache_")
# XLA executables are kept on disk for the test session
# (the pytest-xdist workers and the scripts the tests run inherit the directory): the many
# restarts and resumes of scripts/train.py on the same small configs then load their train
# step instead of compiling it again (~5 s of a 12 s run; the suite ~12 → ~10.5 min).
# Keys hash the program and the XLA flags, so a changed program or device count compiles.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_dir("jaxrec_test_xla_cache_")
# Every executable, not only those over jax's 1 s default: the scripts' many sub-second
# programs (state init, eval, checkpoint helpers) then load too (tests/scripts/test_train.py
# and test_train_bad_data.py: 72 -> 51 s; in-process tests unchanged).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# No size limit of jax's, for this process and the scripts it runs: with one, jax reads
# every entry's `-atime` file at each write and locks the directory at each read (the
# suite took 14:19 against 7:35). (scripts/train.py prunes to 1 GiB at start instead,
# `jaxrec.compile_cache`, and keeps an environment setting.)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")

import jaxrec  # noqa: E402,F401  (adds its XLA flag workarounds before jax starts)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _signal_handlers_kept():
  """A test that leaves SIGINT/SIGTERM handled otherwise (e.g. by running a script's
  module-level `signals.defer()` in this process) fails, and the handlers are put back: a
  leaked handler made later tests in the same xdist worker swallow or raise signals."""
  import signal  # pylint: disable=import-outside-toplevel
  from jaxrec import signals  # pylint: disable=import-outside-toplevel
  before = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
  yield
  after = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
  for s, handler in before.items():
    signal.signal(s, handler)
  # pylint: disable-next=protected-access
  for state in (signals._pending, signals._stopping, signals._second_line, signals._done):
    state.clear()
  changed = [signal.Signals(s).name for s in before if after[s] is not before[s]]
  assert not changed, f"the test left the handler of {changed} changed"


@pytest.fixture(autouse=True)
def _clear_gin():
  """Gin bindings are process-global: no test sees another's config, nor the record of
  where its bindings were made (`gin_usage`: a later test's error message named another
  test's config files)."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxrec import gin_usage  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  gin_usage.clear()
  yield
  gin.clear_config()
  gin_usage.clear()


# Long cases (8-38 s each on 2 cores) that run in `make test-slow` only, to keep the default
# suite under its 15-minute budget. Those from `test_plans_equal` on, and the cases `[4]`,
# `[1]`, `[float32]` and `[npz]` above it, leave another plan, dtype or variant of the same
# test in the default suite. The others have no faster test of their claim there: a kill -9
# mid-save resume, a straggler only reported, an eval past the hang timeout, elastic.py
# --keep's temp dir, an import trained offloaded, the compile cache's rerun, mesh_overhead.py
# end to end, and (from `test_calibration` on) one more timing or error rule of a whole
# script or supervisor run, the default suite keeping other runs of that script. The
# trainer's stochastic rounding with an offloaded table (27 s) leaves its in-process
# comparisons (dp, rw; tw in the slow target) in the default suite, not the loop's passing
# of the slot maps. The three after it (12-14 s each, 2026-12-06) each leave a sibling
# there: the prefetch run with SGD, dlrm learning through train.py (the two-tower's steps in
# tests/models), padded columns on grid and cw with FTRL. Added on the second 2026-12-06
# session: GPU lowering of the bfloat16 and float16 kernels (float32 and int8 stay; 35 s for
# all four), the launcher's SIGTERM with nothing to save (the saving cases stay), and grain's
# workers outliving a killed trainer (18 s; their shared memory at exit stays).
SLOW_CASES = {
    "tests/scripts/test_resume.py::test_kill9_mid_save_and_mid_step_resumes_bitwise_equal",
    "tests/scripts/test_interrupts.py::test_sigterm_during_an_eval_saves_that_step_and_stops[4]",
    "tests/elastic/test_supervisor.py::test_straggler_is_reported_and_moved_off[1]",
    "tests/elastic/test_supervisor.py::"
    "test_a_straggler_is_only_reported_when_setting_it_aside_changes_nothing",
    "tests/elastic/test_supervisor.py::test_an_eval_longer_than_the_hang_timeout_is_no_hang",
    "tests/benchmarks/test_bench_dirs.py::test_elastic_keep_says_where_its_temp_dir_is",
    "tests/offload/test_move_tier.py::test_an_imported_checkpoint_trains_offloaded",
    "tests/models/test_deepfm.py::test_no_dense_features_trains[float32]",
    "tests/checkpoint/test_convert_messages.py::"
    "test_an_int8_part_lost_from_the_index_is_a_corrupt_step[npz]",
    "tests/train/test_compile_cache.py::test_train_fills_the_cache_and_a_rerun_compiles_less",
    "tests/benchmarks/test_mesh_overhead_smoke.py::test_plans_and_stages_report",
    "tests/planner/test_calibration.py::test_the_device_count_asked_for_is_the_one_timed",
    "tests/elastic/test_supervisor.py::"
    "test_an_eval_only_generation_is_not_held_to_the_startup_timeout",
    "tests/elastic/test_supervisor.py::test_a_second_supervisor_on_the_workdir_is_refused",
    "tests/elastic/test_events_truth.py::"
    "test_the_same_command_again_continues_the_generation_count",
    "tests/elastic/test_events_truth.py::"
    "test_resume_breakdown_counts_the_time_a_requested_stop_takes",
    "tests/scripts/test_train_files.py::test_training_on_files_with_a_synthetic_eval_warns",
    "tests/benchmarks/test_elastic_bench.py::"
    "test_a_job_that_fails_after_recovering_fails_the_benchmark",
    "tests/train/test_logq_loop.py::test_a_resume_with_another_batch_size_is_refused",
    "tests/offload/test_resume_changed.py::test_a_wider_dtype_is_widened_offloaded",
    "tests/offload/test_move_tier.py::test_table_changes_tier_on_resume[host]",
    "tests/elastic/test_supervisor.py::test_requested_stop_waits_for_the_check_step_not_a_periodic_checkpoint",
    "tests/elastic/test_supervisor.py::test_lost_slot_rejoins",
    "tests/offload/test_trainer_faults.py::test_eval_batches_bigger_than_the_cache_are_evaluated_in_pieces",
    "tests/models/test_two_tower_bags.py::test_the_same_bag_in_another_order_is_the_same_item[False]",
    "tests/train/test_logq.py::test_one_and_eight_devices_match_and_a_checkpoint_keeps_the_estimator",
    "tests/planner/test_calibration.py::test_quick_calibration_and_cache",
    "tests/offload/test_exact.py::test_exact_prefetch_off_rowwise_state_on_sharded_cache",
    "tests/embedding/test_col_padding.py::test_int8_padded_rows_quantise_over_their_real_columns",
    "tests/checkpoint/test_reshard.py::test_low_precision_tables[int8]",
    "tests/checkpoint/test_convert_torchrec.py::test_train_starts_from_torchrec_import[float32]",
    "tests/train/test_bf16_cpu_update.py::test_bf16_update_in_place_writes_the_same_bits[sgd-data=2,table=2,row=2-twrw]",
    "tests/offload/test_move_tier_edges.py::test_snapshots_go_once_no_kept_checkpoint_needs_them",
    "tests/offload/test_exact.py::test_stochastic_rounding_through_the_trainer",
    "tests/offload/test_exact.py::test_exact_over_50_steps_with_prefetch[adagrad]",
    "tests/offload/test_exact.py::"
    "test_stochastic_rounding_keys_cached_rows_by_their_table_row[adagrad-table=2-tw-2]",
    "tests/scripts/test_train.py::test_every_model_learns[two_tower]",
    "tests/embedding/test_col_padding.py::test_padded_col_split_matches_one_device[cw-col=8-12]",
    "tests/kernels/test_kernel_quant.py::test_lowers_to_triton_for_gpu[bfloat16]",
    "tests/kernels/test_kernel_quant.py::test_lowers_to_triton_for_gpu[float16]",
    "tests/elastic/test_launcher_sigterm.py::"
    "test_sigterm_with_nothing_trained_since_the_checkpoint_kills_at_once",
    "tests/data/test_data_pipeline.py::test_worker_processes_exit_when_the_trainer_is_killed"
    "[SIGTERM]",
    "tests/data/test_data_pipeline.py::test_worker_processes_exit_when_the_trainer_is_killed"
    "[SIGHUP]",
    # 2026-12-06 (the default suite reached 14:41): each leaves the sibling named after it
    "tests/offload/test_exact.py::"   # [sgd-single-dp-2]
    "test_stochastic_rounding_keys_cached_rows_by_their_table_row[rowwise_adagrad-row=2-rw-0]",
    "tests/scripts/test_interrupts.py::"   # test_sigterm_during_an_eval_saves_that_step_and_stops
    "test_ctrl_c_during_an_eval_keeps_the_loss_line",
    "tests/elastic/test_supervisor.py::"   # ..._given_sigterm_checkpoints_and_the_job_replans_...
    "test_the_only_worker_given_sigterm_with_rejoin_after_waits_for_its_slot",
    "tests/offload/test_snapshot_integrity.py::"   # ..._store_deleted_during_the_run_...
    "test_a_store_deleted_between_steps_stops_the_run_at_its_next_read",
    "tests/offload/test_move_tier_edges.py::"   # ..._crash_while_a_save_is_in_flight_...
    "test_a_rejected_checkpoint_keeps_its_snapshot",
    "tests/train/test_schedules.py::"   # test_the_metrics_lines_carry_both_scheduled_rates
    "test_the_logged_dense_rate_is_the_one_optax_applied_after_an_import",
    "tests/models/test_two_tower.py::"   # [in_batch_softmax]
    "test_normalize_gives_a_zero_tower_output_a_zero_gradient[bce]",
    "tests/models/test_two_tower.py::"   # ..._in_batch_softmax_with_adam_scores_the_same_...
    "test_compute_loss_keys_on_the_item_features_and_is_the_same_sharded",
    "tests/embedding/test_table_init.py::"   # the other seven placements
    "test_stacked_init_equals_the_tables_stacked[dp-data=8-float32]",
    "tests/models/test_mixed_dims.py::"   # the other models
    "test_padding_columns_neither_change_the_logits_nor_get_a_gradient[two_tower]",
    "tests/train/test_loop_eval_ids.py::"   # test_interrupts' sigterm_during_an_eval...[2]
    "test_a_step_saved_but_not_evaluated_is_evaluated_on_resume",
    # the second 2026-12-06 session (per-table optimizers added ~2 min): each leaves the
    # sibling named after it
    "tests/offload/test_resume_changed.py::"   # test_table_optimizers' gained_..._state[offloaded]
    "test_an_optimizer_with_state_starts_it_fresh_offloaded",
    "tests/offload/test_table_optimizers.py::"   # [big0-300-names0] (Adam)
    "test_offloaded_table_with_its_own_optimizer_matches_the_device[big1-800-names1]",
    "tests/offload/test_table_optimizers.py::"   # [offloaded]
    "test_resume_where_the_offloaded_table_gained_optimizer_state[on_device]",
    # 2026-12-07 (the default suite took 17:24 on the AMD EPYC host without AVX512, CI
    # 1,174 s with the install): 47 more, each an error path, a variant or an edge of a
    # capability whose main case stays (the store owner's fresh rerun, the table optimizers'
    # in-process resumes, grain workers' batches and shared memory, the supervisor's hang,
    # kill, straggler and max-restarts runs, the other placements, dtypes, models and
    # params of each parametrized test, the launcher's SIGTERM for its SIGHUP)
    "tests/offload/test_store_owner.py::test_existing_arrays_a_killed_run_of_this_workdir_changed_are_refused",
    "tests/offload/test_store_owner.py::test_a_run_failing_before_its_first_checkpoint_hands_its_store_back",
    "tests/scripts/test_table_optimizers.py::test_save_resume_and_change_one_tables_optimizer",
    "tests/data/test_data_pipeline.py::test_worker_processes_from_plain_python",
    "tests/data/test_data_pipeline.py::test_a_hang_up_leaves_the_resource_tracker_running",
    "tests/train/test_configs.py::test_an_adamw_mask_of_other_keys_than_the_params_names_the_binding_before_compiling",
    "tests/embedding/test_table_dicts.py::test_the_config_gin_it_writes_rebuilds_the_same_embedding",
    "tests/elastic/test_supervisor.py::test_a_worker_that_never_joins_is_the_one_blamed",
    "tests/embedding/test_table_init.py::test_stacked_init_equals_the_tables_stacked[dp-data=8-int8]",
    "tests/train/test_config_changes.py::test_a_resume_changing_ftrls_rate_or_initial_accumulator_is_refused",
    "tests/elastic/test_supervisor.py::test_user_error_is_not_retried",
    "tests/benchmarks/test_bad_flags.py::test_embedding_scaling_ratio_is_largest_over_smallest_in_any_order",
    "tests/elastic/test_supervisor.py::test_capacity_no_mesh_takes_says_so_then_stops",
    "tests/elastic/test_supervisor.py::test_capacity_below_minimum_says_scale_down_then_stops",
    "tests/elastic/test_supervisor.py::test_a_capacity_file_found_at_start_is_an_upper_bound_like_later",
    "tests/elastic/test_supervisor.py::test_user_error_after_a_checkpoint_says_to_fix_it_not_to_rerun",
    "tests/elastic/test_supervisor_flags.py::test_a_config_the_processes_asked_for_cannot_run_is_a_user_error",
    "tests/kernels/test_kernel_quant.py::test_lowers_to_triton_for_gpu[int8]",
    "tests/embedding/test_table_init.py::test_stack_values_and_unstack_on_both_row_lookups[40]",
    "tests/checkpoint/test_convert_optimizers.py::test_the_resume_hint_moves_the_offload_snapshots_too",
    "tests/train/test_loop_data_error.py::test_the_steps_since_the_last_checkpoint_are_saved_and_the_rerun_resumes_there[id-id 1000000 is out of range]",
    "tests/planner/test_pricing.py::test_search_by_parts_proposes_what_pricing_from_scratch_does[args1]",
    "tests/benchmarks/test_bad_flags.py::test_table_init_finds_its_configs_from_any_directory",
    "tests/benchmarks/test_bad_flags.py::test_input_pipeline_runs_the_trainer_in_an_absolute_workdir",
    "tests/elastic/test_launcher_sigterm.py::test_sigterm_saves_at_the_next_check_step_then_stops[SIGHUP]",
    "tests/embedding/test_collection.py::test_bag_buckets_merge_only_where_cheaper",
    "tests/train/test_configs.py::test_checkpoint_manager_bindings_parse_without_the_trainer",
    "tests/embedding/test_collection_inputs.py::test_edge_cases_match_single_device[rw-FTRL-duplicates]",
    "tests/models/test_mixed_dims.py::test_serving_models_take_a_numpy_lookup[dims0]",
    "tests/embedding/test_collection_kernels.py::test_pallas_fuses_the_update_of_a_scheduled_rate[RowWiseAdagrad]",
    "tests/data/test_preprocess_script.py::test_failed_run_leaves_no_shards",
    "tests/planner/test_profile.py::test_the_trainer_writes_the_plan_once",
    "tests/embedding/test_collection.py::test_one_slice_stack_with_reordered_or_padded_slot_features[pallas-permuted]",
    "tests/embedding/test_collection.py::test_one_slice_stack_with_reordered_or_padded_slot_features[pallas-padded]",
    "tests/kernels/test_kernel_quant.py::test_comm_cast_round_trip[float16]",
    "tests/train/test_logq_loop.py::test_an_offloaded_item_table_keeps_the_estimate_keyed_by_item",
    "tests/benchmarks/test_kernels_bench.py::test_launch_settings_reach_the_kernels",
    "tests/train/test_initial_state.py::test_initial_state_is_the_recorded_one[two_tower]",
    "tests/models/test_models.py::test_bfloat16_logits_are_not_rounded_to_bfloat16[dcnv2]",
    "tests/offload/test_exact.py::test_finite_source_trains_every_batch_and_flushes_at_the_end[kw0]",
    # and four of the seven plans' 8-vs-1 criterion through train.py at -O0 (dp, twrw and
    # grid stay; all seven also run at users' optimisation level in the slow target)
    "tests/scripts/test_plans_equal.py::test_plan_matches_single_device[tw-table=8]",
    "tests/scripts/test_plans_equal.py::test_plan_matches_single_device[rw-row=8]",
    "tests/scripts/test_plans_equal.py::test_plan_matches_single_device[cw-col=8]",
    "tests/scripts/test_plans_equal.py::"
    "test_plan_matches_single_device[twcw-data=2,table=2,col=2]",
    "tests/benchmarks/test_elastic_bench.py::test_a_relative_workdir_is_where_the_benchmark_runs",
    "tests/offload/test_table_optimizers.py::"
    "test_offloaded_table_sharing_a_stack_at_its_own_rate_matches_the_device",
    "tests/train/test_config_gin.py::test_what_gin_cannot_write_is_named_and_the_header_says_so",
}


@pytest.hookimpl(tryfirst=True)   # before `-m` deselects
def pytest_collection_modifyitems(config, items):
  """Marks `SLOW_CASES` slow (before `-m 'not slow'` deselects); a name that matches no
  collected test is an error, so a renamed test cannot silently return to the default suite."""
  del config
  found = {item.nodeid for item in items} & SLOW_CASES
  for item in items:
    if item.nodeid in SLOW_CASES:
      item.add_marker(pytest.mark.slow)
  # only a whole-suite collection sees every listed test
  if len(items) > 1000 and found != SLOW_CASES:
    raise pytest.UsageError(f"tests/conftest.py SLOW_CASES names no test: "
                            f"{sorted(SLOW_CASES - found)}")
