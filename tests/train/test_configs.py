"""configs/*.gin: every config builds; dlrm_criteo.gin keeps the TorchRec comparison shape."""

import glob
import logging
import os
import re

import gin
import numpy as np
import pytest

from jaxrec import launch
from jaxrec.embedding import optimizers
from jaxrec.errors import ConfigError
from jaxrec.models import DCNv2, DeepFM, DLRM, TwoTower
from jaxrec.train.config import ExperimentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.gin")))


def load(name):
  launch.parse_gin([os.path.join(ROOT, "configs", name)], [])
  config = ExperimentConfig()
  config.validate(num_devices=1)
  return config


def test_the_documented_configs_exist():
  names = {os.path.basename(c) for c in CONFIGS}
  assert {"dlrm_synthetic.gin", "dcnv2_synthetic.gin", "deepfm_synthetic.gin",
          "two_tower_synthetic.gin", "dlrm_criteo.gin"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_builds(path):
  config = load(os.path.basename(path))
  assert config.tables and config.features and config.batch_size > 0
  assert config.dense_tx() is not None and config.sparse_tx() is not None


@pytest.mark.parametrize("name, cls", [
    ("dlrm_synthetic.gin", DLRM), ("dcnv2_synthetic.gin", DCNv2),
    ("deepfm_synthetic.gin", DeepFM), ("two_tower_synthetic.gin", TwoTower)])
def test_synthetic_configs_pick_their_model(name, cls):
  config = load(name)
  assert type(config.model) is cls
  assert config.train_data == "synthetic" and config.eval_data == "synthetic"


def test_dlrm_criteo_is_the_torchrec_shape():
  config = load("dlrm_criteo.gin")
  assert [(t.rows, t.dim) for t in config.tables] == [(100_000, 16)] * 26
  assert [(f.table, f.max_len) for f in config.features] == [(t.name, 1) for t in config.tables]
  assert type(config.model) is DLRM
  assert tuple(config.model.bottom_mlp) == (512, 256, 64, 16)
  assert tuple(config.model.top_mlp) == (512, 256, 1)
  assert config.batch_size == 512
  assert gin.query_parameter("dense_optimizer.name") == "sgd"
  assert gin.query_parameter("dense_optimizer.learning_rate") == 0.1
  assert config.sparse_tx() == optimizers.SGD(lr=0.1)


def test_table_optimizers_take_scoped_optimizers():
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], [
      "ExperimentConfig.table_optimizers = {'t0': @big/RowWiseAdagrad(), 't[3-4]': @Adam()}",
      "big/RowWiseAdagrad.lr = 0.05"])
  config = ExperimentConfig()
  config.validate(num_devices=1)
  tx = config.sparse_tx()
  assert tx.of("t0") == optimizers.RowWiseAdagrad(lr=0.05)
  assert tx.of("t3") == tx.of("t4") == optimizers.Adam()
  assert [n for n, _ in tx.overrides] == ["t0", "t3", "t4"]   # the pattern, expanded
  assert tx.of("t1") == optimizers.SGD(lr=1.0)   # the config's sparse_optimizer


@pytest.mark.parametrize("binding, message", [
    ("ExperimentConfig.batch_size='abc'", "ExperimentConfig.batch_size must be an integer, got 'abc'"),
    ("ExperimentConfig.eval_batch_size=512.5", "ExperimentConfig.eval_batch_size must be an integer"),
    ("ExperimentConfig.num_eval_examples=None", "ExperimentConfig.num_eval_examples must be an integer"),
    # 1e30 trained, then overflowed grain's range in the eval (a traceback)
    ("ExperimentConfig.num_eval_examples=1e30", r"ExperimentConfig.num_eval_examples must be "
                                                r"at most 2\*\*40 \(1.1e12\), got 1e\+30"),
    (f"ExperimentConfig.batch_size={2**31}",
     r"ExperimentConfig.batch_size must be at most 2\*\*31 - 1, got 2,147,483,648"),
    # bound objects of the wrong kind
    ("ExperimentConfig.sparse_optimizer='adam'", "ExperimentConfig.sparse_optimizer must be a "
                                                 r"sparse optimizer, e.g. @RowWiseAdagrad\(\)"),
    ("ExperimentConfig.sparse_optimizer=@SGD",
     r"ExperimentConfig.sparse_optimizer must be .* \(@SGD names the class: write @SGD\(\) "
     r"for an optimizer\)"),
    ("ExperimentConfig.sparse_optimizer=@dense_optimizer()",   # its repr dumped functions
     r"sparse optimizer, e.g. @RowWiseAdagrad\(\) or @sparse_optimizer\(\), got an optax "
     r"\(dense\) optimizer, e.g. @dense_optimizer\(\)$"),
    ("ExperimentConfig.table_optimizers={'t9': @SGD()}",
     r"ExperimentConfig.table_optimizers\['t9'\] names no table \(tables: t0, t1,"),
    ("ExperimentConfig.table_optimizers={'x*': @SGD()}",
     r"ExperimentConfig.table_optimizers\['x\*'\] names no table"),
    ("ExperimentConfig.table_optimizers={'t[0-3]': @SGD(), 't3': @Adam()}",
     r"ExperimentConfig.table_optimizers: table 't3' is named by both 't\[0-3\]' and 't3'"),
    ("ExperimentConfig.table_optimizers={'t1': @Adam}",
     r"ExperimentConfig.table_optimizers\['t1'\] must be a sparse optimizer.*parentheses"),
    ("ExperimentConfig.table_optimizers={'t1': @dense_optimizer()}",
     r"ExperimentConfig.table_optimizers\['t1'\] must be a sparse optimizer"),
    ("ExperimentConfig.table_optimizers='adam'",
     r"ExperimentConfig.table_optimizers must be a dict \{table name: sparse optimizer\}"),
    ("ExperimentConfig.dense_optimizer='adam'", "ExperimentConfig.dense_optimizer must be an "
                                                "optax transformation"),
    ("ExperimentConfig.model='dlrm'", r"ExperimentConfig.model must be a model, e.g. "
                                      r"@build_model\(\), got 'dlrm'"),
    ("ExperimentConfig.embedding=[]", r"ExperimentConfig.embedding must be \(tables, features\)"),
    ("ExperimentConfig.num_dense=-1", "ExperimentConfig.num_dense must be an integer >= 0"),
    ("ExperimentConfig.train_data=5", "ExperimentConfig.train_data must be 'synthetic' or a path"),
])
def test_values_of_the_wrong_kind_name_the_binding(binding, message):
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], [binding])
  with pytest.raises(ConfigError, match=message):
    ExperimentConfig().validate(num_devices=1)


@pytest.mark.parametrize("bindings, message", [
    (["dense_optimizer.learning_rate=-0.1"], "dense_optimizer.learning_rate must be a number >= 0"),
    (["dense_optimizer.learning_rate='0.1'"], "dense_optimizer.learning_rate must be a number"),
    (["dense_optimizer.name='adam'", "dense_optimizer.b2=1.0"],
     r"dense_optimizer.b2 must be a number in \[0, 1\), got 1.0"),
    (["dense_optimizer.name='adam'", "dense_optimizer.eps=0"], "dense_optimizer.eps must be"),
    (["dense_optimizer.betas=0.9"], r"dense_optimizer.betas: optax.sgd takes no such option"),
    (["SGD.lr=-1"], "SGD.lr must be a number >= 0, got -1"),
    # momentum >= 1 diverges (the trace never decays); < 0 flips the sign of past gradients
    (["dense_optimizer.momentum=1.0"], r"dense_optimizer.momentum must be a number in \[0, 1\), "
                                       "got 1.0"),
    (["dense_optimizer.momentum=-0.5"], r"dense_optimizer.momentum must be a number in \[0, 1\)"),
    (["dense_optimizer.momentum=0.9", "dense_optimizer.nesterov='False'"],
     "dense_optimizer.nesterov must be True or False, got 'False'"),
    (["dense_optimizer.nesterov=True"],
     "dense_optimizer.nesterov: applies only with dense_optimizer.momentum"),
    (["dense_optimizer.accumulator_dtype='bfloat16'"],
     "dense_optimizer.accumulator_dtype: applies only with dense_optimizer.momentum"),
    # optax took a string or number mask as one true leaf: weight decay on every parameter
    (["dense_optimizer.name='adamw'", "dense_optimizer.mask='kernel'"],
     r"dense_optimizer.mask must be a pytree of True/False .* got 'kernel'"),
    (["dense_optimizer.name='adamw'", "dense_optimizer.mask={'top_mlp': 1}"],
     r"dense_optimizer.mask must be a pytree of True/False .* got \{'top_mlp': 1\}"),
    (["dense_optimizer.name='adam'", "dense_optimizer.mu_dtype='bf61'"],
     "dense_optimizer.mu_dtype must be a float dtype such as 'float32' or 'bfloat16', got 'bf61'"),
    (["dense_optimizer.name='adam'", "dense_optimizer.mu_dtype='int32'"],
     "dense_optimizer.mu_dtype must be a float dtype"),
])
def test_bad_optimizer_values_name_the_binding(bindings, message):
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], bindings)
  with pytest.raises(ConfigError, match=message):
    launch.build(ExperimentConfig)


def test_dense_optimizer_takes_a_schedule():
  schedule = lambda step: 0.1   # noqa: E731
  from jaxrec.train.config import dense_optimizer   # pylint: disable=import-outside-toplevel
  assert dense_optimizer("adam", schedule, b1=0.5) is not None


@pytest.mark.parametrize("text", ["1e999", "1e-3", "0.5b"])
def test_memory_sizes_below_a_byte_or_overflowing(text):
  from jaxrec.train.config import parse_bytes   # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=f"--memory_per_device: '{text}' is not a size from 1 "
                                        "byte up"):
    parse_bytes(text, "--memory_per_device")
  assert parse_bytes("2b", "--memory_per_device") == 2


@pytest.mark.parametrize("text,meant", [("16G", "16GB (16 x 10^9 bytes) or 16GiB (16 x 2^30)"),
                                        ("512m", "512MB (512 x 10^6 bytes) or 512MiB")])
def test_a_one_letter_unit_is_ambiguous(text, meant):
  """`16G` was "not a size like 16GiB"; docker reads it as GiB, Kubernetes as GB: say both."""
  from jaxrec.train.config import parse_bytes   # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=re.escape(f"'{text}' could mean {meant}")):
    parse_bytes(text, "--memory_per_device")
  assert parse_bytes("16Gi", "--memory_per_device") == 16 * 2**30   # Kubernetes' binary unit
  assert parse_bytes("3mi", "--memory_per_device") == 3 * 2**20


def test_a_small_size_without_a_unit_is_refused():
  """`--memory_per_device=1.5` (meaning GiB) planned for a 1-byte budget and said nothing
  fits; a bare number stays bytes from 1 MiB up."""
  from jaxrec.train.config import parse_bytes   # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=re.escape("'1.5' is 1 bytes, too small to be meant; "
                                                  "give a unit, e.g. 1.5GiB")):
    parse_bytes("1.5", "--memory_per_device")
  assert parse_bytes("1e9", "--memory_per_device") == 10**9
  assert parse_bytes("100b", "--memory_per_device") == 100


@pytest.mark.parametrize("text", ["", "  "])
def test_an_empty_memory_size_is_an_error_not_the_default(text):
  """`--memory_per_device=$MEM` with MEM unset planned for the default 16GiB without a word
  (as `--train_data=` once fell back to the config's)."""
  from jaxrec.train.config import parse_bytes   # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match="--memory_per_device: empty; give a size like 16GiB"):
    parse_bytes(text, "--memory_per_device")
  assert parse_bytes(None, "--memory_per_device") is None   # the flag left out


def test_gin_include_of_a_missing_file_names_it(tmp_path):
  bad = tmp_path / "inc.gin"
  bad.write_text('include "nonexistent_include.gin"\n')
  with pytest.raises(ConfigError, match="nonexistent_include.gin") as e:
    launch.parse_gin([str(bad)], [])
  assert "None" not in str(e.value), str(e.value)


def test_gin_binding_errors_lead_with_file_and_line(tmp_path):
  """A misspelled configurable or parameter, in the file given or in one it includes:
  `FILE:LINE:` first, as for syntax errors (gin puts `In file "F", line N` at the end)."""
  inner = tmp_path / "inner.gin"
  inner.write_text("uniform_tables.num_tables = 2\n\nuniform_tables.num_table = 3\n")
  outer = tmp_path / "outer.gin"
  outer.write_text(f'include "{inner}"\nuniform_table.rows = 5\n')
  with pytest.raises(ConfigError) as e:
    launch.parse_gin([str(inner)], [])
  assert str(e.value) == (f"--gin_file: {inner}:3: Configurable 'uniform_tables' doesn't have "
                          "a parameter named 'num_table' (in 'uniform_tables.num_table = 3'); "
                          "did you mean num_tables? (uniform_tables takes: num_tables, rows, "
                          "dim, prefix, max_len, pooling, dtype)")
  with pytest.raises(ConfigError) as e:
    launch.parse_gin([str(outer)], [])
  # the include chain after the quoted line, not inside it (gin's `In file "outer", ...`)
  assert str(e.value).startswith(
      f"--gin_file: {inner}:3: Configurable 'uniform_tables' doesn't have a parameter named "
      f"'num_table' (in 'uniform_tables.num_table = 3') (included at {outer}:1); did you "
      "mean num_tables?"), str(e.value)
  top = tmp_path / "top.gin"
  top.write_text(f'\ninclude "{outer}"\n')
  with pytest.raises(ConfigError, match=rf"= 3'\) \(included at {outer}:1, {top}:2\); did"):
    launch.parse_gin([str(top)], [])
  outer.write_text("uniform_table.rows = 5\n")
  with pytest.raises(ConfigError, match=rf"^--gin_file: {outer}:1: No configurable matching "
                     r"'uniform_table' \(in 'uniform_table.rows = 5'\); did you mean "
                     r"uniform_tables\?$"):
    launch.parse_gin([str(outer)], [])


@pytest.mark.parametrize("value", [0, -1])
def test_log_every_not_positive_says_positive(value):
  from jaxrec.train.config import RunOptions  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=f"--log_every must be positive, got {value}"):
    RunOptions(log_every=value).validate()


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_a_seed_outside_32_bits_is_an_error(seed):
  """jax.random.key keeps the low 32 bits: --seed=4294967296 initialised the model of
  --seed=0 (with another data order), and 2**64 was an OverflowError traceback."""
  from jaxrec.train.config import RunOptions  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=rf"--seed must be in \[0, 2\*\*32\), got {seed}"):
    RunOptions(seed=seed).validate()
  RunOptions(seed=2**32 - 1).validate()


@pytest.mark.parametrize("name", ["train_data", "eval_data"])
def test_an_empty_data_flag_is_an_error(name):
  """`--train_data=` (e.g. from an unset shell variable) silently used the config's data."""
  from jaxrec.train.config import RunOptions  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=f"--{name}: empty"):
    RunOptions(**{name: ""}).validate()
  RunOptions(**{name: "synthetic"}).validate()


def test_a_dict_giving_a_key_twice_is_an_error_naming_where(tmp_path):
  """`OffloadConfig.tables = {'t0': {...}, 't0': {...}}` kept the last entry silently (gin
  builds dicts as Python does); plan files already refused a key given twice."""
  path = tmp_path / "dup.gin"
  path.write_text("# offload\nOffloadConfig.tables = {\n  't0': {'cache_rows': 20},\n"
                  "  't1': {'cache_rows': 20, 'chunk_rows': 8},\n  't0': {'cache_rows': 10}}\n")
  with pytest.raises(ConfigError, match=rf"^--gin_file: {path}:5: key 't0' appears twice in "
                     r"one dict \(gin keeps the last value silently\); give it once$"):
    launch.parse_gin([str(path)], [])
  binding = "ExperimentConfig.table_optimizers = {'u*': @Adam(), 'v': @SGD(), 'u*': @SGD()}"
  with pytest.raises(ConfigError, match=r"^--gin_bindings: 'ExperimentConfig.table_optimizers "
                     r"= .*': key 'u\*' appears twice in one dict"):
    launch.parse_gin([], [binding])
  # the same key in two dicts, nested or not, is no repeat
  launch.parse_gin([], ["OffloadConfig.tables = {'t0': {'cache_rows': 5}, "
                        "'t1': {'cache_rows': 5}}"])
  gin.clear_config()


def test_a_gin_file_that_is_a_directory_says_so(tmp_path):
  with pytest.raises(ConfigError, match=f"--gin_file: cannot read '{tmp_path}': is a directory"):
    launch.parse_gin([str(tmp_path)], [])


def test_checkpoint_manager_bindings_parse_without_the_trainer(tmp_path):
  """W/config.gin binds CheckpointManager; scripts/plan.py, preprocess.py and launch.py
  (which parse gin without importing the trainer) refused it: No configurable matching."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  path = tmp_path / "run.gin"
  with open(os.path.join(ROOT, "configs", "dlrm_synthetic.gin")) as f:
    path.write_text(f.read() + "\nCheckpointManager.async_save = True\n")
  code = ("import sys; from jaxrec import launch; "
          "assert 'jaxrec.checkpoint' not in sys.modules; launch.parse_gin([sys.argv[1]], "
          "['CheckpointManager.chunk_bytes = 1024']); print('ok')")
  r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                     cwd=ROOT, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_dense_optimizer_bool_and_dtype_options_that_apply_are_taken():
  import jax.numpy as jnp   # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import dense_optimizer   # pylint: disable=import-outside-toplevel
  import jax   # pylint: disable=import-outside-toplevel
  params, grad = {"w": jnp.ones(3)}, {"w": jnp.asarray([1.0, -2.0, 0.5])}

  def state_dtypes(tx):
    return {str(x.dtype) for x in jax.tree.leaves(tx.init(params)) if x.ndim}

  def second_update(tx):   # nesterov changes the update from the second step on
    state = tx.init(params)
    _, state = tx.update(grad, state, params)
    return tx.update(grad, state, params)[0]["w"]
  assert state_dtypes(dense_optimizer("sgd", 0.1, momentum=0.9, nesterov=True,
                                      accumulator_dtype="bf16")) == {"bfloat16"}
  assert state_dtypes(dense_optimizer("adam", 0.1, mu_dtype="bfloat16", nesterov=False)) == {
      "bfloat16", "float32"}   # mu in bfloat16, nu as the params
  for name in ("sgd", "adam"):
    momentum = {"momentum": 0.9} if name == "sgd" else {}
    plain, nesterov = (second_update(dense_optimizer(name, 0.1, nesterov=n, **momentum))
                       for n in (False, True))
    assert not np.allclose(plain, nesterov), name


def test_an_adamw_mask_of_other_keys_than_the_params_names_the_binding_before_compiling():
  """A mask must be a prefix of the params' tree; optax raised a pytree traceback at init."""
  import jax   # pylint: disable=import-outside-toplevel
  import optax   # pylint: disable=import-outside-toplevel
  from jaxrec.train import state   # pylint: disable=import-outside-toplevel
  bindings = ["dense_optimizer.name='adamw'", "dense_optimizer.weight_decay=0.5"]
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")],
                   bindings + ["dense_optimizer.mask={'bottom': True, 'top_mlp': False}"])
  config = launch.build(ExperimentConfig)
  params = state.init_dense(config, jax.random.key(0), 16)
  with pytest.raises(ConfigError, match=r"dense_optimizer.mask does not match the dense params "
                     r".*the mask has keys \['bottom', 'top_mlp'\], the params \['bottom_mlp', "
                     r"'top_mlp'\]"):
    jax.eval_shape(config.dense_tx().init, params)   # traced, as the trainer does
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")],
                   bindings + ["dense_optimizer.mask={'bottom_mlp': True, 'top_mlp': False}"])
  tx = launch.build(ExperimentConfig).dense_tx()
  want = optax.adamw(0.1, weight_decay=0.5, mask={"bottom_mlp": True, "top_mlp": False})
  got, _ = tx.update(params, jax.jit(tx.init)(params), params)
  ref, _ = want.update(params, want.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b), got, ref)


@pytest.mark.parametrize("binding, message", [
    ("DLMR.top_mlp=(8, 1)", "^--gin_bindings: 'DLMR.top_mlp=\\(8, 1\\)': No configurable "
                            "matching 'DLMR'; did you mean DLRM\\?$"),
    ("ExperimentConfig.sparse_optimizer=@rowwiseadagrad()", "did you mean RowWiseAdagrad\\?$"),
    ("train/SDG.lr=1.0", "No configurable matching 'SDG'; did you mean SGD\\?$"),
    ("TwoTower.temp=1.0", "named 'temp'; did you mean temperature\\? \\(TwoTower takes: "
                          "user_features, item_features, user_mlp, "),
    ("DeepFM.mlp=(8,)", "named 'mlp' \\(DeepFM takes: deep_mlp, dtype\\)$"),
    ("Nothing.x=1", "No configurable matching 'Nothing'.$"),
])
def test_a_misspelled_binding_gets_a_suggestion(binding, message):
  """gin named only what it did not find (and repeated the binding at the end)."""
  with pytest.raises(ConfigError, match=message):
    launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], [binding])


@pytest.mark.parametrize("bindings, message", [
    (["ExperimentConfig.embedding=([@TableSpec()], [])"],
     r"^--gin_file: @TableSpec\(\) is called with TableSpec.dim, TableSpec.name and "
     r"TableSpec.rows not bound \(no default for them\); bind them in the gin file or with "
     r"--gin_bindings$"),
    (["ExperimentConfig.model=@TwoTower()", "TwoTower.user_features=(0, 1)"],
     r"^--gin_file: @TwoTower\(\) is called with TwoTower.item_features not bound \(no "
     r"default for it\); bind it in"),
])
def test_a_reference_called_without_its_required_arguments_names_them(bindings, message):
  """gin's TypeError (with its `Gin had values bound for` lines) was a traceback."""
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], bindings)
  with pytest.raises(ConfigError, match=message):
    launch.build(ExperimentConfig)


def test_a_scoped_reference_without_a_required_argument_names_its_scope_and_line(tmp_path):
  """`@cat/TableSpec()` without `cat/TableSpec.dim` said `@TableSpec() is called with
  TableSpec.dim not bound`: not which of several specs, nor where it is."""
  config = tmp_path / "specs.gin"
  config.write_text(f"include '{ROOT}/configs/dlrm_synthetic.gin'\n"
                    "ExperimentConfig.embedding = ((@user/TableSpec(), @cat/TableSpec()), "
                    "(@u/FeatureSpec(), @c/FeatureSpec()))\n"
                    "user/TableSpec.name = 't_user'\nuser/TableSpec.rows = 10\n"
                    "user/TableSpec.dim = 8\n"
                    "cat/TableSpec.name = 't_cat'\ncat/TableSpec.rows = 10\n"
                    "u/FeatureSpec.name = 'u'\nu/FeatureSpec.table = 't_user'\n"
                    "c/FeatureSpec.name = 'c'\nc/FeatureSpec.table = 't_cat'\n")
  launch.parse_gin([str(config)], [])
  with pytest.raises(ConfigError) as e:
    launch.build(ExperimentConfig)
  assert str(e.value) == (f"--gin_file: {config}:6: @cat/TableSpec() is called with "
                          "cat/TableSpec.dim not bound (no default for it); bind it in the gin "
                          "file or with --gin_bindings")


@pytest.mark.parametrize("binding, message", [
    ("build_model.name=dlrm", "^--gin_bindings: 'build_model.name=dlrm': cannot parse the "
     "value dlrm; a string needs quotes: 'dlrm' \\(in a shell, quote the whole flag: "
     "--gin_bindings=\"build_model.name='dlrm'\"\\)$"),
    ("TwoTower.normalize=false", "cannot parse the value false; write False$"),
    ("ExperimentConfig.model=build_model()", "cannot parse the value build_model; a "
     "configurable is referenced as @build_model\\(\\)$"),
    # a path: gin named its first word ('data', then the fix `'data'/day_0.tsv` did not
    # parse either) or said only "Unable to parse value."
    ("ExperimentConfig.train_data=data/day_0.tsv", "cannot parse the value data/day_0.tsv; a "
     "string needs quotes: 'data/day_0.tsv' \\(in a shell, quote the whole flag: "
     "--gin_bindings=\"ExperimentConfig.train_data='data/day_0.tsv'\"\\)$"),
    ("ExperimentConfig.train_data=/data/criteo", "cannot parse the value /data/criteo; a "
     "string needs quotes: '/data/criteo' \\(in a shell, quote the whole flag: "
     "--gin_bindings=\"ExperimentConfig.train_data='/data/criteo'\"\\)$"),
    ("ExperimentConfig.eval_data = day-0.tsv.gz", "value day-0.tsv.gz; a string needs "
     "quotes: 'day-0.tsv.gz' "),
])
def test_an_unparsable_value_says_how_to_write_it(binding, message, tmp_path):
  """gin's text was "malformed node or string on line 1: <ast.Name object at 0x...>"."""
  with pytest.raises(ConfigError, match=message):
    launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], [binding])
  path = tmp_path / "x.gin"
  path.write_text(f"# one\n{binding}\n")
  with pytest.raises(ConfigError, match=f"^--gin_file: {path}:2: cannot parse the value "):
    launch.parse_gin([str(path)], [])


@pytest.mark.parametrize("value, number", [("2**20", "1048576"), ("1024 * 8", "8192"),
                                           ("1e6 / 4", "250000.0"), ("2 ** 10 ** 9", None)])
def test_arithmetic_in_a_value_says_what_to_write(value, number, tmp_path):
  """gin reads literals only: `rows = 2**20` said just "Expected newline."."""
  binding = f"uniform_tables.rows = {value}"
  path = tmp_path / "x.gin"
  path.write_text(f"# one\n{binding}\n")
  for files, bindings, where in (([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")],
                                  [binding], f"--gin_bindings: '{re.escape(binding)}'"),
                                 ([str(path)], [], f"--gin_file: {path}:2")):
    with pytest.raises(ConfigError) as e:
      launch.parse_gin(files, bindings)
    if number is None:   # an exponent too big to work out: gin's words
      assert "Expected newline" in str(e.value), str(e.value)
    else:
      assert re.match(rf"^{where}: gin reads literal values only, not arithmetic such as "
                      rf"{re.escape(value)}: write {number}", str(e.value)), str(e.value)


def test_a_gin_file_with_a_byte_order_mark_says_so(tmp_path):
  """gin said only `Unexpected token.` at line 1 (an editor on Windows saves one)."""
  path = tmp_path / "bom.gin"
  path.write_bytes(b"\xef\xbb\xbfExperimentConfig.batch_size = 64\n")
  with pytest.raises(ConfigError, match=rf"^--gin_file: {path}:1: .*\(the file starts with a "
                     r"UTF-8 byte-order mark: save it without one\)$"):
    launch.parse_gin([str(path)], [])


def test_an_unclosed_bracket_says_so(tmp_path):
  with pytest.raises(ConfigError, match=r"^--gin_bindings: 'DLRM.top_mlp=\(8, 1': EOF in "
                     r"multi-line statement: a \(, \[ or \{ is not closed"):
    launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")], ["DLRM.top_mlp=(8, 1"])


@pytest.mark.parametrize("name", ["configs/dlrm_synthetc.gin", "nope.gin"])
def test_gin_include_of_a_missing_file_in_a_directory_here_names_it(tmp_path, monkeypatch,
                                                                     caplog, name):
  """`include 'configs/x.gin'` (a typo) run from the repository root, which has `configs/`:
  gin's Python-package lookup took `configs` for a package and failed with `expected str,
  bytes or os.PathLike object, not NoneType`; its `Path not found` log line came first."""
  (tmp_path / "configs").mkdir()
  monkeypatch.chdir(tmp_path)
  path = tmp_path / "my.gin"
  path.write_text(f"DLRM.dtype = 'float32'\ninclude '{name}'\n")
  with caplog.at_level(logging.INFO), pytest.raises(ConfigError) as e:
    launch.parse_gin([str(path)], [])
  assert str(e.value) == (f"--gin_file: {path}:2: include '{name}': no such file (a relative "
                          f"path is read from the current directory, {tmp_path})")
  assert not [r for r in caplog.records if "resource_reader" in r.pathname]
  path.write_text("include 'configs'\n")   # a directory: it said 'no such file' too
  with pytest.raises(ConfigError) as e:
    launch.parse_gin([str(path)], [])
  assert str(e.value) == (f"--gin_file: {path}:1: include 'configs': is a directory, not a "
                          "gin file")


def test_relative_data_paths_are_bound_absolute_through_symlinks(tmp_path, monkeypatch):
  """W/config.gin records relative data paths absolute; `lnk/../day.tsv` folded as text
  named another file when `lnk` is a symlink (the run then read no file)."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib  # pylint: disable=import-outside-toplevel
  (tmp_path / "real" / "sub").mkdir(parents=True)
  (tmp_path / "real" / "day.tsv").write_text("")
  (tmp_path / "cwd").mkdir()
  (tmp_path / "cwd" / "data.tsv").write_text("")
  (tmp_path / "cwd" / "lnk").symlink_to(tmp_path / "real" / "sub")
  monkeypatch.chdir(tmp_path / "cwd")
  launch.parse_gin([os.path.join(ROOT, "configs", "dlrm_synthetic.gin")],
                   ["ExperimentConfig.train_data='lnk/../day.tsv'",
                    "ExperimentConfig.eval_data='./data.tsv'"])
  config_lib.absolute_data_paths()
  train = gin.query_parameter("ExperimentConfig.train_data")
  assert os.path.isabs(train) and os.path.samefile(train, tmp_path / "real" / "day.tsv")
  assert gin.query_parameter("ExperimentConfig.eval_data") == str(tmp_path / "cwd" / "data.tsv")


def test_a_gin_file_that_is_not_utf8_names_the_byte_and_line(tmp_path):
  """gin's error was the codec's name alone: `--gin_file: x.gin: utf-8`."""
  path = tmp_path / "latin1.gin"
  path.write_bytes(b"# caf\xc3\xa9\nExperimentConfig.batch_size = 64  # na\xefve\n")
  with pytest.raises(ConfigError) as e:
    launch.parse_gin([str(path)], [])
  assert str(e.value) == (f"--gin_file: {path}:2: not UTF-8 text (byte 0xef at column 39); "
                          "save the file as UTF-8")
  outer = tmp_path / "outer.gin"
  outer.write_text(f"DLRM.dtype = 'float32'\ninclude '{path}'\n")
  with pytest.raises(ConfigError) as e:
    launch.parse_gin([str(outer)], [])
  assert str(e.value) == (f"--gin_file: {path}:2: not UTF-8 text (byte 0xef at column 39); "
                          f"save the file as UTF-8 (included at {outer}:2)")


@pytest.mark.parametrize("text, line, message", [
    ("DLRM.top_mlp = (\n  8,\n  1)\nDLRM.bottom_mlp = [4,\n  (2, 3)\n", 4,
     "the '\\[' at column 19 is not closed by the end of the file"),
    ("DLRM.dtype = 'float32'\n\nDLRM.dtype = '''bf\n", 3,
     "the string at column 14 is not closed by the end of the file"),
])
def test_an_unclosed_bracket_or_string_in_a_file_names_its_line(tmp_path, text, line, message):
  """gin's TokenError has no line: `--gin_file: x.gin: EOF in multi-line statement`, and
  through an include a tuple, `('EOF in multi-line statement', (3, 0))`."""
  path = tmp_path / "open.gin"
  path.write_text(text)
  with pytest.raises(ConfigError, match=rf"^--gin_file: {path}:{line}: {message}$"):
    launch.parse_gin([str(path)], [])
  outer = tmp_path / "outer.gin"
  outer.write_text(f"include '{path}'\n")
  with pytest.raises(ConfigError, match=rf"^--gin_file: {path}:{line}: {message} "
                     rf"\(included at {outer}:1\)$"):
    launch.parse_gin([str(outer)], [])
