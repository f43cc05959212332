"""A store `path` belongs to one workdir: another workdir naming it (a copied workdir, two
jobs with the same gin) is refused before anything there is touched; its restore used to
delete and re-link the other run's store."""

import logging
import os
import shutil

import pytest

from jaxrec import offload
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.errors import ConfigError
from jaxrec.offload import snapshots
from jaxrec.offload.config import OffloadError
from jaxrec.offload.owner import OWNER, read_owner
from jaxrec.sharding.plan import uniform_plan
from tests.offload.offload_helpers import experiment, mesh_of


def _tier(workdir, path=None):
  cfg = experiment()
  off = offload.OffloadConfig((offload.OffloadTable(
      "big", cache_rows=1000, chunk_rows=256, path=path and str(path)),), prefetch_depth=0)
  specs = offload.device_tables(cfg.tables, off, cfg.sparse_tx())
  collection = EmbeddingCollection.create(specs, cfg.features, uniform_plan("dp", specs, 1),
                                          mesh_of(), cfg.sparse_tx())
  return offload.OffloadTier(collection, cfg.tables, off, key=offload.emb_init_key(0),
                             workdir=str(workdir))


def _files(path):
  return sorted((os.path.relpath(os.path.join(r, f), path), os.stat(os.path.join(r, f)).st_ino)
                for r, _, fs in os.walk(path) for f in fs)


def test_another_workdir_is_refused_before_touching_the_store(tmp_path):
  store = tmp_path / "ssd" / "big"
  first = _tier(tmp_path / "w1", store)
  first._ensure_store()
  assert read_owner(str(store)) == str(tmp_path / "w1")
  before = _files(store)
  with pytest.raises(ConfigError) as e:
    _tier(tmp_path / "w2", store)
  msg = str(e.value)
  for part in ("offloaded table 'big': its store", f"'{store}'", f"'{tmp_path / 'w1'}'",
               f"'{tmp_path / 'w2'}'", "fresh 'path' in OffloadConfig.tables", f"delete '{store / OWNER}'"):
    assert part in msg
  assert _files(store) == before            # nothing replaced, re-linked or re-owned
  first.close()
  os.remove(store / OWNER)                  # the documented hand-over
  _tier(tmp_path / "w2", store).close()
  assert read_owner(str(store)) == str(tmp_path / "w2")


def test_a_copied_workdir_takes_its_own_stores(tmp_path):
  """A `cp -r` copy of a workdir owns the copies of its stores (their OWNER files name the
  original's paths); the original keeps its own."""
  w1, w2 = tmp_path / "w1", tmp_path / "w2"
  t = _tier(w1)
  t._ensure_store()
  t.close()
  shutil.copytree(w1, w2)
  _tier(w2).close()
  _tier(w1).close()
  assert read_owner(str(w2 / "offload" / "big")) == str(w2)
  assert read_owner(str(w1 / "offload" / "big")) == str(w1)


def test_a_copied_store_belongs_to_its_user_but_the_original_stays_refused(tmp_path):
  """A store copied to another path (its OWNER names the original's path) is adopted; a
  workdir's own default store that another workdir claimed is refused to it too."""
  t = _tier(tmp_path / "w1", tmp_path / "ssd" / "big")
  t._ensure_store()
  t.close()
  shutil.copytree(tmp_path / "ssd" / "big", tmp_path / "ssd" / "big2")
  _tier(tmp_path / "w2", tmp_path / "ssd" / "big2").close()
  assert read_owner(str(tmp_path / "ssd" / "big2")) == str(tmp_path / "w2")
  legacy = tmp_path / "w3" / "offload" / "big"
  legacy.mkdir(parents=True)
  _tier(tmp_path / "w4", legacy).close()      # w4 names w3's store before w3 has run
  with pytest.raises(ConfigError, match="belongs to the workdir '.*/w4'") as e:
    _tier(tmp_path / "w3")
  assert "leave it unset" not in str(e.value)   # it named this same default path
  (legacy / "OWNER").write_text("garbage\n")       # it "belonged to the workdir 'garbage'"
  with pytest.raises(ConfigError, match=r"the OWNER file of its store '.*/w3/offload/big' is "
                     r"malformed \(it names 'garbage', not a workdir's absolute path\): if no "
                     r"other run uses this store, delete '.*/OWNER'"):
    _tier(tmp_path / "w3")


def test_a_copied_workdirs_store_is_not_taken_by_another_workdir(tmp_path):
  """`cp -r W W2` of a trained run: an unrelated workdir naming `W2/offload/big` as its
  `path` took the copy over (its OWNER names W's path: 'a copy, whoever uses it'), and
  W2's own run was then refused. The copy in W2's default place is W2's."""
  w1, w2 = tmp_path / "w1", tmp_path / "w2"
  t = _tier(w1)
  t._ensure_store()
  t.close()
  (w1 / "checkpoints").mkdir()   # a run's directory, as a trained one holds
  shutil.copytree(w1, w2)
  with pytest.raises(ConfigError, match=rf"offloaded table 'big': its store '{w2}/offload/big' "
                     rf"is the default store of the workdir '{w2}' \(a copy of "
                     rf"'{w1}/offload/big'\).*Give this run a fresh 'path'"):
    _tier(tmp_path / "wx", w2 / "offload" / "big")
  _tier(w2).close()
  assert read_owner(str(w2 / "offload" / "big")) == str(w2)


def test_a_store_without_owner_is_adopted(tmp_path, caplog):
  store = tmp_path / "old"
  store.mkdir()
  (store / "table").mkdir()                 # written before owner files existed
  with caplog.at_level(logging.WARNING, logger="jaxrec.offload.owner"):
    _tier(tmp_path / "w", store).close()
  assert read_owner(str(store)) == str(tmp_path / "w")
  assert "has no OWNER file: this workdir" in caplog.text


def test_snapshots_leave_the_owner_out_and_restores_keep_it(tmp_path):
  store, snaps = tmp_path / "ssd" / "big", tmp_path / "w" / "offload_snapshots"
  run = _tier(tmp_path / "w", store)
  run._ensure_store()
  snapshots.save(str(snaps), 1, {n: t.store for n, t in run.tables.items()}, None)
  assert not os.path.exists(snaps / "1" / "big" / OWNER)
  run.restore(1, str(snaps))
  assert read_owner(str(store)) == str(tmp_path / "w")
  run.close()


@pytest.mark.slow
def test_a_copied_workdir_with_an_explicit_path_stops_and_the_original_resumes(tmp_path):
  """Trainer level: `cp -r W W2` with the same gin (an explicit store path) resumed W2 by
  deleting and re-linking the store W trains; now W2 stops at start-up, W is untouched."""
  from tests.offload.offload_helpers import SMALL_DLRM, train_synthetic
  store = tmp_path / "ssd" / "t0"
  bindings = SMALL_DLRM + [f"OffloadConfig.tables={{'t0': {{'cache_rows': 4000, "
                           f"'path': '{store}'}}}}", "OffloadConfig.host_buffer_rows=600"]
  w = tmp_path / "w"
  train_synthetic(w, 10, bindings)
  copy = shutil.copytree(w, tmp_path / "w2")
  before = _files(store)
  with pytest.raises(ConfigError, match=f"its store '{store}' belongs to the workdir '{w}'"):
    train_synthetic(copy, 20, bindings)
  assert _files(store) == before
  assert train_synthetic(w, 20, bindings)["step"] == 20


def test_a_directory_holding_other_files_is_not_adopted(tmp_path):
  """`path` naming an existing directory of the user's (`/ssd` for `/ssd/big`) was adopted:
  every snapshot linked all its files and every restore deleted all but the snapshot's,
  losing any file added since the last checkpoint."""
  store = tmp_path / "ssd"
  store.mkdir()
  (store / "notes.txt").write_text("keep")
  with pytest.raises(ConfigError, match=rf"^offloaded table 'big': its store directory "
                     rf"'{store}' \('path' in OffloadConfig.tables\) already holds 'notes.txt', which is not "
                     r"an offload store: give the table a directory of its own"):
    _tier(tmp_path / "w", store)
  assert sorted(os.listdir(store)) == ["notes.txt"]


def test_snapshots_and_restores_touch_only_the_store_arrays(tmp_path):
  """A file that lands in a store directory later is neither snapshotted nor deleted."""
  store, snaps = tmp_path / "ssd" / "big", tmp_path / "w" / "offload_snapshots"
  run = _tier(tmp_path / "w", store)
  run._ensure_store()
  (store / "later.txt").write_text("mine")
  snapshots.save(str(snaps), 1, {n: t.store for n, t in run.tables.items()}, None)
  assert not os.path.exists(snaps / "1" / "big" / "later.txt")
  run.restore(1, str(snaps))
  assert (store / "later.txt").read_text() == "mine"
  run.close()


@pytest.mark.parametrize("where,message", [
    ("w", "is the workdir"), (".", "holds the workdir '{w}'"),
    ("w/checkpoints/big", "is inside '{w}/checkpoints', which the run rewrites"),
    ("w/offload_snapshots/x", "is inside '{w}/offload_snapshots', which the run rewrites")])
def test_a_store_path_overlapping_the_run_files_is_refused(tmp_path, where, message):
  """A store in the workdir's checkpoints was rewritten by the restore (it deleted the
  checkpoint being resumed); one holding the workdir snapshotted its snapshots into
  themselves ('File name too long')."""
  w = tmp_path / "w"
  path = os.path.normpath(tmp_path / where)
  with pytest.raises(ConfigError, match=rf"its store directory '{path}' \('path' in OffloadConfig.tables\) "
                     rf"{message.format(w=w)}: give it a directory of its own"):
    _tier(w, path)


def test_a_store_path_that_cannot_be_a_directory_is_one_error(tmp_path):
  """A file in the way was a NotADirectoryError traceback."""
  (tmp_path / "afile").write_text("")
  with pytest.raises(ConfigError, match=r"^offloaded table 'big': its store directory cannot "
                     r"be used \('path' in OffloadConfig.tables\): Not a directory: .*afile/t0/OWNER'$"):
    _tier(tmp_path / "w", tmp_path / "afile" / "t0")


def test_a_missing_existing_store_stops_the_run_before_it_writes_its_files(tmp_path):
  """`'init': 'existing'` with nothing at `path` was found at the first batch, after the
  run had written config.gin, plan.json, tb/ and metrics.jsonl: the one-line error left a
  new workdir behind. The stores are now opened before those writes."""
  from tests.offload.offload_helpers import SMALL_DLRM, train_synthetic
  w, store = tmp_path / "w", tmp_path / "nothing"
  bindings = SMALL_DLRM + [f"OffloadConfig.tables={{'t0': {{'cache_rows': 4000, 'path': "
                           f"'{store}', 'init': 'existing'}}}}"]
  with pytest.raises(ConfigError, match=r"^offloaded table 't0': cannot open tensorstore "
                     r"array .*nothing/table.* \('init': 'existing' opens the arrays an "
                     r"earlier run's store holds at its 'path': table, opt.accum\)$"):
    train_synthetic(w, 10, bindings)
  assert not w.exists()
  assert not store.exists()   # the claim's OWNER (in a directory it made) went with it


def test_a_run_refused_at_its_start_hands_its_store_claims_back(tmp_path):
  """The OWNER files a refused run wrote named a workdir that was then removed, so every
  later run of another workdir was refused ("belongs to the workdir ..."). A directory the
  claim made goes, an adopted store loses the OWNER, a copy's gets its old text back; a
  store the run already owned keeps it."""
  made, adopted = tmp_path / "ssd" / "new" / "big", tmp_path / "old"
  (adopted / "table").mkdir(parents=True)
  _tier(tmp_path / "w1", made).close(refused=True)
  assert not (tmp_path / "ssd").exists()
  _tier(tmp_path / "w1", adopted).close(refused=True)
  assert sorted(os.listdir(adopted)) == ["table"]
  _tier(tmp_path / "w2", adopted).close()     # a later run of another workdir
  assert read_owner(str(adopted)) == str(tmp_path / "w2")
  copy = shutil.copytree(adopted, tmp_path / "copy")
  text = (copy / OWNER).read_text()
  _tier(tmp_path / "w3", copy).close(refused=True)
  assert (copy / OWNER).read_text() == text
  _tier(tmp_path / "w2", adopted).close(refused=True)
  assert read_owner(str(adopted)) == str(tmp_path / "w2")


def test_a_claim_made_while_building_the_tier_is_handed_back(tmp_path, monkeypatch):
  """An error after the claim inside the tier's construction releases it too."""
  from jaxrec.offload import tier as tier_lib  # pylint: disable=import-outside-toplevel

  def broken(*args, **kwargs):
    raise MemoryError("no host memory for the buffer")

  monkeypatch.setattr(tier_lib, "HostBuffer", broken)
  with pytest.raises(MemoryError):
    _tier(tmp_path / "w", tmp_path / "ssd" / "big")
  assert not (tmp_path / "ssd").exists()


def test_a_claim_refused_part_way_hands_back_the_stores_it_claimed_first(tmp_path):
  """A second store path that cannot be made (`/proc/...`) was an error, but the first
  store's new OWNER stayed, naming a workdir never made: every other workdir was refused."""
  from jaxrec.offload import owner  # pylint: disable=import-outside-toplevel
  first = tmp_path / "stores" / "t0"
  with pytest.raises(ConfigError, match="offloaded table 't1': its store directory cannot be "
                     "used"):
    owner.claim({"t0": str(first), "t1": "/proc/jaxrec-test/t1"}, str(tmp_path / "w"))
  assert not (tmp_path / "stores").exists()
  assert owner.claim({"t0": str(first)}, str(tmp_path / "w2"))   # another workdir takes it


def test_nested_claims_are_handed_back_whole(tmp_path):
  """Released first to last, the first claim's directory (`W/offload`) still held the
  second's store: `W/offload/t0` was left behind (and so the workdir)."""
  from jaxrec.offload import owner  # pylint: disable=import-outside-toplevel
  w = tmp_path / "w"
  w.mkdir()
  claims = owner.claim({"t0": str(w / "offload" / "t0"), "t1": str(w / "offload" / "t1")},
                       str(w))
  (w / "offload" / "t0" / "table").mkdir()    # t0's fresh arrays
  (w / "offload" / "t0" / "table" / "zarr.json").write_text("{}")
  owner.release(claims)
  assert os.listdir(w) == []


def test_existing_arrays_a_killed_run_of_this_workdir_changed_are_refused(tmp_path):
  """`'init': 'existing'`, killed before its first checkpoint, then the same command: the
  rerun trained on the half-updated arrays with fresh dense layers, without a word (2,012
  of 2,442 store files rewritten by the killed run). The first change writes
  `<store>/TRAINED` naming the workdir; a fresh start of that workdir is refused. Another
  workdir may still start from them (a store handed over, or copied)."""
  from tests.offload.offload_helpers import SMALL_DLRM, train_synthetic
  source = tmp_path / "trained"
  train_synthetic(tmp_path / "w0", 10, SMALL_DLRM + [
      f"OffloadConfig.tables={{'t0': {{'cache_rows': 4000, 'path': '{source}'}}}}"])
  store = shutil.copytree(source, tmp_path / "existing")   # the user's copy to start from
  bindings = SMALL_DLRM + [f"OffloadConfig.tables={{'t0': {{'cache_rows': 4000, 'path': "
                           f"'{store}', 'init': 'existing'}}}}"]
  w = tmp_path / "w"
  train_synthetic(w, 10, bindings)
  assert (store / "TRAINED").read_text() == f"{w}\n"
  shutil.rmtree(w / "checkpoints")       # as if killed before its first checkpoint
  shutil.rmtree(w / "offload_snapshots")
  with pytest.raises(OffloadError, match=r"^offloaded table 't0': the arrays at '.*existing' "
                     r"\('init': 'existing'\) were changed in place by an earlier run of "
                     r"this workdir .* Put the original arrays back and delete "
                     r".*existing/TRAINED, or train on them as they are from a fresh "
                     r"--workdir \(delete .*existing/OWNER to hand the store over\)"):
    train_synthetic(w, 10, bindings)
  os.remove(store / OWNER)                # handed over: another workdir trains them on
  train_synthetic(tmp_path / "w2", 10, bindings)
  assert (store / "TRAINED").read_text() == f"{tmp_path / 'w2'}\n"


def test_a_fresh_rerun_over_its_own_killed_runs_arrays_does_not_advise_training_them(
    tmp_path, caplog):
  """A run killed during its first run (no checkpoint) left arrays in its own store; the
  rerun's warning advised `'init': 'existing'` to train them, a half-written table."""
  from tests.offload.offload_helpers import SMALL_DLRM, train_synthetic
  w = tmp_path / "w"
  bindings = SMALL_DLRM + ["OffloadConfig.tables={'t0': {'cache_rows': 4000}}"]
  train_synthetic(w, 10, bindings)
  shutil.rmtree(w / "checkpoints")       # as if killed before its first checkpoint
  shutil.rmtree(w / "offload_snapshots")
  with caplog.at_level(logging.WARNING):
    train_synthetic(w, 10, bindings)
  assert ("a fresh run replaces the arrays an earlier run of this workdir left at "
          f"{w}/offload/t0") in caplog.text, caplog.text
  assert "would train them" not in caplog.text


def test_a_run_failing_before_its_first_checkpoint_hands_its_store_back(tmp_path):
  """A cache too small for the first batch stopped the run at step 1 and left its new
  store (311 MB at 5M rows) with its OWNER: a corrected run in another workdir on the same
  `path` was refused as the store of a workdir that never trained."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train import config as config_lib, loop  # pylint: disable=C0415
  store = tmp_path / "ssd" / "t0"

  def run(workdir, cache_rows):
    launch.parse_gin(["configs/dlrm_synthetic.gin"], [
        "ExperimentConfig.batch_size=64", "ExperimentConfig.num_eval_examples=128",
        "ExperimentConfig.eval_batch_size=64",
        f"OffloadConfig.tables = {{'t0': {{'cache_rows': {cache_rows}, 'path': '{store}'}}}}"])
    options = config_lib.RunOptions(num_steps=2, mesh="data=8", plan="dp", progress=False)
    loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(workdir))

  with pytest.raises(OffloadError, match=r"distinct rows but the cache holds 8"):
    run(tmp_path / "w1", 8)
  assert not store.exists()
  run(tmp_path / "w2", 1024)
  assert read_owner(str(store)) is not None
