# Set-up is two commands: `make train` and `make test`; each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
WORKDIR ?= runs/dlrm_synthetic
TRAIN_FLAGS ?=
# `make bench BENCH="mesh_overhead planner"`: those scripts only (default: every one)
BENCH ?=
export PYTHONUNBUFFERED := 1

.PHONY: train test test-slow bench bench-torchrec clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

train: $(STAMP)
	$(PY) scripts/train.py --workdir=$(WORKDIR) --gin_file=configs/dlrm_synthetic.gin \
	  --num_steps=1000 --log_every=100 --eval_every=500 --plan=dp $(TRAIN_FLAGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile -m slow

bench: $(STAMP)
	@# common.py is shared code; naive_dlrm.py is a worker that vs_torchrec.py runs
	@for n in $(BENCH); do case $$n in common|naive_dlrm) echo "make bench: BENCH: $$n is" \
	  "not a benchmark (shared code, or vs_torchrec's worker)" >&2; exit 2;; esac; \
	  [ -f benchmarks/$$n.py ] || { echo "make bench: BENCH: no" \
	  "benchmarks/$$n.py (names: $$(cd benchmarks && ls *.py | sed 's/\.py$$//' | \
	  grep -vx 'common\|naive_dlrm' | tr '\n' ' '))" >&2; exit 2; }; done
	@for b in $(if $(BENCH),$(patsubst %,benchmarks/%.py,$(BENCH)),benchmarks/*.py); do \
	  case $$b in */common.py|*/naive_dlrm.py) continue;; esac; \
	  echo "== $$b" >&2; $(PY) $$b || exit 1; done

bench-torchrec:
	$(MAKE) -C third_party/torchrec_reference bench

clean:
	rm -rf runs .pytest_cache
