"""The offload tier's work per log window in metrics.jsonl (`offload_*`): an operator saw
throughput only, while the tier counted its hits, stalls, store reads and writes."""

import json
import os

import pytest

from jaxrec.offload import telemetry


class _Tier:
  def __init__(self):
    self.counters = {}

  def stats(self):
    return dict(self.counters)


def test_each_window_counts_its_own_steps_and_a_reset_counts_from_zero():
  tier = _Tier()
  tier.counters = {"id_hits": 10, "id_lookups": 20, "row_hits": 1, "row_lookups": 4,
                   "stall_s": 0.5, "store_reads": 30, "written_rows": 7, "flushed_rows": 1}
  window = telemetry.WindowStats(tier, start=100)
  tier.counters = {"id_hits": 40, "id_lookups": 60, "row_hits": 4, "row_lookups": 10,
                   "stall_s": 0.9, "store_reads": 70, "written_rows": 17, "flushed_rows": 4}
  assert window.record(110) == {"offload_hit_rate": 0.75, "offload_row_hit_rate": 0.5,
                                "offload_stall_ms": pytest.approx(40.0),
                                "offload_store_reads": 4.0, "offload_written_rows": 13}
  tier.counters = {"id_hits": 3, "id_lookups": 4, "stall_s": 0.02}   # reset (a rollback)
  got = window.record(105)
  assert got["offload_hit_rate"] == 0.75 and got["offload_stall_ms"] == pytest.approx(20.0)
  assert got["offload_row_hit_rate"] == 0.0 and got["offload_written_rows"] == 0


def test_the_trainer_logs_them(tmp_path, caplog):
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib, loop  # pylint: disable=C0415
  launch.parse_gin(["configs/dlrm_synthetic.gin"], [
      "ExperimentConfig.batch_size=64", "ExperimentConfig.num_eval_examples=128",
      "ExperimentConfig.eval_batch_size=64", "OffloadConfig.tables = {'t0': {'cache_rows': 512}}"])
  options = config_lib.RunOptions(num_steps=6, mesh="data=8", plan="dp", progress=False,
                                  log_every=3, checkpoint_every=2, keep_checkpoints=1)
  with caplog.at_level("INFO"):
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(tmp_path))
  # a small store's old snapshots go quietly (a line at every checkpoint of a long run)
  assert sorted(os.listdir(tmp_path / "offload_snapshots")) == ["6"]
  assert not [r for r in caplog.records if r.levelno >= 20
              and "removing offload snapshots" in r.getMessage()]
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    lines = [l for l in map(json.loads, f) if "loss" in l]
  assert [l["step"] for l in lines] == [3, 6]
  for l in lines:
    assert 0 <= l["offload_row_hit_rate"] <= l["offload_hit_rate"] <= 1, l
    assert l["offload_stall_ms"] >= 0 and l["offload_store_reads"] > 0, l
  assert lines[0]["offload_hit_rate"] < lines[1]["offload_hit_rate"]   # the cache warms up
  assert lines[0]["offload_written_rows"] > 0   # step 2's checkpoint flushed trained rows


def test_a_cache_of_half_its_table_or_more_is_warned_about(caplog):
  """Cached whole, a 5M-row table peaked at 1.64 GB of host memory against 1.18 GB on the
  device, without a word (`auto` keeps such a table on the device)."""
  import types  # pylint: disable=import-outside-toplevel
  from jaxrec import offload  # pylint: disable=import-outside-toplevel
  from jaxrec.offload import hooks  # pylint: disable=import-outside-toplevel

  def tier(**caches):
    return types.SimpleNamespace(tables={n: types.SimpleNamespace(
        spec=types.SimpleNamespace(rows=1000), cache=types.SimpleNamespace(cache_rows=c))
        for n, c in caches.items()})
  off = offload.OffloadConfig({"a": {"cache_rows": 500}, "b": {"cache_rows": 499},
                               "c": {"cache_rows": 1000}})
  got = hooks.warn_big_caches(tier(a=500, b=499, c=1000), off)
  assert [w.split(":")[0] for w in got] == ["OffloadConfig.tables['a']",
                                            "OffloadConfig.tables['c']"]
  assert got[1].startswith("OffloadConfig.tables['c']: its cache holds 1,000 of the table's "
                           "1,000 rows (100%): offloading saves little device memory")
  import dataclasses  # pylint: disable=import-outside-toplevel
  auto = dataclasses.replace(off, auto_added=("a", "c"))
  assert hooks.warn_big_caches(tier(a=500, b=499, c=1000), auto) == []
