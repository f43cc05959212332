"""Re-planning: train flags, mesh candidates for a new device count, the planner's choice."""

import json
import os
import subprocess
import sys

import pytest

from jaxrec.elastic import replan
from jaxrec.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--workdir=/tmp/w", "--gin_file=configs/dlrm_synthetic.gin",
         "--gin_bindings", "ExperimentConfig.batch_size=256", "--mesh", "data=2,table=2,row=2",
         "--plan=auto", "--num_steps=7", "--noprogress"]


def test_train_args_parse_and_replace_mesh_plan():
  args = replan.TrainArgs.parse(FLAGS)
  assert args.workdir == "/tmp/w" and args.num_steps == 7
  assert args.get("gin_bindings") == ["ExperimentConfig.batch_size=256"]
  argv = args.with_mesh_plan("data=1,table=2,row=2,col=1", "rw")
  assert "--mesh" not in argv and "data=2,table=2,row=2" not in argv
  assert argv[-2:] == ["--mesh=data=1,table=2,row=2,col=1", "--plan=rw"]
  assert "--noprogress" in argv and "ExperimentConfig.batch_size=256" in argv
  with pytest.raises(ConfigError, match="--workdir"):
    replan.TrainArgs.parse(["--gin_file=x.gin"])


def test_candidate_meshes_keep_model_axes_when_they_divide():
  prev = {"data": 2, "table": 2, "row": 2, "col": 1}
  assert replan.candidate_meshes(prev, 4)[0] == {"data": 1, "table": 2, "row": 2, "col": 1}
  assert replan.candidate_meshes(prev, 16)[0] == {"data": 4, "table": 2, "row": 2, "col": 1}
  first = replan.candidate_meshes({"data": 1, "table": 4, "row": 2, "col": 1}, 4)[0]
  assert first["data"] == 1 and first["table"] * first["row"] == 4
  assert all(s["data"] * s["table"] * s["row"] * s["col"] == 6
             for s in replan.candidate_meshes(prev, 6))


@pytest.fixture(scope="module")
def config():
  args = replan.TrainArgs.parse(FLAGS)
  return args, replan.load_config(args)


def test_choose_asks_the_planner(config):
  args, cfg = config
  choice = replan.choose(cfg, args, 1, 4)
  assert choice.mesh_flag == "data=1,table=2,row=2,col=1"
  assert sum(choice.plan_kinds.values()) == 8 and choice.estimated_step_time_s > 0
  assert choice.to_json()["devices"] == 4


def test_the_plan_event_names_the_offloaded_tables(config):
  """A one-process job offloading tables (configured or `OffloadConfig.auto`) gave a `plan`
  / `replan` event with no word of it; the choice came from a path that dropped the
  offload config, and so priced offloading meshes by step time alone (train.py prefers
  those offloading the fewest tables)."""
  args, cfg = config
  assert "offloaded" not in replan.choose(cfg, args, 1, 4).to_json()
  off = replan.TrainArgs.parse(FLAGS + ["--gin_bindings",
                                        "OffloadConfig.tables={'t0': {'cache_rows': 4000}}"])
  choice = replan.choose(replan.load_config(off), off, 1, 4)
  assert choice.offloaded == ("t0",) and choice.to_json()["offloaded"] == ["t0"]


def test_mesh_follows_the_users_shape_not_the_previous_generations(config):
  """8 -> 2 -> 8 devices: the grown-back generation gets the user's `--mesh` again (it
  drifted to `data=4,row=2` when the 2-device mesh was the reference)."""
  args, cfg = config
  small = replan.choose(cfg, args, 1, 2)
  assert small.mesh["data"] * small.mesh["table"] * small.mesh["row"] == 2
  again = replan.choose(cfg, args, 2, 4)
  assert again.mesh_flag == "data=2,table=2,row=2,col=1"


def test_best_choice_skips_process_counts_the_batch_does_not_divide(config):
  args, cfg = config
  choice, reasons = replan.best_choice(cfg, args, 3, 4)   # 12 devices: 256 % 12 != 0
  assert choice.processes == 2 and "not divisible" in reasons[0]
  none, reasons = replan.best_choice(cfg, args, 3, 4, minimum=3)
  assert none is None and len(reasons) == 1


def test_without_one_is_what_a_replan_would_run(config):
  args, cfg = config
  assert replan.without_one(cfg, args, 4, 4) == 2       # 3 x 4 devices: 256 % 12 != 0
  assert replan.without_one(cfg, args, 3, 4) == 2       # as now: nothing to set aside
  assert replan.without_one(cfg, args, 2, 4, minimum=2) == 0
  assert replan.without_one(cfg, args, 1, 4) == 0


def test_forced_plan_that_cannot_split_moves_to_another_mesh(config):
  args, cfg = config
  cw = replan.TrainArgs.parse([f for f in FLAGS[:-3] if f != "data=2,table=2,row=2"]
                              + ["col=32", "--plan=cw"])
  choice = replan.choose(cfg, cw, 1, 4)
  assert 16 % choice.mesh["col"] == 0      # dim 16: col=4 at most with 4 devices


def test_plans_price_the_workers_platform_without_a_backend_here(config):
  """The supervisor priced plans for its own jax backend, which it started for that: with
  --platform=gpu on a GPU machine that backend takes memory on every GPU the workers need
  (jax preallocates), and on a CPU-only supervisor it priced XLA kernels for Pallas
  workers."""
  args, cfg = config
  gpu = replan.choose(cfg, args, 1, 4, platform="gpu")
  cpu = replan.choose(cfg, args, 1, 4, platform="cpu")
  pallas_args = replan.TrainArgs.parse(FLAGS + ["--gin_bindings",
                                                "EmbeddingOptions.kernel = 'pallas'"])
  try:
    pallas = replan.choose(replan.load_config(pallas_args), pallas_args, 1, 4)
  finally:
    replan.load_config(args)
  assert gpu.estimated_step_time_s == pallas.estimated_step_time_s
  assert gpu.estimated_step_time_s != cpu.estimated_step_time_s
  code = ("from jax._src import xla_bridge\n"
          "def refuse(*a, **k): raise SystemExit('a jax backend was started')\n"
          "xla_bridge.backends = refuse\n"
          "from jaxrec.elastic import replan\n"
          f"args = replan.TrainArgs.parse({FLAGS!r})\n"
          "choice, _ = replan.best_choice(replan.load_config(args), args, 2, 4, 1, 'gpu')\n"
          "print(choice.mesh_flag)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=ROOT, timeout=300, env=dict(os.environ, JAX_PLATFORMS=""))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "data=2,table=2,row=2,col=1"


def test_auto_mesh_with_a_plan_file_shrinks_like_the_recorded_mesh(config, tmp_path):
  """`--mesh=auto --plan=FILE` runs the file's mesh; a shrunk job keeps its model axes as
  with that `--mesh` (it took data=4, which a grid plan's table slices do not fit, and the
  job gave up `no_usable_mesh` after one lost worker)."""
  path = tmp_path / "plan.json"
  path.write_text(json.dumps({
      "mesh": {"data": 1, "table": 2, "row": 2, "col": 2},
      "plan": {f"t{i}": {"kind": "grid", "table_slice": min(i, 1)} for i in range(8)}}))
  args = replan.TrainArgs.parse([a for a in FLAGS if a not in ("--mesh", "data=2,table=2,row=2")
                                 and a != "--plan=auto"] + ["--mesh=auto", f"--plan={path}"])
  full = replan.choose(config[1], args, 2, 4)
  assert full.mesh == {"data": 1, "table": 2, "row": 2, "col": 2}
  shrunk = replan.choose(config[1], args, 1, 4)
  assert shrunk.mesh["table"] == 2 and shrunk.mesh["row"] * shrunk.mesh["col"] == 2


def test_the_supervisor_reads_train_and_eval_data_flags_as_train_py_does():
  """launch.py parsed the gin config without --train_data/--eval_data: a config whose
  `train_data` binding the flag replaces (here '') gave up with a user error that
  train.py, binding the flag over it, never raised."""
  args = replan.TrainArgs.parse(["--workdir=w", "--gin_file=configs/dlrm_synthetic.gin",
                                 "--gin_bindings=ExperimentConfig.train_data=''",
                                 "--train_data=synthetic", "--eval_data=synthetic"])
  config = replan.load_config(args)
  assert (config.train_data, config.eval_data) == ("synthetic", "synthetic")


def test_one_cpu_process_plans_with_the_workers_host_budget(monkeypatch):
  """With `--plan=auto` and no `--memory_per_device`, a worker of one process on CPU devices
  plans with the host's share (`budget_hint.host_budget`), not 16 GiB. The supervisor priced
  16 GiB and handed the worker `data=8` for tables over the host's share replicated; the
  worker refused that mesh as over its budget, a user error ending the job, where
  `scripts/train.py --mesh=auto` alone took a mesh that splits them."""
  from jaxrec.train import budget_hint
  flags = ["--workdir=/tmp/w", "--gin_file=configs/dlrm_synthetic.gin", "--mesh=auto",
           "--plan=auto", "--num_steps=7", "--noprogress"]
  args = replan.TrainArgs.parse(flags)
  cfg = replan.load_config(args)
  # a 64 MiB host: ~3 MiB a device of 8, less than the 100,000 x 16 table replicated
  monkeypatch.setattr(budget_hint, "_host_memory", lambda host_bytes: 64 << 20)
  choice = replan.choose(cfg, args, 1, 8, platform="cpu")
  assert choice.mesh["data"] < 8, choice.mesh_flag
  given = replan.TrainArgs.parse(flags + ["--memory_per_device=16GiB"])
  assert replan.choose(cfg, given, 1, 8, platform="cpu").mesh["data"] == 8
  # several processes plan alike on any host: the default budget, as their workers do
  assert replan.choose(cfg, args, 2, 4, platform="cpu").mesh["data"] == 8


def test_a_forced_kind_shrinks_to_the_mesh_keeping_most_of_its_axes():
  """`data=2,table=2,row=2 --plan=twrw` on 5 devices took the closest shape, `data=5`,
  where every table was held whole on every device, and the replan event said nothing."""
  args = replan.TrainArgs.parse([
      "--workdir=/tmp/w", "--gin_file=configs/dlrm_synthetic.gin", "--mesh=data=2,table=2,row=2",
      "--plan=twrw", "--gin_bindings=ExperimentConfig.batch_size=960",
      "--gin_bindings=ExperimentConfig.eval_batch_size=960"])
  cfg = replan.load_config(args)
  five = replan.choose(cfg, args, 1, 5)
  assert five.mesh["data"] == 1 and 5 in (five.mesh["table"], five.mesh["row"]), five
  assert "--plan=twrw is placed as " in five.note, five.note
  full = replan.choose(cfg, args, 1, 8)   # its own mesh: kept, nothing to say
  assert full.mesh_flag == "data=2,table=2,row=2,col=1" and not full.note
  assert replan.kept_kind_first("auto", [{"data": 5}], {"data": 5}) == [{"data": 5}]
  # a user's mesh without the kind's axes (cw on data=8, placed as dp) is no worse a start
  cw = replan.kept_kind_first("cw", [{"data": 8, "col": 1}, {"data": 1, "col": 8}],
                              {"data": 8, "col": 1})
  assert cw[0] == {"data": 8, "col": 1}
