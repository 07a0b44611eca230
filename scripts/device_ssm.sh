#!/usr/bin/env bash
# Device-machine check of the Triton KV-SSM kernels (scan, conv, output gates): their tests (compiled, GPU sizes, bf16), then
# benchmarks/bench_ssm.py. Full logs, a JUnit XML with the measured relative errors and the
# benchmark JSON go under $OUT; a short summary and the timing table are printed last.
#
#   OUT=/tmp/ssm bash scripts/device_ssm.sh
# SSM_DEVICE_BUDGET_S (default 285) caps the whole script so the summary always prints.
set -u
budget="${SSM_DEVICE_BUDGET_S:-285}"
OUT="${OUT:-/tmp/device_ssm}"
source "$(dirname "$0")/device_env.sh"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; \
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/environment.txt" 2>&1

# Every test runs (no -x) so that one failure does not hide the others' errors.
timeout -k 10 $((budget * 3 / 5)) python -m pytest tests/apps/attamba/test_ssd_triton.py tests/apps/attamba/test_gated_norm_triton.py -q -rfE -p no:cacheprovider -o junit_family=xunit1 \
  --junitxml="$OUT/junit_ssd_triton.xml" > "$OUT/pytest.txt" 2>&1
echo "pytest exit code $?" >> "$OUT/pytest.txt"

timeout -k 10 $((budget - SECONDS - 10)) python benchmarks/bench_ssm.py --out "$OUT/bench_ssm.json" > "$OUT/bench.txt" 2>&1
echo "bench exit code $?" >> "$OUT/bench.txt"

cat "$OUT/environment.txt"
grep -E "^(FAILED|ERROR)|passed|exit code" "$OUT/pytest.txt" | tail -25
# Largest relative error per quantity over the GPU tests, from the properties they recorded.
python - "$OUT/junit_ssd_triton.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
worst = {}
for case in ET.parse(sys.argv[1]).iter("testcase"):
    kind = "bf16" if "bf16" in case.get("name", "") else "fp32"
    for prop in case.iter("property"):
        key = (kind, prop.get("name"))
        worst[key] = max(worst.get(key, 0.0), float(prop.get("value")))
for (kind, name), value in sorted(worst.items()):
    print(f"max rel err {kind:<5} {name:<8} {value:.2e}")
PY
tail -30 "$OUT/bench.txt"
