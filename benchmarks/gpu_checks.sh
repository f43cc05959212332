#!/usr/bin/env bash
# Every check that needs a GPU, in one run (a lent GPU machine is held for minutes only).
# The checks, in the order they run (what is least known first, so a run cut short still
# brings back the most):
#   memory_warning tests/train/test_step_memory.py on the GPU: its bytes_limit read (at a
#                  0.5% memory fraction) and an eval step measured past it warned about;
#   kernels        benchmarks/kernels.py (fused lookup / device copy bandwidth, goal 0.8) for
#                  float32, bfloat16 and int8 tables;
#   sweep          benchmarks/kernels.py --sweep, float32: the Pallas kernels under each
#                  Triton launch setting (warps, stages, elements per program, unrolled slots);
#   train_bf16     scripts/train.py, configs/dlrm_criteo.gin with a bfloat16 model;
#   train_multihot scripts/train.py, configs/dlrm_synthetic.gin (multi-hot bags);
#   benchmarks     vs_torchrec.py --skip_torchrec --breakdown (jaxrec vs the 60-line JAX
#                  DLRM on 2 of the host's CPU cores, as always: a second CPU to compare;
#                  no TorchRec on the GPU image), offload.py (shortened), checkpoint.py,
#                  embedding_scaling.py;
#   sweep_int8     the sweep again with an int8 table;
#   kernel_tests   tests/kernels with the Pallas kernels compiled by Triton;
#   train_compare  criteo with EmbeddingOptions.kernel='pallas' and 'xla': losses compared
#                  step by step (JSON line "gpu_train_compare"), ex/s of each.
# CHECKS="sweep kernels" runs only those, in that order. Writes into OUT_DIR: summary.log
# (each step's rc, seconds and last lines), bench.log, sweep.log, bench.jsonl (the JSON lines
# of both), kernel_tests.log, train.log, metrics_{pallas,xla}.jsonl: the 8 files one device
# run brings back at most; a rerun into the same OUT_DIR starts them afresh. Stops (exit 1)
# when the env step finds no GPU backend; otherwise runs every step and exits 1 if any failed.
#
#   benchmarks/gpu_checks.sh OUT_DIR [STEPS]    (PYTHON=python3 by default; run from the repo)
#
# Time (H200, 2026-12-04): kernel tests, the kernel benchmark, train_compare and scaling took
# 118 s; with everything, expect ~6-8 minutes (each step has its own limit).
set -u
case ${1:-} in   # --help was taken as OUT_DIR: mkdir printed its help, every log write failed
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  -*) echo "gpu_checks.sh: unknown option '$1' (usage: benchmarks/gpu_checks.sh OUT_DIR" \
        "[STEPS]; --help)" >&2; exit 2 ;;
esac
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR [STEPS]}
steps=${2:-300}
py=${PYTHON:-python3}
all_checks="memory_warning kernels sweep train_bf16 train_multihot benchmarks sweep_int8"
all_checks="$all_checks kernel_tests train_compare"
checks=${CHECKS:-$all_checks}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed=()
step() {  # step NAME SECONDS LOG CMD...: runs CMD with a time limit, appends to LOG
  local name=$1 limit=$2 log=$3 start rc
  shift 3
  start=$(date +%s)
  echo "== $name" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed+=("$name")
  { echo "== $name: rc=$rc, $(( $(date +%s) - start )) s"; tail -n 4 "$log"; } >> "$out/summary.log"
  cat "$out/bench.log" "$out/sweep.log" 2>/dev/null | grep '^{' > "$out/bench.jsonl"
}

train() {  # train NAME GIN_FILE [FLAGS...]: STEPS steps of scripts/train.py into $work/NAME
  local name=$1 gin=$2
  shift 2
  step "train_$name" 120 "$out/train.log" "$py" scripts/train.py --workdir="$work/$name" \
    --gin_file="$gin" --num_steps="$steps" --log_every=50 --eval_every=0 "$@"
}

criteo=(--train_data=synthetic --eval_data=synthetic --plan=dp)

check_kernels() {
  local dtype
  for dtype in float32 bfloat16 int8; do
    step "kernels_$dtype" 90 "$out/bench.log" "$py" benchmarks/kernels.py --dtype="$dtype"
  done
}
check_sweep() { step kernels_sweep 200 "$out/sweep.log" "$py" benchmarks/kernels.py --sweep; }
check_sweep_int8() {
  step kernels_sweep_int8 200 "$out/sweep.log" "$py" benchmarks/kernels.py --sweep --dtype=int8
}
check_train_bf16() {
  train criteo_bf16 configs/dlrm_criteo.gin "${criteo[@]}" --gin_bindings="DLRM.dtype='bfloat16'"
}
check_train_multihot() { train synthetic configs/dlrm_synthetic.gin; }
check_benchmarks() {
  step vs_naive 150 "$out/bench.log" "$py" benchmarks/vs_torchrec.py --skip_torchrec \
    --breakdown
  step offload 150 "$out/bench.log" "$py" benchmarks/offload.py --steps=200 --rounds=3 \
    --stream_steps=600
  step checkpoint 90 "$out/bench.log" "$py" benchmarks/checkpoint.py
  step embedding_scaling 90 "$out/bench.log" "$py" benchmarks/embedding_scaling.py \
    --rounds=3
}
check_memory_warning() {   # fails when the test is skipped (no GPU seen) as when it fails
  step memory_warning 120 "$out/kernel_tests.log" bash -c 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.005 \
    "$0" -m pytest -q -p no:cacheprovider -rs tests/train/test_step_memory.py -k real_gpu \
    | tee -a /dev/stderr | grep -q "^1 passed"' "$py"
}
check_kernel_tests() {
  step kernel_tests 200 "$out/kernel_tests.log" \
    "$py" -m pytest -q -p no:cacheprovider -n 4 -rf tests/kernels
}
check_train_compare() {
  local kernel
  for kernel in pallas xla; do
    train "$kernel" configs/dlrm_criteo.gin "${criteo[@]}" \
      --gin_bindings="EmbeddingOptions.kernel='$kernel'"
    cp "$work/$kernel/metrics.jsonl" "$out/metrics_$kernel.jsonl" 2>/dev/null
  done
  step train_compare 30 "$out/bench.log" \
    "$py" - "$out/metrics_pallas.jsonl" "$out/metrics_xla.jsonl" <<'EOF'
import json, sys
runs = [[json.loads(l) for l in open(p)] for p in sys.argv[1:]]
loss = [{r["step"]: r["loss"] for r in run if r.get("loss") is not None} for run in runs]
rate = [[r["examples_per_sec"] for r in run if r.get("examples_per_sec")] for run in runs]
auc = [[r["eval_auc"] for r in run if r.get("eval_auc") is not None] for run in runs]
common = sorted(set(loss[0]) & set(loss[1]))
diff = max(abs(loss[0][s] - loss[1][s]) / abs(loss[1][s]) for s in common)
print(json.dumps({"benchmark": "gpu_train_compare", "config": "dlrm_criteo", "steps": common,
                  "max_loss_rel_diff": diff, "examples_per_sec_pallas": rate[0][-1],
                  "examples_per_sec_xla": rate[1][-1], "eval_auc_pallas": auc[0][-1:],
                  "eval_auc_xla": auc[1][-1:]}))
EOF
}

for check in $checks; do
  if ! declare -F "check_$check" > /dev/null; then
    echo "gpu_checks.sh: unknown check '$check' in CHECKS (known:" \
      "$(declare -F | sed -n 's/^declare -f check_//p' | paste -sd ' '))" >&2
    exit 2
  fi
done
mkdir -p "$out"
rm -f "$out"/{summary,bench,sweep,kernel_tests,train}.log "$out"/bench.jsonl \
  "$out"/metrics_{pallas,xla}.jsonl   # a rerun's results were appended to the last run's
step env 60 "$out/kernel_tests.log" "$py" -c \
  "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices()); \
assert jax.default_backend() == 'gpu', 'no GPU backend: ' + jax.default_backend()"
if [ ${#failed[@]} -gt 0 ]; then   # every step would fail the same way (no cuda backend)
  why=$(grep -v '^== ' "$out/kernel_tests.log" | tail -n 1)   # e.g. no jax in $py
  echo "gpu_checks.sh: no GPU backend (JAX_PLATFORMS=$JAX_PLATFORMS, PYTHON=$py): ${why:-the" \
    "env step failed}; see $out/kernel_tests.log" >&2
  exit 1
fi
for check in $checks; do "check_$check"; done
cat "$out/summary.log"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_checks.sh: ${#failed[@]} step(s) failed: ${failed[*]}" >&2
  exit 1
fi
