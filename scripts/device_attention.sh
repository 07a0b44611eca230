#!/usr/bin/env bash
# Device-machine check of Attamba's attention kernels: their GPU tests, the tile sweep
# (benchmarks/tune_attention_triton.py) and the attention benchmark (benchmarks/bench_attention.py:
# triton, flex, sdpa_dense, causal flash). Logs and JSON go under $OUT; the tables print last.
#
#   OUT=/tmp/attention bash scripts/device_attention.sh
# TUNE=false skips the tile sweep; BENCH_ARGS goes to bench_attention.py (e.g. "--seq-lens 16384");
# DOCS=false skips the second benchmark, with packed documents of mean length 512 (as training).
set -u
OUT="${OUT:-/tmp/device_attention}"
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/environment.txt"
timeout -k 10 240 python -m pytest -q -p no:cacheprovider tests/apps/attamba/test_attention_triton.py \
  tests/apps/attamba/test_attention.py -k "gpu or cuda" > "$OUT/pytest.txt" 2>&1
echo "pytest exit code $?" >> "$OUT/pytest.txt"
if [ "${TUNE:-true}" = true ]; then
  timeout -k 10 240 python benchmarks/tune_attention_triton.py --kernels --out "$OUT/tune.json" > "$OUT/tune.txt" 2>&1
fi
timeout -k 10 200 python benchmarks/bench_attention.py ${BENCH_ARGS:-} --out "$OUT/bench_attention.json" > "$OUT/bench.txt" 2>&1
if [ "${DOCS:-true}" = true ]; then
  timeout -k 10 150 python benchmarks/bench_attention.py --mean-doc 512 --seq-lens 1024 4096 16384 --impls triton flex causal \
    --out "$OUT/bench_attention_documents.json" > "$OUT/bench_documents.txt" 2>&1
fi
grep -E "^(FAILED|ERROR)|passed|failed|exit code" "$OUT/pytest.txt" | tail -12
[ -f "$OUT/tune.txt" ] && sed -n '/^n=/,$p' "$OUT/tune.txt"
grep -v "^measured" "$OUT/bench.txt" | tail -20
[ -f "$OUT/bench_documents.txt" ] && grep -v "^measured" "$OUT/bench_documents.txt" | tail -12
