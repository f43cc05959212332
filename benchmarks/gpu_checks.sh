#!/usr/bin/env bash
# Every check that needs a GPU, in one run (a lent GPU machine is held for minutes only):
#   1. tests/kernels with the Pallas kernels compiled by Triton (INTERPRET is False on a GPU);
#   2. benchmarks/kernels.py (fused lookup / device copy bandwidth, goal 0.8) for float32,
#      bfloat16 and int8 tables;
#   3. scripts/train.py on configs/dlrm_criteo.gin with EmbeddingOptions.kernel='pallas' and
#      'xla': losses compared step by step (JSON line "gpu_train_compare"), ex/s of each;
#      then criteo with a bfloat16 model, and dlrm_synthetic (multi-hot bags), on Pallas;
#   4. benchmarks/vs_torchrec.py --skip_torchrec --breakdown (jaxrec vs the 60-line JAX
#      DLRM; no TorchRec on the GPU image), embedding_scaling.py, offload.py (shortened) and
#      checkpoint.py;
#   5. benchmarks/kernels.py --sweep (float32): the Pallas kernels under each Triton launch
#      setting (warps, stages, elements per program), into sweep.log.
# Writes into OUT_DIR: summary.log (each step's rc, seconds and last lines), bench.jsonl
# (every benchmark JSON line), kernel_tests.log, train.log, metrics_{pallas,xla}.jsonl,
# sweep.log (8 files: what one device run brings back at most).
#
#   benchmarks/gpu_checks.sh OUT_DIR [STEPS]    (PYTHON=python3 by default; run from the repo)
#
# Time: steps 1-3 and the scaling benchmark took 118 s on an H200 (2026-12-04); with the
# offload, checkpoint and sweep steps added since, expect ~6-8 minutes (each step has its
# own limit; the sweep comes last, so a run cut short still brings back the rest).
set -u
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR [STEPS]}
steps=${2:-300}
py=${PYTHON:-python3}
mkdir -p "$out"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)

step() {  # step NAME SECONDS LOG CMD...: runs CMD with a time limit, appends to LOG
  local name=$1 limit=$2 log=$3 start rc
  shift 3
  start=$(date +%s)
  echo "== $name" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  rc=$?
  { echo "== $name: rc=$rc, $(( $(date +%s) - start )) s"; tail -n 4 "$log"; } >> "$out/summary.log"
}

step env 60 "$out/kernel_tests.log" "$py" -c \
  "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
step kernel_tests 200 "$out/kernel_tests.log" \
  "$py" -m pytest -q -p no:cacheprovider -n 4 -rf tests/kernels
for dtype in float32 bfloat16 int8; do
  step "kernels_$dtype" 90 "$out/bench.log" "$py" benchmarks/kernels.py --dtype="$dtype"
done
for kernel in pallas xla; do
  step "train_$kernel" 120 "$out/train.log" "$py" scripts/train.py --workdir="$work/$kernel" \
    --gin_file=configs/dlrm_criteo.gin --train_data=synthetic --eval_data=synthetic \
    --num_steps="$steps" --log_every=50 --eval_every=0 --plan=dp \
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
step train_criteo_bf16 120 "$out/train.log" "$py" scripts/train.py --workdir="$work/bf16" \
  --gin_file=configs/dlrm_criteo.gin --train_data=synthetic --eval_data=synthetic \
  --num_steps="$steps" --log_every=50 --eval_every=0 --plan=dp \
  --gin_bindings="DLRM.dtype='bfloat16'"
step train_synthetic 120 "$out/train.log" "$py" scripts/train.py --workdir="$work/synthetic" \
  --gin_file=configs/dlrm_synthetic.gin --num_steps="$steps" --log_every=50 --eval_every=0
step vs_naive 150 "$out/bench.log" "$py" benchmarks/vs_torchrec.py --skip_torchrec --breakdown
step embedding_scaling 90 "$out/bench.log" "$py" benchmarks/embedding_scaling.py --rounds=3
step offload 150 "$out/bench.log" "$py" benchmarks/offload.py --steps=200 --rounds=3 \
  --stream_steps=600
step checkpoint 90 "$out/bench.log" "$py" benchmarks/checkpoint.py
grep -h '^{' "$out/bench.log" > "$out/bench.jsonl"
step kernels_sweep 240 "$out/sweep.log" "$py" benchmarks/kernels.py --sweep
rm -rf "$work"
cat "$out/summary.log"
