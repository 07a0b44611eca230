#!/usr/bin/env bash
# Device-machine check of decoding (issue 5), in one call so that every row compares: the GPU tests
# of the decode kernels (apps/attamba/ssm_step_triton.py, lingua/decode_attention.py) and of CUDA
# decoding against the full forward pass, then benchmarks/bench_decode.py for both 60M models with
# torch.compile and Programmatic Dependent Launch (`compile_pdl`; since one-row matmuls run as
# Inductor kernels, PDL speeds the transformer's step up too), each cache's default attention
# (Attamba: the split-key kernel; the transformer: SDPA, cuDNN).
# Logs and JSON go under $OUT; the test summary and the bench's tables are printed last.
#
#   OUT=/tmp/decode bash scripts/device_decode.sh
# CONTEXTS (default "32768 131072") and BATCHES (default "1 16") pick the rows, ATTAMBA_MODES
# and TRANSFORMER_MODES (default "compile_pdl" both) the bench_decode modes (say
# compile_pdl+kernel), BENCH_FLAGS extra flags for both; TEST_FILES and TEST_FILTER (pytest's -k;
# default: the decode tests of the GPU paths but max-autotune's slow compiles) and TEST_TIMEOUT
# (default 200 s) the tests. A row takes about 45 s on an H100 (a process, a compile, 64 steps).
# The default tests took ~320 s there (eighth session: 49 passed in the 200 s, the last 8 in 138 s
# more), so the tests and all 8 rows do not fit one 10-minute device call: run the rows alone with
# TEST_FILTER=no_such_test_name, and the tests with TEST_TIMEOUT=400 CONTEXTS=131072 BATCHES=1.
set -u
OUT="${OUT:-/tmp/device_decode}"
CONTEXTS="${CONTEXTS:-32768 131072}"
BATCHES="${BATCHES:-1 16}"
source "$(dirname "$0")/device_env.sh"

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/environment.txt" 2>&1
TEST_FILES="${TEST_FILES:-tests/lingua/test_decode_attention.py tests/lingua/test_decode_weights.py tests/apps/attamba/test_ssd_triton.py tests/apps/attamba/test_cache.py tests/lingua/test_generate.py}"
timeout -k 10 "${TEST_TIMEOUT:-200}" python -m pytest -q -rfE -p no:cacheprovider $TEST_FILES \
  -k "${TEST_FILTER:-(decode or cuda or one_row) and not max_autotune}" > "$OUT/pytest.txt" 2>&1
echo "pytest exit code $?" >> "$OUT/pytest.txt"

bench() {  # name, then bench_decode arguments
  local name=$1
  shift
  python benchmarks/bench_decode.py --contexts $CONTEXTS --batches $BATCHES --steps 64 --timeout 100 \
    ${BENCH_FLAGS:-} --out "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2>&1
}
bench attamba --models attamba --modes ${ATTAMBA_MODES:-compile_pdl}
bench transformer --models transformer --modes ${TRANSFORMER_MODES:-compile_pdl}

cat "$OUT/environment.txt"
grep -E "^(FAILED|ERROR)|passed|failed|exit code" "$OUT/pytest.txt" | tail -15
python benchmarks/bench_decode.py --summarize "$OUT/attamba.json" "$OUT/transformer.json"
