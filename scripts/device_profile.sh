#!/usr/bin/env bash
# Device-machine step profiles (benchmarks/profile_step.py): the 60M Attamba with and without
# packed documents, and the 60M transformer, at n=1024, batch 16. Writes $OUT/profile.txt.
#   OUT=/tmp/profile bash scripts/device_profile.sh
set -u
OUT="${OUT:-/tmp/device_profile}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
attamba=apps/attamba/configs/attamba_60m.yaml
transformer=apps/main/configs/transformer_60m.yaml
{
  python benchmarks/profile_step.py config=$attamba --mean-doc 512 ${ATTAMBA_EXTRA:-}
  python benchmarks/profile_step.py config=$attamba --mean-doc 0 --rows 12 ${ATTAMBA_EXTRA:-}
  python benchmarks/profile_step.py config=$transformer --mean-doc 512 --rows 12
} 2>&1 | grep -v "^USDT\|Warning\|warn(" | tee "$OUT/profile.txt"
