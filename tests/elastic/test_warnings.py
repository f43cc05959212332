"""A worker's warning for the user (the trainer's unused gin bindings) reaches the
supervisor's stderr and `W/events.jsonl` once per job, not only `W/workers/<p>.log`."""

import os

from jaxrec.elastic import stragglers, supervisor as sup, watching, worker
from tests.elastic import elastic_testlib as t

MESSAGE = "warning: gin bindings that no configurable of this run used ...: SGD.x (a.gin:3)"


def _as_worker(monkeypatch, w, generation):
  monkeypatch.setattr(worker, "_WORKER", worker._Worker({   # pylint: disable=protected-access
      worker.ENV_GENERATION: str(generation), worker.ENV_WORKDIR: w,
      worker.ENV_PROCESS_ID: "0"}))


def test_each_generations_warning_is_printed_once(tmp_path, monkeypatch, capsys):
  w = str(tmp_path)
  s = sup.Supervisor(sup.Options(num_processes=1, devices_per_process=2),
                     [f"--workdir={w}", "--gin_file=configs/x.gin"])
  s.procs = [watching.WorkerProc(0, None, None, 0.0)]
  s.detectors = (stragglers.Detector("process", 1.5, 3, 20),
                 stragglers.Detector("shard", 1.5, 3, 20))
  for generation in (0, 1):            # a restarted generation's trainer warns again
    s.generation = generation
    _as_worker(monkeypatch, w, generation)
    assert worker.report_warning(MESSAGE)
    s._read_progress(0.0)               # pylint: disable=protected-access
    worker._worker()._file.close()      # pylint: disable=protected-access
  assert capsys.readouterr().err == MESSAGE + "\n"
  assert [(e["event"], e["generation"], e["message"]) for e in t.events(w)] == [
      ("warning", 0, MESSAGE)]


def test_a_plain_run_reports_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(worker, "_WORKER", worker._Worker({}))   # pylint: disable=protected-access
  assert worker.report_warning(MESSAGE) is False
  assert not os.path.exists(tmp_path / "workers")

