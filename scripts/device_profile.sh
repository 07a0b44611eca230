#!/usr/bin/env bash
# Device-machine step profiles (benchmarks/profile_step.py): the 60M Attamba with and without
# packed documents, and the 60M transformer, at n=1024, batch 16. Writes $OUT/profile.txt.
#   OUT=/tmp/profile bash scripts/device_profile.sh
# PROFILE_ARGS goes to every profile (e.g. "--seq-len 4096 --batch 4"); ATTAMBA_EXTRA and
# TRANSFORMER_EXTRA add config overrides to one model (e.g. distributed.compile_mode=reduce-overhead).
# NO_DOCS=false skips the Attamba profile without documents.
set -u
OUT="${OUT:-/tmp/device_profile}"
source "$(dirname "$0")/device_env.sh"
attamba=apps/attamba/configs/attamba_60m.yaml
transformer=apps/main/configs/transformer_60m.yaml
args="${PROFILE_ARGS:-}"
{
  python benchmarks/profile_step.py config=$attamba --mean-doc 512 $args ${ATTAMBA_EXTRA:-}
  [ "${NO_DOCS:-true}" = true ] && python benchmarks/profile_step.py config=$attamba --mean-doc 0 --rows 12 $args ${ATTAMBA_EXTRA:-}
  python benchmarks/profile_step.py config=$transformer --mean-doc 512 --rows 12 $args ${TRANSFORMER_EXTRA:-}
} 2>&1 | grep -v "^USDT\|Warning\|warn(" | tee "$OUT/profile.txt"
